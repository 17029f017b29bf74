"""Per-tier profiling Jobs: the profiler's termination-log summary, turning a Job's
termination message into a measured tier, planning from measured tiers, and (cluster)
the Jobs the operator runs on nodes of each tier."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Any

import pytest
import yaml

from _cluster_support import Namespace, get, wait_for
from edgeai_operator import profiling
from edgeai_operator.deployspec import parse_deployment
from edgeai_operator.handlers.models import profile_jobs_pass
from edgeai_operator.localcluster import DEFAULT_TOPOLOGY
from edgeai_operator.planning import NodeState, plan_zones
from edgeai_operator.problem import analytic_profile, termination_summary
from edgeai_operator.topology import load_topology

NS = "default"


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """A real `edgeai profile digits_cnn --repeats 2 --idle-ms 20 --termination-log FILE` run:
    (the profile it printed, the termination message it wrote)."""
    log = tmp_path_factory.mktemp("profile") / "termination-log"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeai_operator.cli",
            "profile",
            "digits_cnn",
            "--repeats",
            "2",
            "--idle-ms",
            "20",
            "-o",
            "json",
            "--termination-log",
            str(log),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return json.loads(out.stdout), log.read_text()


def test_termination_log_summary_is_small_and_round_trips(
    profiled: tuple[dict[str, Any], str],
) -> None:
    profile, message = profiled
    assert len(message.encode()) < 4096
    summary = json.loads(message)
    assert summary["kind"] == "ProfileSummary"
    assert summary["model"] == "digits_cnn"
    assert summary["repeats"] == 2
    assert summary["idleMs"] == profile["idleMs"] == 20
    assert summary["hostGflops"] == profile["host"]["gflops"]
    assert summary["totalMs"] == pytest.approx(profile["totalMs"], abs=1e-4)
    assert summary["segmentsMs"] == pytest.approx(
        [s["measuredMs"] for s in profile["segments"]], abs=1e-4
    )
    # The operator's check accepts it against the graph's own segment count.
    segments = len(analytic_profile("digits_cnn")["segments"])
    assert profiling.parse_summary(message, segments) == summary


def test_termination_summary_drops_precision_to_fit() -> None:
    profile = {
        "model": "big",
        "host": {"gflops": 12.5},
        "totalMs": 1234.56789,
        "segments": [{"measuredMs": 123.456789} for _ in range(600)],
    }
    text = termination_summary(profile)
    assert len(text.encode()) < 4096
    assert json.loads(text)["segmentsMs"][0] == 123.5  # one decimal fits 600 segments


def _job(conditions: list[dict[str, Any]]) -> dict[str, Any]:
    return {"spec": {"activeDeadlineSeconds": 300}, "status": {"conditions": conditions}}


def _pod(message: str | None) -> dict[str, Any]:
    terminated: dict[str, Any] = {"exitCode": 0, "reason": "Completed"}
    if message is not None:
        terminated["message"] = message
    return {
        "spec": {"nodeName": "edge-zone-a-0"},
        "status": {"containerStatuses": [{"state": {"terminated": terminated}}]},
    }


def test_termination_message_becomes_a_measured_tier(
    profiled: tuple[dict[str, Any], str],
) -> None:
    _, message = profiled
    complete = _job([{"type": "Complete", "status": "True"}])
    assert profiling.job_result(_job([]), []) is None
    result = profiling.job_result(complete, [_pod(message)])
    assert result == ("message", message)
    base = analytic_profile("digits_cnn")
    summary = profiling.parse_summary(message, len(base["segments"]))
    analytic = {"totalMs": 0.005, "gflops": 150.0, "nodes": 2, "source": "analytic"}
    tier = profiling.measured_tier(analytic, summary, "edge-zone-a-0", "m-profile-edge-1")
    assert tier["source"] == "measured"
    assert tier["node"] == "edge-zone-a-0"
    assert tier["totalMs"] == round(summary["totalMs"], 3)
    assert tier["jobResult"] == "measured"
    assert tier["message"].endswith("(2 repeats, each after 20 ms idle)")
    assert tier["gflops"] == 150.0
    measured = profiling.with_measurement(base, "edge", summary, "edge-zone-a-0")
    assert measured["measuredTiers"]["edge"]["segmentsMs"] == summary["segmentsMs"]
    assert measured["measuredTiers"]["edge"]["hostGflops"] == summary["hostGflops"]
    # A Job without a message, a failed one and one past its deadline say why.
    assert profiling.job_result(complete, [_pod(None)])[0] == "noMessage"  # type: ignore[index]
    failed = _job([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}])
    assert profiling.job_result(failed, [])[0] == "failed"  # type: ignore[index]
    late = _job([{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}])
    kind, why = profiling.job_result(late, []) or ("", "")
    assert kind == "timedOut"
    assert "timeoutSeconds (300 s)" in why
    with pytest.raises(ValueError, match="segment times"):
        profiling.parse_summary(message, len(base["segments"]) + 1)
    with pytest.raises(ValueError, match="not a ProfileSummary"):
        profiling.parse_summary('{"kind": "Profile"}', 1)
    with pytest.raises(ValueError, match="idleMs must be a non-negative number"):
        profiling.parse_summary(json.dumps({**summary, "idleMs": "slow"}), len(base["segments"]))


def _nodes() -> list[NodeState]:
    return [NodeState(n, True, True) for n in load_topology(DEFAULT_TOPOLOGY).nodes]


def _deployment(tiers: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNDeployment",
        "metadata": {"name": "d", "namespace": NS},
        "spec": {
            "modelRef": {"name": "digits"},
            "slo": {"latencyP95Ms": 200},
            "placement": {"tiers": tiers},
        },
    }


def test_planning_uses_measured_tiers_only_when_every_usable_tier_is_measured(
    profiled: tuple[dict[str, Any], str],
) -> None:
    _, message = profiled
    base = analytic_profile("digits_cnn")
    summary = profiling.parse_summary(message, len(base["segments"]))
    device = profiling.with_measurement(base, "device", summary, "device-zone-a-0")
    both = profiling.with_measurement(device, "edge", summary, "edge-zone-a-0")
    body = _deployment(["device", "edge"])
    zones = plan_zones(parse_deployment(body), [device], _nodes())
    assert zones.plans["zone-a"].compute_method == "analytic"
    zones = plan_zones(parse_deployment(body), [both], _nodes())
    plan = zones.plans["zone-a"]
    assert plan.compute_method == "measured"
    assert plan.measured_on == {"device": "device-zone-a-0", "edge": "edge-zone-a-0"}
    # Each tier's time is its own measurement scaled by host GFLOPS / node GFLOPS.
    total = sum(summary["segmentsMs"])
    assert plan.tiers["device"]["totalMs"] == pytest.approx(
        total * summary["hostGflops"] / 8.0, abs=1e-3
    )
    assert plan.tiers["edge"]["totalMs"] == pytest.approx(
        total * summary["hostGflops"] / 150.0, abs=1e-3
    )
    # So are the fixed per-request serving overheads each Job measured through a worker.
    assert summary["servingMs"] > 0
    for tier, gflops in (("device", 8.0), ("edge", 150.0)):
        expected = summary["servingMs"] * summary["hostGflops"] / gflops
        assert plan.tiers[tier]["servingMs"] == pytest.approx(expected, rel=1e-3, abs=1e-4)
    # the device pays the fixed part and the per-MB part on the raw input it receives,
    # and when the plan sends anything up (which the measured speeds decide), the
    # forwarding overhead on what it sends
    device_tier = plan.tiers["device"]
    input_bytes = 4 * math.prod(base["input"]["shape"])  # FP32
    expected = device_tier["servingMs"] + device_tier.get("servingMsPerMB", 0.0) * input_bytes / 1e6
    if any(stage.tier != "device" for stage in plan.stages):
        up_bytes = plan.transfers[0].bytes
        expected += device_tier.get("forwardingMs", 0.0)
        expected += device_tier.get("forwardingMsPerMB", 0.0) * up_bytes / 1e6
    assert plan.serving_ms["device"] == pytest.approx(expected, abs=1e-3)
    # A device-only deployment needs only the device measured.
    zones = plan_zones(parse_deployment(_deployment(["device"])), [device], _nodes())
    assert zones.plans["zone-a"].compute_method == "measured"


def test_profiled_condition_says_which_tiers_are_measured() -> None:
    analytic = {"source": "analytic", "totalMs": 3.0}
    measured = {"source": "measured", "totalMs": 1.25}
    assert profiling.profiled_condition({"device": analytic, "edge": analytic})[0] == (
        "AnalyticEstimate"
    )
    reason, message = profiling.profiled_condition({"device": analytic, "edge": measured})
    assert reason == "PartlyMeasured"
    assert message == "edge 1.25 ms measured, device 3.00 ms analytic"
    assert profiling.profiled_condition({"edge": measured, "cloud": measured})[0] == "Measured"


def test_profile_job_is_pinned_to_one_node_of_its_tier() -> None:
    model: dict[str, Any] = {
        "apiVersion": "edgeai.dev/v1alpha1",
        "metadata": {"name": "m", "namespace": NS, "uid": "u-1", "generation": 2},
        "spec": {
            "source": {"zoo": "digits_cnn"},
            "input": {"name": "input", "shape": [1, 1, 8, 8], "dtype": "FP32"},
            "profile": {"repeats": 5},
        },
    }
    job = profiling.profile_job(model, "edge", "edge-zone-a-0", image="img:1")
    assert job["metadata"]["name"] == "m-profile-edge-2"
    assert job["metadata"]["labels"] == {
        "app.kubernetes.io/managed-by": "edgeai-operator",
        "edgeai.dev/model": "m",
        "edgeai.dev/tier": "edge",
    }
    assert job["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "edgeai.dev/v1alpha1",
            "kind": "DNNModel",
            "name": "m",
            "uid": "u-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert job["spec"]["activeDeadlineSeconds"] == 300
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"][0]["matchExpressions"] == [
        {"key": "edgeai.dev/tier", "operator": "In", "values": ["edge"]},
        {"key": "kubernetes.io/hostname", "operator": "In", "values": ["edge-zone-a-0"]},
    ]
    container = pod["containers"][0]
    assert container["image"] == "img:1"
    assert container["command"] == ["edgeai"]
    assert container["args"] == [
        "profile",
        "digits_cnn",
        "--repeats=5",
        "--idle-ms=100",
        "-o",
        "json",
        "--termination-log",
    ]
    assert profiling.profile_tiers(model["spec"], [n.spec for n in _nodes()]) == [
        "device",
        "edge",
        "cloud",
    ]
    assert profiling.profile_tiers(
        {**model["spec"], "profile": {"tiers": ["cloud", "device"]}}, []
    ) == [
        "device",
        "cloud",
    ]


# ---------------------------------------------------------------------------
# Against the real control plane


@pytest.mark.cluster
@pytest.mark.slow
def test_model_gets_one_owned_profiling_job_per_tier(
    ns: Namespace, operator: Any, profiled: tuple[dict[str, Any], str]
) -> None:
    model = {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNModel",
        "metadata": {"name": "pj"},
        "spec": {
            "source": {"zoo": "digits_cnn"},
            "input": {"name": "input", "shape": [1, 1, 8, 8], "dtype": "FP32"},
            "profile": {"repeats": 2, "timeoutSeconds": 60},
        },
    }
    ns.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(model))
    # the profiling Jobs carry their tier; the model's preparation Job does not
    selector = "edgeai.dev/model=pj,edgeai.dev/tier"

    def jobs() -> list[dict[str, Any]]:
        return list(get(ns, "jobs", "-l", selector)["items"])

    wait_for("three profiling Jobs", lambda: len(jobs()) == 3, 120)
    uid = get(ns, "dnnm", "pj")["metadata"]["uid"]
    by_tier = {j["metadata"]["labels"]["edgeai.dev/tier"]: j for j in jobs()}
    assert sorted(by_tier) == ["cloud", "device", "edge"]
    for tier, job in by_tier.items():
        assert job["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "edgeai-operator"
        refs = job["metadata"]["ownerReferences"]
        assert [(r["kind"], r["uid"], r["controller"]) for r in refs] == [("DNNModel", uid, True)]
        name = job["metadata"]["name"]

        def bound(name: str = name) -> Any:
            pods = get(ns, "pods", "-l", f"batch.kubernetes.io/job-name={name}")["items"]
            return pods and pods[0]["spec"].get("nodeName") and pods[0]

        pod = wait_for(f"{name}'s pod bound", bound, 60)
        node = get(ns, "node", pod["spec"]["nodeName"])
        assert node["metadata"]["labels"]["edgeai.dev/tier"] == tier

    def reported() -> Any:
        tiers = get(ns, "dnnm", "pj")["status"].get("tiers", {})
        done = [t for t in tiers.values() if t.get("jobResult")]
        return len(done) == 3 and tiers

    tiers = wait_for("every tier's Job reported", reported, 120)
    for tier, entry in tiers.items():
        # kwok completes the pods without running them: no termination message.
        assert entry["source"] == "analytic"
        assert entry["jobResult"] == "noMessage"
        assert "without a termination message" in entry["message"]
        assert "analytic estimate" in entry["message"]
        assert entry["job"] == by_tier[tier]["metadata"]["name"]
        assert entry["totalMs"] >= 0  # the analytic estimate is kept
        assert entry["gflops"] > 0
    # The timer's next pass has nothing left to do for this generation.
    status = get(ns, "dnnm", "pj")["status"]
    body = get(ns, "dnnm", "pj")
    assert profile_jobs_pass(
        body,
        status,
        [],
        image="edgeai-worker:0.1.0",
    ) == ({}, [])

    # A pod that did write a termination message, as a kubelet reports it (kwok runs
    # nothing, so the test puts the real profiler's message in the pod's status):
    # the operator reads it and the edge tier becomes measured.
    _, message = profiled
    summary = json.loads(message)
    edge_job = by_tier["edge"]["metadata"]["name"]
    pod = get(ns, "pods", "-l", f"batch.kubernetes.io/job-name={edge_job}")["items"][0]
    statuses = pod["status"].get("containerStatuses") or [
        {"name": "profile", "image": "edgeai-worker:0.1.0", "imageID": "", "ready": False}
        | {"restartCount": 0, "state": {"terminated": {"exitCode": 0}}}
    ]
    terminated = {**statuses[0]["state"].get("terminated", {}), "message": message}
    statuses[0]["state"] = {"terminated": terminated}
    patch = json.dumps({"status": {"containerStatuses": statuses}})
    ns.kubectl(
        "patch", "pod", pod["metadata"]["name"], "--subresource=status", "--type=merge", "-p", patch
    )
    again = json.dumps({"status": {"tiers": {"edge": {"jobResult": None}}}})
    ns.kubectl("patch", "dnnm", "pj", "--subresource=status", "--type=merge", "-p", again)

    def measured() -> Any:
        status = get(ns, "dnnm", "pj")["status"]
        return status["tiers"]["edge"].get("source") == "measured" and status

    status = wait_for("the edge tier measured", measured, 60)
    edge = status["tiers"]["edge"]
    assert edge["jobResult"] == "measured"
    assert edge["node"] == pod["spec"]["nodeName"]
    assert edge["totalMs"] == round(summary["totalMs"], 3)
    assert edge["hostGflops"] == summary["hostGflops"]
    assert status["tiers"]["device"]["source"] == "analytic"
    profiled_cond = next(c for c in status["conditions"] if c["type"] == "Profiled")
    assert profiled_cond["reason"] == "PartlyMeasured"
    parts = {p.split()[0]: p.split()[-1] for p in profiled_cond["message"].split(", ")}
    assert parts == {"edge": "measured", "device": "analytic", "cloud": "analytic"}
    stored = status["profiles"][0]["measuredTiers"]["edge"]
    assert stored["segmentsMs"] == pytest.approx(summary["segmentsMs"])
    # An edge-only deployment uses only measured tiers: its plan says so.
    deployment = {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNDeployment",
        "metadata": {"name": "pjd"},
        "spec": {
            "modelRef": {"name": "pj"},
            "slo": {"latencyP95Ms": 200},
            "devices": {"nodeSelector": {"app": "camera"}},
            "placement": {"tiers": ["edge"]},
        },
    }
    ns.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(deployment))

    def plan() -> Any:
        cm = get(ns, "configmap", "pjd-plan")
        return cm and yaml.safe_load(cm["data"]["plan-zone-a.yaml"])

    doc = wait_for("pjd planned", plan, 60)
    assert doc["compute"]["method"] == "measured"
    assert doc["compute"]["measuredOn"] == {"edge": pod["spec"]["nodeName"]}
    ns.kubectl("delete", "dnnd", "pjd", "--timeout=60s")

    ns.kubectl("delete", "dnnm", "pj", "--timeout=60s")
    wait_for("profiling Jobs garbage-collected", lambda: not jobs(), 90)
