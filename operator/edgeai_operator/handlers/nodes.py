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
# Counts placement-relevant node changes: a plan computed at one epoch stays valid
# until the next (kopf updates the index before it runs this module's event handler).
_epoch = 0


def epoch() -> int:
    return _epoch


@kopf.index("", "v1", "nodes")
async def node_index(name: str, body: kopf.Body, **_: Any) -> dict[str, NodeState] | None:
    spec = node_from_object(dict(body))
    if spec is None:
        return None
    return {name: node_state(dict(body), spec)}


@kopf.on.event("", "v1", "nodes")
async def node_changed(name: str, type: str | None, body: kopf.Body, **_: Any) -> None:
    global _epoch
    if type == "DELETED":
        _seen.pop(name, None)
    else:
        fingerprint = _fingerprint(body)
        if _seen.get(name) == fingerprint:
            return
        _seen[name] = fingerprint
    _epoch += 1
    wakeups.wake_all()


_listed: tuple[int, list[NodeState]] | None = None


def all_nodes(index: kopf.Index[str, NodeState]) -> list[NodeState]:
    """Every indexed node; one list per node epoch (heartbeats re-index a node with
    the same placement-relevant state, so the list of the epoch still holds)."""
    global _listed
    if _listed is None or _listed[0] != _epoch:
        _listed = (_epoch, [state for store in index.values() for state in store])
    return _listed[1]
