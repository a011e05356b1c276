#!/usr/bin/env bash
# Build the real etcd peers (etcd server, etcdctl, benchmark) from the Go
# module proxy into a bin dir. Idempotent: a binary newer than its inputs is
# kept. Progress goes to stderr; the last line of stdout is the bin dir.
#
#   peers/build.sh            # -> ${K8S_SQL_PEERS_BIN:-$HOME/.cache/k8s-sql/peers/v3.6.16}
#   peers/build.sh OUT_DIR    # explicit output dir
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${1:-${K8S_SQL_PEERS_BIN:-$HOME/.cache/k8s-sql/peers/v3.6.16}}"
mkdir -p "$bin"
bin="$(cd "$bin" && pwd)"

command -v go >/dev/null || { echo "build.sh: go not found on PATH" >&2; exit 1; }

cd "$here"
inputs=(go.mod go.sum etcd/main.go tools.go build.sh)

# up_to_date OUT: OUT exists and is newer than every input.
up_to_date() {
  local out="$1" f
  [[ -x "$out" ]] || return 1
  for f in "${inputs[@]}"; do
    [[ "$out" -nt "$f" ]] || return 1
  done
}

build() {
  local name="$1" pkg="$2" start
  if up_to_date "$bin/$name"; then
    echo "peers: $name up to date" >&2
    return
  fi
  echo "peers: building $name ($pkg)" >&2
  start=$SECONDS
  # Build to a temp name and rename, so an interrupted build never leaves a
  # truncated binary that looks up to date.
  go build -trimpath -buildvcs=false -o "$bin/.$name.tmp" "$pkg" >&2
  mv -f "$bin/.$name.tmp" "$bin/$name"
  echo "peers: built $name in $((SECONDS - start))s" >&2
}

build etcd ./etcd
build etcdctl go.etcd.io/etcd/etcdctl/v3
build benchmark go.etcd.io/etcd/v3/tools/benchmark

echo "$bin"
