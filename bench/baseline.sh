#!/usr/bin/env bash
# Baseline throughput of k8s-sql (SQLite, synchronous=FULL) with etcd's own `benchmark`
# tool, next to a real etcd on the same machine for scale. Not part of CI's pass/fail:
# tests/test_bench_smoke.py only checks that this script runs with tiny sizes.
#
#   bench/baseline.sh                 # full run (about a minute)
#   TOTAL=200 bench/baseline.sh       # quick run
#
# Prints a Markdown table and writes the raw tool output under bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
TOTAL="${TOTAL:-5000}"
CLIENTS="${CLIENTS:-1 16 64}"
VAL_SIZE="${VAL_SIZE:-256}"
OUT="${OUT:-bench/results/baseline-$(date -u +%Y%m%dT%H%M%SZ)}"
PEERS="$(bash peers/build.sh | tail -n 1)"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_ready() { # endpoint
  for _ in $(seq 300); do
    "$PEERS/etcdctl" --endpoints="$1" --dial-timeout=1s endpoint health >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "server at $1 did not become ready" >&2; return 1
}

# Each start_* sets ENDPOINT (not echoed: a $(...) subshell would lose the PID to clean up).
start_k8s_sql() {
  local port; port=$(free_port)
  python3 -m k8s_sql --data-dir "$WORK/k8s-sql" --listen-client-urls "http://127.0.0.1:$port" \
    --log-level warn >"$OUT/k8s-sql.log" 2>&1 &
  PIDS+=($!); ENDPOINT="127.0.0.1:$port"
}

start_etcd() {
  local port peer; port=$(free_port); peer=$(free_port)
  "$PEERS/etcd" --name bench --data-dir "$WORK/etcd" --listen-client-urls "http://127.0.0.1:$port" \
    --listen-peer-urls "http://127.0.0.1:$peer" >"$OUT/etcd.log" 2>&1 &
  PIDS+=($!); ENDPOINT="127.0.0.1:$port"
}

# Requests/sec from the tool's summary ("Requests/sec:\t1234.5678").
rps() { awk '/Requests\/sec/ {printf "%.0f", $2}' "$1"; }
p99() { awk '/99% in/ {printf "%.1f", $3*1000}' "$1"; }

run() { # server endpoint
  local name=$1 ep=$2
  wait_ready "$ep"
  for c in $CLIENTS; do
    local conns=$(( c < 8 ? c : 8 ))
    "$PEERS/benchmark" --endpoints="$ep" --clients="$c" --conns="$conns" put \
      --total="$TOTAL" --key-size=16 --val-size="$VAL_SIZE" --key-space-size=100000 >"$OUT/$name-put-$c.txt" 2>&1
    echo "| $name | put | $c | $(rps "$OUT/$name-put-$c.txt") | $(p99 "$OUT/$name-put-$c.txt") |"
  done
  for c in $CLIENTS; do
    local conns=$(( c < 8 ? c : 8 ))
    "$PEERS/benchmark" --endpoints="$ep" --clients="$c" --conns="$conns" range foo \
      --total="$TOTAL" >"$OUT/$name-range-$c.txt" 2>&1
    echo "| $name | range (1 key) | $c | $(rps "$OUT/$name-range-$c.txt") | $(p99 "$OUT/$name-range-$c.txt") |"
  done
}

echo "| server | workload | clients | requests/s | p99 ms |"
echo "|---|---|---|---|---|"
start_k8s_sql; run k8s-sql "$ENDPOINT"
start_etcd; run etcd "$ENDPOINT"
echo
echo "total=$TOTAL value=${VAL_SIZE}B; raw output in $OUT"
