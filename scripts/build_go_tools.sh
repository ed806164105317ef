#!/usr/bin/env bash
# Build the Go tools the tests need (scripts/go_tools.txt) from their Go modules, once per
# version, into a cache outside the repository:
#   ${KILN_TOOLS_CACHE:-$HOME/.cache/kiln-tools}/<name>-<version>/<name>
# A tool whose directory holds a finished build is skipped, so a second run costs nothing.
# Usage: scripts/build_go_tools.sh [NAME...]   (default: every tool in the list)
#
# Adding a tool: one line in scripts/go_tools.txt. A tool that needs another way to build
# (a module with replace directives, say) gets a new `how` word and a build_<how> function.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
list="$here/go_tools.txt"
cache="${KILN_TOOLS_CACHE:-$HOME/.cache/kiln-tools}"

# No Go, or one older than Kiln's wrapper modules need: fetch the pinned Go toolchain from
# the Go module proxy (the golang.org/toolchain module `go` itself switches to), once, into
# the cache. If that fails too, the tools' tests skip with a notice -- except under CI=true,
# where a missing tool must fail `make test` here, not skip tests quietly later.
go_bootstrap=1.26.8
declare -A go_bootstrap_sha256=(  # of the proxy's zips (module versions never change)
  [amd64]=30c2b1bf7dcc88d3eb0a1364e47ddd9128edb3110a30e8a0ef61cd5856b31de7
  [arm64]=02b36b6787b3ac767668f630e2998df45a3b1f9ffee08d1bf3ef6487cd658d99
)
go_needed=$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$here"/go/*/go.mod | sort -V | tail -n 1)

fail() {
  echo "build_go_tools: $*" >&2
  local ci=${CI:-}
  if [ "${ci,,}" = true ]; then exit 1; fi
  echo "build_go_tools: tests that need Go-built tools will skip (they fail under CI=true)" >&2
  exit 0
}

go_is_new_enough() {
  command -v go >/dev/null || return 1
  local have
  have=$(go env GOVERSION 2>/dev/null) || return 1
  have=${have#go}
  [ "$(printf '%s\n%s\n' "$go_needed" "$have" | sort -V | head -n 1)" = "$go_needed" ]
}

fetch_go() {
  local arch dir zip url root
  case "$(uname -m)" in x86_64) arch=amd64 ;; aarch64 | arm64) arch=arm64 ;; *) return 1 ;; esac
  dir="$cache/go-$go_bootstrap"
  if [ ! -f "$dir/.done" ]; then
    echo "build_go_tools: fetching Go $go_bootstrap from the Go module proxy"
    url="${GOPROXY:-https://proxy.golang.org}"
    url="${url%%[,|]*}/golang.org/toolchain/@v/v0.0.1-go$go_bootstrap.linux-$arch.zip"
    rm -rf "$dir" && mkdir -p "$dir"
    zip="$dir/toolchain.zip"
    curl -fsSL --retry 3 -o "$zip" "$url" || return 1
    echo "${go_bootstrap_sha256[$arch]}  $zip" | sha256sum -c --quiet - ||
      { echo "build_go_tools: $url is not the Go $go_bootstrap we pinned" >&2; return 1; }
    unzip -q "$zip" -d "$dir" && rm -f "$zip" || return 1
    # Module zips keep no file modes: make the toolchain's programs executable again.
    root=$(echo "$dir"/golang.org/toolchain@*)
    chmod -R a+rX "$root" && find "$root/bin" "$root/pkg/tool" -type f -exec chmod a+x {} + ||
      return 1
    touch "$dir/.done"
  fi
  PATH="$(echo "$dir"/golang.org/toolchain@*/bin):$PATH"
  export GOTOOLCHAIN=local
}

if ! go_is_new_enough; then
  fetch_go || fail "no Go >= $go_needed on PATH and fetching Go $go_bootstrap failed"
  go_is_new_enough || fail "the fetched Go $go_bootstrap does not run here"
fi
export GOFLAGS="${GOFLAGS:--buildvcs=false}" CGO_ENABLED="${CGO_ENABLED:-0}"

# go install PACKAGE@VERSION with GOBIN pointing at the tool's directory.
build_install() {
  local name=$1 version=$2 package=$3 dir=$4
  GOBIN="$dir" go install "$package@$version"
  local built
  built="$dir/$(basename "$package")"
  [ "$built" = "$dir/$name" ] || mv "$built" "$dir/$name"
}

# A test binary (`go test -c`) of the module PACKAGE at VERSION, built in a private copy of
# the module (the module cache is read-only).
build_test() {
  local name=$1 version=$2 package=$3 dir=$4
  local src work
  src=$(cd "$dir" && GOFLAGS=-mod=mod go mod download -json "$package@$version" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -n "$src" ] || { echo "build_go_tools: cannot download $package@$version" >&2; return 1; }
  work=$(mktemp -d "$dir/.src-XXXXXX")
  cp -r "$src/." "$work/"
  chmod -R u+w "$work"
  (cd "$work" && go mod download && go test -c -o "$dir/$name" .)
  rm -rf "$work"
}

