#!/usr/bin/env bash
# Run the Kubernetes storage conformance suite against k8s-sql:
# k8s.io/apiserver's pkg/storage/etcd3 tests (the RunTest* functions of
# pkg/storage/testing, called with an etcd3 store) and pkg/storage/cacher
# tests, with etcd3/testserver.RunEtcd replaced by testserver_k8s_sql.go,
# which starts a fresh k8s-sql per call.
#
# Nothing upstream is committed: at run time this script copies
# k8s.io/apiserver@$APISERVER_VERSION from the Go module cache (after
# `go mod download`, checked against sum.golang.org) into a throwaway
# directory, swaps in our testserver, and runs `go test -json` there with
# apiserver's own go.mod/go.sum, so every dependency is the version upstream
# tested with.
#
#   conformance/storage/run.sh                      # everything (etcd3 + cacher)
#   K8S_SQL_STORAGE_RUN='TestWatch' conformance/storage/run.sh
#   K8S_SQL_STORAGE_PKGS=etcd3 conformance/storage/run.sh
#   conformance/storage/run.sh --build              # only download and compile (CI warm-up)
#
# Environment:
#   APISERVER_VERSION        k8s.io/apiserver version (default v0.37.2)
#   K8S_SQL_STORAGE_PKGS     packages under pkg/storage/ (default "etcd3 cacher")
#   K8S_SQL_STORAGE_RUN      go test -run filter (default: all tests)
#   K8S_SQL_STORAGE_SKIP     go test -skip filter, added to the tests listed in
#                            excluded.txt (upstream flakes that never reach a server);
#                            a filter with '/' (subtests) replaces that list
#   K8S_SQL_STORAGE_TIMEOUT  go test -timeout (default 60m)
#   K8S_SQL_STORAGE_CACHE    work dir parent (default ~/.cache/k8s-sql/storage-conformance)
#   K8S_SQL_STORAGE_RESULTS  results dir (default $K8S_SQL_STORAGE_CACHE/$APISERVER_VERSION/results)
#   K8S_SQL_PYTHON           interpreter that runs k8s-sql (default: python3)
#   K8S_SQL_ARGS             extra k8s-sql arguments for every server (each server has
#                            its own --data-dir; do not point them at one shared --endpoint)
#   K8S_SQL_ENDPOINT_TEMPLATE  run on PostgreSQL/MariaDB: a database URL with {n} in the
#                            database name; every server gets a new database (see
#                            testserver_k8s_sql.go)
#   K8S_SQL_STORAGE_SERVER   k8s-sql (default), or etcd: keep upstream's testserver
#                            (embedded etcd) to get the reference results
#
# Output: per-test results in $RESULTS/results.txt (STATUS<TAB>test<TAB>seconds<TAB>notes),
# a per-test-function table in $RESULTS/results.md, the raw `go test -json`
# stream in $RESULTS/test.json, and a last line
#   storage conformance: N passed, M failed, K skipped (of T)
# Exit status: 0 when every failure is listed in known_failures.txt, 1 when a
# test outside that list failed, 2 when the suite could not be built or run.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
version="${APISERVER_VERSION:-v0.37.2}"
cache="${K8S_SQL_STORAGE_CACHE:-$HOME/.cache/k8s-sql/storage-conformance}"
work="$cache/$version"
results="${K8S_SQL_STORAGE_RESULTS:-$work/results}"
pkgs=(${K8S_SQL_STORAGE_PKGS:-etcd3 cacher})
python="${K8S_SQL_PYTHON:-python3}"

build_only=false
case "${1:-}" in
  "") ;;
  --build) build_only=true ;;
  *) echo "usage: $0 [--build]" >&2; exit 2 ;;
esac

log() { echo "storage: $*" >&2; }
die() { log "$*"; exit 2; }

command -v go >/dev/null || die "go not found on PATH"
command -v "$python" >/dev/null || die "$python not found"
PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" "$python" -c 'import k8s_sql' \
  || die "$python cannot import k8s_sql (pip install -e $root)"

