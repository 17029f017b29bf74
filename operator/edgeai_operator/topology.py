"""Cluster topology files: node groups per tier and zone, as plain data.

One file format serves three users: `edgeai cluster up` creates kwok nodes from it,
`edgeai plan --topology` reads tier compute and links from it, and tests build their
clusters from it. A node group expands to nodes named `<group>-<zone>-<index>`
(or `<group>-<index>` without zones), carrying the tier label, the zone label, the
`edgeai.dev/*` annotations and the declared capacity.

    kind: Topology
    nodeGroups:
      - name: device
        tier: device
        zones: [zone-a, zone-b]
        countPerZone: 3
        capacity: {cpu: "4", memory: 4Gi, pods: "20"}
        gflops: 8
        uplinkMbps: 10
        uplinkRttMs: 15
        powerWatts: 5
        labels: {app: camera}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeai_operator import (
    GFLOPS_ANNOTATION,
    POWER_WATTS_ANNOTATION,
    TIER_LABEL,
    TIERS,
    UPLINK_MBPS_ANNOTATION,
    UPLINK_RTT_MS_ANNOTATION,
    ZONE_LABEL,
)
from edgeai_operator.errors import SpecError, read_yaml_documents

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_GROUP_KEYS = {
    "name",
    "tier",
    "zones",
    "countPerZone",
    "count",
    "capacity",
    "gflops",
    "uplinkMbps",
    "uplinkRttMs",
    "powerWatts",
    "labels",
    "taints",
}


@dataclass(frozen=True)
class NodeSpec:
    """One node of a topology, ready to become a v1.Node."""

    name: str
    tier: str
    zone: str | None
    capacity: dict[str, str]
    gflops: float
    uplink_mbps: float | None
    uplink_rtt_ms: float | None
    power_watts: float | None
    labels: dict[str, str] = field(default_factory=dict)
    taints: tuple[dict[str, str], ...] = ()

    def manifest(self, *, kwok: bool = True) -> dict[str, Any]:
        """The v1.Node object; `kwok=True` marks it for kwok to simulate."""
        labels = {
            **self.labels,
            TIER_LABEL: self.tier,
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "type": "kwok" if kwok else "real",
        }
        if self.zone:
            labels[ZONE_LABEL] = self.zone
        annotations = {GFLOPS_ANNOTATION: _num(self.gflops)}
        if self.uplink_mbps is not None:
            annotations[UPLINK_MBPS_ANNOTATION] = _num(self.uplink_mbps)
        if self.uplink_rtt_ms is not None:
            annotations[UPLINK_RTT_MS_ANNOTATION] = _num(self.uplink_rtt_ms)
        if self.power_watts is not None:
            annotations[POWER_WATTS_ANNOTATION] = _num(self.power_watts)
        if kwok:
            annotations[KWOK_ANNOTATION] = "fake"
        node: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.name, "labels": labels, "annotations": annotations},
            "spec": {"taints": [dict(t) for t in self.taints]} if self.taints else {},
            "status": {"capacity": dict(self.capacity), "allocatable": dict(self.capacity)},
        }
        return node


@dataclass(frozen=True)
class Topology:
    nodes: tuple[NodeSpec, ...]

    def by_tier(self, tier: str) -> list[NodeSpec]:
        return [n for n in self.nodes if n.tier == tier]

    def zones(self) -> list[str]:
        return sorted({n.zone for n in self.nodes if n.zone and n.tier != "cloud"})


def _num(value: float) -> str:
    return f"{value:g}"


def _positive(group: str, key: str, value: Any, *, required: bool) -> float | None:
    where = f"nodeGroups[{group}].{key}"
    if value is None:
        if required:
            raise SpecError(where, "is required", "a positive number")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise SpecError(where, f"must be a positive number, got {value!r}", "a number > 0")
    return float(value)


def parse_topology(data: Any) -> Topology:
    """Validates a topology document and expands its node groups into nodes."""
    if not isinstance(data, dict):
        raise SpecError("topology", "must be a mapping", "kind: Topology with nodeGroups")
    if data.get("kind", "Topology") != "Topology":
        raise SpecError("kind", f"must be Topology, got {data.get('kind')!r}", "Topology")
    groups = data.get("nodeGroups")
    if not isinstance(groups, list) or not groups:
        raise SpecError("nodeGroups", "must be a non-empty list", "a list of node groups")
    nodes: list[NodeSpec] = []
    for i, group in enumerate(groups):
        if not isinstance(group, dict):
            raise SpecError(f"nodeGroups[{i}]", "must be a mapping", "a node group")
        name = group.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise SpecError(
                f"nodeGroups[{i}].name",
                f"invalid name {name!r}",
                "a DNS label: lower-case letters, digits and '-'",
            )
        unknown = sorted(set(group) - _GROUP_KEYS)
        if unknown:
            raise SpecError(
                f"nodeGroups[{name}]", f"unknown field(s) {unknown}", ", ".join(sorted(_GROUP_KEYS))
            )
        tier = group.get("tier")
        if tier not in TIERS:
            raise SpecError(f"nodeGroups[{name}].tier", f"unknown tier {tier!r}", ", ".join(TIERS))
        zones = group.get("zones")
        if zones is not None:
            if not isinstance(zones, list) or not all(
                isinstance(z, str) and _NAME.match(z) for z in zones
            ):
                raise SpecError(
                    f"nodeGroups[{name}].zones", f"invalid zones {zones!r}", "a list of DNS labels"
                )
            count = group.get("countPerZone", 1)
            where = f"nodeGroups[{name}].countPerZone"
        else:
            count = group.get("count", 1)
            where = f"nodeGroups[{name}].count"
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise SpecError(where, f"must be a positive integer, got {count!r}", "an integer >= 1")
        capacity = group.get("capacity", {"cpu": "4", "memory": "8Gi", "pods": "110"})
        if not isinstance(capacity, dict):
            raise SpecError(
                f"nodeGroups[{name}].capacity",
                "must be a mapping",
                "resource name -> quantity, e.g. {cpu: '4', memory: 8Gi}",
            )
        capacity = {str(k): str(v) for k, v in capacity.items()}
        capacity.setdefault("pods", "110")
        labels = group.get("labels", {})
        if not isinstance(labels, dict):
            raise SpecError(f"nodeGroups[{name}].labels", "must be a mapping", "label -> value")
        taints = group.get("taints", [])
        if not isinstance(taints, list) or not all(
            isinstance(t, dict) and "key" in t and "effect" in t for t in taints
        ):
            raise SpecError(
                f"nodeGroups[{name}].taints",
                "must be a list of taints",
                "{key, value?, effect: NoSchedule|PreferNoSchedule|NoExecute}",
            )
        gflops = _positive(name, "gflops", group.get("gflops"), required=True)
        assert gflops is not None
        common = dict(
            tier=tier,
            capacity=capacity,
            gflops=gflops,
            uplink_mbps=_positive(name, "uplinkMbps", group.get("uplinkMbps"), required=False),
            uplink_rtt_ms=_positive(name, "uplinkRttMs", group.get("uplinkRttMs"), required=False),
            power_watts=_positive(name, "powerWatts", group.get("powerWatts"), required=False),
            labels={str(k): str(v) for k, v in labels.items()},
            taints=tuple({str(k): str(v) for k, v in t.items()} for t in taints),
        )
        if zones is not None:
            for zone in zones:
                for j in range(count):
                    nodes.append(NodeSpec(name=f"{name}-{zone}-{j}", zone=zone, **common))
        else:
            for j in range(count):
                nodes.append(NodeSpec(name=f"{name}-{j}", zone=None, **common))
    names = [n.name for n in nodes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SpecError("nodeGroups", f"node names collide: {dupes}", "distinct group names")
    return Topology(nodes=tuple(nodes))


def load_topology(path: str | Path) -> Topology:
    docs = read_yaml_documents(path, "--topology")
    return parse_topology(docs[0] if len(docs) == 1 else None)


def _annotation_number(annotations: dict[str, str], key: str) -> float | None:
    raw = annotations.get(key)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if value > 0 else None


def node_from_object(obj: dict[str, Any]) -> NodeSpec | None:
    """A live v1.Node as a NodeSpec; None when it carries no valid `edgeai.dev/tier`.

    An annotation `<key>-measured` (e.g. `edgeai.dev/uplink-mbps-measured`), when it
    holds a positive number, overrides the declared `<key>`. Nothing in this project
    writes it: it is for whatever measures a node from outside (an administrator or a
    node agent). The device stage's own uplink estimate picks its split and is exported
    as the `edgeai_uplink_mbps` metric; it is not written to the node.
    """
    meta = obj.get("metadata", {})
    labels: dict[str, str] = dict(meta.get("labels") or {})
    annotations: dict[str, str] = dict(meta.get("annotations") or {})
    tier = labels.get(TIER_LABEL)
    if tier not in TIERS:
        return None

    def pick(key: str) -> float | None:
        measured = _annotation_number(annotations, f"{key}-measured")
        return measured if measured is not None else _annotation_number(annotations, key)

    capacity = {str(k): str(v) for k, v in (obj.get("status", {}).get("capacity") or {}).items()}
    return NodeSpec(
        name=str(meta.get("name", "")),
        tier=tier,
        zone=labels.get(ZONE_LABEL),
        capacity=capacity,
        gflops=pick(GFLOPS_ANNOTATION) or 1.0,
        uplink_mbps=pick(UPLINK_MBPS_ANNOTATION),
        uplink_rtt_ms=pick(UPLINK_RTT_MS_ANNOTATION),
        power_watts=pick(POWER_WATTS_ANNOTATION),
        labels=labels,
        taints=tuple(
            {str(k): str(v) for k, v in t.items()}
            for t in (obj.get("spec", {}).get("taints") or [])
        ),
    )
