"""Nodes as placement sees them, indexed by name; any change wakes the deployments."""

from __future__ import annotations

from typing import Any

import kopf

from edgeai_operator.handlers import wakeups
from edgeai_operator.planning import NodeState, node_state
from edgeai_operator.topology import node_from_object

# Only these parts of a node change placement; heartbeats alone do not.
_RELEVANT = ("labels", "annotations", "unschedulable", "taints", "ready")


def _fingerprint(body: kopf.Body) -> tuple[Any, ...]:
    conditions = body.get("status", {}).get("conditions") or []
    ready = next((c.get("status") for c in conditions if c.get("type") == "Ready"), None)
    meta = body.get("metadata", {})
    return (
        tuple(sorted((meta.get("labels") or {}).items())),
        tuple(sorted((meta.get("annotations") or {}).items())),
        body.get("spec", {}).get("unschedulable"),
        str(body.get("spec", {}).get("taints")),
        ready,
    )


_seen: dict[str, tuple[Any, ...]] = {}


@kopf.index("", "v1", "nodes")
def node_index(name: str, body: kopf.Body, **_: Any) -> dict[str, NodeState] | None:
    spec = node_from_object(dict(body))
    if spec is None:
        return None
    return {name: node_state(dict(body), spec)}


@kopf.on.event("", "v1", "nodes")
def node_changed(name: str, type: str | None, body: kopf.Body, **_: Any) -> None:
    if type == "DELETED":
        _seen.pop(name, None)
        wakeups.wake_all()
        return
    fingerprint = _fingerprint(body)
    if _seen.get(name) != fingerprint:
        _seen[name] = fingerprint
        wakeups.wake_all()


def all_nodes(index: kopf.Index[str, NodeState]) -> list[NodeState]:
    return [state for store in index.values() for state in store]
