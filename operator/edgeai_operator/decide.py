"""What one reconcile pass of a DNNDeployment should do, decided in pure code.

`decide(observed, state)` takes everything a pass observed (the DNNDeployment, its
model's profiles, the nodes, its stage workloads and pods as the watch cache holds
them, the pods' parsed /metrics) and what the deployment remembers between passes,
and returns a `Decision`: the children to apply, the deletions and shared-stage
releases allowed now, the status patch, the Events, the scale decisions and the
state for the next pass. It does no I/O and mutates none of its inputs; the
`ClusterWriter` in writer.py carries a decision out.

Make-before-break: a child a new plan no longer needs is deleted (a shared stage is
released) only in a pass that applies nothing and sees every desired workload with
all its replicas available, so an old stage goes only once its replacement serves.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from edgeai_operator.autoscaler import (
    ScalePolicy,
    Scrape,
    StageScaler,
    offload_observed,
    stage_targets,
)
from edgeai_operator.builders import (
    BACKBONE_LABEL,
    REPLICAS_ANNOTATION,
    DeploymentOptions,
    Owner,
    build_children,
    is_shared,
    priority_class,
    priority_class_name,
    shared_edge,
    workload_name,
)
from edgeai_operator.conditions import set_condition
from edgeai_operator.deployspec import DeploymentSpec, parse_deployment
from edgeai_operator.errors import SpecError
from edgeai_operator.netpol import network_policies
from edgeai_operator.plandoc import PlanDocument
from edgeai_operator.planning import NodeState, ZonePlans, plan_zones

ChildKey = tuple[str, str, str]  # (apiVersion, kind, name)
WORKLOAD_KINDS = ("Deployment", "DaemonSet")


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Apply:
    obj: dict[str, Any]
    field_manager: str | None = None  # None: the operator's own; a shared stage: its user's


@dataclass(frozen=True)
class Release:
    """Give up this deployment's share of a shared stage object."""

    key: ChildKey
    others: int  # users that keep it (0: the object is deleted)


@dataclass(frozen=True)
class ScaleDecision:
    workload: str
    from_replicas: int
    to_replicas: int
    reason: str


@dataclass(frozen=True)
class Observed:
    """What a pass saw. `workloads` and `pods` are this deployment's stage workloads
    and pods and those of the shared stages it uses; `scrapes` maps a pod name to its
    parsed /metrics (None: not scraped in this pass)."""

    body: Mapping[str, Any]
    profiles: Sequence[Mapping[str, Any]] | None
    nodes: Sequence[NodeState]
    image: str
    now: float
    workloads: Mapping[tuple[str, str], Mapping[str, Any]] = field(default_factory=dict)
    pods: Sequence[Mapping[str, Any]] = ()
    scrapes: Mapping[str, Scrape] | None = None
    node_epoch: int | None = None
    # children found by listing the cluster (first pass after an operator restart)
    owned: frozenset[ChildKey] | None = None
    # shared stage objects this deployment is an owner of (listed when state asks)
    shares_in_use: frozenset[ChildKey] | None = None


@dataclass
class DeploymentState:
    """What must survive between passes (the cluster holds everything else)."""

    applied_digest: str = ""
    applied_keys: frozenset[ChildKey] = frozenset()
    desired_keys: frozenset[ChildKey] = frozenset()
    pending_deletes: frozenset[ChildKey] = frozenset()
    pending_releases: frozenset[ChildKey] = frozenset()
    shared: bool = False  # the last applied children included a shared workload
    list_shares: bool = False  # the next observation lists the shared stages in use
    last_status_digest: str = ""
    last_split: Mapping[str, str] = field(default_factory=dict)
    last_excluded: tuple[tuple[str, str, str | None], ...] = ()
    replicas: Mapping[str, int] = field(default_factory=dict)
    scalers: Mapping[str, StageScaler] = field(default_factory=dict)
    entry: StageScaler = field(default_factory=lambda: StageScaler(ScalePolicy()))
    observed: Mapping[str, Any] = field(default_factory=dict)
    # the last plan and what it was computed from: (generation, profiles id, node epoch)
    plan_inputs: tuple[Any, ...] | None = None
    plan: ZonePlans | None = None
    plan_profiles: Any = None  # keeps the profiles referenced, so their id stays theirs
    children_inputs: tuple[Any, ...] | None = None
    # observation bookkeeping (writer-free): when stages were last scraped, and the
    # back-off of pods that did not answer: (pod, IP) -> (failures in a row, retry at)
    last_scrape: float = float("-inf")
    scrape_backoff: Mapping[tuple[str, str], tuple[int, float]] = field(default_factory=dict)
    # stage certificates (stagetls.py): the ones the pods mount, when to renew next
    tls_stages: tuple[Any, ...] = ()
    tls_recheck: Any = None  # a UTC datetime; None: nothing to renew


