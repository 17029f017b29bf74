"""Plans for a DNNDeployment on the live cluster: one plan per zone with selected devices.

Pure: takes the deployment body, the DNNModel's stored profiles and the nodes (as
`NodeSpec`s), returns per-zone `PlanDocument`s (what `edgeai plan` prints)
and the reasons behind anything that could not be planned. Which nodes count:

- devices: tier `device`, matching `spec.devices.nodeSelector`, Ready;
- edge servers of the zone and cloud nodes: Ready and schedulable;
- a zone whose edge servers are all gone is planned device -> cloud;
- `spec.placement.partitioning: none` places the whole model on the single best tier
  (the same solve as `edgeai plan`), `auto` splits it across tiers;
- when no plan meets the SLO, the best-effort plan (min latency, no SLO) is used and
  the reason is kept, so the deployment keeps serving while `SLOMet` says why not;
- a zone in `edge_only` (a shared trunk's, trunkplan.py) is planned on its edge
  servers alone from the fp32 profile, the one the trunk's digest was checked on.

Compute per tier: a profile measured on one host (`host.gflops` set) is scaled to
each tier as `edgeai plan --profile` does. Otherwise the DNNModel's profiling Jobs may
have measured some tiers (`profiles[].measuredTiers.<tier>`: host GFLOPS and
per-segment ms on a node of that tier). A zone is planned from those measurements
only when every tier it could use (its topology's tiers that `spec.placement.tiers`
allows) is measured, each tier from its own measurement (scaled by that host's GFLOPS
over the planned node's, as above); if any such tier is not measured the whole zone
is planned analytically (FLOPs / GFLOPS), so one plan never mixes the two.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from edgeai_operator.deployspec import DeploymentSpec
from edgeai_operator.errors import SpecError
from edgeai_operator.offloadplan import check_offload, offload_section, solve_offload
from edgeai_operator.plandoc import PlanDocument
from edgeai_operator.planner import Problem
from edgeai_operator.problem import (
    OVERHEAD_FIELDS,
    OVERHEAD_KEYS,
    build_problem,
    plan_document,
)
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
    plans: dict[str, PlanDocument] = field(default_factory=dict)
    # zone -> why its plan misses the SLO (the plan is best effort)
    slo_misses: dict[str, str] = field(default_factory=dict)
    # zone -> why it has no plan at all
    unplanned: dict[str, str] = field(default_factory=dict)
    devices: dict[str, list[str]] = field(default_factory=dict)

    @property
    def predicted_latency_ms(self) -> float | None:
        values = [p.predicted_latency_ms or 0.0 for p in self.plans.values()]
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


def zone_devices(
    selector: Mapping[str, str], nodes: Sequence[NodeState]
) -> dict[str, list[NodeSpec]]:
    """The Ready device nodes matching `selector`, by zone (the zones a deployment
    with this device selector is planned in)."""
    out: dict[str, list[NodeSpec]] = {}
    for n in nodes:
        if n.spec.tier == "device" and n.spec.zone and n.ready and _matches(n.spec, selector):
            out.setdefault(n.spec.zone, []).append(n.spec)
    return out


def plan_zones(
    spec: DeploymentSpec,
    profiles: Sequence[Mapping[str, Any]],
    nodes: Sequence[NodeState],
    edge_only: frozenset[str] = frozenset(),
) -> ZonePlans:
    """Per-zone plans; raises SpecError for a spec no cluster state can fix."""
    if not profiles:
        raise SpecError("spec.modelRef", "the model has no profile yet")
    check_offload(spec, profiles)
    result = ZonePlans()
    servers = [n.spec for n in nodes if n.spec.tier in ("edge", "cloud") and n.usable]
    clouds = [n for n in servers if n.tier == "cloud"]
    by_zone = zone_devices(spec.device_selector, nodes)
    own_spec, own_profiles = spec, profiles
    for zone in sorted(by_zone):
        devices = by_zone[zone]
        spec, profiles = own_spec, own_profiles
        if zone in edge_only:
            spec = replace(own_spec, tiers=("edge",), adaptive_split=False)
            profiles = [p for p in own_profiles if p.get("variant") == "fp32"] or own_profiles
        single_host = all(p.get("host", {}).get("gflops") for p in profiles)
        method = "measured" if single_host else "analytic"
        result.devices[zone] = sorted(d.name for d in devices)
        edges = [n for n in servers if n.tier == "edge" and n.zone == zone]
        topology = Topology(nodes=tuple(devices + edges + clouds))
        used = [t for t in spec.tiers if any(n.tier == t for n in topology.nodes)]
        per_tier = not single_host and all(
            t in (p.get("measuredTiers") or {}) for p in profiles for t in used
        )
        zone_method = "measured" if per_tier else method
        try:
            if per_tier:
                problem, context = _per_tier_problem(spec, profiles, topology, zone, used)
            else:
                problem, context = build_problem(
                    spec, [dict(p) for p in profiles], topology, zone=zone, method=method
                )
        except SpecError as exc:
            result.unplanned[zone] = str(exc)
            continue
        # per-input offloading: the split costed with the exit shares (offloadplan)
        section = offload_section(profiles)
        gflops = {t: float(v["gflops"]) for t, v in context["tiers"].items()}
        plan, shares = solve_offload(spec, problem, section, gflops)
        if not plan.feasible:
            relaxed = replace(problem, slo_latency_ms=None, slo_throughput_rps=None)
            best, shares = solve_offload(spec, relaxed, section, gflops)
            if not best.feasible:
                result.unplanned[zone] = plan.reason or best.reason or "no feasible placement"
                continue
            result.slo_misses[zone] = plan.reason or "the SLO cannot be met"
            plan = best
        measured_on = (
            {t: profiles[0]["measuredTiers"][t].get("node") for t in used} if per_tier else None
        )
        result.plans[zone] = plan_document(
            spec,
            [dict(p) for p in profiles],
            plan,
            context,
            zone_method,
            zone=zone,
            measured_on=measured_on,
            exit_shares=shares,
        )
    return result


def tier_profile(profile: Mapping[str, Any], tier: str) -> dict[str, Any]:
    """The profile as measured on a node of `tier` (host GFLOPS, per-segment ms)."""
    measured = profile["measuredTiers"][tier]
    times = [float(t) for t in measured["segmentsMs"]]
    if len(times) != len(profile["segments"]):
        raise SpecError(f"status.profiles[].measuredTiers.{tier}", "segment count differs")
    out = {
        **profile,
        "host": {**(profile.get("host") or {}), "gflops": float(measured["hostGflops"])},
        "segments": [
            {**seg, "measuredMs": ms} for seg, ms in zip(profile["segments"], times, strict=True)
        ],
    }
    # Serving overheads measured on that node replace any measured elsewhere.
    for key in OVERHEAD_KEYS:
        out.pop(key, None)
        if measured.get(key) is not None:
            out[key] = float(measured[key])
    return out


def _per_tier_problem(
    spec: DeploymentSpec,
    profiles: Sequence[Mapping[str, Any]],
    topology: Topology,
    zone: str,
    tiers: Sequence[str],
) -> tuple[Problem, dict[str, Any]]:
    """The zone's problem with each tier's compute from its own measurement."""
    base, context = build_problem(
        spec, [dict(p) for p in profiles], topology, zone=zone, method="analytic"
    )
    node_ms: list[dict[str, tuple[float, ...]]] = [dict(v.graph.node_ms) for v in base.variants]
    overheads: dict[str, dict[str, float]] = {f: {} for f in OVERHEAD_FIELDS}
    for tier in tiers:
        measured, _ = build_problem(
            spec, [tier_profile(p, tier) for p in profiles], topology, zone=zone, method="measured"
        )
        # each tier's overheads from its own node's measurement (scaled to the tier)
        if tier in measured.serving_ms:
            for f in OVERHEAD_FIELDS:
                overheads[f][tier] = float(getattr(measured, f).get(tier, 0.0))
        for i, variant in enumerate(measured.variants):
            node_ms[i][tier] = variant.graph.node_ms[tier]
            if i == 0 and tier in context["tiers"]:
                context["tiers"][tier]["totalMs"] = round(sum(node_ms[i][tier]), 3)
    variants = tuple(
        replace(v, graph=replace(v.graph, node_ms=ms))
        for v, ms in zip(base.variants, node_ms, strict=True)
    )
    if set(overheads["serving_ms"]) != set(tiers):
        # like compute, overheads come from every tier's measurement or from none
        overheads = {f: {} for f in OVERHEAD_FIELDS}
    for tier in overheads["serving_ms"]:
        if tier in context["tiers"]:
            for f, key in OVERHEAD_FIELDS.items():
                context["tiers"][tier][key] = round(overheads[f][tier], 4)
    problem = replace(
        base,
        variants=variants,
        serving_ms=overheads["serving_ms"],
        serving_ms_per_mb=overheads["serving_ms_per_mb"],
        forwarding_ms=overheads["forwarding_ms"],
        forwarding_ms_per_mb=overheads["forwarding_ms_per_mb"],
    )
    return problem, context
