#!/usr/bin/env bash
# Local inference benchmark: Airlock's in-process engine against llama.cpp
# (llama-cpp-python) on the same GGUF files and against sentence-transformers on the
# same MiniLM folder, measured in the same run with the same thread count.
#
#   bash scripts/bench-local.sh [--quick] [--threads N]
#
# From a fresh clone: fetches the models (scripts/fetch-models.sh), creates the
# llama.cpp venv (scripts/llamacpp-venv.sh, .cache/llamacpp-venv, builds llama.cpp:
# several minutes) and a sentence-transformers venv (.cache/st-venv: torch from PyPI,
# a few GB; fine for a benchmark, not for CI), builds airlock-bench-local in release,
# then runs Airlock, llama.cpp and sentence-transformers one after the other with N
# threads each (default 2) and prints one Markdown table with the ratio. Raw results:
# target/bench/local-{airlock,llamacpp,st}.json; the table: target/bench/local.md.
# Full run: about 5 minutes of measurement on 2 cores; --quick: about 2.
#
# What is measured and how: benches/local/ (main.rs, baseline.py, data/plan.json) and
# docs/bench-local.md.
#
# Environment: LLAMACPP_VENV=DIR and ST_VENV=DIR use existing venvs (llama-cpp-python,
# sentence-transformers) instead of creating them under .cache.
# Models: .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf and all-MiniLM-L6-v2 always;
# Gemma 3 270M (gemma-3-270m-q4_k_m.gguf or gemma-3-270m-it-Q4_K_M.gguf) when present
# and Airlock can load it, else skipped with a note.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
T0=$(date +%s)

QUICK=()
THREADS=2
while [ "$#" -gt 0 ]; do
  case "$1" in
    --quick) QUICK=(--quick) ;;
    --threads) THREADS=${2:?--threads needs a number}; shift ;;
    --threads=*) THREADS=${1#--threads=} ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (use --quick, --threads N)" >&2; exit 64 ;;
  esac
  shift
done
case "$THREADS" in ''|*[!0-9]*|0) echo "--threads must be a positive integer" >&2; exit 64 ;; esac

log() { echo "bench-local: $*" >&2; }
PYTHON="${PYTHON:-python3}"
ST_VERSION=6.2.0

# --- models and venvs ------------------------------------------------------------------
bash scripts/fetch-models.sh >&2

if [ -n "${LLAMACPP_VENV:-}" ]; then
  LLAMA_PY="$LLAMACPP_VENV/bin/python"
else
  LLAMA_PY="$ROOT/$(bash scripts/llamacpp-venv.sh)"
fi
"$LLAMA_PY" -c 'import llama_cpp' || { log "no llama_cpp in $LLAMA_PY"; exit 1; }

st_version() { "$1" -c 'import sentence_transformers as s; print(s.__version__)' 2>/dev/null || true; }
if [ -n "${ST_VENV:-}" ]; then
  ST_PY="$ST_VENV/bin/python"
else
  ST_DIR=.cache/st-venv
  ST_PY="$ROOT/$ST_DIR/bin/python"
  if [ ! -x "$ST_PY" ] || [ "$(st_version "$ST_PY")" != "$ST_VERSION" ]; then
    log "creating $ST_DIR with sentence-transformers==$ST_VERSION (torch from PyPI: large)"
    [ -x "$ST_PY" ] || "$PYTHON" -m venv "$ST_DIR"
    "$ST_PY" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
    "$ST_PY" -m pip install --quiet --disable-pip-version-check \
      "sentence-transformers==$ST_VERSION" >&2
  fi
fi
[ -n "$(st_version "$ST_PY")" ] || { log "no sentence_transformers in $ST_PY"; exit 1; }

log "building airlock-bench-local (release)"
cargo build --release --locked -p airlock-bench-local >&2
BENCH="$ROOT/target/release/airlock-bench-local"

MODELS=.cache/models
GGUF=(--gguf "$MODELS/SmolLM2-135M-Instruct.Q4_1.gguf")
for gemma in gemma-3-270m-q4_k_m.gguf gemma-3-270m-it-Q4_K_M.gguf; do
  if [ -f "$MODELS/$gemma" ]; then GGUF+=(--gguf "$MODELS/$gemma"); break; fi
done
if [ "${#GGUF[@]}" = 2 ]; then
  echo "Note: Gemma 3 270M not in $MODELS (fetch-models.sh does not fetch it yet); skipped."
fi
EMBED="$MODELS/all-MiniLM-L6-v2"

# --- measure: one engine at a time, same threads ------------------------------------------
OUT=target/bench
mkdir -p "$OUT"
rm -f "$OUT"/local-airlock.json "$OUT"/local-llamacpp.json "$OUT"/local-st.json
CPU_MODEL=$(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | xargs || true)
LABEL="commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo '+dirty'); $(nproc --all) cores${CPU_MODEL:+ ($CPU_MODEL)}; $(uname -r)"
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

log "Airlock (RAYON_NUM_THREADS=$THREADS); load average $(loadavg)"
RAYON_NUM_THREADS="$THREADS" "$BENCH" --threads "$THREADS" "${GGUF[@]}" --embedding "$EMBED" \
  "${QUICK[@]}" --label "$LABEL" --json "$OUT/local-airlock.json" >/dev/null

# Baselines only for the models Airlock measured (a skipped model is skipped for both).
mapfile -t LOADED < <("$PYTHON" -c '
import json, sys
for m in json.load(open(sys.argv[1]))["chat"]:
    if m["status"] == "ok": print(m["model"])' "$OUT/local-airlock.json")
BASE_GGUF=()
for m in "${LOADED[@]}"; do BASE_GGUF+=(--gguf "$MODELS/$m"); done

log "llama.cpp (n_threads=$THREADS); load average $(loadavg)"
if [ "${#BASE_GGUF[@]}" -gt 0 ]; then
  "$LLAMA_PY" benches/local/baseline.py llama --threads "$THREADS" "${BASE_GGUF[@]}" \
    "${QUICK[@]}" --json "$OUT/local-llamacpp.json" 2> >(grep -v '^llama_context: n_ctx_per_seq' >&2)
fi
log "sentence-transformers (torch threads=$THREADS); load average $(loadavg)"
"$ST_PY" benches/local/baseline.py st --threads "$THREADS" --embedding "$EMBED" \
  "${QUICK[@]}" --json "$OUT/local-st.json" 2> >(grep -v '^Loading weights' >&2)
log "done; load average $(loadavg)"

echo
echo "Command: bash scripts/bench-local.sh ${QUICK[*]:+${QUICK[*]} }--threads $THREADS ($LABEL)"
echo
"$PYTHON" benches/local/table.py "$OUT/local-airlock.json" "$OUT/local-llamacpp.json" \
  "$OUT/local-st.json" | tee "$OUT/local.md"
log "raw results: $OUT/local-{airlock,llamacpp,st}.json; table: $OUT/local.md"
log "total $(( $(date +%s) - T0 )) s"