@dataclass
class Decision:
    status: dict[str, Any]  # the whole status after this pass
    status_patch: dict[str, Any] | None  # a merge patch, None when unchanged
    state: DeploymentState
    applies: list[Apply] = field(default_factory=list)
    deletes: list[ChildKey] = field(default_factory=list)
    releases: list[Release] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    scales: list[ScaleDecision] = field(default_factory=list)


def digest(obj: Any) -> str:
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


# ---------------------------------------------------------------------------------
# decide


class _Pass:
    """The working set of one decision: the observation, the next state, the output."""

    def __init__(self, observed: Observed, state: DeploymentState) -> None:
        self.obs = observed
        self.state = replace(state)
        meta = observed.body["metadata"]
        self.name, self.namespace = str(meta["name"]), str(meta["namespace"])
        self.owner = Owner(name=self.name, namespace=self.namespace, uid=str(meta.get("uid")))
        self.generation = meta.get("generation")
        self.old_status: dict[str, Any] = dict(observed.body.get("status") or {})
        self.conditions: list[dict[str, Any]] = [
            c for c in self.old_status.get("conditions", []) if isinstance(c, dict)
        ]
        self.events: list[Event] = []
        self.applies: list[Apply] = []
        self.deletes: list[ChildKey] = []
        self.releases: list[Release] = []
        self.scales: list[ScaleDecision] = []

    def emit(self, type_: str, reason: str, message: str) -> None:
        self.events.append(Event(type_, reason, message))

    def condition(self, type_: str, status: bool | None, reason: str, message: str) -> None:
        self.conditions = set_condition(
            self.conditions, type_, status, reason, message, self.generation
        )

    def finish(self, phase: str, extra: Mapping[str, Any]) -> Decision:
        status = {**self.old_status, **extra, "phase": phase, "conditions": self.conditions}
        status["observedGeneration"] = self.generation
        status_digest = digest(status)
        patch = None
        if status_digest != self.state.last_status_digest:
            patch = merge_patch(self.old_status, status)
            self.state.last_status_digest = status_digest
        return Decision(
            status=status,
            status_patch=patch,
            state=self.state,
            applies=self.applies,
            deletes=self.deletes,
            releases=self.releases,
            events=self.events,
            scales=self.scales,
        )


def decide(observed: Observed, state: DeploymentState) -> Decision:
    """One pass's decision; see the module docstring."""
    p = _Pass(observed, state)
    try:
        spec = parse_deployment(observed.body)
        if observed.profiles is None:
            p.condition(
                "Planned",
                False,
                "ModelNotProfiled",
                f"waiting for DNNModel {spec.model_ref!r} in {p.namespace} to be profiled "
                f"(kubectl get dnnm {spec.model_ref})",
            )
            return p.finish("Pending", {})
        zones = _plan(p, spec, observed.profiles)
    except SpecError as exc:
        p.condition("Planned", False, "InvalidSpec", str(exc))
        p.condition("Degraded", True, "InvalidSpec", str(exc))
        return p.finish("Failed", {})
    if not zones.plans:
        why = _no_plan_reason(spec, zones, observed.nodes)
        for type_ in ("Planned", "Degraded", "Available"):
            p.condition(type_, type_ == "Degraded", "NoFeasiblePlan", why)
        if p.old_status.get("phase") != "Degraded":
            p.emit("Warning", "NoFeasiblePlan", why)
        return p.finish("Degraded", {"split": "", "replicas": ""})
    return _decide_planned(p, spec, zones)


