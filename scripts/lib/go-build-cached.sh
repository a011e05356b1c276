# Sourced by the build scripts (peers/, bench/, conformance/k3s/): build a Go binary
# only when its inputs changed, judged by content (a hash stored next to the binary),
# not by file times, which a fresh clone resets.

# go_module_inputs DIR: the files a module's binary is built from (go.mod, go.sum and
# its non-test .go files), relative to DIR, one per line.
go_module_inputs() {
  (cd "$1" && ls go.mod go.sum *.go | grep -v '_test\.go$' | sort)
}

# go_build_cached LABEL BIN NAME DIR PKG INPUT...: `go build` package PKG of the module
# in DIR into BIN/NAME, unless BIN/NAME exists and the hash of the INPUT files' contents
# (paths relative to DIR, or absolute; the paths themselves are not hashed, so a clone
# elsewhere reuses the binary) matches the one stored with it. The build goes to a
# temporary name first, so an interrupted build never leaves a binary that looks current.
# Builds of one BIN/NAME take turns (flock on BIN/.NAME.lock): parallel tests on a cold
# cache built the same binary at once, and one moved the other's temporary file away
# (CI: "mv: cannot stat .../.loadgen.tmp"); the later one now finds it up to date.
# GO_LDFLAGS, if set, is passed as -ldflags and is part of the hash.
go_build_cached() {
  local label="$1" bin="$2" name="$3" dir="$4" pkg="$5" hash
  shift 5
  hash="$(cd "$dir" && { for f in "$@"; do sha256sum <"$f"; done; echo "${GO_LDFLAGS:-}"; } | sha256sum | cut -d' ' -f1)"
  mkdir -p "$bin"
  (
    flock 9
    if [[ -x "$bin/$name" && "$(cat "$bin/.$name.inputs" 2>/dev/null)" == "$hash" ]]; then
      echo "$label: $name up to date" >&2
      exit 0
    fi
    echo "$label: building $name ($pkg in $dir)" >&2
    start=$SECONDS
    (cd "$dir" && go build -trimpath -buildvcs=false ${GO_LDFLAGS:+-ldflags="$GO_LDFLAGS"} -o "$bin/.$name.tmp" "$pkg") >&2
    mv -f "$bin/.$name.tmp" "$bin/$name"
    echo "$hash" >"$bin/.$name.inputs"
    echo "$label: built $name in $((SECONDS - start))s" >&2
  ) 9>"$bin/.$name.lock"
}
