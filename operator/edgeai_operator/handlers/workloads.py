"""Stage workloads changing (rollout progress, availability) wake their deployment's
daemon at once, so `Available` and make-before-break deletions follow the cluster
instead of waiting for the next resync."""

from __future__ import annotations

from typing import Any

import kopf

from edgeai_operator.handlers import wakeups

MANAGED = {"app.kubernetes.io/managed-by": "edgeai-operator"}


def _status_fingerprint(body: kopf.Body) -> tuple[Any, ...]:
    status = body.get("status") or {}
    return tuple(sorted((k, str(v)) for k, v in status.items() if k != "conditions"))


_seen: dict[tuple[str, str, str], tuple[Any, ...]] = {}


@kopf.on.event("apps", "v1", "deployments", labels=MANAGED)
@kopf.on.event("apps", "v1", "daemonsets", labels=MANAGED)
def workload_changed(
    type: str | None, body: kopf.Body, labels: kopf.Labels, namespace: str | None, **_: Any
) -> None:
    # A deployment's own workloads carry its label; a shared one lists every user
    # among its ownerReferences.
    owners = {
        str(ref.get("name"))
        for ref in body.get("metadata", {}).get("ownerReferences") or []
        if ref.get("kind") == "DNNDeployment"
    }
    if labels.get("edgeai.dev/deployment"):
        owners.add(str(labels["edgeai.dev/deployment"]))
    if not owners or namespace is None:
        return
    key = (namespace, str(body.get("kind")), str(body.get("metadata", {}).get("name")))
    fingerprint = _status_fingerprint(body)
    if type == "DELETED":
        _seen.pop(key, None)
    elif _seen.get(key) == fingerprint:
        return
    else:
        _seen[key] = fingerprint
    for owner in owners:
        wakeups.wake(namespace, owner)