def _plan(p: _Pass, spec: DeploymentSpec, profiles: Sequence[Mapping[str, Any]]) -> ZonePlans:
    """The zones' plans, reused while spec, profiles and nodes are unchanged."""
    obs = p.obs
    inputs = (p.generation, id(profiles), obs.node_epoch)
    if obs.node_epoch is not None and p.state.plan_inputs == inputs and p.state.plan:
        return p.state.plan
    zones = plan_zones(spec, profiles, obs.nodes)
    p.state.plan_inputs, p.state.plan, p.state.plan_profiles = inputs, zones, profiles
    return zones


def _decide_planned(p: _Pass, spec: DeploymentSpec, zones: ZonePlans) -> Decision:
    excluded = excluded_nodes(p.obs.nodes)
    opts = DeploymentOptions(
        image=p.obs.image,
        device_selector=dict(spec.device_selector),
        excluded_nodes=excluded,
        priority_class=priority_class_name(spec.priority) if spec.priority > 0 else None,
        transport=spec.transport,
        stage_tls=spec.security.stage_tls,
        entry_token=spec.security.entry_token,
        entry_client_ca=spec.security.entry_client_ca,
    )
    shared_model = spec.model_ref if spec.sharing == "backbone" else None
    shared_names = {
        zone: stage.name
        for zone, plan in zones.plans.items()
        if shared_model and (stage := shared_edge(plan, shared_model, zone, opts)) is not None
    }
    if p.obs.scrapes is not None:
        _autoscale(p, spec, zones, shared_names)
    applying = _children(p, spec, zones, opts, shared_model, shared_names)
    _report_plan_changes(p, zones)
    _report_exclusions(p, excluded)
    health = _health(p)
    available = not applying and bool(health) and all(a >= d and d > 0 for a, d in health.values())
    if available:
        _break(p)
    return _status(p, spec, zones, health, available)


def _children(
    p: _Pass,
    spec: DeploymentSpec,
    zones: ZonePlans,
    opts: DeploymentOptions,
    shared_model: str | None,
    shared_names: Mapping[str, str],
) -> bool:
    """Builds the children when their inputs changed, applies them when their form
    changed; returns whether this pass applies anything."""
    state = p.state
    replicas = {k: max(v, spec.autoscaling.min_replicas) for k, v in state.replicas.items()}
    # Children depend on the plan, the replicas and the excluded nodes only (and, when
    # shared, on other users' wishes): unchanged inputs, unchanged children.
    child_inputs = (
        (
            state.plan_inputs,
            tuple(sorted(replicas.items())),
            opts.excluded_nodes,
            opts.image,
            opts.priority_class,
        )
        if p.obs.node_epoch is not None and not shared_model
        else None
    )
    if child_inputs is not None and child_inputs == state.children_inputs:
        return False
    children = build_children(
        p.owner,
        zones.plans,
        replicas,
        opts,
        default_replicas=max(spec.autoscaling.min_replicas, 1),
        shared_model=shared_model,
    )
    security = spec.security
    if security.network_policy:
        children += network_policies(
            p.owner, children, security.entry_namespaces, security.entry_cidrs
        )
    live_replicas = _share_replicas(p, children)
    state.desired_keys = frozenset(_key(c) for c in children)
    state.children_inputs = child_inputs
    children_digest = digest([children, live_replicas])
    if children_digest == state.applied_digest:
        return False
    # The first pass of a deployment reconciled before (an operator restart) adds what
    # exists; after that this state knows what it applied.
    recovering = not state.applied_digest and bool(p.old_status)
    applied = set(state.applied_keys) | (set(p.obs.owned or ()) if recovering else set())
    applied |= {_key(c) for c in children if not is_shared(c)}
    if opts.priority_class:
        p.applies.append(Apply(priority_class(spec.priority)))
    for child in children:
        manager = p.owner.field_manager if is_shared(child) else None
        p.applies.append(Apply(child, manager))
    state.applied_keys = frozenset(applied)
    state.applied_digest = children_digest
    state.pending_deletes = frozenset(applied - state.desired_keys)
    # Shares to give up are looked up when this deployment shares or has shared.
    state.list_shares = bool(shared_model or state.shared or recovering)
    state.shared = bool(shared_names)
    return True


