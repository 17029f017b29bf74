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

from edgeai_operator.cache import owner_names
from edgeai_operator.context import context_of

MANAGED = {"app.kubernetes.io/managed-by": "edgeai-operator"}


def _progress(obj: Mapping[str, Any] | None) -> dict[str, Any]:
    """The status fields that say how a rollout stands (conditions only repeat them)."""
    status = (obj or {}).get("status") or {}
    return {k: v for k, v in status.items() if k != "conditions"}


@kopf.on.event("apps", "v1", "deployments", labels=MANAGED)
@kopf.on.event("apps", "v1", "daemonsets", labels=MANAGED)
async def workload_changed(
    type: str | None, body: kopf.Body, namespace: str | None, memo: kopf.Memo, **_: Any
) -> None:
    if namespace is None:
        return
    ctx = context_of(memo)
    kind, name = str(body.get("kind")), str(body.get("metadata", {}).get("name"))
    if type == "DELETED":
        ctx.cache.drop_workload(namespace, kind, name)
    elif _progress(ctx.cache.put_workload(body)) == _progress(body):
        return  # a change owners need not see (metadata, or the same status again)
    # A deployment's own workloads carry its label; a shared one lists every user
    # among its ownerReferences.
    for owner in owner_names(body):
        ctx.wakeups.wake(namespace, owner)


@kopf.on.event("", "v1", "pods", labels=MANAGED)
async def stage_pod_changed(
    type: str | None, body: kopf.Body, namespace: str | None, memo: kopf.Memo, **_: Any
) -> None:
    if namespace is None:
        return
    cache = context_of(memo).cache
    if type == "DELETED":
        cache.drop_pod(namespace, str(body.get("metadata", {}).get("name")))
    else:
        cache.put_pod(body)
