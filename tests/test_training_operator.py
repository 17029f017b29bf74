"""DNNTrainingJob on the real control plane: the operator places the job on kwok nodes,
the process kubelet runs every pod's own command (aggregator and workers) as real
processes, the operator reads their progress into status, copies the trained model
into a ConfigMap, a DNNModel prepares it and a DNNDeployment serves it."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from _cluster_support import Namespace, apply, condition, get, wait_for
from _process_kubelet import ProcessKubelet, ServiceProxy
from _serving import deployment, infer, serving_chain, slow_device
from _training_samples import held_out_accuracy
from conftest import OperatorProcess
from edgeai_worker import zoo

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

JOB_LABEL = "edgeai.dev/training-job"


def training_job(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": {"zoo": "digits_cnn"},
        "workers": {"nodeSelector": {"app": "camera"}, "count": 4},
        "algorithm": {"mode": "fedavg", "localSteps": 10, "learningRate": 0.1},
        "stop": {"targetAccuracy": 0.9, "maxRounds": 30},
        "faults": {"roundTimeoutSeconds": 5},
    }
    body.update(spec)
    return {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNTrainingJob",
        "metadata": {"name": name},
        "spec": body,
    }


def phase_in(ns: Namespace, name: str, *phases: str) -> Any:
    obj = get(ns, "dnntj", name)
    return obj if (obj or {}).get("status", {}).get("phase") in phases else None


def events_of(ns: Namespace, name: str) -> list[tuple[str, str]]:
    items = get(ns, "events", "--field-selector", f"involvedObject.name={name}")["items"]
    return [(e["reason"], e["message"]) for e in items]


def children(ns: Namespace, name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for kind in ("pods", "services", "poddisruptionbudgets", "configmaps"):
        items = get(ns, kind, "-l", f"{JOB_LABEL}={name}")["items"]
        out[kind] = sorted(
            o["metadata"]["name"] for o in items if not o["metadata"].get("deletionTimestamp")
        )
    return out


def test_fedavg_job_trains_to_target_and_its_model_is_prepared(
    ns: Namespace, operator: OperatorProcess, tmp_path: Path
) -> None:
    """Four workers on the camera devices, an aggregator on the zone's edge node; the
    job succeeds at 0.90 held-out accuracy, status and printer columns show it, the
    pods are gone afterwards and the model ConfigMap feeds a DNNModel."""
    apply(ns, training_job("digits"))
    pods = wait_for(
        "the job's five pods",
        lambda: len(p := children(ns, "digits")["pods"]) == 5 and p,
        60,
    )
    assert pods == ["digits-aggregator", *(f"digits-worker-{i}" for i in range(4))]
    job = get(ns, "dnntj", "digits")
    placement = job["status"]["placement"]
    assert placement["aggregator"].startswith("edge-zone-a")
    assert all(node.startswith("device-zone-a") for node in placement["workers"][:3])
    agg = get(ns, "pod", "digits-aggregator")
    assert agg["spec"]["nodeName"] == placement["aggregator"]
    assert agg["metadata"]["ownerReferences"][0]["kind"] == "DNNTrainingJob"
    assert children(ns, "digits")["poddisruptionbudgets"] == ["digits-aggregator"]

    with (
        ServiceProxy(ns) as proxy,
        ProcessKubelet(ns, f"{JOB_LABEL}=digits", tmp_path, proxy),
    ):
        job = wait_for("the job to succeed", lambda: phase_in(ns, "digits", "Succeeded"), 240)
    status = job["status"]
    assert status["accuracy"] >= 0.9
    assert 1 <= status["round"] <= 30
    assert status["uplinkBytes"] == status["bytesUp"] > 0
    assert status["bytesDown"] > 0
    assert status["participants"] == [0, 1, 2, 3]
    assert status["model"] == "configmap://digits-model/model.onnx"
    assert condition(job, "Succeeded")["status"] == "True"
    header, row = ns.kubectl("get", "dnntj", "digits").splitlines()
    assert header.split() == ["NAME", "MODE", "ROUND", "ACCURACY", "UPLINK-BYTES", "PHASE", "AGE"]
    assert row.split()[:6] == [
        "digits",
        "fedavg",
        str(status["round"]),
        str(status["accuracy"]),
        str(status["uplinkBytes"]),
        "Succeeded",
    ]
    reasons = [reason for reason, _ in events_of(ns, "digits")]
    assert {"PodsCreated", "FirstRound", "Completed"} <= set(reasons), reasons
    completed = next(m for r, m in events_of(ns, "digits") if r == "Completed")
    assert "target accuracy 0.9 reached" in completed
    # the finished job's pods, Services and PDB are gone; its ConfigMaps stay
    left = wait_for(
        "the finished job's pods to go", lambda: not (c := children(ns, "digits"))["pods"] and c
    )
    assert left == {
        "pods": [],
        "services": [],
        "poddisruptionbudgets": [],
        "configmaps": ["digits-model", "digits-spec"],
    }

    model = {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNModel",
        "metadata": {"name": "trained-digits"},
        "spec": {
            "source": {"uri": status["model"]},
            "input": {"name": "input", "shape": [1, 1, 8, 8], "dtype": "FP32"},
        },
    }
    apply(ns, model)
    prepared = wait_for(
        "the trained model prepared",
        lambda: (
            (o := get(ns, "dnnm", "trained-digits"))
            and condition(o, "Prepared").get("status") == "True"
            and o
        ),
        180,
    )
    assert condition(prepared, "Prepared")["reason"] != "InvalidSpec"
    # the ConfigMap holds the aggregator's trained model: it scores what status says
    data = get(ns, "configmap", "digits-model")["binaryData"]["model.onnx"]
    exported = tmp_path / "exported.onnx"
    exported.write_bytes(base64.b64decode(data))
    assert held_out_accuracy(str(exported)) == pytest.approx(status["accuracy"], abs=1e-3)

    # and deployed with an SLO: a device -> edge chain of the trained model serves what
    # onnxruntime computes on the exported file
    apply(ns, deployment("trained-app", "trained-digits"))
    _, _, x_test, _ = zoo.digits_split()
    x = x_test[:8].reshape(8, 1, 1, 8, 8).astype(np.float32)
    session = ort.InferenceSession(str(exported))
    with slow_device(ns), serving_chain(ns, "trained-app", tmp_path / "serve") as url:
        for sample in x:
            got = infer(url, "trained-digits", sample, input_name="input")
            want = session.run(None, {"input": sample})[0]
            assert float(np.max(np.abs(got - want))) <= 1e-4


def test_a_deleted_worker_is_recreated_and_the_job_completes(
    ns: Namespace, operator: OperatorProcess, tmp_path: Path
) -> None:
    job = training_job(
        "resilient",
        workers={"nodeSelector": {"app": "camera"}, "count": 3},
        algorithm={"mode": "syncSGD", "learningRate": 0.1},
        # rounds without the deleted worker go on at full speed (its refused connection
        # drops it at once): enough of them that the operator sees the pod gone first
        stop={"targetAccuracy": 1.0, "maxRounds": 400},
        faults={"roundTimeoutSeconds": 2},
    )
    apply(ns, job)
    with (
        ServiceProxy(ns) as proxy,
        ProcessKubelet(ns, f"{JOB_LABEL}=resilient", tmp_path, proxy),
    ):
        wait_for(
            "round 2",
            lambda: (
                int((get(ns, "dnntj", "resilient") or {}).get("status", {}).get("round") or 0) >= 2
            ),
            180,
        )
        ns.kubectl("delete", "pod", "resilient-worker-1", "--wait=false")
        done = wait_for(
            "the job to succeed", lambda: phase_in(ns, "resilient", "Succeeded", "Failed"), 240
        )
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert done["status"]["round"] == 400
    reasons = [reason for reason, _ in events_of(ns, "resilient")]
    assert "WorkerRecreated" in reasons, ", ".join(reasons)
    assert "round limit 400 reached" in done["status"]["message"]


def test_a_gossip_job_completes_without_an_aggregator(
    ns: Namespace, operator: OperatorProcess, tmp_path: Path
) -> None:
    """Three gossip workers, each behind a Service of its own; the job succeeds once
    every worker has finished, with the workers' numbers in status and no model copied
    (each worker keeps its own)."""
    job = training_job(
        "peers",
        workers={"nodeSelector": {"app": "camera"}, "count": 3},
        algorithm={"mode": "gossip", "localSteps": 10, "learningRate": 0.1},
        stop={"targetAccuracy": 0.85, "maxRounds": 20},
    )
    apply(ns, job)
    made = wait_for(
        "the gossip workers and their Services",
        lambda: len((c := children(ns, "peers"))["services"]) == len(c["pods"]) == 3 and c,
        60,
    )
    assert made["pods"] == ["peers-worker-0", "peers-worker-1", "peers-worker-2"]
    assert made["poddisruptionbudgets"] == []
    with (
        ServiceProxy(ns) as proxy,
        ProcessKubelet(ns, f"{JOB_LABEL}=peers", tmp_path, proxy),
    ):
        done = wait_for(
            "the gossip job to end", lambda: phase_in(ns, "peers", "Succeeded", "Failed"), 240
        )
    status = done["status"]
    assert status["phase"] == "Succeeded", status
    assert set(status["placement"]) == {"workers"}  # no aggregator
    assert status["round"] >= 1
    assert status["uplinkBytes"] == status["bytesUp"] > 0
    assert "model" not in status
    reasons = [reason for reason, _ in events_of(ns, "peers")]
    assert {"PodsCreated", "Completed"} <= set(reasons), ", ".join(reasons)


def test_no_matching_device_fails_naming_the_selector(
    ns: Namespace, operator: OperatorProcess
) -> None:
    apply(ns, training_job("nowhere", workers={"nodeSelector": {"app": "drone"}, "count": 2}))
    job = wait_for("the job to fail", lambda: phase_in(ns, "nowhere", "Failed"), 60)
    assert job["status"]["reason"] == "NoMatchingNodes"
    assert "spec.workers.nodeSelector" in job["status"]["message"]
    assert "app=drone" in job["status"]["message"]
    assert condition(job, "Succeeded")["status"] == "False"
    assert children(ns, "nowhere")["pods"] == []
    assert "NoMatchingNodes" in [reason for reason, _ in events_of(ns, "nowhere")]


def test_deleting_a_job_deletes_its_children(ns: Namespace, operator: OperatorProcess) -> None:
    """No kubelet runs these pods: the job stays Pending with every child created."""
    apply(ns, training_job("short-lived", workers={"nodeSelector": {"app": "camera"}, "count": 2}))
    made = wait_for(
        "the job's children",
        lambda: len((c := children(ns, "short-lived"))["pods"]) == 3 and c,
        60,
    )
    assert made == {
        "pods": ["short-lived-aggregator", "short-lived-worker-0", "short-lived-worker-1"],
        "services": ["short-lived-aggregator"],
        "poddisruptionbudgets": ["short-lived-aggregator"],
        "configmaps": ["short-lived-spec"],
    }
    ns.kubectl("delete", "dnntj", "short-lived", "--wait=false")
    empty: dict[str, list[str]] = {
        "pods": [],
        "services": [],
        "poddisruptionbudgets": [],
        "configmaps": [],
    }
    wait_for("every child gone", lambda: children(ns, "short-lived") == empty, 90)
