"""Stage workloads and their pods, as the watches deliver them.

Each event updates the operator's watch cache (cache.py), which reconcile passes read
instead of asking the API server. A workload's status changing (rollout progress,
availability) wakes its deployment's daemon at once, so `Available` and
make-before-break deletions follow the cluster instead of waiting for the next resync.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from edgeai_operator.cache import WatchCache
from edgeai_operator.handlers import wakeups

MANAGED = {"app.kubernetes.io/managed-by": "edgeai-operator"}

CACHE = WatchCache()


def _progress(obj: Mapping[str, Any] | None) -> dict[str, Any]:
    """The status fields that say how a rollout stands (conditions only repeat them)."""
    status = (obj or {}).get("status") or {}
    return {k: v for k, v in status.items() if k != "conditions"}


@kopf.on.event("apps", "v1", "deployments", labels=MANAGED)
@kopf.on.event("apps", "v1", "daemonsets", labels=MANAGED)
async def workload_changed(
    type: str | None, body: kopf.Body, labels: kopf.Labels, namespace: str | None, **_: Any
) -> None:
    if namespace is None:
        return
    kind, name = str(body.get("kind")), str(body.get("metadata", {}).get("name"))
    if type == "DELETED":
        CACHE.drop_workload(namespace, kind, name)
    elif _progress(CACHE.put_workload(body)) == _progress(body):
        return  # a change owners need not see (metadata, or the same status again)
    # A deployment's own workloads carry its label; a shared one lists every user
    # among its ownerReferences.
    owners = {
        str(ref.get("name"))
        for ref in body.get("metadata", {}).get("ownerReferences") or []
        if ref.get("kind") == "DNNDeployment"
    }
    if labels.get("edgeai.dev/deployment"):
        owners.add(str(labels["edgeai.dev/deployment"]))
    for owner in owners:
        wakeups.wake(namespace, owner)


@kopf.on.event("", "v1", "pods", labels=MANAGED)
async def stage_pod_changed(
    type: str | None, body: kopf.Body, namespace: str | None, **_: Any
) -> None:
    if namespace is None:
        return
    if type == "DELETED":
        CACHE.drop_pod(namespace, str(body.get("metadata", {}).get("name")))
    else:
        CACHE.put_pod(body)
