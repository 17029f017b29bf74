"""`decide`, the pure half of a reconcile pass, on literal inputs (no cluster).

Every test builds what a pass observed (the DNNDeployment, a profile, nodes, the
stage workloads as the watch cache holds them, pod scrapes) as literals, calls
`decide`, and checks the decision: what is applied, what is deleted and when, the
status, the Events, the scale steps. `_Cluster` plays the cluster's part between
passes in the simplest honest way: what a pass applied exists in the next one,
available or not as the test says.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from edgeai_operator.autoscaler import Scrape
from edgeai_operator.decide import (
    ChildKey,
    Decision,
    DeploymentState,
    Observed,
    decide,
    released_priority_class,
)
from edgeai_operator.planning import NodeState
from edgeai_operator.topology import NodeSpec

NS = "ns"
IMAGE = "edgeai-worker:test"

# A three-segment chain: a large input, a mid-sized and a small feature map, a tiny
# output. At 1 Mbps the device keeps two segments; at 100 Mbps it keeps one.
PROFILE: dict[str, Any] = {
    "kind": "Profile",
    "model": "digits_cnn",
    "variant": "fp32",
    "input": {"name": "input", "shape": [1, 3, 224, 224], "dtype": "FP32"},
    "host": {},
    "cuts": [
        {"index": 0, "tensors": ["input"], "sizeBytes": 602112, "position": 0},
        {"index": 1, "tensors": ["f1"], "sizeBytes": 20000, "position": 1},
        {"index": 2, "tensors": ["f2"], "sizeBytes": 2000, "position": 2},
        {"index": 3, "tensors": ["output"], "sizeBytes": 40, "position": 3},
    ],
    "segments": [
        {"index": 0, "positions": "0-0", "flops": 20_000_000},
        {"index": 1, "positions": "1-1", "flops": 200_000_000},
        {"index": 2, "positions": "2-2", "flops": 200_000_000},
    ],
}
PROFILES = [PROFILE]


def node(
    name: str,
    tier: str,
    zone: str | None,
    *,
    mbps: float | None = 1.0,
    ready: bool = True,
    schedulable: bool = True,
    labels: Mapping[str, str] | None = None,
) -> NodeState:
    gflops = {"device": 2.0, "edge": 100.0, "cloud": 400.0}[tier]
    spec = NodeSpec(
        name=name,
        tier=tier,
        zone=zone,
        capacity={},
        gflops=gflops,
        uplink_mbps=mbps if tier != "cloud" else None,
        uplink_rtt_ms=5.0 if tier != "cloud" else None,
        power_watts=None,
        labels=dict(labels or {}),
    )
    return NodeState(spec=spec, ready=ready, schedulable=schedulable)


def topology(device_mbps: float = 1.0, **changes: NodeState) -> list[NodeState]:
    """Two zones: zone-a has two devices and two edge servers, zone-b one of each;
    one cloud node. `changes` replaces nodes by name."""
    nodes = {
        "dev-a-0": node("dev-a-0", "device", "zone-a", mbps=device_mbps),
        "dev-a-1": node("dev-a-1", "device", "zone-a", mbps=device_mbps),
        "dev-b-0": node("dev-b-0", "device", "zone-b", mbps=device_mbps),
        "edge-a-0": node("edge-a-0", "edge", "zone-a", mbps=1000.0),
        "edge-a-1": node("edge-a-1", "edge", "zone-a", mbps=1000.0),
        "edge-b-0": node("edge-b-0", "edge", "zone-b", mbps=1000.0),
        "cloud-0": node("cloud-0", "cloud", None),
    }
    nodes.update(changes)
    return list(nodes.values())


def body(
    generation: int = 1,
    status: Mapping[str, Any] | None = None,
    name: str = "cam",
    uid: str = "uid-cam",
    **spec: Any,
) -> dict[str, Any]:
    return {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNDeployment",
        "metadata": {"name": name, "namespace": NS, "uid": uid, "generation": generation},
        "spec": {
            "modelRef": {"name": "digits"},
            "slo": {"latencyP95Ms": 400},
            "placement": {"tiers": ["device", "edge"]},
            **spec,
        },
        "status": dict(status or {}),
    }


def key_of(obj: Mapping[str, Any]) -> ChildKey:
    return (obj["apiVersion"], obj["kind"], obj["metadata"]["name"])


class _Cluster:
    """What exists between passes: each applied workload, and whether the workloads
    report all their replicas available to the next pass."""

    def __init__(self) -> None:
        self.workloads: dict[tuple[str, str], dict[str, Any]] = {}
        self.status: dict[str, Any] = {}
        self.deleted: list[ChildKey] = []

    def absorb(self, decision: Decision) -> None:
        for item in decision.applies:
            obj = copy.deepcopy(item.obj)
            if obj["kind"] in ("Deployment", "DaemonSet"):
                old = self.workloads.get((obj["kind"], obj["metadata"]["name"]))
                generation = 1 if old is None else old["metadata"]["generation"] + 1
                obj["metadata"]["generation"] = generation
                self.workloads[(obj["kind"], obj["metadata"]["name"])] = obj
        for key in decision.deletes:
            self.workloads.pop((key[1], key[2]), None)
            self.deleted.append(key)
        self.status = decision.status

    def set_available(self, available: bool) -> None:
        for obj in self.workloads.values():
            generation = obj["metadata"]["generation"]
            if obj["kind"] == "DaemonSet":
                obj["status"] = {
                    "observedGeneration": generation,
                    "desiredNumberScheduled": 2,
                    "numberAvailable": 2 if available else 1,
                    "updatedNumberScheduled": 2,
                }
            else:
                n = obj["spec"]["replicas"]
                obj["status"] = {
                    "observedGeneration": generation,
                    "availableReplicas": n if available else n - 1,
                    "updatedReplicas": n,
                }


def observed(
    doc: Mapping[str, Any],
    nodes: Sequence[NodeState],
    cluster: _Cluster | None = None,
    *,
    epoch: int = 1,
    profiles: Sequence[Mapping[str, Any]] | None = PROFILES,
    **extra: Any,
) -> Observed:
    return Observed(
        body=doc,
        profiles=profiles,
        nodes=nodes,
        image=IMAGE,
        now=extra.pop("now", 0.0),
        workloads=dict(cluster.workloads) if cluster else {},
        node_epoch=epoch,
        **extra,
    )


def cond(decision: Decision, type_: str) -> dict[str, Any]:
    return next(c for c in decision.status["conditions"] if c["type"] == type_)


def reasons(decision: Decision) -> list[str]:
    return [e.reason for e in decision.events]


def assert_make_before_break(obs: Observed, decision: Decision) -> None:
    """A pass deletes only when it applies nothing and every desired workload is
    observed with all its replicas available."""
    if not decision.deletes and not decision.releases:
        return
    assert not decision.applies
    for _, kind, name in decision.state.desired_keys:
        if kind in ("Deployment", "DaemonSet"):
            live = obs.workloads[(kind, name)]
            status = live["status"]
            if kind == "DaemonSet":
                assert status["numberAvailable"] >= status["desiredNumberScheduled"] > 0
            else:
                assert status["availableReplicas"] >= live["spec"]["replicas"] > 0


def run(
    doc: Mapping[str, Any],
    nodes: Sequence[NodeState],
    cluster: _Cluster,
    state: DeploymentState,
    *,
    available: bool,
    **extra: Any,
) -> tuple[Decision, DeploymentState]:
    """One pass against `cluster`, whose workloads report `available` to it; the
    cluster then holds what the pass applied."""
    cluster.set_available(available)
    obs = observed({**doc, "status": cluster.status}, nodes, cluster, **extra)
    decision = decide(obs, state)
    assert_make_before_break(obs, decision)
    cluster.absorb(decision)
    return decision, decision.state


def settle(
    doc: Mapping[str, Any], nodes: Sequence[NodeState], **extra: Any
) -> tuple[_Cluster, DeploymentState]:
    """A deployment applied and then available."""
    cluster, state = _Cluster(), DeploymentState()
    first, state = run(doc, nodes, cluster, state, available=False, **extra)
    assert first.status["phase"] == "Progressing"
    second, state = run(doc, nodes, cluster, state, available=True, **extra)
    assert second.status["phase"] == "Available"
    return cluster, state


# ---------------------------------------------------------------------------------
# phases and conditions


def test_a_model_not_profiled_yet_is_pending_and_applies_nothing() -> None:
    decision = decide(observed(body(), topology(), profiles=None), DeploymentState())
    assert decision.status["phase"] == "Pending"
    planned = cond(decision, "Planned")
    assert (planned["status"], planned["reason"]) == ("False", "ModelNotProfiled")
    assert "kubectl get dnnm digits" in planned["message"]
    assert not decision.applies
    assert not decision.deletes
    assert decision.status_patch
    again = decide(
        observed(body(status=decision.status), topology(), profiles=None), decision.state
    )
    assert again.status_patch is None  # unchanged status is not written again


def test_an_invalid_spec_fails_naming_the_field() -> None:
    decision = decide(observed(body(objective="fastest"), topology()), DeploymentState())
    assert decision.status["phase"] == "Failed"
    for type_, status in (("Planned", "False"), ("Degraded", "True")):
        c = cond(decision, type_)
        assert (c["status"], c["reason"]) == (status, "InvalidSpec")
        assert "spec.objective" in c["message"]
    assert not decision.applies


def test_no_matching_device_is_degraded_with_an_actionable_reason_once() -> None:
    doc = body(devices={"nodeSelector": {"app": "camera"}})
    first = decide(observed(doc, topology()), DeploymentState())
    assert first.status["phase"] == "Degraded"
    for type_ in ("Planned", "Available"):
        assert cond(first, type_)["status"] == "False"
    degraded = cond(first, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "NoFeasiblePlan")
    assert "app=camera" in degraded["message"]
    assert "3 of 3 device nodes Ready" in degraded["message"]
    assert reasons(first) == ["NoFeasiblePlan"]
    assert not first.applies
    second = decide(observed({**doc, "status": first.status}, topology()), first.state)
    assert reasons(second) == []  # the Warning is posted when the phase turns Degraded


def test_first_pass_applies_every_child_then_turns_available() -> None:
    cluster, state = _Cluster(), DeploymentState()
    first, state = run(body(), topology(), cluster, state, available=False)
    kinds = sorted((k[1], k[2]) for k in map(key_of, (a.obj for a in first.applies)))
    assert ("ConfigMap", "cam-plan") in kinds
    assert ("DaemonSet", "cam-device-zone-a") in kinds
    assert ("DaemonSet", "cam-device-zone-b") in kinds
    assert first.status["phase"] == "Progressing"
    available = cond(first, "Available")
    assert (available["status"], available["reason"]) == ("False", "StagesNotReady")
    assert cond(first, "Progressing")["reason"] == "RollingOut"
    assert reasons(first).count("Planned") == 2  # one per zone, with its numbers
    assert all("predicted" in e.message for e in first.events)

    waiting, state = run(body(), topology(), cluster, state, available=True)
    assert not waiting.applies  # nothing changed: nothing re-applied
    assert waiting.status["phase"] == "Available"
    assert cond(waiting, "Available")["reason"] == "StagesAvailable"
    assert cond(waiting, "Progressing")["reason"] == "Stable"
    assert cond(waiting, "Degraded")["reason"] == "AsPlanned"
    slo = cond(waiting, "SLOMet")
    assert (slo["status"], slo["reason"]) == ("True", "PredictedWithinSLO")
    assert waiting.status["split"]
    assert waiting.status["replicas"]

    quiet = decide(observed(body(status=cluster.status), topology(), cluster), state)
    assert quiet.status_patch is None
    assert not quiet.applies
    assert not quiet.events


def test_workloads_not_all_available_keep_the_deployment_progressing() -> None:
    cluster, state = _Cluster(), DeploymentState()
    _, state = run(body(), topology(), cluster, state, available=False)
    second, _ = run(body(), topology(), cluster, state, available=False)
    assert second.status["phase"] == "Progressing"
    assert "cam-device-zone-a 1/2" in cond(second, "Available")["message"]


def test_an_unreachable_slo_is_reported_and_served_best_effort() -> None:
    doc = body(slo={"latencyP95Ms": 1})
    decision = decide(observed(doc, topology()), DeploymentState())
    slo = cond(decision, "SLOMet")
    assert (slo["status"], slo["reason"]) == ("False", "SLOUnreachable")
    assert decision.applies  # the best-effort plan is deployed


def test_a_zone_that_cannot_be_planned_degrades_the_deployment() -> None:
    nodes = topology(**{"dev-b-0": node("dev-b-0", "device", "zone-b", mbps=None)})
    decision = decide(observed(body(), nodes), DeploymentState())
    assert decision.status["phase"] == "Degraded"
    degraded = cond(decision, "Degraded")
    assert degraded["reason"] == "ZonesUnplanned"
    assert "zone-b" in degraded["message"]
    assert "uplink" in degraded["message"]
    assert "zone-a" in decision.status["plan"]["zones"]  # the other zone is served


@pytest.mark.parametrize(
    ("low_s", "high_s", "status", "reason"),
    [(0.5, 1.0, "False", "ObservedAboveSLO"), (0.01, 0.05, "True", "ObservedWithinSLO")],
)
def test_observed_latency_decides_slo_met(
    low_s: float, high_s: float, status: str, reason: str
) -> None:
    """The entry's p95 from the device pods' histograms, against the SLO (400 ms)."""
    cluster, state = settle(body(), topology())
    pods = [_pod("cam-device-zone-a-x", "device", "zone-a")]
    for t, count in ((10.0, 0.0), (20.0, 100.0)):  # 100 requests, all in (low, high]
        decision, state = run(
            body(),
            topology(),
            cluster,
            state,
            available=True,
            now=t,
            pods=pods,
            scrapes={"cam-device-zone-a-x": _scrape({low_s: 0.0, high_s: count})},
        )
    slo = cond(decision, "SLOMet")
    assert (slo["status"], slo["reason"]) == (status, reason)
    p95 = decision.status["observed"]["p95LatencyMs"]
    assert low_s * 1000 < p95 <= high_s * 1000
    assert decision.status["observed"]["requestsPerSecond"] > 0


def test_offload_rates_and_labelled_accuracy_reach_the_status() -> None:
    """Exit, escalation and reuse counters of the device and edge pods, summed."""
    cluster, state = settle(body(), topology())
    pods = [
        _pod("cam-device-zone-a-x", "device", "zone-a"),
        _pod("cam-edge-zone-a-x", "edge", "zone-a"),
    ]
    device = Scrape(
        buckets={0.01: 0.0, math.inf: 0.0},
        in_flight=0.0,
        offload={
            "edgeai_exit_answers_total": 90.0,
            "edgeai_escalations_total": 10.0,
            "edgeai_labelled_requests_total": 50.0,
            "edgeai_labelled_correct_total": 49.0,
        },
    )
    edge = Scrape(
        buckets={0.01: 0.0, math.inf: 0.0},
        in_flight=0.0,
        offload={"edgeai_reuse_lookups_total": 10.0, "edgeai_reuse_hits_total": 4.0},
    )
    decision, _ = run(
        body(),
        topology(),
        cluster,
        state,
        available=True,
        now=10.0,
        pods=pods,
        scrapes={"cam-device-zone-a-x": device, "cam-edge-zone-a-x": edge},
    )
    assert decision.status["observed"]["offload"] == {
        "exitRate": 0.9,
        "escalationRate": 0.1,
        "reuseHitRate": 0.4,
        "labelledRequests": 50.0,
        "labelledAccuracy": 0.98,
    }


def test_the_status_plan_carries_the_expected_exit_shares() -> None:
    """With spec.offload.exits and a profile carrying the calibration, the plan is
    costed with the shares it gives, and status.plan says what they are."""
    section = {
        "exits": [{"output": "exit_0", "after": "f1", "logitsBytes": 40, "headFlops": 1000}],
        "cascade": {"flops": [1000]},
        "validation": {
            "final_correct": [1] * 10,
            "exits_correct": [[1] * 9 + [0]],
            "exits_maxProb": [[0.9] * 9 + [0.2]],
            "cascade_correct": [1] * 10,
            "cascade_maxProb": [0.9] * 10,
        },
    }
    offload = {"exits": {"rule": "maxProb", "targetAccuracy": 0.95}}
    profiles = [{**PROFILE, "offload": section}]
    decision = decide(
        observed(body(offload=offload), topology(), profiles=profiles), DeploymentState()
    )
    assert decision.status["plan"]["exitShares"] == {"exit_0": 0.9, "final": 0.1}
    plain = decide(observed(body(), topology()), DeploymentState())
    assert "exitShares" not in plain.status["plan"]


def test_no_offload_counters_no_offload_status() -> None:
    cluster, state = settle(body(), topology())
    decision, _ = run(
        body(),
        topology(),
        cluster,
        state,
        available=True,
        now=10.0,
        pods=[_pod("cam-device-zone-a-x", "device", "zone-a")],
        scrapes={"cam-device-zone-a-x": _scrape({0.01: 0.0, 0.05: 10.0})},
    )
    assert "offload" not in decision.status["observed"]


# ---------------------------------------------------------------------------------
# replanning and make-before-break


def test_bandwidth_change_replans_and_rolls_the_stages() -> None:
    cluster, state = settle(body(), topology(device_mbps=1.0))
    before = cluster.status["split"]
    decision, state = run(
        body(), topology(device_mbps=100.0), cluster, state, available=False, epoch=2
    )
    assert decision.status["split"] != before
    replanned = [e for e in decision.events if e.reason == "Replanned"]
    assert replanned
    assert all("100 Mbps" in e.message for e in replanned)
    configmap = next(a.obj for a in decision.applies if a.obj["kind"] == "ConfigMap")
    assert "f1" in configmap["data"]["plan-zone-a.yaml"]
    assert decision.status["phase"] == "Progressing"


def test_a_device_moving_zone_releases_the_old_zone_only_once_the_new_stages_serve() -> None:
    cluster, state = settle(body(), topology())
    assert ("DaemonSet", "cam-device-zone-b") in cluster.workloads
    moved = topology(**{"dev-b-0": node("dev-b-0", "device", "zone-a")})
    first, state = run(body(), moved, cluster, state, available=True, epoch=2)
    assert "ZoneReleased" in reasons(first)
    assert not first.deletes  # it applies: nothing goes in the same pass
    obsolete = {("apps/v1", "DaemonSet", "cam-device-zone-b")}
    assert obsolete <= state.pending_deletes
    # The replacements exist but are not all available: still nothing is deleted.
    second, state = run(body(), moved, cluster, state, available=False, epoch=2)
    assert not second.deletes
    assert obsolete <= state.pending_deletes
    assert second.status["phase"] == "Progressing"
    fourth, state = run(body(), moved, cluster, state, available=True, epoch=2)
    assert obsolete <= set(fourth.deletes)
    assert "StageRemoved" in reasons(fourth)
    assert not state.pending_deletes
    assert fourth.status["phase"] == "Available"
    assert list(fourth.status["plan"]["zones"]) == ["zone-a"]


def test_an_edge_node_failure_moves_the_stage_off_it() -> None:
    doc = body(slo={"latencyP95Ms": 400})
    cluster, state = settle(doc, topology(device_mbps=100.0))
    edge = cluster.workloads[("Deployment", "cam-edge-zone-a")]
    failed = topology(
        device_mbps=100.0, **{"edge-a-0": node("edge-a-0", "edge", "zone-a", ready=False)}
    )
    decision, state = run(doc, failed, cluster, state, available=False, epoch=2)
    migrating = [e for e in decision.events if e.reason == "MigratingStages"]
    assert migrating
    assert "edge-a-0" in migrating[0].message
    moved = next(a.obj for a in decision.applies if a.obj["metadata"]["name"] == "cam-edge-zone-a")
    terms = moved["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"][0]["matchExpressions"]
    assert {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["edge-a-0"]} in terms
    assert edge["spec"]["replicas"] == moved["spec"]["replicas"]
    assert decision.status["phase"] == "Progressing"
    assert not decision.deletes
    after, _ = run(doc, failed, cluster, state, available=True, epoch=2)
    assert after.status["phase"] == "Available"


def test_an_operator_restart_finds_what_exists_and_removes_the_obsolete() -> None:
    cluster, _ = settle(body(), topology())
    stale = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "cam-edge-zone-c", "generation": 1},
        "spec": {"replicas": 1},
        "status": {"observedGeneration": 1, "availableReplicas": 1, "updatedReplicas": 1},
    }
    owned = frozenset(
        {
            ("apps/v1", "DaemonSet", "cam-device-zone-a"),
            ("apps/v1", "Deployment", "cam-edge-zone-c"),
        }
    )
    cluster.workloads[("Deployment", "cam-edge-zone-c")] = stale
    fresh = DeploymentState()  # a restarted operator remembers nothing
    first, state = run(body(), topology(), cluster, fresh, available=True, owned=owned)
    assert first.applies
    assert not first.deletes
    second, _ = run(body(), topology(), cluster, state, available=True)
    assert ("apps/v1", "Deployment", "cam-edge-zone-c") in second.deletes


# ---------------------------------------------------------------------------------
# shared stages


def _shared_users(obj: Mapping[str, Any], *names: str) -> None:
    obj["metadata"]["ownerReferences"] = [
        {"kind": "DNNDeployment", "name": n, "uid": f"uid-{n}"} for n in names
    ]


@pytest.mark.parametrize(("others", "word"), [(("door",), "1 other user"), ((), "deleted")])
def test_leaving_a_shared_stage_releases_it_after_the_own_stage_serves(
    others: tuple[str, ...], word: str
) -> None:
    doc = body(sharing="backbone", security={"stageTLS": "disabled"})
    nodes = topology(device_mbps=100.0)
    cluster, state = settle(doc, nodes)
    shared = [
        a for a in cluster.workloads.values() if a["metadata"]["labels"].get("edgeai.dev/shared")
    ]
    assert shared, "the edge stage is a shared workload"
    for obj in shared:
        _shared_users(obj, "cam", *others)
    shared_keys = frozenset(
        (k0, k1, shared[0]["metadata"]["name"])
        for k0, k1 in (("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "ConfigMap"))
    )
    own = body(generation=2, sharing="none")
    first, state = run(own, nodes, cluster, state, available=True)
    assert ("Deployment", "cam-edge-zone-a") in {
        (k[1], k[2]) for k in map(key_of, (a.obj for a in first.applies))
    }
    assert state.list_shares
    assert not first.releases
    # Not available yet: the share is kept even though the listing shows it.
    second, state = run(own, nodes, cluster, state, available=False, shares_in_use=shared_keys)
    assert not second.releases
    third, state = run(own, nodes, cluster, state, available=True, shares_in_use=shared_keys)
    assert {r.key for r in third.releases} == shared_keys
    assert {r.others for r in third.releases} == {len(others)}
    released = [e for e in third.events if e.reason == "SharedStageReleased"]
    assert len(released) == 3
    assert all(word in e.message for e in released)
    assert not state.list_shares
    assert not state.pending_releases


def test_a_shared_stage_runs_the_most_replicas_any_user_wants() -> None:
    doc = body(sharing="backbone", security={"stageTLS": "disabled"})
    nodes = topology(device_mbps=100.0)
    cluster, state = settle(doc, nodes)
    live = next(
        a for a in cluster.workloads.values() if a["metadata"]["labels"].get("edgeai.dev/shared")
    )
    _shared_users(live, "cam", "door")
    live["metadata"]["annotations"] = {
        "replicas.edgeai.dev/door": "3",
        "replicas.edgeai.dev/gone": "9",
    }
    decision, _ = run(doc, nodes, cluster, state, available=True)
    applied = next(
        a
        for a in decision.applies
        if a.obj["metadata"]["name"] == live["metadata"]["name"] and a.obj["kind"] == "Deployment"
    )
    assert applied.obj["spec"]["replicas"] == 3  # door's wish; a former user's is ignored
    assert applied.field_manager == "edgeai-operator.cam"


# ---------------------------------------------------------------------------------
# autoscaling


def _pod(name: str, tier: str, zone: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "labels": {
                "edgeai.dev/deployment": "cam",
                "edgeai.dev/tier": tier,
                "edgeai.dev/zone": zone,
            },
        },
        "status": {"phase": "Running", "podIP": "127.244.0.9"},
    }


def _scrape(buckets: Mapping[float, float]) -> Scrape:
    counts = dict(buckets)
    counts[math.inf] = max(counts.values())
    return Scrape(buckets=counts, in_flight=0.0)


def _scaling_run(
    latency_s: float,
    times: Sequence[float],
    doc: Mapping[str, Any],
    *,
    requests_per_scrape: float = 100.0,
    replicas: int | None = None,
) -> tuple[list[Decision], DeploymentState]:
    """Passes at `times` whose scrapes of the zone-a edge pod show every request so
    far taking between `latency_s / 2` and `latency_s`."""
    nodes = topology(device_mbps=100.0)
    cluster, state = settle(doc, nodes)
    if replicas is not None:
        state.replicas = {"cam-edge-zone-a": replicas}
    pods = [_pod("cam-edge-zone-a-x", "edge", "zone-a")]
    decisions = []
    for i, t in enumerate(times):
        n = requests_per_scrape * i
        scrape = _scrape({latency_s / 2: 0.0, latency_s: n, 10.0: n})
        decision, state = run(
            doc,
            nodes,
            cluster,
            state,
            available=True,
            now=t,
            pods=pods,
            scrapes={"cam-edge-zone-a-x": scrape},
        )
        decisions.append(decision)
    return decisions, state


def _scaled(decisions: Sequence[Decision]) -> list[tuple[str, int, int]]:
    return [(s.workload, s.from_replicas, s.to_replicas) for d in decisions for s in d.scales]


def test_a_slow_edge_stage_scales_up_and_the_next_pass_applies_it() -> None:
    doc = body(slo={"latencyP95Ms": 400}, autoscaling={"maxReplicas": 4, "panicWindowSeconds": 6})
    decisions, _ = _scaling_run(0.5, [100.0, 110.0, 120.0], doc)
    steps = _scaled(decisions)
    assert steps
    assert steps[0][:3] == ("cam-edge-zone-a", 1, 2)
    up = next(d for d in decisions if d.scales)
    assert "ScaledUp" in reasons(up)
    applied = next(a.obj for a in up.applies if a.obj["metadata"]["name"] == "cam-edge-zone-a")
    assert applied["spec"]["replicas"] == 2


def test_a_far_too_slow_stage_panics_and_doubles() -> None:
    doc = body(slo={"latencyP95Ms": 400}, autoscaling={"maxReplicas": 8})
    decisions, _ = _scaling_run(5.0, [100.0, 103.0], doc)
    assert _scaled(decisions)[0] == ("cam-edge-zone-a", 1, 2)
    assert "panic" in next(e.message for d in decisions for e in d.events if e.reason == "ScaledUp")


def test_a_calm_stage_scales_down_to_its_minimum() -> None:
    doc = body(
        slo={"latencyP95Ms": 400},
        autoscaling={"minReplicas": 1, "maxReplicas": 4, "scaleDownDelaySeconds": 30},
    )
    decisions, state = _scaling_run(
        0.002, [100.0, 140.0, 180.0, 220.0], doc, requests_per_scrape=50.0, replicas=3
    )
    steps = [(s.from_replicas, s.to_replicas) for d in decisions for s in d.scales]
    down_messages = [e.message for d in decisions for e in d.events if e.reason == "ScaledDown"]
    assert steps
    assert all(b == a - 1 for a, b in steps)
    assert state.replicas["cam-edge-zone-a"] < 3
    assert down_messages
    assert all("under half the stage target" in m for m in down_messages)


# ---------------------------------------------------------------------------------
# purity and speed


def test_decide_leaves_its_inputs_as_they_were() -> None:
    cluster, state = settle(body(), topology())
    obs = observed(body(status=cluster.status), topology(device_mbps=100.0), cluster, epoch=2)
    before_obs, before_state = copy.deepcopy(obs), copy.deepcopy(state)
    decide(obs, state)
    assert obs == before_obs
    assert state.applied_digest == before_state.applied_digest
    assert state.pending_deletes == before_state.pending_deletes
    assert state.last_split == before_state.last_split


def test_a_steady_pass_takes_milliseconds() -> None:
    cluster, state = settle(body(), topology())
    obs = observed(body(status=cluster.status), topology(), cluster)
    started = time.perf_counter()
    for _ in range(100):
        decide(obs, state)
    per_pass_ms = (time.perf_counter() - started) * 10
    print(f"steady decide: {per_pass_ms:.2f} ms per pass")


def test_the_last_user_of_a_priority_releases_its_priority_class() -> None:
    me, other = ("ns", "a"), ("ns2", "a")
    assert released_priority_class(me, 100, []) == "edgeai-priority-100"
    # the deployment itself may still be indexed when it goes
    assert released_priority_class(me, 100, [me]) == "edgeai-priority-100"
    assert released_priority_class(me, 100, [me, other]) is None
    assert released_priority_class(me, 0, []) is None