def released_priority_class(
    deleted: tuple[str, str], priority: int, users: Iterable[tuple[str, str]]
) -> str | None:
    """The PriorityClass a deleted DNNDeployment leaves behind: its own, unless another
    live deployment (`users`: those with the same spec.priority) still runs with it."""
    if priority <= 0 or any(user != deleted for user in users):
        return None
    return priority_class_name(priority)


def _key(obj: Mapping[str, Any]) -> ChildKey:
    return (str(obj["apiVersion"]), str(obj["kind"]), str(obj["metadata"]["name"]))


def _owners(obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    meta = obj.get("metadata") or {}
    refs = meta.get("ownerReferences") or meta.get("owner_references") or []
    return [r for r in refs if r.get("kind") == "DNNDeployment"]


def _share_replicas(p: _Pass, children: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Sets each shared Deployment's replicas to the max its users want (their
    `replicas.edgeai.dev/<name>` annotations; users still among its owners); returns
    the live replicas that differ from that, so a change by another user re-applies."""
    live_replicas: dict[str, int] = {}
    for child in children:
        if child["kind"] != "Deployment" or not is_shared(child):
            continue
        live = p.obs.workloads.get(("Deployment", child["metadata"]["name"]))
        if live is None:
            continue
        users = {str(r["name"]) for r in _owners(live) if r["name"] != p.name}
        wants = [int(child["spec"]["replicas"])]
        annotations = (live.get("metadata") or {}).get("annotations") or {}
        for key, value in annotations.items():
            user = key.removeprefix(REPLICAS_ANNOTATION)
            if key.startswith(REPLICAS_ANNOTATION) and user in users and str(value).isdigit():
                wants.append(int(value))
        child["spec"]["replicas"] = max(wants)
        running = int((live.get("spec") or {}).get("replicas") or 0)
        if running != child["spec"]["replicas"]:
            live_replicas[child["metadata"]["name"]] = running
    return live_replicas


def _health(p: _Pass) -> dict[str, tuple[int, int]]:
    """(available, desired) of every desired stage workload; one not seen yet is 0/0."""
    health: dict[str, tuple[int, int]] = {}
    for _, kind, name in sorted(p.state.desired_keys):
        if kind in WORKLOAD_KINDS:
            obj = p.obs.workloads.get((kind, name))
            health[name] = workload_health(obj) if obj is not None else (0, 0)
    return health


def _break(p: _Pass) -> None:
    """Make-before-break: with every replacement available, obsolete children go, and
    shared stages this deployment left are released."""
    state = p.state
    if p.obs.shares_in_use is not None:
        state.pending_releases = frozenset(p.obs.shares_in_use - state.desired_keys)
        state.list_shares = False
    for key in sorted(state.pending_deletes):
        p.deletes.append(key)
        p.emit("Normal", "StageRemoved", f"removed {key[1]} {key[2]}: replaced and Ready")
    state.applied_keys = state.applied_keys - state.pending_deletes
    state.pending_deletes = frozenset()
    for key in sorted(state.pending_releases):
        live = p.obs.workloads.get(("Deployment", key[2])) or {}
        others = len({r.get("uid") for r in _owners(live)} - {p.owner.uid})
        p.releases.append(Release(key, others))
        p.emit(
            "Normal",
            "SharedStageReleased",
            f"no longer uses shared {key[1]} {key[2]}"
            + (f" ({others} other user(s) keep it)" if others else " (deleted: no user left)"),
        )
    state.pending_releases = frozenset()


# ---------------------------------------------------------------------------------
# autoscaling


def _pods_by_workload(p: _Pass) -> dict[str, list[str]]:
    """Names of the Running pods with an IP, grouped by workload name."""
    out: dict[str, list[str]] = {}
    for pod in p.obs.pods:
        meta, status = pod["metadata"], pod.get("status") or {}
        if meta.get("deletionTimestamp") or status.get("phase") != "Running":
            continue
        if not status.get("podIP"):
            continue
        lbls = meta.get("labels") or {}
        name = lbls.get(BACKBONE_LABEL) or workload_name(
            p.owner, lbls.get("edgeai.dev/tier", ""), lbls.get("edgeai.dev/zone")
        )
        out.setdefault(name, []).append(str(meta["name"]))
    return out


def policy(spec: DeploymentSpec, target_ms: float) -> ScalePolicy:
    a = spec.autoscaling
    return ScalePolicy(
        min_replicas=a.min_replicas,
        max_replicas=a.max_replicas,
        target_ms=target_ms,
        stable_window_s=float(a.stable_window_s),
        panic_window_s=float(a.panic_window_s),
        scale_down_delay_s=float(a.scale_down_delay_s),
    )


def _autoscale(p: _Pass, spec: DeploymentSpec, zones: ZonePlans, shared: Mapping[str, str]) -> None:
    """Feeds this pass's scrapes to each edge/cloud stage's scaler and scales it;
    writes `status.observed` into the state. A shared edge workload (`shared[zone]`)
    gets this deployment's wish; it runs the max of its users' wishes."""
    state, t = p.state, p.obs.now
    scrapes = p.obs.scrapes or {}
    scalers = copy.deepcopy(dict(state.scalers))
    replicas = dict(state.replicas)
    pods = _pods_by_workload(p)
    slo_ms = spec.slo_latency_ms or 0.0
    for zone, plan in sorted(zones.plans.items()):
        targets = stage_targets(plan, slo_ms) if slo_ms else {}
        for tier in ("edge", "cloud"):
            if tier not in targets:
                continue
            name = _stage_workload(p, tier, zone, shared, pods)
            scaler = scalers.get(name)
            if scaler is None or scaler.policy.target_ms != targets[tier]:
                scaler = scalers[name] = _rescaled(scaler, policy(spec, targets[tier]))
            seen = {pod: scrapes[pod] for pod in pods.get(name, []) if pod in scrapes}
            if not seen:
                continue
            scaler.observe(t, seen)
            current = replicas.get(name, scaler.policy.min_replicas)
            desired, why = scaler.decide(t, current)
            if desired != current:
                p.scales.append(ScaleDecision(name, current, desired, why))
                verb = "ScaledUp" if desired > current else "ScaledDown"
                p.emit("Normal", verb, f"{name}: {current} -> {desired} replicas: {why}")
                replicas[name] = desired
    state.scalers, state.replicas = scalers, replicas
    state.observed = _observed_latency(p, spec, zones, pods, scalers)


def _rescaled(scaler: StageScaler | None, new: ScalePolicy) -> StageScaler:
    if scaler is None:
        return StageScaler(new)
    scaler.policy = new  # a new target keeps the stage's history
    return scaler


def _stage_workload(
    p: _Pass, tier: str, zone: str, shared: Mapping[str, str], pods: Mapping[str, Any]
) -> str:
    if tier == "edge" and zone in shared:
        return shared[zone]
    shared_cloud = workload_name(p.owner, tier, None)
    if tier == "cloud" and shared_cloud in pods:
        return shared_cloud
    return workload_name(p.owner, tier, zone)


def _observed_latency(
    p: _Pass,
    spec: DeploymentSpec,
    zones: ZonePlans,
    pods: Mapping[str, Sequence[str]],
    scalers: Mapping[str, StageScaler],
) -> dict[str, Any]:
    """`status.observed`: the entry's p95 and rate over the stable window (from the
    device pods), and each scaled stage's p95 against its target."""
    t, scrapes = p.obs.now, p.obs.scrapes or {}
    entry_scrapes = {
        pod: scrapes[pod]
        for zone in zones.plans
        for pod in pods.get(workload_name(p.owner, "device", zone), [])
        if pod in scrapes
    }
    observed: dict[str, Any] = {}
    window = float(spec.autoscaling.stable_window_s)
    if entry_scrapes:
        entry = copy.deepcopy(p.state.entry)
        entry.observe(t, entry_scrapes)
        p.state.entry = entry
        p95 = entry.p95_ms(t, window)
        if p95 is not None:
            observed["p95LatencyMs"] = round(p95, 2)
            observed["requestsPerSecond"] = round(entry.requests(t, window) / window, 2)
    for name, scaler in sorted(scalers.items()):
        p95 = scaler.p95_ms(t, scaler.policy.stable_window_s)
        if p95 is not None:
            observed.setdefault("stages", {})[name] = {
                "p95LatencyMs": round(p95, 2),
                "targetMs": round(scaler.policy.target_ms, 2),
            }
    # per-input offloading (spec.offload): exit, escalation and reuse rates, accuracy
    # on labelled requests, from every stage pod's counters
    served = [scrapes[pod] for names in pods.values() for pod in names if pod in scrapes]
    offload = offload_observed(served)
    if offload:
        observed["offload"] = offload
    return observed


