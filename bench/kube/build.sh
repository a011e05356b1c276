#!/usr/bin/env bash
# Build what workload W5 (bench/kube/run.sh) needs besides kube-apiserver:
#   kwok             sigs.k8s.io/kwok/cmd/kwok, fake nodes and pods
#   kwok-stages.yaml kwok's own "fast" node and pod stages plus the lease
#                    heartbeat, assembled from the kwok module (kwok refuses to
#                    start without stages)
#   loadgen          bench/kube/loadgen, the client (k8s.io/client-go v0.37.x)
#
# kwok's go.mod has no replace directives, so `go install module@version`
# builds it with exactly the dependencies it was released with.
#
# Idempotent: a binary newer than its inputs is kept. Progress goes to stderr;
# the last line of stdout is the bin dir,
# ${K8S_SQL_BENCH_KUBE_CACHE:-~/.cache/k8s-sql/bench-kube}/kwok-$KWOK_VERSION/bin.
#
#   bench/kube/build.sh
#   KWOK_VERSION=v0.7.0 bench/kube/build.sh
#
# Environment:
#   KWOK_VERSION              default v0.8.0, the newest release when this was
#                             written; `latest` asks the module proxy
#   K8S_SQL_BENCH_KUBE_CACHE  parent of the per-version bin dirs
#   GOCACHE/GOMODCACHE        the usual Go caches (defaults)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
script="$here/build.sh"
version="${KWOK_VERSION:-v0.8.0}"
cache="${K8S_SQL_BENCH_KUBE_CACHE:-$HOME/.cache/k8s-sql/bench-kube}"

log() { echo "bench-kube: $*" >&2; }
command -v go >/dev/null || { log "go not found on PATH"; exit 1; }

if [[ "$version" == latest ]]; then
  version="$(cd "$here/loadgen" && go list -m -f '{{.Version}}' sigs.k8s.io/kwok@latest)"
  log "latest kwok is $version"
fi
[[ "$version" =~ ^v[0-9]+\.[0-9]+\.[0-9]+$ ]] || { log "KWOK_VERSION must look like vX.Y.Z, got '$version'"; exit 1; }

bin="$cache/kwok-$version/bin"
mkdir -p "$bin"

# up_to_date OUT INPUT...: OUT exists and is newer than every INPUT.
up_to_date() {
  local out="$1" f
  shift
  [[ -e "$out" ]] || return 1
  for f in "$@"; do
    [[ "$out" -nt "$f" ]] || return 1
  done
}

# 1. kwok. Built into a temp dir and renamed, so that an interrupted build never
# leaves a truncated binary that looks up to date.
if up_to_date "$bin/kwok" "$script"; then
  log "kwok $version up to date"
else
  log "building kwok $version; a cold build takes a few minutes"
  start=$SECONDS
  tmp="$(mktemp -d "$bin/.kwok.XXXXXX")"
  # outside any module, so that go install reads only kwok's own go.mod
  (cd "$tmp" && GOBIN="$tmp" GOFLAGS=-buildvcs=false go install -trimpath -ldflags="-s -w" "sigs.k8s.io/kwok/cmd/kwok@$version" >&2)
  mv -f "$tmp/kwok" "$bin/kwok"
  rmdir "$tmp"
  log "built kwok in $((SECONDS - start))s"
fi

# 2. The stages, from the module's kustomize/stage/<kind>/<set>/kustomization.yaml
# resource lists (the same sets kwokctl enables by default).
if up_to_date "$bin/kwok-stages.yaml" "$script" "$bin/kwok"; then
  log "kwok stages up to date"
else
  dir="$(cd "$bin" && go mod download -json "sigs.k8s.io/kwok@$version" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
  [[ -d "$dir/kustomize/stage" ]] || { log "no kustomize/stage in the kwok module at '$dir'"; exit 1; }
  tmp="$(mktemp "$bin/.stages.XXXXXX")"
  for set in node/fast node/heartbeat-with-lease pod/fast; do
    for f in $(sed -n 's/^- \(.*\.yaml\)$/\1/p' "$dir/kustomize/stage/$set/kustomization.yaml"); do
      echo "---" >>"$tmp"
      cat "$dir/kustomize/stage/$set/$f" >>"$tmp"
    done
  done
  grep -q '^kind: Stage' "$tmp" || { log "found no stages in $dir/kustomize/stage"; exit 1; }
  chmod 644 "$tmp"
  mv -f "$tmp" "$bin/kwok-stages.yaml"
  log "wrote $(grep -c '^kind: Stage' "$bin/kwok-stages.yaml") kwok stages"
fi

# 3. The load generator, a module of its own. Judged by the hash of its sources, not
# by file times: the bin dir is shared by every checkout on the machine, and a fresh
# clone's files are all newer than a binary built from another tree's sources (a clone
# without the soak mode once replaced the binary in the middle of a soak run).
# shellcheck source=../../scripts/lib/go-build-cached.sh
source "$here/../../scripts/lib/go-build-cached.sh"
lg="$here/loadgen"
mapfile -t lg_inputs < <(go_module_inputs "$lg")
GO_LDFLAGS="-s -w" go_build_cached bench-kube "$bin" loadgen "$lg" . "${lg_inputs[@]}" "$script"

echo "$bin"
