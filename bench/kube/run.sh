#!/usr/bin/env bash
# Workload W5: Kubernetes on an etcd endpoint (etcd, kine, k8s-sql) with kwok.
#
# Starts kube-apiserver v1.37.2 (default watch cache) on --etcd-servers, waits
# for /readyz, starts kwok managing the nodes annotated kwok.x-k8s.io/node=fake,
# then runs bench/kube/loadgen: it creates the namespaces and --nodes fake
# nodes, waits until kwok has made them Ready, creates --pods pods bound
# round-robin to the nodes with --concurrency workers, waits until kwok has
# made every pod Running, and lists all pods cluster-wide (one consistent LIST
# and one paginated by 500) every --list-interval meanwhile. It writes a
# one-element JSON array to --out; see bench/kube/README.md for the fields.
#
#   bench/kube/run.sh --etcd-servers http://127.0.0.1:2379 --out w5.json \
#       [--nodes 100] [--pods 3000] [--concurrency 20] [--label NAME] \
#       [--namespaces 5] [--list-interval 5s] [--timeout 30m] [--keep] \
#       [--apiserver-arg=--watch-cache=false ...] [--loadgen-arg=-soak=30m ...]
#
# --loadgen-arg passes a flag to loadgen as is: the soak (bench/harness/soak.py)
# runs loadgen's -soak mode this way, with --apiserver-arg=--event-ttl=3m.
#
# The endpoint must hold no earlier run's objects (use a fresh etcd / database).
# Everything started here is stopped on exit, also on failure; the work dir
# (logs) is removed after a successful run unless --keep, and kept otherwise.
#
# Environment: KUBE_VERSION (v1.37.2) and K8S_SQL_KUBE_CACHE as for
# conformance/build.sh; KWOK_VERSION and K8S_SQL_BENCH_KUBE_CACHE as for
# bench/kube/build.sh; K8S_SQL_BENCH_LOADGEN, a loadgen binary to run instead
# of build.sh's (the soak builds its own from this tree: the bin dir is shared
# by every checkout on the machine); TMPDIR for the work dir.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2; }

etcd="" out="" label="" nodes=100 pods=3000 concurrency=20 namespaces=5 interval=5s timeout=30m keep=0
extra=()  # more kube-apiserver flags
lgextra=()  # more loadgen flags
while [[ $# -gt 0 ]]; do
  case "$1" in
    --etcd-servers) etcd="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --label) label="$2"; shift 2 ;;
    --nodes) nodes="$2"; shift 2 ;;
    --pods) pods="$2"; shift 2 ;;
    --concurrency) concurrency="$2"; shift 2 ;;
    --namespaces) namespaces="$2"; shift 2 ;;
    --list-interval) interval="$2"; shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    --apiserver-arg) extra+=("$2"); shift 2 ;;
    --apiserver-arg=*) extra+=("${1#--apiserver-arg=}"); shift ;;
    --loadgen-arg) lgextra+=("$2"); shift 2 ;;
    --loadgen-arg=*) lgextra+=("${1#--loadgen-arg=}"); shift ;;
    -h|--help) usage ;;
    *) echo "run.sh: unknown argument '$1'" >&2; usage ;;
  esac
done
[[ -n "$etcd" && -n "$out" ]] || usage
label="${label:-$etcd}"
out="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"

log() { echo "w5: $*" >&2; }

# The binaries (both builds are quick no-ops once built).
kube_bin="$(bash "$root/conformance/build.sh" | tail -1)"
bench_bin="$(bash "$here/build.sh" | tail -1)"

work="$(mktemp -d "${TMPDIR:-/tmp}/k8s-sql-w5.XXXXXX")"
apiserver_pid="" kwok_pid="" ok=0

