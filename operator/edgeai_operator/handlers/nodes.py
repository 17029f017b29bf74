"""Nodes as placement sees them, indexed by name; any change wakes the deployments."""

from __future__ import annotations

from typing import Any

import kopf

from edgeai_operator.context import context_of
from edgeai_operator.planning import NodeState, node_state
from edgeai_operator.topology import node_from_object


def _fingerprint(body: kopf.Body) -> tuple[Any, ...]:
    """Only these parts of a node change placement; heartbeats alone do not."""
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


@kopf.index("", "v1", "nodes")
async def node_index(name: str, body: kopf.Body, **_: Any) -> dict[str, NodeState] | None:
    spec = node_from_object(dict(body))
    if spec is None:
        return None
    return {name: node_state(dict(body), spec)}


@kopf.on.event("", "v1", "nodes")
async def node_changed(
    name: str, type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any
) -> None:
    # kopf updates the index before it runs this handler: a new epoch sees the change.
    ctx = context_of(memo)
    if ctx.nodes.changed(name, None if type == "DELETED" else _fingerprint(body)):
        ctx.wakeups.wake_all()


def all_nodes(memo: kopf.Memo, index: kopf.Index[str, NodeState]) -> list[NodeState]:
    """Every indexed node; one list per node epoch (heartbeats re-index a node with
    the same placement-relevant state, so the list of the epoch still holds)."""
    return context_of(memo).nodes.nodes(index.values())
