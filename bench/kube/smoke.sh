#!/usr/bin/env bash
# CI smoke test of workload W5: a fresh k8s-sql on SQLite in a temp dir, then
# bench/kube/run.sh --nodes 2 --pods 10 against it, and a check of the JSON.
# Under a minute once the binaries are built (bench/kube/build.sh,
# conformance/build.sh; run.sh calls both). Prints "1 passed, 0 failed" or
# "0 passed, 1 failed" last and exits accordingly.
#
#   bench/kube/smoke.sh [OUT.json]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/k8s-sql-w5-smoke.XXXXXX")"
out="${1:-$work/w5-smoke.json}"
store_pid=""

cleanup() {
  local rc=$?
  trap - EXIT
  if [[ -n "$store_pid" ]] && kill -0 "$store_pid" 2>/dev/null; then
    kill -TERM "$store_pid" 2>/dev/null || true
    wait "$store_pid" 2>/dev/null || true
  fi
  if [[ $rc == 0 ]]; then
    rm -rf "$work"
    echo "w5-smoke: 1 passed, 0 failed"
  else
    [[ -s "$work/k8s-sql.log" ]] && tail -n 25 "$work/k8s-sql.log" >&2
    echo "w5-smoke: logs in $work" >&2
    echo "w5-smoke: 0 passed, 1 failed"
  fi
  exit "$rc"
}
trap cleanup EXIT

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
python3 -m k8s_sql --data-dir "$work/k8s-sql" --listen-client-urls "http://127.0.0.1:$port" \
  --log-level warn >"$work/k8s-sql.log" 2>&1 &
store_pid=$!
python3 - "$port" <<'EOF'
import socket, sys, time
deadline = time.monotonic() + 60
while True:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("k8s-sql did not listen within 60s")
        time.sleep(0.2)
EOF

bash "$here/run.sh" --etcd-servers "http://127.0.0.1:$port" --out "$out" \
  --nodes 2 --pods 10 --concurrency 4 --label k8s-sql-sqlite-smoke --timeout 2m

python3 - "$out" <<'EOF'
import json, sys
[r] = json.load(open(sys.argv[1]))
assert r["workload"] == "w5" and r["pods_running"] == r["pods"] == 10, r
assert r["mutating_ms"]["count"] >= 10 and r["list_ms"]["count"] >= 1, r
assert r["metrics_p99_ms"]["mutating"] is not None and r["metrics_p99_ms"]["list"] is not None, r
assert r["mutating_cdf"] and r["list_cdf"] and not r["errors"], r
print(f"w5-smoke: all {r['pods']} pods Running after {r['seconds_to_all_running']}s; "
      f"mutating p99 {r['mutating_ms']['p99']} ms, LIST p99 {r['list_ms']['p99']} ms")
EOF
