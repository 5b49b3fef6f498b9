#!/usr/bin/env bash
# Builds the workspace with the `cuda` feature on a machine with no GPU and no system
# CUDA toolkit, using NVIDIA's CUDA 13.0 wheels from PyPI in a venv at
# .cache/cuda-venv/ (git-ignored, never committed; CUDA_VENV puts it elsewhere). CUDA 13
# is the first release whose PyPI wheels carry nvcc itself (the -cu12 nvcc wheels have
# only ptxas). Pinned wheels (the set that cuda-toolkit==13.0.2 resolves to):
#
#   nvidia-cuda-nvcc==13.0.88    -> nvcc, cudafe++, fatbinary, nvlink, ptxas
#   nvidia-nvvm==13.0.88         -> cicc, libnvvm, libdevice
#   nvidia-cuda-crt==13.0.88     -> include/crt (nvcc's host/device runtime headers)
#   nvidia-cuda-runtime==13.0.96 -> cuda_runtime.h, cuda_fp16.h, cuda_bf16.h, libcudart
#   nvidia-cuda-cccl==13.0.85    -> thrust, cub, libcu++ (include/cccl)
#   nvidia-cuda-nvrtc==13.0.88   -> libnvrtc
#   nvidia-cublas==13.1.0.3      -> libcublas, libcublasLt
#   nvidia-curand==10.4.0.35     -> libcurand
#
# They all install into one toolkit-shaped folder, site-packages/nvidia/cu13/, which
# becomes CUDA_HOME. The wheels ship only versioned libraries (libcublas.so.13), so the
# unversioned names the linker wants are symlinked next to them, and, as no wheel ships
# the driver library, lib/stubs/libcuda.so is a generated stub (empty functions under
# the names cudarc's driver bindings link to, soname libcuda.so.1), like the toolkit's
# own stubs: the built binary loads the real driver's libcuda.so.1 at run time.
#
# Then runs, with CUDA_COMPUTE_CAP (default 80; there is no nvidia-smi to ask), in
# CARGO_TARGET_DIR (default target/cuda, apart from the CPU build's target/):
#   cargo clippy --workspace --all-targets --features airlock/cuda -- -D warnings
#   cargo build -p airlock --features cuda --bin airlock
# With --check, only the clippy pass (every crate and target type-checked, no link).
# With --env, prints the environment as `export` lines and builds nothing
# (`eval "$(scripts/check-cuda.sh --env)"`).
#
# Running the binary needs an NVIDIA driver for CUDA 13 (580 or newer) and
# LD_LIBRARY_PATH=$CUDA_HOME/lib for the toolkit libraries.
#
# Idempotent: the venv is reused while its recorded wheel list matches, the symlinks and
# the stub are remade only when missing, and cargo rebuilds only what changed. Exits
# non-zero with a message on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${CUDA_VENV:-.cache/cuda-venv}"
PYTHON="${PYTHON:-python3}"
WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.1.0.3
  nvidia-curand==10.4.0.35
)
# library name -> the versioned file the wheels ship, in $CUDA_HOME/lib
LIBS=(
  cudart:libcudart.so.13
  nvrtc:libnvrtc.so.13
  cublas:libcublas.so.13
  cublasLt:libcublasLt.so.13
  curand:libcurand.so.10
)

MODE=build
case "${1:-}" in
  "") ;;
  --check) MODE=check ;;
  --env) MODE=env ;;
  *)
    echo "usage: $0 [--check | --env]" >&2
    exit 2
    ;;
esac

die() {
  echo "check-cuda: error: $*" >&2
  exit 1
}

log() {
  echo "check-cuda: $*" >&2
}

# The venv, with exactly $WHEELS installed.
stamp="$VENV/.airlock-wheels"
want="$(printf '%s\n' "${WHEELS[@]}")"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  log "installing the CUDA wheels into $VENV"
  if [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ] && [ -n "$(ls -A "$VENV")" ]; then
    die "$VENV exists and is not a venv; move it away or set CUDA_VENV"
  fi
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV" || die "could not create the venv (is python3-venv installed?)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${WHEELS[@]}" ||
    die "pip install of the CUDA wheels failed (is PyPI reachable?)"
  printf '%s\n' "$want" >"$stamp"
fi

site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
CUDA_HOME="$(cd "$site/nvidia/cu13" 2>/dev/null && pwd)" ||
  die "$site/nvidia/cu13 is missing; delete $VENV and run again"
[ -x "$CUDA_HOME/bin/nvcc" ] || die "$CUDA_HOME/bin/nvcc is missing; delete $VENV and run again"

# Unversioned names for the linker.
for entry in "${LIBS[@]}"; do
  name="${entry%%:*}" file="${entry#*:}"
  [ -f "$CUDA_HOME/lib/$file" ] || die "$CUDA_HOME/lib/$file is missing; delete $VENV and run again"
  [ -e "$CUDA_HOME/lib/lib$name.so" ] || ln -sfn "$file" "$CUDA_HOME/lib/lib$name.so"
done

export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda}"

# The driver stub: one empty function per cu* symbol that cudarc's driver bindings link
# to (read from the cudarc source that this lockfile resolves).
stub="$CUDA_HOME/lib/stubs/libcuda.so"
if [ ! -f "$stub" ]; then
  log "generating $stub"
  cudarc="$(cargo metadata --format-version 1 --locked --features airlock/cuda |
    "$PYTHON" -c 'import json, os, sys
pkgs = [p for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"]
print(os.path.dirname(pkgs[0]["manifest_path"]) if pkgs else "")')"
  [ -n "$cudarc" ] || die "cudarc is not in the cuda build's dependency graph"
  bindings="$cudarc/src/driver/sys/mod.rs"
  [ -f "$bindings" ] || die "$bindings is missing"
  mkdir -p "$(dirname "$stub")"
  src="$(mktemp --suffix=.c)"
  trap 'rm -f "$src"' EXIT
  sed -n 's/^ *fn \(cu[A-Za-z0-9_]*\)(.*/void \1(void) {}/p' "$bindings" | sort -u >"$src"
  [ -s "$src" ] || die "found no driver functions in $bindings"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub.partial" "$src" ||
    die "could not compile the libcuda stub"
  mv "$stub.partial" "$stub"
fi

if [ "$MODE" = env ]; then
  for var in CUDA_HOME PATH CUDA_COMPUTE_CAP CARGO_TARGET_DIR; do
    printf 'export %s=%q\n' "$var" "${!var}"
  done
  exit 0
fi

log "nvcc $("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), CUDA_HOME=$CUDA_HOME, CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, CARGO_TARGET_DIR=$CARGO_TARGET_DIR"

log "cargo clippy --workspace --all-targets --features airlock/cuda -- -D warnings"
cargo clippy --locked --workspace --all-targets --features airlock/cuda -- -D warnings ||
  die "clippy failed with the cuda feature"

if [ "$MODE" = check ]; then
  echo "check-cuda: OK: the workspace checks and is clippy-clean with --features cuda (CUDA 13.0, sm_$CUDA_COMPUTE_CAP)"
else
  log "cargo build -p airlock --features cuda --bin airlock"
  cargo build --locked -p airlock --features cuda --bin airlock ||
    die "cargo build failed with the cuda feature"
  echo "check-cuda: OK: $CARGO_TARGET_DIR/debug/airlock built with --features cuda (CUDA 13.0, sm_$CUDA_COMPUTE_CAP)"
fi
