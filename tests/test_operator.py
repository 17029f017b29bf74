"""The operator against the real control plane: samples placed by the real scheduler,
status and events, replanning, migration, deletion and the stage pods' command."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from _cluster_support import (
    Namespace,
    annotated_nodes,
    apply,
    condition,
    failed_node,
    get,
    json_infer_body,
    spare_edge_node,
    wait_for,
)
from _process_kubelet import ProcessKubelet, ServiceProxy
from conftest import OperatorProcess
from edgeai_operator.localcluster import REPO_ROOT

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def model(name: str, zoo: str, shape: list[int]) -> dict[str, Any]:
    return {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNModel",
        "metadata": {"name": name},
        "spec": {
            "source": {"zoo": zoo},
            "input": {"name": "input", "shape": shape, "dtype": "FP32"},
        },
    }


def deployment(name: str, model_name: str, **spec: Any) -> dict[str, Any]:
    body = {
        "modelRef": {"name": model_name},
        "slo": {"latencyP95Ms": 200},
        "devices": {"nodeSelector": {"app": "camera"}},
        "autoscaling": {"minReplicas": 1, "maxReplicas": 4},
    }
    body.update(spec)
    return {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNDeployment",
        "metadata": {"name": name},
        "spec": body,
    }


def available(ns: Namespace, name: str) -> Any:
    obj = get(ns, "dnnd", name)
    return obj if condition(obj, "Available").get("status") == "True" else None


def pods_of(ns: Namespace, name: str, tier: str) -> list[dict[str, Any]]:
    items = get(ns, "pods", "-l", f"edgeai.dev/deployment={name},edgeai.dev/tier={tier}")
    return [p for p in items["items"] if not p["metadata"].get("deletionTimestamp")]


def node_labels(ns: Namespace, node: str) -> dict[str, str]:
    labels: dict[str, str] = get(ns, "node", node)["metadata"]["labels"]
    return labels


def uplink(ns: Namespace, mbps: float) -> contextlib.AbstractContextManager[None]:
    """Every device's uplink at `mbps` for a block; the earlier values come back after."""
    devices = [f"device-{zone}-{i}" for zone in ("zone-a", "zone-b") for i in range(3)]
    return annotated_nodes(ns.cluster, devices, "edgeai.dev/uplink-mbps", f"{mbps:g}")


def test_digits_sample_placed_on_devices_with_status_and_events(
    ns: Namespace, operator: OperatorProcess
) -> None:
    docs = list(yaml.safe_load_all((REPO_ROOT / "examples/digits-model.yaml").read_text()))
    docs += list(yaml.safe_load_all((REPO_ROOT / "examples/digits-deployment.yaml").read_text()))
    apply(ns, *docs)

    def profiled_current() -> bool:
        # `digits` may exist from an earlier test with another spec: wait for the
        # profile of this generation.
        obj = get(ns, "dnnm", "digits")
        cond = condition(obj, "Profiled")
        return bool(
            cond.get("status") == "True"
            and cond.get("observedGeneration") == obj["metadata"]["generation"]
        )

    assert wait_for("DNNModel digits profiled", profiled_current, 180)
    dnnm = get(ns, "dnnm", "digits")
    assert dnnm["status"]["cuts"] >= 5
    assert set(dnnm["status"]["tiers"]) == {"device", "edge", "cloud"}
    variants = {v["name"]: v for v in dnnm["status"]["variants"]}
    assert variants["fp32"]["accuracy"] > 0.9
    assert variants["int8"]["ready"]
    assert variants["int8"]["sizeBytes"] > 0
    wide = ns.kubectl("get", "dnnm", "digits", "-o", "wide")
    assert "digits_cnn" in wide
    assert "fp32,int8,pruned-50" in wide

    obj = wait_for("digits-reader Available", lambda: available(ns, "digits-reader"))
    assert obj["status"]["phase"] == "Available"
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    types = {c["type"] for c in obj["status"]["conditions"]}
    assert types == {"Planned", "Available", "SLOMet", "Degraded", "Progressing"}
    assert all(c["observedGeneration"] == 1 for c in obj["status"]["conditions"])
    # The real scheduler put one device pod on each camera device, in its own zone's set.
    pods = pods_of(ns, "digits-reader", "device")
    assert len(pods) == 6
    for pod in pods:
        zone = node_labels(ns, pod["spec"]["nodeName"])["topology.kubernetes.io/zone"]
        assert pod["metadata"]["labels"]["edgeai.dev/zone"] == zone
        assert pod["status"]["phase"] == "Running"
    row = ns.kubectl("get", "dnnd", "digits-reader").splitlines()[1].split()
    # NAME MODEL SLO PREDICTED P95 SPLIT REPLICAS... (P95 empty before traffic)
    assert row[1] == "digits"
    assert row[2] == "50"
    assert float(row[3]) > 0
    assert "device:" in row[4]
    events = get(
        ns,
        "events",
        "--field-selector",
        "involvedObject.kind=DNNDeployment,involvedObject.name=digits-reader",
    )
    messages = [e["message"] for e in events["items"]]
    assert any("predicted" in m and "links device->edge 10 Mbps" in m for m in messages)