# ---------------------------------------------------------------------------------
# events and status


def _report_plan_changes(p: _Pass, zones: ZonePlans) -> None:
    last = dict(p.state.last_split)
    for zone, plan in sorted(zones.plans.items()):
        if last.get(zone) == plan.split:
            continue
        verb = "Replanned" if zone in last else "Planned"
        p.emit("Normal", verb, f"zone {zone}: {describe_plan(plan)}")
        last[zone] = plan.split
    for zone in sorted(set(last) - set(zones.plans)):
        p.emit("Normal", "ZoneReleased", f"zone {zone}: no selected device left, stages removed")
        del last[zone]
    p.state.last_split = last


def describe_plan(plan: PlanDocument) -> str:
    """A plan's split and the numbers behind it, for its Event."""
    transfers = ", ".join(
        f"{t.from_tier}->{t.to_tier} {t.bytes} B {t.ms:.1f} ms" for t in plan.transfers
    )
    compute = ", ".join(f"{s.tier} {s.compute_ms:.1f} ms" for s in plan.stages)
    links = ", ".join(
        f"{link.from_tier}->{link.to_tier} {link.mbps:g} Mbps/{link.rtt_ms:g} ms"
        for link in plan.links
    )
    serving = ", ".join(f"{tier} {ms:.1f} ms" for tier, ms in plan.serving_ms.items())
    return (
        f"split {plan.split}, predicted {plan.predicted_latency_ms or 0.0:.1f} ms "
        f"(compute {compute}; "
        + (f"serving {serving}; " if serving else "")
        + f"transfer {transfers or 'none'}; links {links})"
    )


