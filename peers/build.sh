#!/usr/bin/env bash
# Build the real etcd peers (etcd server, etcdctl, etcdutl, benchmark) from the Go
# module proxy into a bin dir. Idempotent: a binary is rebuilt only when the
# hash of its inputs changed (scripts/lib/go-build-cached.sh). Progress goes to stderr; the last line of stdout is the bin dir.
#
#   peers/build.sh            # -> ${K8S_SQL_PEERS_BIN:-$HOME/.cache/k8s-sql/peers/v3.6.16}
#   peers/build.sh OUT_DIR    # explicit output dir
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${1:-${K8S_SQL_PEERS_BIN:-$HOME/.cache/k8s-sql/peers/v3.6.16}}"
mkdir -p "$bin"
bin="$(cd "$bin" && pwd)"

command -v go >/dev/null || { echo "build.sh: go not found on PATH" >&2; exit 1; }

root="$(cd "$here/.." && pwd)"
# shellcheck source=../scripts/lib/go-build-cached.sh
source "$root/scripts/lib/go-build-cached.sh"
inputs=(go.mod go.sum etcd/main.go tools.go build.sh "$root/scripts/lib/go-build-cached.sh")

build() {
  go_build_cached peers "$bin" "$1" "$here" "$2" "${inputs[@]}"
}

build etcd ./etcd
build etcdctl go.etcd.io/etcd/etcdctl/v3
build etcdutl go.etcd.io/etcd/etcdutl/v3  # snapshot status/restore: tests/test_etcd_snapshot.py
build benchmark go.etcd.io/etcd/v3/tools/benchmark

echo "$bin"
