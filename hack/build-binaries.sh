#!/usr/bin/env bash
# Builds the pinned control-plane binaries (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, etcd, kwok), the OCI registry the tests push model
# artefacts to (CNCF distribution) and helm (the chart's tests) from the Go module proxy
# into a cache outside the work tree. Idempotent: a second run only checks the stamps and returns.
#
#   hack/build-binaries.sh            # prints the bin directory on the last line
#   hack/build-binaries.sh registry   # only the named groups: kubernetes etcd kwok registry helm
#
# EDGEAI_CACHE overrides the cache root (default ~/.cache/edgeai).
set -euo pipefail

K8S_VERSION=v1.34.4
ETCD_VERSION=v3.6.13
KWOK_VERSION=v0.8.0
REGISTRY_VERSION=v3.1.2
# the helm 3 release built against k8s.io v0.34 (Kubernetes 1.34)
HELM_VERSION=v3.19.5

here=$(cd "$(dirname "$0")" && pwd)
cache=${EDGEAI_CACHE:-$HOME/.cache/edgeai}
bin=$cache/k8s-$K8S_VERSION/bin
mkdir -p "$bin"

export CGO_ENABLED=0 GOFLAGS=-mod=mod
log() { printf '[build-binaries %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# A stamp records the inputs a binary was built from; a changed pin rebuilds it.
stamp_of() { cat "$@" | sha256sum | cut -c1-16; }
fresh() { [ -x "$bin/$1" ] && [ "$(cat "$bin/.$1.stamp" 2>/dev/null)" = "$2" ]; }
mark() { echo "$2" > "$bin/.$1.stamp"; }

all_groups=(kubernetes etcd kwok registry helm)
for g in "$@"; do
  [[ " ${all_groups[*]} " == *" $g "* ]] \
    || { echo "build-binaries: unknown group '$g' (accepted: ${all_groups[*]})" >&2; exit 2; }
done
# A test that needs only the registry must not wait for a cold Kubernetes build.
selected=("$@")
want() { [ ${#selected[@]} -eq 0 ] || [[ " ${selected[*]} " == *" $1 "* ]]; }

k8s_stamp=$(stamp_of "$here/k8s/go.mod" "$here/k8s/go.sum" <(echo "$K8S_VERSION"))
k8s_cmds=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
need_k8s=0
for c in "${k8s_cmds[@]}"; do fresh "$c" "$k8s_stamp" || need_k8s=1; done
if ! want kubernetes; then
  :
elif [ $need_k8s = 1 ]; then
  minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$now"
  done
  log "building ${k8s_cmds[*]} $K8S_VERSION (cold: 10-20 min on 2 cores; go -v lists packages as they compile)"
  t0=$(date +%s)
  pkgs=(); for c in "${k8s_cmds[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
  (cd "$here/k8s" && go build -v -trimpath -tags selinux,notest -ldflags "$ldflags" -o "$bin/" "${pkgs[@]}" 2>&1 \
     | awk '{n++; if (n % 200 == 0) printf "[build-binaries] ... %d packages compiled (last: %s)\n", n, $0; fflush()}' >&2)
  for c in "${k8s_cmds[@]}"; do mark "$c" "$k8s_stamp"; done
  log "kubernetes binaries built in $(( $(date +%s) - t0 ))s"
else
  log "kubernetes $K8S_VERSION binaries cached in $bin"
fi

etcd_stamp=$(stamp_of "$here/etcd/go.mod" "$here/etcd/go.sum" "$here/etcd/main.go")
if ! want etcd; then
  :
elif ! fresh etcd "$etcd_stamp"; then
  log "building etcd $ETCD_VERSION"
  t0=$(date +%s)
  (cd "$here/etcd" && go build -trimpath -ldflags "-s -w" -o "$bin/etcd" .)
  mark etcd "$etcd_stamp"
  log "etcd built in $(( $(date +%s) - t0 ))s"
else
  log "etcd $ETCD_VERSION cached"
fi

if ! want kwok; then
  :
elif ! fresh kwok "$KWOK_VERSION"; then
  log "building kwok $KWOK_VERSION"
  t0=$(date +%s)
  (cd /tmp && GOFLAGS= GOBIN="$bin" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION")
  # kwok >= 0.8 needs Stage configs; the stock ones ship inside the module.
  moddir=$(cd /tmp && GOFLAGS= go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  rm -rf "$bin/../kwok-stages" && mkdir -p "$bin/../kwok-stages"
  cp -r "$moddir/kustomize/stage/." "$bin/../kwok-stages/" && chmod -R u+w "$bin/../kwok-stages"
  mark kwok "$KWOK_VERSION"
  log "kwok built in $(( $(date +%s) - t0 ))s"
else
  log "kwok $KWOK_VERSION cached"
fi

if ! want registry; then
  :
elif ! fresh registry "$REGISTRY_VERSION"; then
  log "building registry (github.com/distribution/distribution/v3) $REGISTRY_VERSION (cold: about 2 min)"
  t0=$(date +%s)
  (cd /tmp && GOFLAGS= GOBIN="$bin" go install -v -trimpath -ldflags "-s -w" \
     "github.com/distribution/distribution/v3/cmd/registry@$REGISTRY_VERSION" 2>&1 \
     | awk '{n++; if (n % 100 == 0) printf "[build-binaries] ... %d packages compiled (last: %s)\n", n, $0; fflush()}' >&2)
  mark registry "$REGISTRY_VERSION"
  log "registry built in $(( $(date +%s) - t0 ))s"
else
  log "registry $REGISTRY_VERSION cached"
fi

if ! want helm; then
  :
elif ! fresh helm "$HELM_VERSION"; then
  log "building helm (helm.sh/helm/v3) $HELM_VERSION (cold: 4-7 min on 2 cores)"
  t0=$(date +%s)
  (cd /tmp && GOFLAGS= GOBIN="$bin" go install -v -trimpath \
     -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
     "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" 2>&1 \
     | awk '{n++; if (n % 200 == 0) printf "[build-binaries] ... %d packages compiled (last: %s)\n", n, $0; fflush()}' >&2)
  mark helm "$HELM_VERSION"
  log "helm built in $(( $(date +%s) - t0 ))s"
else
  log "helm $HELM_VERSION cached"
fi

echo "$bin"
