#!/usr/bin/env bash
# Creates .cache/llamacpp-venv (git-ignored) with llama-cpp-python, the reference
# implementation our tokenizer fixtures and benchmarks are compared against:
#
#   llama-cpp-python==0.3.16 (built from source: it compiles llama.cpp with cmake/gcc)
#
# Idempotent: a venv that already imports the pinned version is left alone. The build
# uses CMAKE_BUILD_PARALLEL_LEVEL (default 2) jobs and takes several minutes on two
# cores. cmake comes from PyPI into the venv when the machine has none.
# Prints the venv's python on success, and nothing else on stdout (callers capture it);
# exits non-zero with a message on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.cache/llamacpp-venv
LLAMA_CPP_PYTHON_VERSION=0.3.16
PYTHON="${PYTHON:-python3}"

die() {
  echo "llamacpp-venv: error: $*" >&2
  exit 1
}

installed_version() {
  "$VENV/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null || true
}

if [ -x "$VENV/bin/python" ] && [ "$(installed_version)" = "$LLAMA_CPP_PYTHON_VERSION" ]; then
  echo "llamacpp-venv: llama-cpp-python $LLAMA_CPP_PYTHON_VERSION present in $VENV" >&2
  echo "$VENV/bin/python"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV" >&2 || die "could not create $VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2 \
  || die "could not upgrade pip in $VENV (is PyPI reachable?)"

if ! command -v cmake >/dev/null 2>&1 && [ ! -x "$VENV/bin/cmake" ]; then
  echo "llamacpp-venv: no cmake on PATH; installing it into $VENV" >&2
  "$VPY" -m pip install --quiet --disable-pip-version-check cmake >&2 \
    || die "could not install cmake"
fi

echo "llamacpp-venv: building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (several minutes)" >&2
PATH="$PWD/$VENV/bin:$PATH" \
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
  "$VPY" -m pip install --disable-pip-version-check \
  "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >&2 \
  || die "pip install llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION failed"

[ "$(installed_version)" = "$LLAMA_CPP_PYTHON_VERSION" ] \
  || die "llama_cpp does not import as version $LLAMA_CPP_PYTHON_VERSION after install"
echo "llamacpp-venv: ready" >&2
echo "$VPY"