# 1. The pinned module source, read-only in the module cache.
mod_json="$(go mod download -json "k8s.io/apiserver@$version")" || die "go mod download k8s.io/apiserver@$version failed: $mod_json"
src="$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' <<<"$mod_json")"
[[ -d "$src/pkg/storage/etcd3/testserver" ]] || die "no pkg/storage/etcd3/testserver in '$src'"

# 2. A fresh writable copy with testserver swapped. The build cache is keyed on
# content, so re-copying costs no rebuild.
server="${K8S_SQL_STORAGE_SERVER:-k8s-sql}"
copy="$work/apiserver"
mkdir -p "$work" "$results"
# One run at a time per version: the copy's path is fixed, because the build
# cache keys compiled packages on their source directory.
if command -v flock >/dev/null; then
  exec 9>"$work/.lock"
  flock -n 9 || { log "another run.sh is using $work; waiting"; flock 9; }
fi
rm -rf "$copy"
cp -r "$src" "$copy" && chmod -R u+w "$copy" || die "copying $src failed"
case "$server" in
  k8s-sql)
    rm -f "$copy"/pkg/storage/etcd3/testserver/*.go
    cp "$here/testserver_k8s_sql.go" "$copy/pkg/storage/etcd3/testserver/" || die "copy testserver"
    log "k8s.io/apiserver $version from $src -> $copy (testserver replaced)" ;;
  etcd)
    log "k8s.io/apiserver $version from $src -> $copy (upstream testserver: embedded etcd)" ;;
  *) die "K8S_SQL_STORAGE_SERVER must be k8s-sql or etcd, got '$server'" ;;
esac

targets=()
for p in "${pkgs[@]}"; do
  [[ -d "$copy/pkg/storage/$p" ]] || die "no package pkg/storage/$p"
  targets+=("./pkg/storage/$p/")
done

cd "$copy" || die "cd $copy"
export K8S_SQL_PYTHON="$python" K8S_SQL_ROOT="$root"
export GOFLAGS="${GOFLAGS:-} -mod=readonly"

# 3. Build first (compile time is not test time; a build error is a harness error).
start=$SECONDS
log "building test binaries for ${pkgs[*]} (a cold build takes many minutes)"
go test -count=1 -run '^$' "${targets[@]}" >"$results/build.log" 2>&1 \
  || { cat "$results/build.log" >&2; die "build failed"; }
log "built in $((SECONDS - start))s"
$build_only && exit 0

# 4. Run. -p 1: one package at a time (each test starts its own server).
start=$SECONDS
args=(-json -count=1 -p 1 -timeout "${K8S_SQL_STORAGE_TIMEOUT:-60m}")
[[ -n "${K8S_SQL_STORAGE_RUN:-}" ]] && args+=(-run "$K8S_SQL_STORAGE_RUN")
# excluded.txt: upstream-flaky tests that never start a server (each with its
# reason there); they test nothing of k8s-sql, and a panic in one ends its
# whole package.
skip=()
while read -r name reason; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  [[ -n "$reason" ]] || die "excluded.txt: $name has no reason"
  skip+=("^$name\$")
  log "excluded (upstream flake, never reaches a server): $name"
done <"$here/excluded.txt"
# go test splits a -skip pattern at '/' into levels, so a filter naming subtests
# cannot be joined with the list and replaces it.
if [[ "${K8S_SQL_STORAGE_SKIP:-}" == */* ]]; then
  skip=("$K8S_SQL_STORAGE_SKIP")
elif [[ -n "${K8S_SQL_STORAGE_SKIP:-}" ]]; then
  skip+=("$K8S_SQL_STORAGE_SKIP")
fi
((${#skip[@]})) && args+=(-skip "$(IFS='|'; echo "${skip[*]}")")
log "go test ${args[*]} ${targets[*]}"
go test "${args[@]}" "${targets[@]}" >"$results/test.json" 2>"$results/stderr.log"
go_rc=$?
elapsed=$((SECONDS - start))
log "go test exited $go_rc after ${elapsed}s"

# 5. Count and compare with the known failures.
"$python" "$here/summarize.py" "$results/test.json" "$here/known_failures.txt" "$results" "$elapsed"
