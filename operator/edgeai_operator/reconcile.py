"""One reconcile pass of a DNNDeployment: plan, apply children, observe, report.

Called by the deployment's daemon (handlers/deployments.py) whenever the spec, the
model, a node or a child changes, and every few seconds otherwise. Idempotent: the
children are server-side applied only when their desired form changed; status is
written only when it changed; Events are posted only for decisions that changed
(a new split, a moved stage, a scale step), each with the numbers behind it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeai_operator import k8s
from edgeai_operator.builders import (
    DeploymentOptions,
    Owner,
    build_children,
    priority_class,
    split_summary,
)
from edgeai_operator.conditions import set_condition
from edgeai_operator.errors import SpecError
from edgeai_operator.planning import NodeState, ZonePlans, device_selector, plan_zones

EventSink = Callable[[str, str, str], None]  # (type Normal|Warning, reason, message)


@dataclass
class DeploymentState:
    """What a daemon remembers between passes (the cluster holds the truth)."""

    applied_digest: str = ""
    last_split: dict[str, str] = field(default_factory=dict)
    last_excluded: tuple[str, ...] = ()
    replicas: dict[str, int] = field(default_factory=dict)
    pending_deletes: set[tuple[str, str, str]] = field(default_factory=set)
    last_status_digest: str = ""
    started: float = field(default_factory=time.monotonic)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def excluded_nodes(nodes: Sequence[NodeState]) -> tuple[str, ...]:
    """Edge/cloud nodes stages must leave: NotReady, cordoned or tainted."""
    return tuple(
        sorted(n.spec.name for n in nodes if n.spec.tier in ("edge", "cloud") and not n.usable)
    )


def workload_health(obj: Mapping[str, Any]) -> tuple[int, int]:
    """(available, desired) replicas of a Deployment or DaemonSet."""
    status = obj.get("status") or {}
    if obj["kind"] == "DaemonSet":
        return int(status.get("number_available") or status.get("numberAvailable") or 0), int(
            status.get("desired_number_scheduled") or status.get("desiredNumberScheduled") or 0
        )
    spec_replicas = int((obj.get("spec") or {}).get("replicas") or 0)
    available = int(status.get("available_replicas") or status.get("availableReplicas") or 0)
    updated = int(status.get("updated_replicas") or status.get("updatedReplicas") or 0)
    # A rollout still in progress (old pods on a failed node, say) is not yet available.
    return (min(available, updated), spec_replicas)


def reconcile(
    body: Mapping[str, Any],
    profiles: Sequence[Mapping[str, Any]] | None,
    nodes: Sequence[NodeState],
    state: DeploymentState,
    emit: EventSink,
    *,
    image: str,
) -> dict[str, Any]:
    """One pass; returns the status it wrote (for tests and logs)."""
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    generation = meta.get("generation")
    status = dict(body.get("status") or {})
    conditions: list[dict[str, Any]] = [
        c for c in status.get("conditions", []) if isinstance(c, dict)
    ]
    spec_body = body.get("spec") or {}
    model_name = (spec_body.get("modelRef") or {}).get("name")

    def finish(phase: str, extra: dict[str, Any]) -> dict[str, Any]:
        new_status = {**status, **extra, "phase": phase, "conditions": conditions}
        new_status["observedGeneration"] = generation
        digest = _digest(new_status)
        if digest != state.last_status_digest:
            k8s.patch_status("dnndeployments", namespace, name, new_status)
            state.last_status_digest = digest
        return new_status

    if profiles is None:
        conditions = set_condition(
            conditions,
            "Planned",
            False,
            "ModelNotProfiled",
            f"waiting for DNNModel {model_name!r} in {namespace} to be profiled "
            f"(kubectl get dnnm {model_name})",
            generation,
        )
        return finish("Pending", {})

    try:
        spec, zones = plan_zones(body, profiles, nodes, excluded=())
    except SpecError as exc:
        conditions = set_condition(
            conditions, "Planned", False, "InvalidSpec", str(exc), generation
        )
        conditions = set_condition(
            conditions, "Degraded", True, "InvalidSpec", str(exc), generation
        )
        return finish("Failed", {})

    if not zones.plans:
        why = _no_plan_reason(body, zones, nodes)
        conditions = set_condition(conditions, "Planned", False, "NoFeasiblePlan", why, generation)
        conditions = set_condition(conditions, "Degraded", True, "NoFeasiblePlan", why, generation)
        conditions = set_condition(
            conditions, "Available", False, "NoFeasiblePlan", why, generation
        )
        if status.get("phase") != "Degraded":
            emit("Warning", "NoFeasiblePlan", why)
        return finish("Degraded", {"split": "", "replicas": ""})

    owner = Owner(name=name, namespace=namespace, uid=meta["uid"])
    priority = int(spec_body.get("priority") or 0)
    excluded = excluded_nodes(nodes)
    opts = DeploymentOptions(
        image=image,
        device_selector=device_selector(body),
        excluded_nodes=excluded,
        priority_class=f"edgeai-priority-{priority}" if priority > 0 else None,
    )
    autoscaling = spec_body.get("autoscaling") or {}
    min_replicas = int(autoscaling.get("minReplicas", 1))
    children = build_children(
        owner,
        zones.plans,
        {k: max(v, min_replicas) for k, v in state.replicas.items()},
        opts,
        default_replicas=max(min_replicas, 1),
    )

    _report_plan_changes(zones, state, emit)
    if excluded != state.last_excluded:
        newly = sorted(set(excluded) - set(state.last_excluded))
        if newly:
            emit(
                "Normal",
                "MigratingStages",
                f"nodes {', '.join(newly)} are NotReady, cordoned or tainted: "
                "moving stages off them (new pods Ready before old ones go)",
            )
        state.last_excluded = excluded

    desired_keys = {(c["apiVersion"], c["kind"], c["metadata"]["name"]) for c in children}
    digest = _digest(children)
    if digest != state.applied_digest:
        if opts.priority_class:
            k8s.apply(priority_class(priority))
        for child in children:
            k8s.apply(child)
        state.applied_digest = digest
        existing = set(k8s.owned_children(namespace, name))
        state.pending_deletes = existing - desired_keys

    # Observe the workloads we asked for.
    health: dict[str, tuple[int, int]] = {}
    for api_version, kind, child_name in sorted(desired_keys):
        if kind not in ("Deployment", "DaemonSet"):
            continue
        obj = k8s.get(api_version, kind, child_name, namespace)
        if obj is not None:
            health[child_name] = workload_health(obj)
    available = bool(health) and all(a >= d and d > 0 for a, d in health.values())

    # Make-before-break: obsolete children go only once their replacements serve.
    if available and state.pending_deletes:
        for api_version, kind, child_name in sorted(state.pending_deletes):
            if k8s.delete(api_version, kind, child_name, namespace):
                emit("Normal", "StageRemoved", f"removed {kind} {child_name}: replaced and Ready")
        state.pending_deletes = set()

    predicted = zones.predicted_latency_ms
    slo_ms = spec.slo_latency_ms
    observed = status.get("observed") or {}
    worst_zone = max(zones.plans, key=lambda z: float(zones.plans[z]["predictedLatencyMs"]))
    plan_status = {
        "predictedLatencyMs": round(float(predicted or 0.0), 3),
        "stages": zones.plans[worst_zone]["stages"],
        "transfers": zones.plans[worst_zone]["transfers"],
        "zones": {
            z: {
                "split": split_summary(p),
                "predictedLatencyMs": p["predictedLatencyMs"],
                "devices": zones.devices.get(z, []),
            }
            for z, p in sorted(zones.plans.items())
        },
    }
    conditions = set_condition(
        conditions,
        "Planned",
        True,
        "Planned",
        f"{len(zones.plans)} zone(s) planned, predicted p95 {predicted:.1f} ms"
        + (f" against an SLO of {slo_ms:g} ms" if slo_ms else ""),
        generation,
    )
    if zones.slo_misses:
        why = "; ".join(f"{z}: {r}" for z, r in sorted(zones.slo_misses.items()))
        conditions = set_condition(conditions, "SLOMet", False, "SLOUnreachable", why, generation)
    elif observed.get("p95LatencyMs") is not None and slo_ms is not None:
        met = float(observed["p95LatencyMs"]) <= slo_ms
        conditions = set_condition(
            conditions,
            "SLOMet",
            met,
            "ObservedWithinSLO" if met else "ObservedAboveSLO",
            f"observed p95 {float(observed['p95LatencyMs']):.1f} ms, SLO {slo_ms:g} ms",
            generation,
        )
    else:
        conditions = set_condition(
            conditions,
            "SLOMet",
            True if slo_ms is None else predicted is not None and predicted <= slo_ms,
            "PredictedWithinSLO",
            f"predicted p95 {predicted:.1f} ms"
            + (f", SLO {slo_ms:g} ms" if slo_ms else "")
            + " (no traffic observed yet)",
            generation,
        )
    waiting = sorted(f"{n} {a}/{d}" for n, (a, d) in health.items() if a < d or d == 0)
    conditions = set_condition(
        conditions,
        "Available",
        available,
        "StagesAvailable" if available else "StagesNotReady",
        "every stage has its replicas available"
        if available
        else f"waiting for: {', '.join(waiting)}",
        generation,
    )
    progressing = not available or bool(state.pending_deletes)
    conditions = set_condition(
        conditions,
        "Progressing",
        progressing,
        "RollingOut" if progressing else "Stable",
        "creating or moving stages" if progressing else "all stages at the planned placement",
        generation,
    )
    degraded_reasons = [f"{z}: {r}" for z, r in sorted(zones.unplanned.items())]
    conditions = set_condition(
        conditions,
        "Degraded",
        bool(degraded_reasons),
        "ZonesUnplanned" if degraded_reasons else "AsPlanned",
        "; ".join(degraded_reasons) if degraded_reasons else "every zone with devices is served",
        generation,
    )
    if degraded_reasons:
        phase = "Degraded"
    elif available:
        phase = "Available"
    else:
        phase = "Progressing"
    replicas_text = " ".join(
        f"{n.removeprefix(name + '-')}:{a}/{d}" for n, (a, d) in sorted(health.items())
    )
    return finish(
        phase,
        {
            "plan": plan_status,
            "split": split_summary(zones.plans[worst_zone]),
            "replicas": replicas_text,
        },
    )


def _report_plan_changes(zones: ZonePlans, state: DeploymentState, emit: EventSink) -> None:
    for zone, plan in sorted(zones.plans.items()):
        split = split_summary(plan)
        if state.last_split.get(zone) == split:
            continue
        transfers = ", ".join(
            f"{t['from']}->{t['to']} {int(t['bytes'])} B {float(t['ms']):.1f} ms"
            for t in plan.get("transfers", [])
        )
        compute = ", ".join(
            f"{s['tier']} {float(s['computeMs']):.1f} ms" for s in plan.get("stages", [])
        )
        links = ", ".join(
            f"{link['from']}->{link['to']} {link['mbps']:g} Mbps/{link['rttMs']:g} ms"
            for link in plan.get("links", [])
        )
        verb = "Replanned" if zone in state.last_split else "Planned"
        emit(
            "Normal",
            verb,
            f"zone {zone}: split {split}, predicted {float(plan['predictedLatencyMs']):.1f} ms "
            f"(compute {compute}; transfer {transfers or 'none'}; links {links})",
        )
        state.last_split[zone] = split
    for zone in set(state.last_split) - set(zones.plans):
        emit("Normal", "ZoneReleased", f"zone {zone}: no selected device left, stages removed")
        del state.last_split[zone]


def _no_plan_reason(body: Mapping[str, Any], zones: ZonePlans, nodes: Sequence[NodeState]) -> str:
    if zones.unplanned:
        return "; ".join(f"zone {z}: {r}" for z, r in sorted(zones.unplanned.items()))
    selector = device_selector(body)
    shown = ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "(none)"
    devices = [n for n in nodes if n.spec.tier == "device"]
    ready = [n for n in devices if n.ready]
    return (
        f"no Ready device node matches spec.devices.nodeSelector {shown} "
        f"({len(ready)} of {len(devices)} device nodes Ready); label device nodes "
        "edgeai.dev/tier=device with a topology.kubernetes.io/zone, or change the selector"
    )