# A small wrapper module of Kiln's own, scripts/go/PACKAGE (main.go, go.mod, go.sum), for a
# program that `go install` cannot build: k8s.io/kubernetes needs each k8s.io/* staging
# module replaced by its published version, which only a main module's go.mod can say. Its
# go.mod must require the listed VERSION. Optional files beside it: `ldflags` (-X stamps;
# ${VERSION}, ${MAJOR} and ${MINOR} are filled in) and `links` (names to link to the binary,
# for a multi-call program that dispatches on its name).
build_wrapper() {
  local name=$1 version=$2 package=$3 dir=$4
  local src="$here/go/$package" ldflags="-s -w"
  grep -Eq "[[:space:]]$version([[:space:]]|\$)" "$src/go.mod" ||
    { echo "build_go_tools: $src/go.mod does not require $version" >&2; return 1; }
  if [ -f "$src/ldflags" ]; then
    local major minor
    major=${version#v}; major=${major%%.*}
    minor=${version#v*.}; minor=${minor%%.*}
    ldflags="$ldflags $(sed -e "s/\${VERSION}/$version/g" -e "s/\${MAJOR}/$major/g" \
      -e "s/\${MINOR}/$minor/g" "$src/ldflags")"
  fi
  (cd "$src" && go build -trimpath -ldflags "$ldflags" -o "$dir/$name" .)
  if [ -f "$src/links" ]; then
    local link
    while read -r link; do [ -z "$link" ] || ln -sf "$name" "$dir/$link"; done <"$src/links"
  fi
}

# Several programs of one module at VERSION (`go install` each, GOBIN the tool's directory):
# PACKAGE is a space-separated list of packages, the first of which is the program NAME names
# (or, for a set of equals such as the CNI plugins, none is: NAME is then the directory's name
# only); words starting with `-` are flags for `go install` (-tags=a,b).
build_multi() {
  local name=$1 version=$2 packages=$3 dir=$4
  local flags=() pkgs=() word
  for word in $packages; do
    case "$word" in -*) flags+=("$word") ;; *) pkgs+=("$word@$version") ;; esac
  done
  GOBIN="$dir" go install -trimpath -ldflags "-s -w" "${flags[@]}" "${pkgs[@]}"
}

# A program of Kiln's own with no dependencies, scripts/go/PACKAGE (the sandbox's pause
# program): VERSION is Kiln's own name for its revision; the fingerprint rebuilds it on edits.
build_local() {
  local name=$1 version=$2 package=$3 dir=$4
  (cd "$here/go/$package" && go build -trimpath -ldflags "-s -w" -o "$dir/$name" .)
}

# What a finished build records in .done: for Kiln's own wrapper modules, a digest of their
# files, so an edited wrapper (another component, a new replace) is rebuilt although its
# version did not change. (An empty .done, from before this was recorded, is trusted.)
fingerprint() {
  local how=$1 package=$2
  case "$how" in wrapper | local) ;; *) return 0 ;; esac
  (cd "$here/go/$package" && find . -type f | LC_ALL=C sort | xargs sha256sum | sha256sum |
    cut -d' ' -f1)
}

# A cold build fills Go's build and module caches with about 8 GB these tools never need
# again (they land in $cache). Left behind, that is disk the test suite then lacks (a test
# node under DiskPressure takes no pods), so a build uses scratch caches, removed on exit,
# unless GOCACHE or GOMODCACHE is set in the environment.
scratch=""
scratch_caches() {
  [ -z "$scratch" ] || return 0
  scratch=$(mktemp -d "${TMPDIR:-/tmp}/kiln-go-caches-XXXXXX")
  trap 'chmod -R u+w "$scratch" 2>/dev/null; rm -rf "$scratch"' EXIT
  export GOCACHE="${GOCACHE:-$scratch/build}" GOMODCACHE="${GOMODCACHE:-$scratch/mod}"
}

built=0
while read -r name version how package; do
  case "$name" in '' | \#*) continue ;; esac
  if [ $# -gt 0 ] && [[ " $* " != *" $name "* ]]; then continue; fi
  dir="$cache/$name-$version"
  stamp=$(fingerprint "$how" "$package")
  if [ -f "$dir/.done" ] && { [ -x "$dir/$name" ] || [ "$how" = multi ]; }; then
    recorded=$(cat "$dir/.done")
    if [ -z "$recorded" ] || [ "$recorded" = "$stamp" ]; then continue; fi
  fi
  echo "build_go_tools: building $name $version ($package)"
  scratch_caches
  rm -rf "$dir"
  mkdir -p "$dir"
  start=$SECONDS
  if ! "build_$how" "$name" "$version" "$package" "$dir"; then
    rm -rf "$dir"
    echo "build_go_tools: building $name $version failed" >&2
    exit 1
  fi
  echo "$stamp" >"$dir/.done"
  echo "build_go_tools: $name $version ready in $((SECONDS - start)) s: $dir"
  built=$((built + 1))
done <"$list"
[ "$built" -gt 0 ] || echo "build_go_tools: every tool is built (cache $cache)"
