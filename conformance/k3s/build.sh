#!/usr/bin/env bash
# Build k3s-probe (conformance/k3s): the datastore calls a k3s server makes
# with an external etcd, through the kine version pinned in go.mod (the same
# one bench/kine uses, so the Go build cache is shared).
#
#   conformance/k3s/build.sh           # -> ${K8S_SQL_K3S_PROBE_BIN:-$HOME/.cache/k8s-sql/k3s-probe/<kine version>}
#   conformance/k3s/build.sh OUT_DIR   # explicit output dir
#
# The binary is rebuilt only when the hash of go.mod, go.sum, the non-test
# .go files and this script differs from the one stored next to it
# (scripts/lib/go-build-cached.sh). The
# default Go module and build caches are used. Progress goes to stderr; the
# last line of stdout is the bin dir.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
command -v go >/dev/null || { echo "k3s-probe: go not found on PATH" >&2; exit 1; }

kine_version="$(grep -oE 'github.com/k3s-io/kine v[^ ]+' "$here/go.mod" | head -n 1 | cut -d' ' -f2)"
[[ -n "$kine_version" ]] || { echo "k3s-probe: no kine version in conformance/k3s/go.mod" >&2; exit 1; }
bin="${1:-${K8S_SQL_K3S_PROBE_BIN:-$HOME/.cache/k8s-sql/k3s-probe/$kine_version}}"
mkdir -p "$bin"
bin="$(cd "$bin" && pwd)"

root="$(cd "$here/../.." && pwd)"
# shellcheck source=../../scripts/lib/go-build-cached.sh
source "$root/scripts/lib/go-build-cached.sh"
# cgo as in bench/build.sh (kine's SQLite driver is linked in), so the build cache
# entries match.
export CGO_ENABLED=1
mapfile -t inputs < <(go_module_inputs "$here")
go_build_cached k3s-probe "$bin" k3s-probe "$here" . "${inputs[@]}" build.sh "$root/scripts/lib/go-build-cached.sh"

echo "$bin"
