"""Plans for a DNNDeployment on the live cluster: one plan per zone with selected devices.

Pure: takes the deployment body, the DNNModel's stored profiles and the nodes (as
`NodeSpec`s), returns per-zone Plan documents (the same shape `edgeai plan` prints)
and the reasons behind anything that could not be planned. Which nodes count:

- devices: tier `device`, matching `spec.devices.nodeSelector`, Ready;
- edge servers of the zone and cloud nodes: Ready, schedulable, not excluded;
- a zone whose edge servers are all gone is planned device -> cloud;
- when no plan meets the SLO, the best-effort plan (min latency, no SLO) is used and
  the reason is kept, so the deployment keeps serving while `SLOMet` says why not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from edgeai_operator.deployspec import DeploymentSpec, parse_deployment
from edgeai_operator.errors import SpecError
from edgeai_operator.plancli import build_problem, plan_document
from edgeai_operator.planner import plan_partitions
from edgeai_operator.topology import NodeSpec, Topology


@dataclass(frozen=True)
class NodeState:
    """A node as placement sees it."""

    spec: NodeSpec
    ready: bool
    schedulable: bool

    @property
    def usable(self) -> bool:
        return self.ready and self.schedulable


@dataclass
class ZonePlans:
    plans: dict[str, dict[str, Any]] = field(default_factory=dict)
    # zone -> why its plan misses the SLO (the plan is best effort)
    slo_misses: dict[str, str] = field(default_factory=dict)
    # zone -> why it has no plan at all
    unplanned: dict[str, str] = field(default_factory=dict)
    devices: dict[str, list[str]] = field(default_factory=dict)

    @property
    def predicted_latency_ms(self) -> float | None:
        values = [float(p["predictedLatencyMs"]) for p in self.plans.values()]
        return max(values) if values else None


def node_state(obj: Mapping[str, Any], spec: NodeSpec) -> NodeState:
    conditions = obj.get("status", {}).get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    taints = obj.get("spec", {}).get("taints") or []
    blocking = [
        t
        for t in taints
        if t.get("effect") in ("NoSchedule", "NoExecute")
        and not str(t.get("key", "")).startswith("node.kubernetes.io/")
    ]
    unschedulable = bool(obj.get("spec", {}).get("unschedulable")) or bool(blocking)
    return NodeState(spec=spec, ready=ready, schedulable=not unschedulable)


def _matches(node: NodeSpec, selector: Mapping[str, str]) -> bool:
    return all(node.labels.get(k) == v for k, v in selector.items())


def device_selector(body: Mapping[str, Any]) -> dict[str, str]:
    devices = (body.get("spec") or {}).get("devices") or {}
    return {str(k): str(v) for k, v in (devices.get("nodeSelector") or {}).items()}


def plan_zones(
    body: Mapping[str, Any],
    profiles: Sequence[Mapping[str, Any]],
    nodes: Sequence[NodeState],
    *,
    excluded: Sequence[str] = (),
) -> tuple[DeploymentSpec, ZonePlans]:
    """Per-zone plans; raises SpecError for a spec no cluster state can fix."""
    spec = parse_deployment(dict(body))
    if not profiles:
        raise SpecError("spec.modelRef", "the model has no profile yet")
    selector = device_selector(body)
    result = ZonePlans()
    servers = [
        n.spec
        for n in nodes
        if n.spec.tier in ("edge", "cloud") and n.usable and n.spec.name not in excluded
    ]
    clouds = [n for n in servers if n.tier == "cloud"]
    zones = sorted({n.spec.zone for n in nodes if n.spec.tier == "device" and n.spec.zone})
    method = "measured" if all(p.get("host", {}).get("gflops") for p in profiles) else "analytic"
    for zone in zones:
        devices = [
            n.spec
            for n in nodes
            if n.spec.tier == "device"
            and n.spec.zone == zone
            and n.ready
            and _matches(n.spec, selector)
        ]
        if not devices:
            continue
        result.devices[zone] = sorted(d.name for d in devices)
        edges = [n for n in servers if n.tier == "edge" and n.zone == zone]
        topology = Topology(nodes=tuple(devices + edges + clouds))
        try:
            problem, context = build_problem(
                spec, [dict(p) for p in profiles], topology, zone=zone, method=method
            )
        except SpecError as exc:
            result.unplanned[zone] = str(exc)
            continue
        plan = plan_partitions(problem)
        if not plan.feasible:
            relaxed = replace(problem, slo_latency_ms=None, slo_throughput_rps=None)
            best = plan_partitions(relaxed)
            if not best.feasible:
                result.unplanned[zone] = plan.reason or best.reason or "no feasible placement"
                continue
            result.slo_misses[zone] = plan.reason or "the SLO cannot be met"
            plan = best
        doc = plan_document(spec, [dict(p) for p in profiles], plan, context, method)
        doc["zone"] = zone
        result.plans[zone] = doc
    return spec, result
