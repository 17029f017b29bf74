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
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeai_operator import k8s, opmetrics
from edgeai_operator.autoscaler import (
    ScalePolicy,
    Scrape,
    StageScaler,
    parse_metrics,
    stage_targets,
)
from edgeai_operator.builders import (
    BACKBONE_LABEL,
    REPLICAS_ANNOTATION,
    WORKER_PORT,
    DeploymentOptions,
    Owner,
    build_children,
    is_shared,
    priority_class,
    shared_edge,
    split_summary,
    workload_name,
)
from edgeai_operator.cache import ClusterView, LiveView
from edgeai_operator.conditions import set_condition
from edgeai_operator.errors import SpecError
from edgeai_operator.planning import NodeState, ZonePlans, device_selector, plan_zones

EventSink = Callable[[str, str, str], None]  # (type Normal|Warning, reason, message)
Scraper = Callable[[str], str | None]  # pod IP -> its /metrics text, None if unreachable
# Passes woken in a burst (a rollout's status updates) scrape the stages at most this often.
SCRAPE_INTERVAL_S = 2.0
# A pod that did not answer its last scrapes (not serving yet, unreachable) is tried
# again after 2, 4, ... up to this many seconds, not on every pass.
SCRAPE_BACKOFF_MAX_S = 30.0


def scrape_pod(ip: str) -> str | None:
    """GET http://<pod IP>:8080/metrics, a short timeout: a slow pod is a missing sample."""
    try:
        with urllib.request.urlopen(f"http://{ip}:{WORKER_PORT}/metrics", timeout=1.0) as resp:
            return resp.read().decode()  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


