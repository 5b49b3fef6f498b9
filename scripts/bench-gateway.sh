#!/usr/bin/env bash
# Gateway load benchmark: airlock against nginx as a plain reverse proxy and against
# calling the mock upstream directly, in the same run.
#
#   bash scripts/bench-gateway.sh [--quick] [--everything-on] [--profile]
#
# Builds the release binaries (airlock, airlock-load), installs nginx and gnuplot with
# apt-get if missing, then on loopback only:
#   core 0: the system under test (airlock, or nginx with 1 worker), one at a time loaded
#   core 1: the mock OpenAI upstream and the load generator (benches/load)
# and runs every phase (fixed-rate open loop, closed loop, 50 ms upstream delay; JSON
# and SSE) for each target. Prints one Markdown table per phase, writes the raw results
# to target/bench/gateway.json and the p99-vs-rate plot to docs/bench-latency.png.
# Full run: about 4 minutes of measurement; --quick: under a minute.
#
# --everything-on adds target airlock-full: a second gateway on
# benches/load/airlock-full.toml with governance on (real keys, limits, budgets, audit,
# metrics), its key made through the admin API (create_full_key below); runs are then
# shorter so the total stays bounded. Without it, only the bare gateway is measured.
#
# --profile samples the gateway processes with `perf record -e cpu-clock` (software
# clock: works where hardware counters are not exposed) during the closed-loop phases
# only, and writes the flat profile by symbol to target/bench/gateway-profile-*.txt
# (BENCH_PERF_GRAPH=1: with DWARF call graphs, callers of the top symbols in
# target/bench/gateway-callgraph-*.txt and inclusive shares in gateway-inclusive-*.txt).
#
# Environment: BENCH_ONLY="fixed-json closed-json" runs only those phases;
# BENCH_DURATION=SECONDS overrides the measured time per run; BENCH_AIRLOCK_B=PATH
# adds targets airlock-b (and airlock-full-b) run by another airlock binary on the same
# configs, each measured right after its twin in every phase (an A/B comparison of two
# builds in one run).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
T0=$(date +%s)
ARGS="$*"

QUICK=()
FULL=0
PROFILE=0
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=(--quick) ;;
    --everything-on) FULL=1 ;;
    --profile) PROFILE=1; BENCH_ONLY=${BENCH_ONLY:-closed-json closed-sse} ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (use --quick, --everything-on, --profile)" >&2; exit 64 ;;
  esac
done

export PATH="$PATH:/usr/sbin:/sbin"
log() { echo "bench: $*" >&2; }

# --- tools ---------------------------------------------------------------------------
SUDO=()
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null; then SUDO=(sudo); else SUDO=(false); fi
fi

apt_install() {
  # Keep the package's service from starting (we run nginx ourselves, on our own
  # config): a policy-rc.d that denies starts, only if none is there, removed after.
  local policy=/usr/sbin/policy-rc.d made=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
    "${SUDO[@]}" chmod 755 "$policy"; made=1
  fi
  local rc=0
  { "${SUDO[@]}" apt-get update -qq && \
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "$@"; } >&2 || rc=$?
  if [ "$made" = 1 ]; then "${SUDO[@]}" rm -f "$policy"; fi
  return "$rc"
}

need=()
command -v nginx >/dev/null || need+=(nginx)
command -v gnuplot >/dev/null || need+=(gnuplot-nox)
command -v taskset >/dev/null || need+=(util-linux)
if [ "${#need[@]}" -gt 0 ]; then
  log "installing ${need[*]} with apt-get"
  apt_install "${need[@]}"
fi
NGINX=$(command -v nginx)

if [ "$(nproc --all)" -lt 2 ]; then
  log "needs at least 2 CPU cores (core 0: system under test, core 1: load generator + mock)"
  exit 1
fi

log "building release binaries"
cargo build --release --locked -p airlock -p airlock-load >&2
AIRLOCK="$ROOT/target/release/airlock"
LOAD="$ROOT/target/release/airlock-load"