def _report_exclusions(p: _Pass, excluded: tuple[tuple[str, str, str | None], ...]) -> None:
    if excluded == p.state.last_excluded:
        return
    newly = sorted({e[0] for e in excluded} - {e[0] for e in p.state.last_excluded})
    if newly:
        p.emit(
            "Normal",
            "MigratingStages",
            f"nodes {', '.join(newly)} are NotReady, cordoned or tainted: "
            "moving stages off them (new pods Ready before old ones go)",
        )
    p.state.last_excluded = excluded


def _plan_status(zones: ZonePlans) -> tuple[dict[str, Any], PlanDocument]:
    worst_zone = max(zones.plans, key=lambda z: zones.plans[z].predicted_latency_ms or 0.0)
    worst = zones.plans[worst_zone]
    doc = worst.to_dict()
    # per-input offloading: the shares of inputs each exit is expected to answer
    shares = doc.get("offload", {}).get("exitShares")
    return {
        "predictedLatencyMs": round(float(zones.predicted_latency_ms or 0.0), 3),
        "stages": doc["stages"],
        "transfers": doc["transfers"],
        **({"exitShares": shares} if shares else {}),
        "zones": {
            z: {
                "split": plan.split,
                "predictedLatencyMs": plan.predicted_latency_ms,
                "devices": zones.devices.get(z, []),
                # what the zone's stage pods serve: the variant and its artefact
                "variant": plan.model.variant,
                "artifact": plan.model.digest,
            }
            for z, plan in sorted(zones.plans.items())
        },
    }, worst