@dataclass
class DeploymentState:
    """What a daemon remembers between passes (the cluster holds the truth)."""

    applied_digest: str = ""
    last_split: dict[str, str] = field(default_factory=dict)
    last_excluded: tuple[tuple[str, str, str | None], ...] = ()
    replicas: dict[str, int] = field(default_factory=dict)
    scalers: dict[str, StageScaler] = field(default_factory=dict)
    entry: StageScaler = field(default_factory=lambda: StageScaler(ScalePolicy()))
    pending_deletes: set[tuple[str, str, str]] = field(default_factory=set)
    # shared workloads this deployment no longer uses: its share goes once ours serve
    pending_releases: set[tuple[str, str, str]] = field(default_factory=set)
    shared: bool = False  # the last applied children included a shared workload
    last_status_digest: str = ""
    # children applied so far (what a changed plan may leave obsolete)
    applied_keys: set[tuple[str, str, str]] = field(default_factory=set)
    # the last plan and what it was computed from: (generation, profiles, node epoch)
    plan_inputs: tuple[Any, ...] | None = None
    plan: Any = None
    plan_profiles: Any = None
    last_scrape: float = float("-inf")
    observed: dict[str, Any] = field(default_factory=dict)
    # (pod name, IP) -> (failed scrapes in a row, when to try again)
    scrape_backoff: dict[tuple[str, str], tuple[int, float]] = field(default_factory=dict)
    children_inputs: tuple[Any, ...] | None = None
    desired_keys: set[tuple[str, str, str]] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning `old` into `new`: keys `new` dropped become null
    (a plain merge patch would keep them, e.g. a released zone in status.plan.zones)."""
    patch: dict[str, Any] = {}
    for key in old:
        if key not in new:
            patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            patch[key] = merge_patch(before, value)
        else:
            patch[key] = value
    return patch


def excluded_nodes(nodes: Sequence[NodeState]) -> tuple[tuple[str, str, str | None], ...]:
    """Edge/cloud nodes stages must leave: NotReady, cordoned or tainted."""
    return tuple(
        sorted(
            (n.spec.name, n.spec.tier, n.spec.zone)
            for n in nodes
            if n.spec.tier in ("edge", "cloud") and not n.usable
        )
    )


def workload_health(obj: Mapping[str, Any]) -> tuple[int, int]:
    """(available, desired) replicas of a Deployment or DaemonSet. Until its controller
    has seen the latest spec (status.observedGeneration), none count as available: the
    status still describes the previous template."""
    status = obj.get("status") or {}
    generation = int((obj.get("metadata") or {}).get("generation") or 0)
    current = int(status.get("observedGeneration") or 0) >= generation
    if obj["kind"] == "DaemonSet":
        available = int(status.get("numberAvailable") or 0)
        updated = int(status.get("updatedNumberScheduled") or 0)
        desired = int(status.get("desiredNumberScheduled") or 0)
        return (min(available, updated) if current else 0), desired
    spec_replicas = int((obj.get("spec") or {}).get("replicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    updated = int(status.get("updatedReplicas") or 0)
    # A rollout still in progress (old pods on a failed node, say) is not yet available.
    return (min(available, updated) if current else 0), spec_replicas


def reconcile(
    body: Mapping[str, Any],
    profiles: Sequence[Mapping[str, Any]] | None,
    nodes: Sequence[NodeState],
    state: DeploymentState,
    emit: EventSink,
    *,
    image: str,
    scrape: Scraper = scrape_pod,
    now: Callable[[], float] = time.monotonic,
    view: ClusterView | None = None,
    node_epoch: int | None = None,
) -> dict[str, Any]:
    """One pass; returns the status it wrote (for tests and logs).

    `view` reads workloads and pods (the operator passes its watch cache; default: the
    API server). `node_epoch` counts placement-relevant node changes: with it, a pass
    whose spec, profiles and nodes are unchanged reuses the last plan."""
    view = view or LiveView()
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
            patch = merge_patch(body.get("status") or {}, new_status)
            k8s.patch_status("dnndeployments", namespace, name, patch)
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

    inputs = (generation, id(profiles), node_epoch)
    try:
        if node_epoch is not None and state.plan_inputs == inputs:
            spec, zones = state.plan
        else:
            spec, zones = plan_zones(body, profiles, nodes, excluded=())
            # `profiles` is kept referenced so its id stays its own
            state.plan_inputs, state.plan = inputs, (spec, zones)
            state.plan_profiles = profiles
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
    shared_model = str(model_name) if spec_body.get("sharing") == "backbone" else None
    shared_names: dict[str, str] = {}
    for zone, plan in zones.plans.items():
        stage = shared_edge(plan, shared_model, zone, opts) if shared_model else None
        if stage is not None:
            shared_names[zone] = stage.name
    t = now()
    if t - state.last_scrape >= SCRAPE_INTERVAL_S:
        state.observed = _autoscale(
            owner, spec_body, zones, state, emit, scrape, t, view, shared_names
        )
        state.last_scrape = t
    observed = state.observed
    replicas = {k: max(v, min_replicas) for k, v in state.replicas.items()}
    # Children depend on the plan, the replicas and the excluded nodes only (and, when
    # shared, on other users' wishes): unchanged inputs, unchanged children.
    child_inputs = (
        (inputs, tuple(sorted(replicas.items())), excluded, image, opts.priority_class)
        if node_epoch is not None and not shared_model
        else None
    )
    children: list[dict[str, Any]] = []
    live_replicas: dict[str, int] = {}
    unchanged = child_inputs is not None and child_inputs == state.children_inputs
    if not unchanged:
        children = build_children(
            owner,
            zones.plans,
            replicas,
            opts,
            default_replicas=max(min_replicas, 1),
            shared_model=shared_model,
        )
        live_replicas = _share_replicas(owner, children, view)

    _report_plan_changes(zones, state, emit)
    if excluded != state.last_excluded:
        newly = sorted({e[0] for e in excluded} - {e[0] for e in state.last_excluded})
        if newly:
            emit(
                "Normal",
                "MigratingStages",
                f"nodes {', '.join(newly)} are NotReady, cordoned or tainted: "
                "moving stages off them (new pods Ready before old ones go)",
            )
        state.last_excluded = excluded

    if unchanged:
        desired_keys = state.desired_keys
        digest = state.applied_digest
    else:
        desired_keys = {(c["apiVersion"], c["kind"], c["metadata"]["name"]) for c in children}
        digest = _digest([children, live_replicas])
    first_pass = not state.applied_digest
    if digest != state.applied_digest:
        if opts.priority_class:
            k8s.apply(priority_class(priority))
        # On the first pass of a deployment that was reconciled before (an operator
        # restart), what exists is listed; after that this daemon knows what it applied.
        # A deployment never reconciled (no status yet) has no children to find.
        recovering = first_pass and bool(body.get("status"))
        if recovering:
            state.applied_keys |= set(k8s.owned_children(namespace, name))
        state.applied_keys |= {
            (c["apiVersion"], c["kind"], c["metadata"]["name"])
            for c in children
            if not is_shared(c)
        }
        for child in children:
            if is_shared(child):
                view.remember(k8s.apply(child, field_manager=owner.field_manager))
            else:
                view.remember(k8s.apply(child))
        opmetrics.inc("edgeai_operator_applies_total", len(children))
        state.applied_digest = digest
        state.pending_deletes = state.applied_keys - desired_keys
        # Shares to give up: looked up when this deployment shares or has shared, and
        # when recovering; one list call.
        if shared_model or state.shared or recovering:
            used = set(k8s.shared_children_of(namespace, owner.uid))
            state.pending_releases = used - desired_keys
        state.shared = bool(shared_names)
    state.desired_keys = desired_keys
    state.children_inputs = child_inputs

    # Observe the workloads we asked for.
    health: dict[str, tuple[int, int]] = {}
    for api_version, kind, child_name in sorted(desired_keys):
        if kind not in ("Deployment", "DaemonSet"):
            continue
        obj = view.workload(api_version, kind, child_name, namespace)
        if obj is not None:
            health[child_name] = workload_health(obj)
    available = bool(health) and all(a >= d and d > 0 for a, d in health.values())

    # Make-before-break: obsolete children go only once their replacements serve.
    if available and state.pending_deletes:
        for api_version, kind, child_name in sorted(state.pending_deletes):
            if k8s.delete(api_version, kind, child_name, namespace):
                emit("Normal", "StageRemoved", f"removed {kind} {child_name}: replaced and Ready")
            state.applied_keys.discard((api_version, kind, child_name))
        state.pending_deletes = set()
    if available and state.pending_releases:
        for api_version, kind, child_name in sorted(state.pending_releases):
            left = k8s.release_shared(api_version, kind, child_name, namespace, owner)
            emit(
                "Normal",
                "SharedStageReleased",
                f"no longer uses shared {kind} {child_name}"
                + (f" ({left} other user(s) keep it)" if left else " (deleted: no user left)"),
            )
        state.pending_releases = set()

    predicted = zones.predicted_latency_ms
    slo_ms = spec.slo_latency_ms
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
            "observed": observed,
        },
    )


def _share_replicas(
    owner: Owner, children: Sequence[dict[str, Any]], view: ClusterView
) -> dict[str, int]:
    """Sets each shared Deployment's replicas to the max its users want (their
    `replicas.edgeai.dev/<name>` annotations; users still among its owners); returns
    the live replicas, so a change by another user re-applies ours."""
    live_replicas: dict[str, int] = {}
    for child in children:
        if child["kind"] != "Deployment" or not is_shared(child):
            continue
        live = view.workload("apps/v1", "Deployment", child["metadata"]["name"], owner.namespace)
        if live is None:
            continue
        meta = live["metadata"]
        users = {
            ref["name"]
            for ref in meta.get("owner_references") or meta.get("ownerReferences") or []
            if ref.get("kind") == "DNNDeployment" and ref["name"] != owner.name
        }
        wants = [int(child["spec"]["replicas"])]
        for key, value in (meta.get("annotations") or {}).items():
            user = key.removeprefix(REPLICAS_ANNOTATION)
            if key.startswith(REPLICAS_ANNOTATION) and user in users and str(value).isdigit():
                wants.append(int(value))
        child["spec"]["replicas"] = max(wants)
        live_replicas[child["metadata"]["name"]] = int(
            (live.get("spec") or {}).get("replicas") or 0
        )
    return live_replicas


def _pods_by_workload(
    owner: Owner, view: ClusterView, shared: Sequence[str] = ()
) -> dict[str, list[tuple[str, str]]]:
    """Running pods with an IP, grouped by workload name: [(pod name, pod IP)]."""
    pods = view.pods(owner.namespace, "edgeai.dev/deployment", owner.name)
    for name in sorted(set(shared)):
        pods += view.pods(owner.namespace, BACKBONE_LABEL, name)
    out: dict[str, list[tuple[str, str]]] = {}
    for pod in pods:
        meta, status = pod["metadata"], pod.get("status") or {}
        ip = status.get("podIP")
        if meta.get("deletionTimestamp") or status.get("phase") != "Running" or not ip:
            continue
        lbls = meta.get("labels") or {}
        name = lbls.get(BACKBONE_LABEL) or workload_name(
            owner, lbls.get("edgeai.dev/tier", ""), lbls.get("edgeai.dev/zone")
        )
        out.setdefault(name, []).append((meta["name"], ip))
    return out


def _scrape(state: DeploymentState, scrape: Scraper, pod: str, ip: str, t: float) -> Scrape | None:
    """One pod's parsed /metrics, None when it does not answer (then backed off)."""
    key = (pod, ip)
    failures, retry_at = state.scrape_backoff.get(key, (0, t))
    if t < retry_at:
        return None
    text = scrape(ip)
    if text is None:
        delay = min(SCRAPE_BACKOFF_MAX_S, 2.0 ** (failures + 1))
        state.scrape_backoff[key] = (failures + 1, t + delay)
        return None
    state.scrape_backoff.pop(key, None)
    return parse_metrics(text)