# --- processes -----------------------------------------------------------------------
TMP=$(mktemp -d -t airlock-bench.XXXXXX)
chmod 755 "$TMP"   # nginx workers drop privileges and must reach their temp paths
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# wait_line FILE REGEX SECONDS PID: the first match of REGEX in FILE, or fail.
wait_line() {
  local file=$1 re=$2 secs=$3 pid=$4 i line
  for i in $(seq $((secs * 20))); do
    line=$(grep -m1 -E "$re" "$file" 2>/dev/null || true)
    if [ -n "$line" ]; then echo "$line"; return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
    sleep 0.05
  done
  log "no '$re' in $file after ${secs}s; its output:"; cat "$file" >&2 || true
  return 1
}

# The mock upstream, on core 1 with the load generator.
taskset -c 1 "$LOAD" mock --listen 127.0.0.1:0 --chunks 20 >"$TMP/mock.out" 2>&1 &
MOCK_PID=$!; PIDS+=("$MOCK_PID")
MOCK=$(wait_line "$TMP/mock.out" '^mock listening on http://' 10 "$MOCK_PID")
MOCK=${MOCK#mock listening on http://}
log "mock upstream on $MOCK (pid $MOCK_PID)"

# nginx: 1 worker pinned to core 0, keepalive to the mock, no buffering (SSE passes
# through as it comes), no access log.
NGINX_PORT=$("$LOAD" free-port)
mkdir -p "$TMP/nginx"
cat >"$TMP/nginx/nginx.conf" <<EOF
worker_processes 1;
worker_cpu_affinity 01;
worker_rlimit_nofile 65536;
daemon off;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 16384; }
http {
  access_log off;
  client_body_temp_path $TMP/nginx/body;
  proxy_temp_path $TMP/nginx/proxy;
  fastcgi_temp_path $TMP/nginx/fastcgi;
  uwsgi_temp_path $TMP/nginx/uwsgi;
  scgi_temp_path $TMP/nginx/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  upstream mock {
    server $MOCK;
    keepalive 256;               # airlock's default pool_max_idle_per_host
    keepalive_requests 1000000;
    keepalive_timeout 300s;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT backlog=4096;
    location / {
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
EOF
taskset -c 0 "$NGINX" -p "$TMP/nginx" -e "$TMP/nginx/error.log" -c "$TMP/nginx/nginx.conf" \
  >"$TMP/nginx/stdout" 2>&1 &
NGINX_PID=$!; PIDS+=("$NGINX_PID")
for i in $(seq 100); do
  if out=$("$LOAD" http GET "http://127.0.0.1:$NGINX_PORT/v1/models" 2>/dev/null) \
     && [ "$(head -n1 <<<"$out")" = 200 ]; then break; fi
  if ! kill -0 "$NGINX_PID" 2>/dev/null || [ "$i" = 100 ]; then
    log "nginx did not start:"; cat "$TMP/nginx/stdout" "$TMP/nginx/error.log" >&2 2>/dev/null || true; exit 1
  fi
  sleep 0.05
done
log "nginx $("$NGINX" -v 2>&1 | sed 's/.*nginx\///') on 127.0.0.1:$NGINX_PORT (master pid $NGINX_PID)"

# airlock, on core 0. RUST_LOG=warn so logging does not dominate.
export AIRLOCK_MASTER_KEY="sk-bench-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
start_airlock() { # NAME CONFIG_TEMPLATE [BINARY] -> sets AIRLOCK_ADDR, AIRLOCK_PID
  local name=$1 template=$2 bin=${3:-$AIRLOCK}
  sed "s/@MOCK@/$MOCK/g" "$template" >"$TMP/$name.toml"
  RUST_LOG=warn taskset -c 0 "$bin" serve --config "$TMP/$name.toml" \
    --listen 127.0.0.1:0 --data-dir "$TMP/$name-data" >"$TMP/$name.out" 2>"$TMP/$name.err" &
  AIRLOCK_PID=$!; PIDS+=("$AIRLOCK_PID")
  local line
  if ! line=$(wait_line "$TMP/$name.out" '^airlock listening on http://' 20 "$AIRLOCK_PID"); then
    cat "$TMP/$name.err" >&2; return 1
  fi
  AIRLOCK_ADDR=${line#airlock listening on http://}
  log "$name on $AIRLOCK_ADDR (pid $AIRLOCK_PID, config $template)"
}
start_airlock airlock benches/load/airlock-bare.toml
BARE_ADDR=$AIRLOCK_ADDR; BARE_PID=$AIRLOCK_PID
out=$("$LOAD" http POST "http://$BARE_ADDR/v1/chat/completions" --key "$AIRLOCK_MASTER_KEY" \
  --body '{"model":"bench","messages":[{"role":"user","content":"hi"}]}')
if [ "$(head -n1 <<<"$out")" != 200 ]; then log "airlock does not answer through the mock: $out"; exit 1; fi

# "Everything on" (auth with real keys, rate limits, budgets, audit, metrics): runs as
# target airlock-full, a second gateway on benches/load/airlock-full.toml, once the
# gateway has the admin API for keys. Any failure here is reported and the run goes on
# with the other targets.
create_full_key() { # ADDR -> prints a key for the benchmark's models
  # TODO(governance): give the key limits and a budget far above the benchmark's load
  # (so they are checked on every request but never reject one) once they land.
  local out org limits='{"rpm_limit":100000000,"tpm_limit":1000000000000,"max_parallel_requests":1000000,"max_budget_micros":1000000000000000}'
  out=$("$LOAD" http POST "http://$1/admin/orgs" --key "$AIRLOCK_MASTER_KEY" \
    --body "{\"name\":\"bench\",\"models\":[\"bench\",\"bench-slow\"],\"limits\":$limits}") || return 1
  if [ "$(head -n1 <<<"$out")" -ge 300 ]; then log "creating an org failed: $out"; return 1; fi
  org=$(tail -n +2 <<<"$out" | grep -o '"id" *: *"[^"]*"' | head -n1 | sed 's/.*: *"//; s/"$//')
  out=$("$LOAD" http POST "http://$1/admin/keys" --key "$AIRLOCK_MASTER_KEY" \
    --body "{\"name\":\"bench\",\"org_id\":\"$org\",\"models\":[\"bench\",\"bench-slow\"],\"limits\":$limits}") || return 1
  if [ "$(head -n1 <<<"$out")" -ge 300 ]; then log "creating a key failed: $out"; return 1; fi
  tail -n +2 <<<"$out" | grep -o '"key" *: *"[^"]*"' | head -n1 | sed 's/.*: *"//; s/"$//'
}
FULL_TARGET=""
probe=$("$LOAD" http GET "http://$BARE_ADDR/admin/keys" --key "$AIRLOCK_MASTER_KEY")
if [ "$(head -n1 <<<"$probe")" = 404 ]; then
  echo "everything-on: not available yet (the gateway has no /admin/keys route)"
elif [ "$FULL" = 0 ]; then
  echo "everything-on: not run (pass --everything-on to add target airlock-full)"
elif start_airlock airlock-full benches/load/airlock-full.toml \
     && FULL_PID=$AIRLOCK_PID && FULL_ADDR=$AIRLOCK_ADDR \
     && FULL_KEY=$(create_full_key "$FULL_ADDR") && [ -n "$FULL_KEY" ]; then
  FULL_TARGET=$(printf ',\n  {"name":"airlock-full","url":"http://%s","path":"/v1/chat/completions","slow_path":"/v1/chat/completions","model":"bench","slow_model":"bench-slow","key":"%s","pids":[%s]}' \
    "$FULL_ADDR" "$FULL_KEY" "$FULL_PID")
else
  echo "everything-on: not available yet (the airlock-full gateway did not start or gave no key; see above)"
  if [ -n "${FULL_PID:-}" ]; then kill "$FULL_PID" 2>/dev/null || true; FULL_PID=""; fi
fi

# A/B: the same two gateways again on another binary (BENCH_AIRLOCK_B), each listed
# right after its twin so that every phase measures them back to back.
BARE_B_TARGET=""; FULL_B_TARGET=""
if [ -n "${BENCH_AIRLOCK_B:-}" ]; then
  start_airlock airlock-b benches/load/airlock-bare.toml "$BENCH_AIRLOCK_B"
  BARE_B_TARGET=$(printf ',\n  {"name":"airlock-b","url":"http://%s","path":"/v1/chat/completions","slow_path":"/v1/chat/completions","model":"bench","slow_model":"bench-slow","key":"%s","pids":[%s]}' \
    "$AIRLOCK_ADDR" "$AIRLOCK_MASTER_KEY" "$AIRLOCK_PID")
  if [ -n "$FULL_TARGET" ] && start_airlock airlock-full-b benches/load/airlock-full.toml "$BENCH_AIRLOCK_B" \
     && FULL_B_KEY=$(create_full_key "$AIRLOCK_ADDR") && [ -n "$FULL_B_KEY" ]; then
    FULL_B_TARGET=$(printf ',\n  {"name":"airlock-full-b","url":"http://%s","path":"/v1/chat/completions","slow_path":"/v1/chat/completions","model":"bench","slow_model":"bench-slow","key":"%s","pids":[%s]}' \
      "$AIRLOCK_ADDR" "$FULL_B_KEY" "$AIRLOCK_PID")
  fi
fi

cat >"$TMP/targets.json" <<EOF
{"client_pids": [$MOCK_PID],
 "targets": [
  {"name":"direct","direct":true,"url":"http://$MOCK","path":"/v1/chat/completions","slow_path":"/d50/v1/chat/completions","model":"gpt-4o-mini","slow_model":"gpt-4o-mini","pids":[]},
  {"name":"nginx","url":"http://127.0.0.1:$NGINX_PORT","path":"/v1/chat/completions","slow_path":"/d50/v1/chat/completions","model":"gpt-4o-mini","slow_model":"gpt-4o-mini","pids":[$NGINX_PID]},
  {"name":"airlock","url":"http://$BARE_ADDR","path":"/v1/chat/completions","slow_path":"/v1/chat/completions","model":"bench","slow_model":"bench-slow","key":"$AIRLOCK_MASTER_KEY","pids":[$BARE_PID]}$BARE_B_TARGET$FULL_TARGET$FULL_B_TARGET
 ]}
EOF

# --- measure -------------------------------------------------------------------------
mkdir -p target/bench docs
EXTRA=()
for p in ${BENCH_ONLY:-}; do EXTRA+=(--only "$p"); done
if [ -n "${BENCH_DURATION:-}" ]; then EXTRA+=(--duration "$BENCH_DURATION")
elif [ -n "$FULL_TARGET" ] && [ "${#QUICK[@]}" = 0 ]; then EXTRA+=(--duration 3); fi
LABEL="commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); $(nproc --all) cores; $(uname -r); nginx $("$NGINX" -v 2>&1 | sed 's/.*nginx\///')"
log "running phases (${QUICK[*]:-full}); progress below, tables on stdout"
echo
echo "Command: bash scripts/bench-gateway.sh $ARGS"
echo
PERF_PIDS=()
if [ "$PROFILE" = 1 ]; then
  command -v perf >/dev/null || "${SUDO[@]}" apt-get install -y -qq linux-perf >&2
  for pid in "$BARE_PID" ${FULL_PID:-}; do
    perf record -q -e cpu-clock -F 999 ${BENCH_PERF_GRAPH:+--call-graph dwarf,16384} \
      -p "$pid" -o "$TMP/perf-$pid.data" 2>/dev/null &
    PERF_PIDS+=("$!")
  done
fi
taskset -c 1 "$LOAD" run --targets "$TMP/targets.json" "${QUICK[@]}" "${EXTRA[@]}" \
  --json target/bench/gateway.json --plot-data "$TMP/p99.dat" --label "$LABEL"
if [ "$PROFILE" = 1 ]; then
  for p in "${PERF_PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  for pid in "$BARE_PID" ${FULL_PID:-}; do
    name=bare; [ "$pid" = "${FULL_PID:-}" ] && name=everything-on
    { perf report -i "$TMP/perf-$pid.data" --stdio --sort dso 2>/dev/null
      perf report -i "$TMP/perf-$pid.data" --stdio --sort dso,symbol --percent-limit 0.3 2>/dev/null
    } | grep -E '^ +[0-9]' | sed -E 's/ +$//; s/ {2,}/  /g' >"target/bench/gateway-profile-$name.txt" || true
    if [ -n "${BENCH_PERF_GRAPH:-}" ]; then
      perf report -i "$TMP/perf-$pid.data" --stdio --no-children --sort symbol \
        --percent-limit 1 -g caller,0.5,callee,function,percent 2>/dev/null \
        >"target/bench/gateway-callgraph-$name.txt" || true
      perf report -i "$TMP/perf-$pid.data" --stdio --children --sort symbol -g none \
        --percent-limit 1.5 2>/dev/null | grep -E '^ +[0-9]' | cut -c1-240 \
        >"target/bench/gateway-inclusive-$name.txt" || true
    fi
    log "profile ($name): target/bench/gateway-profile-$name.txt"
  done
fi

for pid in "$BARE_PID" ${FULL_PID:-}; do
  if ! kill -0 "$pid" 2>/dev/null; then log "airlock (pid $pid) died during the run:"; tail -n 20 "$TMP"/airlock*.err >&2; exit 1; fi
done

# --- plot: p99 against offered rate, airlock vs nginx (and the mock direct) ------------
if [ -s "$TMP/p99.dat" ]; then
  TERM_SPEC="png size 1280,520"
  if gnuplot -e 'set terminal' 2>&1 | grep -q pngcairo; then TERM_SPEC="pngcairo size 1280,520 font 'sans,10'"; fi
  header=$(grep -m1 '^# ' "$TMP/p99.dat")            # "# fixed-json | rate direct nginx airlock ..."
  read -r -a names <<<"${header#*| rate }"
  nblocks=$(grep -c '^# ' "$TMP/p99.dat")
  xr=$(awk '!/^#/ && NF { if (min == "" || $1 < min) min = $1; if ($1 > max) max = $1 }
            END { printf "[%g:%g]", min / 1.4, max * 1.4 }' "$TMP/p99.dat")
  {
    echo "set terminal $TERM_SPEC"
    echo "set output '$ROOT/docs/bench-latency.png'"
    echo "set logscale xy; set grid; set key top left; set xrange $xr"
    echo "set xlabel 'offered load (requests/s, open loop)'; set ylabel 'p99 latency (ms, from scheduled send)'"
    echo "set multiplot layout 1,$nblocks title 'Airlock vs nginx: p99 latency, one core each, mock upstream ($(date +%F))'"
    for b in $(seq 0 $((nblocks - 1))); do
      title=$(grep '^# ' "$TMP/p99.dat" | sed -n "$((b + 1))p" | sed 's/^# //; s/ |.*//')
      case "$title" in fixed-json) title="non-streaming" ;; fixed-sse) title="streaming (SSE, 20 chunks)" ;; esac
      echo "set title '$title'"
      plot="plot"
      for i in "${!names[@]}"; do
        n=${names[$i]}; col=$((i + 2))
        case "$n" in
          direct) style="lw 1 dt 3 lc rgb '#888888'" ;;
          nginx) style="lw 2 dt 2 lc rgb '#009e73'" ;;
          airlock) style="lw 2 lc rgb '#d55e00'" ;;
          *) style="lw 2 lc rgb '#0072b2'" ;;
        esac
        plot="$plot '$TMP/p99.dat' index $b using 1:$col with linespoints $style pt 7 ps 0.8 title '$n',"
      done
      echo "${plot%,}"
    done
    echo "unset multiplot"
  } >"$TMP/plot.gp"
  if gnuplot "$TMP/plot.gp" 2>"$TMP/plot.err"; then
    log "plot: docs/bench-latency.png"
  else
    log "gnuplot failed:"; cat "$TMP/plot.err" >&2
  fi
fi
log "raw results: target/bench/gateway.json"
log "total $(( $(date +%s) - T0 )) s"