def _slo_condition(p: _Pass, spec: DeploymentSpec, zones: ZonePlans) -> None:
    predicted = zones.predicted_latency_ms or 0.0
    slo_ms = spec.slo_latency_ms
    p95 = p.state.observed.get("p95LatencyMs")
    if zones.slo_misses:
        why = "; ".join(f"{z}: {r}" for z, r in sorted(zones.slo_misses.items()))
        p.condition("SLOMet", False, "SLOUnreachable", why)
    elif p95 is not None and slo_ms is not None:
        met = float(p95) <= slo_ms
        p.condition(
            "SLOMet",
            met,
            "ObservedWithinSLO" if met else "ObservedAboveSLO",
            f"observed p95 {float(p95):.1f} ms, SLO {slo_ms:g} ms",
        )
    else:
        p.condition(
            "SLOMet",
            True if slo_ms is None else predicted <= slo_ms,
            "PredictedWithinSLO",
            f"predicted p95 {predicted:.1f} ms"
            + (f", SLO {slo_ms:g} ms" if slo_ms else "")
            + " (no traffic observed yet)",
        )


def _status(
    p: _Pass,
    spec: DeploymentSpec,
    zones: ZonePlans,
    health: Mapping[str, tuple[int, int]],
    available: bool,
) -> Decision:
    predicted = zones.predicted_latency_ms or 0.0
    slo_ms = spec.slo_latency_ms
    plan_status, worst = _plan_status(zones)
    p.condition(
        "Planned",
        True,
        "Planned",
        f"{len(zones.plans)} zone(s) planned, predicted p95 {predicted:.1f} ms"
        + (f" against an SLO of {slo_ms:g} ms" if slo_ms else ""),
    )
    _slo_condition(p, spec, zones)
    waiting = sorted(f"{n} {a}/{d}" for n, (a, d) in health.items() if a < d or d == 0)
    p.condition(
        "Available",
        available,
        "StagesAvailable" if available else "StagesNotReady",
        "every stage has its replicas available"
        if available
        else f"waiting for: {', '.join(waiting) or 'the stages just applied'}",
    )
    progressing = not available or bool(p.state.pending_deletes)
    p.condition(
        "Progressing",
        progressing,
        "RollingOut" if progressing else "Stable",
        "creating or moving stages" if progressing else "all stages at the planned placement",
    )
    degraded = [f"{z}: {r}" for z, r in sorted(zones.unplanned.items())]
    p.condition(
        "Degraded",
        bool(degraded),
        "ZonesUnplanned" if degraded else "AsPlanned",
        "; ".join(degraded) if degraded else "every zone with devices is served",
    )
    phase = "Degraded" if degraded else "Available" if available else "Progressing"
    replicas_text = " ".join(
        f"{n.removeprefix(p.name + '-')}:{a}/{d}" for n, (a, d) in sorted(health.items())
    )
    return p.finish(
        phase,
        {
            "plan": plan_status,
            "split": worst.split,
            "variant": _variants_text(zones),
            "replicas": replicas_text,
            "observed": dict(p.state.observed),
        },
    )


def _variants_text(zones: ZonePlans) -> str:
    """The VARIANT column: the one variant every zone serves, or `zone:variant` each."""
    chosen = {z: plan.model.variant or "fp32" for z, plan in sorted(zones.plans.items())}
    if len(set(chosen.values())) == 1:
        return next(iter(chosen.values()))
    return ",".join(f"{z}:{v}" for z, v in chosen.items())


def _no_plan_reason(spec: DeploymentSpec, zones: ZonePlans, nodes: Sequence[NodeState]) -> str:
    if zones.unplanned:
        return "; ".join(f"zone {z}: {r}" for z, r in sorted(zones.unplanned.items()))
    shown = ",".join(f"{k}={v}" for k, v in sorted(spec.device_selector.items())) or "(none)"
    devices = [n for n in nodes if n.spec.tier == "device"]
    ready = [n for n in devices if n.ready]
    return (
        f"no Ready device node matches spec.devices.nodeSelector {shown} "
        f"({len(ready)} of {len(devices)} device nodes Ready); label device nodes "
        "edgeai.dev/tier=device with a topology.kubernetes.io/zone, or change the selector"
    )
