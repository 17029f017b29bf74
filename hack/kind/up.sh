#!/usr/bin/env bash
# `make kind-up`: a kind cluster shaped like hack/topology.yaml (kind-config.yaml), from
# the offline node image, with the project's images loaded. Idempotent: builds only what
# changed and reuses a running cluster.
#
#   hack/kind/up.sh      # prints the kubeconfig path last
#
# Then: export KUBECONFIG=$(hack/kind/up.sh | tail -1); kubectl get nodes -L edgeai.dev/tier
set -euo pipefail

CLUSTER=${EDGEAI_KIND_CLUSTER:-edgeai}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${EDGEAI_CACHE:-$HOME/.cache/edgeai}
kubeconfig=$cache/kind-$CLUSTER.kubeconfig
# One host folder bind-mounted into every node at ARTIFACTS_IN_NODE: a hostPath
# PersistentVolume there is the same store on every node, so models a preparation Job
# writes on one node are fetched by stage pods on the others (pvc://, no registry).
artifacts=$cache/kind-$CLUSTER-artifacts
ARTIFACTS_IN_NODE=/mnt/edgeai-artifacts
python=${PYTHON:-$repo/.venv/bin/python}
log() { printf '[kind-up %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
t_start=$(date +%s)

"$here/host.sh"
mapfile -t images < <(PYTHON=$python "$repo/hack/images/build.sh" | tail -2)
node_image=$("$here/node-image.sh" | tail -1)
bin=$cache/kind-v1.34.4/bin
kubectl=$(bash "$repo/hack/build-binaries.sh" kubernetes | tail -1)/kubectl
kind=$bin/kind
log "images ready after $(( $(date +%s) - t_start ))s: ${images[*]} $node_image"

if "$kind" get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  log "kind cluster $CLUSTER exists"
  "$kind" export kubeconfig --name "$CLUSTER" --kubeconfig "$kubeconfig" 2>/dev/null
else
  log "creating kind cluster $CLUSTER from $repo/kind-config.yaml (+ $artifacts on every node)"
  mkdir -p "$artifacts"
  chown 10001:10001 "$artifacts"   # the images' user edgeai
  config=$cache/kind-$CLUSTER-config.yaml
  "$python" - "$repo/kind-config.yaml" "$artifacts" "$ARTIFACTS_IN_NODE" > "$config" <<'PY'
import sys, yaml
config = yaml.safe_load(open(sys.argv[1]))
for node in config["nodes"]:
    node.setdefault("extraMounts", []).append({"hostPath": sys.argv[2], "containerPath": sys.argv[3]})
print(yaml.safe_dump(config, sort_keys=False))
PY
  t0=$(date +%s)
  "$kind" create cluster --name "$CLUSTER" --image "$node_image" --config "$config" \
    --kubeconfig "$kubeconfig" --retain >&2
  log "kind create cluster took $(( $(date +%s) - t0 ))s"
fi
"$kubectl" --kubeconfig "$kubeconfig" wait --for=condition=Ready nodes --all --timeout=300s >&2
PYTHONPATH=$repo/operator "$python" "$here/annotate_nodes.py" "$repo/hack/topology.yaml" "$kubeconfig" "$kubectl"
t0=$(date +%s)
"$kind" load docker-image --name "$CLUSTER" "${images[@]}" >&2
log "loaded ${images[*]} into every node in $(( $(date +%s) - t0 ))s"
log "cluster $CLUSTER up in $(( $(date +%s) - t_start ))s in all; kubeconfig: $kubeconfig"
echo "$kubeconfig"