def _autoscale(
    owner: Owner,
    spec_body: Mapping[str, Any],
    zones: ZonePlans,
    state: DeploymentState,
    emit: EventSink,
    scrape: Scraper,
    t: float,
    view: ClusterView,
    shared: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Scrapes every stage pod, scales edge/cloud stages; returns `status.observed`.
    `shared` maps a zone to its shared edge workload: this deployment's scaler there
    says what it wants; the shared workload runs the max of its users' wishes."""
    shared = shared or {}
    autoscaling = spec_body.get("autoscaling") or {}
    slo_ms = float((spec_body.get("slo") or {}).get("latencyP95Ms") or 0.0)
    pods = _pods_by_workload(owner, view, list(shared.values()))
    live = {(p, ip) for members in pods.values() for p, ip in members}
    for key in set(state.scrape_backoff) - live:
        del state.scrape_backoff[key]
    entry_scrapes: dict[str, Scrape] = {}
    for zone, plan in sorted(zones.plans.items()):
        targets = stage_targets(plan, slo_ms) if slo_ms else {}
        for tier in ("edge", "cloud"):
            if tier not in targets:
                continue
            shared_cloud = workload_name(owner, tier, None)
            name = (
                shared_cloud
                if tier == "cloud" and shared_cloud in pods
                else workload_name(owner, tier, zone)
            )
            if tier == "edge" and zone in shared:
                name = shared[zone]
            if name in state.scalers and state.scalers[name].policy.target_ms != targets[tier]:
                state.scalers[name].policy = _policy(autoscaling, targets[tier])
            scaler = state.scalers.setdefault(
                name, StageScaler(_policy(autoscaling, targets[tier]))
            )
            scrapes = {
                p: m
                for p, ip in pods.get(name, [])
                if (m := _scrape(state, scrape, p, ip, t)) is not None
            }
            if not scrapes:
                continue
            scaler.observe(t, scrapes)
            current = state.replicas.get(name, scaler.policy.min_replicas)
            desired, why = scaler.decide(t, current)
            if desired != current:
                verb = "ScaledUp" if desired > current else "ScaledDown"
                emit("Normal", verb, f"{name}: {current} -> {desired} replicas: {why}")
                opmetrics.inc("edgeai_operator_scale_events_total")
                state.replicas[name] = desired
        device = workload_name(owner, "device", zone)
        for p, ip in pods.get(device, []):
            m = _scrape(state, scrape, p, ip, t)
            if m is not None:
                entry_scrapes[p] = m
    observed: dict[str, Any] = {}
    if entry_scrapes:
        state.entry.observe(t, entry_scrapes)
        window = float(autoscaling.get("stableWindowSeconds", 60))
        p95 = state.entry.p95_ms(t, window)
        if p95 is not None:
            observed["p95LatencyMs"] = round(p95, 2)
            observed["requestsPerSecond"] = round(state.entry.requests(t, window) / window, 2)
    for name, scaler in sorted(state.scalers.items()):
        p95 = scaler.p95_ms(t, scaler.policy.stable_window_s)
        if p95 is not None:
            observed.setdefault("stages", {})[name] = {
                "p95LatencyMs": round(p95, 2),
                "targetMs": round(scaler.policy.target_ms, 2),
            }
    return observed


def _policy(autoscaling: Mapping[str, Any], target_ms: float) -> ScalePolicy:
    return ScalePolicy(
        min_replicas=int(autoscaling.get("minReplicas", 1)),
        max_replicas=int(autoscaling.get("maxReplicas", 8)),
        target_ms=target_ms,
        stable_window_s=float(autoscaling.get("stableWindowSeconds", 60)),
        panic_window_s=float(autoscaling.get("panicWindowSeconds", 6)),
        scale_down_delay_s=float(autoscaling.get("scaleDownDelaySeconds", 30)),
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
        serving = ", ".join(
            f"{tier} {float(ms):.1f} ms" for tier, ms in (plan.get("servingMs") or {}).items()
        )
        verb = "Replanned" if zone in state.last_split else "Planned"
        emit(
            "Normal",
            verb,
            f"zone {zone}: split {split}, predicted {float(plan['predictedLatencyMs']):.1f} ms "
            f"(compute {compute}; "
            + (f"serving {serving}; " if serving else "")
            + f"transfer {transfers or 'none'}; links {links})",
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
