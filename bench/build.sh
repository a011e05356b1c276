#!/usr/bin/env bash
# Build the benchmark binaries: kine (bench/kine, pinned kine v0.17.x) and
# bench-driver (bench/driver), plus the real etcd peers via peers/build.sh.
#
#   bench/build.sh            # -> ${K8S_SQL_BENCH_BIN:-$HOME/.cache/k8s-sql/bench/<kine version>}
#   bench/build.sh OUT_DIR    # explicit output dir
#
# Output: one bin dir holding kine, bench-driver, and symlinks etcd, etcdctl
# and benchmark to the binaries peers/build.sh built. Progress goes to
# stderr; the last line of stdout is that bin dir.
#
# A binary is rebuilt only when the hash of its module's inputs (go.mod,
# go.sum, the non-test .go files, this script) differs from the one stored
# next to it (scripts/lib/go-build-cached.sh). The default Go module and build caches are used. kine's
# SQLite driver needs cgo (mattn/go-sqlite3), so CGO_ENABLED=1 and a C
# compiler are required.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
command -v go >/dev/null || { echo "bench/build.sh: go not found on PATH" >&2; exit 1; }

kine_version="$(grep -oE 'github.com/k3s-io/kine v[^ ]+' "$here/kine/go.mod" | head -n 1 | cut -d' ' -f2)"
[[ -n "$kine_version" ]] || { echo "bench/build.sh: no kine version in bench/kine/go.mod" >&2; exit 1; }
bin="${1:-${K8S_SQL_BENCH_BIN:-$HOME/.cache/k8s-sql/bench/$kine_version}}"
mkdir -p "$bin"
bin="$(cd "$bin" && pwd)"

# shellcheck source=../scripts/lib/go-build-cached.sh
source "$root/scripts/lib/go-build-cached.sh"
export CGO_ENABLED=1

# build NAME MODULE_DIR: its module's inputs, this script and the helper decide.
build() {
  local inputs
  mapfile -t inputs < <(go_module_inputs "$2")
  go_build_cached bench "$bin" "$1" "$2" . "${inputs[@]}" "$here/build.sh" "$root/scripts/lib/go-build-cached.sh"
}

build kine "$here/kine"
build bench-driver "$here/driver"

peers="$(bash "$root/peers/build.sh" | tail -n 1)"
for name in etcd etcdctl benchmark; do
  ln -sfn "$peers/$name" "$bin/$name"
done

echo "$bin"