def test_bandwidth_change_replans_onto_edge_servers_of_each_zone(
    ns: Namespace, operator: OperatorProcess
) -> None:
    apply(ns, model("resnet18", "resnet18", [1, 3, 224, 224]), deployment("r18", "resnet18"))
    obj = wait_for("r18 Available", lambda: available(ns, "r18"), 180)
    # 10 Mbps: 602 KB of input costs 480 ms to send; ResNet-18 stays on the device,
    # and the SLO of 200 ms is reported as unreachable.
    assert obj["status"]["split"].startswith("device:")
    assert "edge" not in obj["status"]["split"]
    assert condition(obj, "SLOMet")["status"] == "False"
    assert "200" in condition(obj, "SLOMet")["message"]
    with uplink(ns, 200):
        obj = wait_for(
            "r18 replanned onto the edge",
            lambda: (o := available(ns, "r18")) and "edge" in o["status"]["split"] and o,
            120,
        )
        assert condition(obj, "SLOMet")["status"] == "True"
        assert obj["status"]["plan"]["predictedLatencyMs"] < 200
        edge_pods = wait_for(
            "edge pods",
            lambda: len(pods_of(ns, "r18", "edge")) == 2 and pods_of(ns, "r18", "edge"),
        )
        for pod in edge_pods:
            node = pod["spec"]["nodeName"]
            assert node_labels(ns, node)["edgeai.dev/tier"] == "edge"
            assert (
                node_labels(ns, node)["topology.kubernetes.io/zone"]
                == pod["metadata"]["labels"]["edgeai.dev/zone"]
            )
        services = get(ns, "svc", "-l", "edgeai.dev/deployment=r18")["items"]
        assert {s["metadata"]["name"] for s in services} >= {"r18-edge-zone-a", "r18-edge-zone-b"}
        events = get(
            ns,
            "events",
            "--field-selector",
            "involvedObject.kind=DNNDeployment,involvedObject.name=r18",
        )
        assert any(
            e["reason"] == "Replanned" and "200 Mbps" in e["message"] for e in events["items"]
        )