stop_pid() {  # stop_pid PID NAME: SIGTERM, then SIGKILL after 20s
  local pid="$1" name="$2" i
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 40; i++)); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.5
  done
  log "$name did not stop on SIGTERM; killing it"
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_pid "$kwok_pid" kwok
  stop_pid "$apiserver_pid" kube-apiserver
  if [[ $ok == 1 && $keep == 0 ]]; then
    rm -rf "$work"
  else
    if [[ $ok == 0 ]]; then
      for f in kube-apiserver.log kwok.log; do
        [[ -s "$work/$f" ]] && { log "--- tail of $f"; tail -n 25 "$work/$f" >&2; }
      done
    fi
    log "logs kept in $work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# kube-apiserver, set up as tests/test_kubernetes_e2e.py does: a self-signed
# serving certificate, a service-account key, one system:masters token.
token="w5-bench-$RANDOM$RANDOM"
port="$(free_port)"
server="https://127.0.0.1:$port"
mkdir -p "$work/certs"
openssl genrsa -out "$work/sa.key" 2048 2>/dev/null
openssl rsa -in "$work/sa.key" -pubout -out "$work/sa.pub" 2>/dev/null
echo "$token,admin,admin,\"system:masters\"" >"$work/tokens.csv"
log "kube-apiserver on $server, etcd $etcd; work dir $work"
"$kube_bin/kube-apiserver" \
  --etcd-servers="$etcd" \
  --cert-dir="$work/certs" \
  --secure-port="$port" \
  --bind-address=127.0.0.1 \
  --advertise-address=127.0.0.1 \
  --service-cluster-ip-range=10.96.0.0/24 \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-signing-key-file="$work/sa.key" \
  --service-account-key-file="$work/sa.pub" \
  --token-auth-file="$work/tokens.csv" \
  --authorization-mode=RBAC \
  --endpoint-reconciler-type=none \
  --v=1 ${extra[@]+"${extra[@]}"} >"$work/kube-apiserver.log" 2>&1 &
apiserver_pid=$!

t0=$SECONDS
until curl -skf -o /dev/null -H "Authorization: Bearer $token" "$server/readyz"; do
  kill -0 "$apiserver_pid" 2>/dev/null || { log "kube-apiserver exited"; exit 1; }
  ((SECONDS - t0 < 180)) || { log "kube-apiserver not ready after 180s"; exit 1; }
  sleep 0.5
done
log "kube-apiserver ready in $((SECONDS - t0))s"

cat >"$work/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: w5
  cluster:
    server: $server
    insecure-skip-tls-verify: true
users:
- name: admin
  user:
    token: $token
contexts:
- name: w5
  context:
    cluster: w5
    user: admin
current-context: w5
EOF

# kwok: HOME is the work dir so that no ~/.kwok/kwok.yaml is merged into the
# stages; pod IPs (never used) come from a /16 so that 3000+ pods fit; only
# warnings are logged, as a line per pod update costs CPU the apiserver needs.
HOME="$work" "$bench_bin/kwok" \
  --kubeconfig="$work/kubeconfig" \
  --config="$bench_bin/kwok-stages.yaml" \
  --manage-all-nodes=false \
  --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
  --node-lease-duration-seconds=40 \
  --cidr=10.0.0.0/16 \
  --v=WARN >"$work/kwok.log" 2>&1 &
kwok_pid=$!

log "loadgen: $nodes nodes, $pods pods, $concurrency workers"
rc=0
"${K8S_SQL_BENCH_LOADGEN:-$bench_bin/loadgen}" \
  -server="$server" -token="$token" -out="$out" -label="$label" -etcd-servers="$etcd" \
  -nodes="$nodes" -pods="$pods" -concurrency="$concurrency" -namespaces="$namespaces" \
  -list-interval="$interval" -timeout="$timeout" ${lgextra[@]+"${lgextra[@]}"} || rc=$?
kill -0 "$kwok_pid" 2>/dev/null || log "kwok exited during the run"
[[ $rc == 0 ]] || { log "loadgen failed ($rc); partial result in $out"; exit "$rc"; }
ok=1
log "result in $out"
