#!/usr/bin/env bash
# Build the pinned Kubernetes control-plane binaries (kube-apiserver,
# kube-controller-manager, kubectl), etcd and helm from the consumer Go
# modules next to this script, into a cache outside the repository:
#
#   ${DTX_CACHE_DIR:-$HOME/.cache/dtx}/k8s/<k8s-version>/bin/
#
# Idempotent: a stamp file records the pinned versions and a hash of the
# go.mod/go.sum files; when it matches, only missing binaries are built (and
# usually nothing is). A cold build takes tens of minutes on 2 cores, so it
# runs under `nice` and holds a lock so concurrent callers wait, not race.
#
# Progress goes to stderr; the last line on stdout is the bin directory.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${DTX_CACHE_DIR:-$HOME/.cache/dtx}/k8s"

# Pinned versions are read from the go.mod files (single source of truth).
modver() { awk -v m="$2" '$1 == m && $2 ~ /^v/ { print $2; exit }' "$here/$1"; }
k8s_version="$(modver go.mod k8s.io/kubernetes)"
etcd_version="$(modver etcd/go.mod go.etcd.io/etcd/server/v3)"
helm_version="$(modver helm/go.mod helm.sh/helm/v3)"
helm_kube_version="$(modver helm/go.mod k8s.io/client-go)"   # v0.X.Y
[[ -n "$k8s_version" && -n "$etcd_version" && -n "$helm_version" && -n "$helm_kube_version" ]] \
  || { echo "build.sh: cannot read pinned versions from $here/*go.mod" >&2; exit 1; }

bin_dir="$cache_root/$k8s_version/bin"
mkdir -p "$bin_dir"
exec 9>"$cache_root/.build.lock"
flock 9

sums="$(cd "$here" && cat go.mod go.sum etcd/go.mod etcd/go.sum helm/go.mod helm/go.sum build.sh | sha256sum | cut -c1-16)"
stamp="k8s=$k8s_version etcd=$etcd_version helm=$helm_version sums=$sums"
stamp_file="$bin_dir/.stamp"
if [[ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ]]; then
  rm -f "$stamp_file" "$bin_dir"/{kube-apiserver,kube-controller-manager,kubectl,etcd,helm}
fi

go_bin="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
export CGO_ENABLED=0

# build <module dir> <binary name> <package> <extra ldflags>
build() {
  local dir="$1" name="$2" pkg="$3" ldflags="$4"
  [[ -x "$bin_dir/$name" ]] && return 0
  echo "build.sh: building $name ($pkg) -> $bin_dir/$name" >&2
  local start=$SECONDS
  (cd "$here/$dir" && nice -n 10 "$go_bin" build -trimpath -ldflags "-s -w $ldflags" \
     -o "$bin_dir/.$name.tmp" "$pkg")
  mv -f "$bin_dir/.$name.tmp" "$bin_dir/$name"   # atomic: no half-written binary
  echo "build.sh: built $name in $((SECONDS - start))s" >&2
}

minor="${k8s_version#v1.}"; minor="${minor%%.*}"
kver=""
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kver+=" -X $p.gitVersion=$k8s_version -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
done
hminor="${helm_kube_version#v0.}"; hminor="${hminor%%.*}"
hver="-X helm.sh/helm/v3/internal/version.version=$helm_version -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  hver+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$hminor"
done

build . kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$kver"
build . kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$kver"
build . kubectl k8s.io/kubernetes/cmd/kubectl "$kver"
build etcd etcd go.etcd.io/etcd/server/v3 ""
build helm helm helm.sh/helm/v3/cmd/helm "$hver"

echo "$stamp" > "$stamp_file"
echo "build.sh: up to date: $stamp" >&2
echo "$bin_dir"