def test_stage_pod_command_serves_the_planned_chain(
    ns: Namespace, operator: OperatorProcess, tmp_path: Path
) -> None:
    """The ConfigMap plan and the pods' `edgeai run-stage` args, run as real processes."""
    apply(
        ns,
        model("alexnet", "alexnet_like", [1, 3, 224, 224]),
        deployment(
            "alex",
            "alexnet",
            slo={"latencyP95Ms": 500},
            placement={"tiers": ["device", "edge"]},
            privacy={"rawInputStaysOnDevice": True},
        ),
    )
    with uplink(ns, 300):
        wait_for(
            "alex split across device and edge",
            lambda: (
                (o := available(ns, "alex"))
                and "edge" in o["status"]["split"]
                and "device" in o["status"]["split"]
                and o
            ),
            180,
        )
        cm = get(ns, "configmap", "alex-plan")
        edge = get(ns, "deployment", "alex-edge-zone-a")
        device = get(ns, "daemonset", "alex-device-zone-a")
        assert "plan-zone-a.yaml" in cm["data"]
        fetch = device["spec"]["template"]["spec"]["initContainers"][0]
        assert fetch["args"][0] == "fetch"
        assert edge["spec"]["template"]["spec"]["initContainers"][0]["args"] == fetch["args"]
        # the pods' own commands (init container first) as processes, Services proxied;
        # still at 300 Mbit/s: the old uplink would make the operator replan the split
        selector = "edgeai.dev/deployment=alex,edgeai.dev/zone=zone-a"
        with ServiceProxy(ns) as proxy, ProcessKubelet(ns, selector, tmp_path, proxy) as kubelet:
            ip = wait_for("device and edge processes serving", kubelet.entry_ip, 180)
            x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
            # the served name is the DNNModel's
            got = _infer(f"http://{ip}:8080", "alexnet", x)
    import onnxruntime as ort

    from edgeai_worker import zoo

    session = ort.InferenceSession(str(zoo.export_onnx("alexnet_like")))
    want = session.run(None, {"input": x})[0]
    assert got.shape == want.shape
    assert float(np.max(np.abs(got - want))) <= 1e-4


