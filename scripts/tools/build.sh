#!/usr/bin/env bash
# Build the pinned Go tools the observability tests use, into a cache outside the repository:
#
#   ${DTX_CACHE_DIR:-$HOME/.cache/dtx}/tools/<tool>-<version>/bin/<tool>
#
#   promtool  checks and unit-tests the Prometheus rules, and parses every PromQL
#             expression of the dashboards (scripts/tools/promtool/go.mod)
#   tempo     the tracing backend of the trace test (scripts/tools/tempo/go.mod)
#
# Usage: build.sh [promtool|tempo ...]   (default: all). The last line on stdout is the
# path of the (last) binary asked for, one line per tool before it; progress goes to stderr.
#
# Idempotent: each binary has a stamp (its pinned version and a hash of its go.mod, go.sum
# and this script); when the stamp matches, nothing is built. A cold build takes minutes on
# 2 cores, so it runs under `nice` and holds a lock, so concurrent callers wait, not race.
# The versions are pinned in each tool's consumer module (the single source of truth);
# go.sum pins every dependency's hash.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${DTX_CACHE_DIR:-$HOME/.cache/dtx}/tools"
go_bin="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
mkdir -p "$cache_root"

export CGO_ENABLED=0
# Only what go.sum already pins is downloaded: a build never edits the consumer modules.
export GOFLAGS="-mod=readonly -buildvcs=false"
# Tempo is pinned by a pseudo-version that the checksum database does not list; its hash
# is in tempo/go.sum, which is what the go command checks it against.
export GONOSUMDB="github.com/grafana/tempo${GONOSUMDB:+,$GONOSUMDB}"

modver() { awk -v m="$2" '$1 == m && $2 ~ /^v/ { print $2; exit }' "$here/$1/go.mod"; }

# build <tool> <module path> <package> <extra ldflags> [build tags]
build() {
  local tool="$1" module="$2" pkg="$3" ldflags="$4" tags="${5:-}"
  local version sums dir stamp
  version="$(modver "$tool" "$module")"
  [[ -n "$version" ]] || { echo "build.sh: no version of $module in $here/$tool/go.mod" >&2; exit 1; }
  sums="$(cat "$here/$tool/go.mod" "$here/$tool/go.sum" "$here/build.sh" | sha256sum | cut -c1-16)"
  dir="$cache_root/$tool-$version/bin"
  stamp="$tool=$version sums=$sums go=$("$go_bin" env GOVERSION)"
  mkdir -p "$dir"
  (
    flock 9
    if [[ "$(cat "$dir/.stamp" 2>/dev/null)" != "$stamp" || ! -x "$dir/$tool" ]]; then
      rm -f "$dir/.stamp" "$dir/$tool"
      echo "build.sh: building $tool $version ($pkg) -> $dir/$tool" >&2
      local start=$SECONDS
      (cd "$here/$tool" && nice -n 10 "$go_bin" build -trimpath -tags "$tags" \
        -ldflags "-s -w $ldflags" -o "$dir/.$tool.tmp" "$pkg")
      mv -f "$dir/.$tool.tmp" "$dir/$tool" # atomic: no half-written binary
      echo "$stamp" >"$dir/.stamp"
      echo "build.sh: built $tool in $((SECONDS - start))s" >&2
    fi
  ) 9>"$cache_root/.$tool.lock"
  echo "$dir/$tool"
}

version_flags() { # the -X flags of github.com/prometheus/common/version
  local p=github.com/prometheus/common/version
  echo "-X $p.Version=$1 -X $p.Branch=HEAD -X $p.Revision=$2 -X $p.BuildUser=dtx"
}

build_promtool() {
  local v
  v="$(modver promtool github.com/prometheus/prometheus)" # v0.3XY.Z is Prometheus 3.XY.Z
  local minor="${v#v0.3}" && minor="${minor%%.*}" && minor="$((10#$minor))"
  # remove_all_sd (Prometheus' documented build tag) leaves out the cloud service
  # discoveries — AWS, Azure, GCE and a dozen more SDKs — that rule checks and rule tests
  # never touch; it more than halves a cold build.
  build promtool github.com/prometheus/prometheus github.com/prometheus/prometheus/cmd/promtool \
    "$(version_flags "3.$minor.${v##*.}" "$v")" remove_all_sd
}

build_tempo() {
  local v
  v="$(modver tempo github.com/grafana/tempo)"
  build tempo github.com/grafana/tempo github.com/grafana/tempo/cmd/tempo \
    "$(version_flags "$v" "${v##*-}")"
}

tools=("$@")
[[ ${#tools[@]} -gt 0 ]] || tools=(promtool tempo)
for tool in "${tools[@]}"; do
  case "$tool" in
    promtool) build_promtool ;;
    tempo) build_tempo ;;
    *) echo "build.sh: unknown tool $tool (promtool, tempo)" >&2; exit 2 ;;
  esac
done
