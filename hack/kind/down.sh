#!/usr/bin/env bash
# `make kind-down`: delete the kind cluster `make kind-up` made (images and caches stay).
set -euo pipefail
CLUSTER=${EDGEAI_KIND_CLUSTER:-edgeai}
cache=${EDGEAI_CACHE:-$HOME/.cache/edgeai}
kind=$cache/kind-v1.34.4/bin/kind
if [ -x "$kind" ] && "$kind" get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  "$kind" delete cluster --name "$CLUSTER" --kubeconfig "$cache/kind-$CLUSTER.kubeconfig"
else
  echo "no kind cluster $CLUSTER" >&2
fi