def _infer(url: str, name: str, x: np.ndarray) -> np.ndarray:
    body = json_infer_body(x)
    req = urllib.request.Request(
        f"{url}/v2/models/{name}/infer",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        out = json.loads(resp.read())["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def test_edge_node_failure_migrates_make_before_break(
    ns: Namespace, operator: OperatorProcess
) -> None:
    with spare_edge_node(ns.cluster, "edge2", "zone-a") as spare, uplink(ns, 200):
        _migrate_off_failed_edge_node(ns, spare)


def _migrate_off_failed_edge_node(ns: Namespace, spare: str) -> None:
    apply(ns, model("resnet18", "resnet18", [1, 3, 224, 224]), deployment("mig", "resnet18"))
    wait_for(
        "mig on the edge",
        lambda: (o := available(ns, "mig")) and "edge" in o["status"]["split"] and o,
        180,
    )
    before = pods_of(ns, "mig", "edge")
    victim = next(
        p["spec"]["nodeName"]
        for p in before
        if p["metadata"]["labels"]["edgeai.dev/zone"] == "zone-a"
    )
    t0 = time.monotonic()
    with failed_node(ns.cluster, victim, "KernelPanic"):
        moved = wait_for(
            "zone-a edge stage moved off the failed node",
            lambda: (
                (
                    pods := [
                        p
                        for p in pods_of(ns, "mig", "edge")
                        if p["metadata"]["labels"]["edgeai.dev/zone"] == "zone-a"
                    ]
                )
                and all(p["spec"]["nodeName"] != victim for p in pods)
                and available(ns, "mig")
                and pods
            ),
            120,
        )
        elapsed = time.monotonic() - t0
        assert {p["spec"]["nodeName"] for p in moved} == ({"edge-zone-a-0", spare} - {victim})
        print(f"edge node failure -> stage migrated and Available in {elapsed:.1f}s")
        events = get(
            ns,
            "events",
            "--field-selector",
            "involvedObject.kind=DNNDeployment,involvedObject.name=mig",
        )
        assert any(
            e["reason"] == "MigratingStages" and victim in e["message"] for e in events["items"]
        )


def _digits_reader(ns: Namespace) -> Any:
    """The digits sample (examples/) applied in the test's namespace, once Available."""
    docs = list(yaml.safe_load_all((REPO_ROOT / "examples/digits-model.yaml").read_text()))
    docs += list(yaml.safe_load_all((REPO_ROOT / "examples/digits-deployment.yaml").read_text()))
    apply(ns, *docs)
    return wait_for("digits-reader Available", lambda: available(ns, "digits-reader"), 240)


def test_device_moving_zone_follows_its_user(ns: Namespace, operator: OperatorProcess) -> None:
    _digits_reader(ns)
    mover = "device-zone-a-2"
    t0 = time.monotonic()
    ns.kubectl("label", "--overwrite", "node", mover, "topology.kubernetes.io/zone=zone-c")
    try:

        def moved() -> Any:
            pods = [
                p
                for p in pods_of(ns, "digits-reader", "device")
                if p["spec"].get("nodeName") == mover
            ]
            return (
                len(pods) == 1
                and pods[0]["metadata"]["labels"]["edgeai.dev/zone"] == "zone-c"
                and pods[0]["status"]["phase"] == "Running"
                and available(ns, "digits-reader")
            )

        obj = wait_for("device pod re-created in zone-c", moved, 90)
        print(f"device zone change -> served in its new zone in {time.monotonic() - t0:.1f}s")
        assert "zone-c" in obj["status"]["plan"]["zones"]
        assert obj["status"]["plan"]["zones"]["zone-c"]["devices"] == [mover]
    finally:
        ns.kubectl("label", "--overwrite", "node", mover, "topology.kubernetes.io/zone=zone-a")
    wait_for(
        "zone-c released",
        lambda: "zone-c" not in (get(ns, "dnnd", "digits-reader")["status"]["plan"]["zones"]),
    )
    wait_for(
        "zone-c DaemonSet removed",
        lambda: get(ns, "daemonset", "digits-reader-device-zone-c") is None,
    )


def test_no_matching_devices_is_degraded_with_an_actionable_reason(
    ns: Namespace, operator: OperatorProcess
) -> None:
    apply(
        ns,
        model("digits", "digits_cnn", [1, 1, 8, 8]),
        deployment("doorbell", "digits", devices={"nodeSelector": {"app": "doorbell"}}),
    )
    obj = wait_for(
        "doorbell Degraded",
        lambda: (
            (o := get(ns, "dnnd", "doorbell"))
            and condition(o, "Degraded").get("status") == "True"
            and o
        ),
    )
    message = condition(obj, "Degraded")["message"]
    assert "spec.devices.nodeSelector app=doorbell" in message
    assert "0 of" not in message  # devices exist and are Ready, the selector matches none
    assert obj["status"]["phase"] == "Degraded"


def test_delete_removes_every_owned_object(ns: Namespace, operator: OperatorProcess) -> None:
    apply(ns, model("digits", "digits_cnn", [1, 1, 8, 8]), deployment("gone", "digits"))
    wait_for("gone Available", lambda: available(ns, "gone"), 180)
    owned = get(
        ns, "daemonsets,deployments,services,configmaps", "-l", "edgeai.dev/deployment=gone"
    )["items"]
    assert len(owned) >= 3
    ns.kubectl("delete", "dnnd", "gone", "--timeout=60s")
    wait_for(
        "gone's children garbage-collected",
        lambda: (
            not get(
                ns,
                "daemonsets,deployments,services,configmaps,pods",
                "-l",
                "edgeai.dev/deployment=gone",
            )["items"]
        ),
        90,
    )


def test_the_last_deployment_of_a_priority_deletes_its_priority_class(
    ns: Namespace, operator: OperatorProcess
) -> None:
    # A priority no other test uses: PriorityClasses are cluster-scoped.
    pc = "edgeai-priority-37"
    apply(
        ns,
        model("digits", "digits_cnn", [1, 1, 8, 8]),
        deployment("first", "digits", priority=37),
        deployment("second", "digits", priority=37),
        deployment("third", "digits", priority=37),
    )
    for name in ("first", "second", "third"):
        wait_for(f"{name} Available", lambda name=name: available(ns, name), 180)
    assert get(ns, "priorityclass", pc)["value"] == 37
    assert {p["spec"]["priorityClassName"] for p in pods_of(ns, "first", "device")} == {pc}

    uid = get(ns, "priorityclass", pc)["metadata"]["uid"]
    # kubectl delete returns once the finalizer is gone, so the release has run: the
    # PriorityClass "second" still runs with stays (the same object, not recreated).
    ns.kubectl("delete", "dnnd", "first", "--timeout=60s")
    assert get(ns, "priorityclass", pc)["metadata"]["uid"] == uid

    # the last two deleted at once, right after a spec change starts a pass in each
    # (a pass still applying children must not re-create it after the release): each
    # sees the other going, one of them deletes it
    for name in ("second", "third"):
        ns.kubectl(
            "patch", "dnnd", name, "--type=merge", "-p", '{"spec":{"slo":{"latencyP95Ms":150}}}'
        )
    ns.kubectl("delete", "dnnd", "second", "third", "--timeout=60s")
    wait_for("the PriorityClass deleted", lambda: get(ns, "priorityclass", pc) is None, 30)
    time.sleep(5)  # nothing re-creates it once both daemons have ended
    assert get(ns, "priorityclass", pc) is None


def _metrics(operator: OperatorProcess) -> dict[str, float]:
    with urllib.request.urlopen(operator.metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    return {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_operator_serves_its_own_metrics(ns: Namespace, operator: OperatorProcess) -> None:
    # Counted against a baseline: the operator may have been restarted by another test.
    before = wait_for("the operator's /metrics", lambda: _metrics_or_none(operator), 60)
    apply(ns, model("digits", "digits_cnn", [1, 1, 8, 8]), deployment("counted", "digits"))
    wait_for("counted Available", lambda: available(ns, "counted"), 180)
    values = _metrics(operator)
    for counter in (
        "edgeai_operator_reconciles_total",
        "edgeai_operator_applies_total",
        "edgeai_operator_models_profiled_total",
    ):
        assert values[counter] > before.get(counter, 0.0), counter
    assert (
        values['edgeai_operator_reconcile_seconds_bucket{le="+Inf"}']
        == values["edgeai_operator_reconcile_seconds_count"]
    )


def _metrics_or_none(operator: OperatorProcess) -> dict[str, float] | None:
    try:
        return _metrics(operator)
    except OSError:  # a restarted operator is not listening yet
        return None


def test_restarted_operator_finishes_a_change_made_while_it_was_down(
    ns: Namespace, operator: OperatorProcess
) -> None:
    """A restarted operator knows nothing it applied before: it finds the deployment's
    children by label, so a zone the spec dropped meanwhile is still cleaned up."""
    before = _digits_reader(ns)
    assert get(ns, "daemonset", "digits-reader-device-zone-b") is not None
    operator.stop()
    selector = {"app": "camera", "topology.kubernetes.io/zone": "zone-a"}
    try:
        patch = json.dumps({"spec": {"devices": {"nodeSelector": selector}}})
        ns.kubectl("patch", "dnnd", "digits-reader", "--type=merge", "-p", patch)
        # Nothing acts on it while the operator is down: the new generation is unobserved.
        obj = get(ns, "dnnd", "digits-reader")
        assert obj["metadata"]["generation"] == before["metadata"]["generation"] + 1
        assert obj["status"]["observedGeneration"] == before["metadata"]["generation"]
        assert get(ns, "daemonset", "digits-reader-device-zone-b") is not None
        operator.start()

        def converged() -> Any:
            obj = available(ns, "digits-reader")
            return (
                obj
                and obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
                and sorted(obj["status"]["plan"]["zones"]) == ["zone-a"]
                and get(ns, "daemonset", "digits-reader-device-zone-b") is None
                and obj
            )

        wait_for("zone-b stage removed after the restart", converged, 90)
        assert get(ns, "daemonset", "digits-reader-device-zone-a") is not None
    finally:
        if not operator.running:
            operator.start()
