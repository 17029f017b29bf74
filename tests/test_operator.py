"""The operator against the real control plane: samples placed by the real scheduler,
status and events, replanning, migration, deletion and the stage pods' command."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from _cluster_support import apply, condition, get, wait_for
from conftest import OperatorProcess
from edgeai_operator.localcluster import REPO_ROOT, LocalCluster
from edgeai_operator.topology import parse_topology

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
NS = "default"


def model(name: str, zoo: str, shape: list[int]) -> dict[str, Any]:
    return {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNModel",
        "metadata": {"name": name, "namespace": NS},
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
        "metadata": {"name": name, "namespace": NS},
        "spec": body,
    }


def available(cluster: LocalCluster, name: str) -> Any:
    obj = get(cluster, "dnnd", name)
    return obj if condition(obj, "Available").get("status") == "True" else None


def pods_of(cluster: LocalCluster, name: str, tier: str) -> list[dict[str, Any]]:
    items = get(cluster, "pods", "-l", f"edgeai.dev/deployment={name},edgeai.dev/tier={tier}")
    return [p for p in items["items"] if not p["metadata"].get("deletionTimestamp")]


def node_labels(cluster: LocalCluster, node: str) -> dict[str, str]:
    labels: dict[str, str] = get(cluster, "node", node)["metadata"]["labels"]
    return labels


def set_uplink(cluster: LocalCluster, mbps: float) -> None:
    for i in range(3):
        for zone in ("zone-a", "zone-b"):
            cluster.kubectl(
                "annotate",
                "--overwrite",
                "node",
                f"device-{zone}-{i}",
                f"edgeai.dev/uplink-mbps={mbps:g}",
            )


def test_digits_sample_placed_on_devices_with_status_and_events(
    cluster: LocalCluster, operator: OperatorProcess
) -> None:
    docs = list(yaml.safe_load_all((REPO_ROOT / "examples/digits-model.yaml").read_text()))
    docs += list(yaml.safe_load_all((REPO_ROOT / "examples/digits-deployment.yaml").read_text()))
    apply(cluster, *docs)

    def profiled_current() -> bool:
        # `digits` may exist from an earlier test with another spec: wait for the
        # profile of this generation.
        obj = get(cluster, "dnnm", "digits")
        cond = condition(obj, "Profiled")
        return bool(
            cond.get("status") == "True"
            and cond.get("observedGeneration") == obj["metadata"]["generation"]
        )

    assert wait_for("DNNModel digits profiled", profiled_current, 180)
    dnnm = get(cluster, "dnnm", "digits")
    assert dnnm["status"]["cuts"] >= 5
    assert set(dnnm["status"]["tiers"]) == {"device", "edge", "cloud"}
    variants = {v["name"]: v for v in dnnm["status"]["variants"]}
    assert variants["fp32"]["accuracy"] > 0.9
    assert variants["int8"]["ready"]
    assert variants["int8"]["sizeBytes"] > 0
    wide = cluster.kubectl("get", "dnnm", "digits", "-o", "wide")
    assert "digits_cnn" in wide
    assert "fp32,int8,pruned-50" in wide

    obj = wait_for("digits-reader Available", lambda: available(cluster, "digits-reader"))
    assert obj["status"]["phase"] == "Available"
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    types = {c["type"] for c in obj["status"]["conditions"]}
    assert types == {"Planned", "Available", "SLOMet", "Degraded", "Progressing"}
    assert all(c["observedGeneration"] == 1 for c in obj["status"]["conditions"])
    # The real scheduler put one device pod on each camera device, in its own zone's set.
    pods = pods_of(cluster, "digits-reader", "device")
    assert len(pods) == 6
    for pod in pods:
        zone = node_labels(cluster, pod["spec"]["nodeName"])["topology.kubernetes.io/zone"]
        assert pod["metadata"]["labels"]["edgeai.dev/zone"] == zone
        assert pod["status"]["phase"] == "Running"
    row = cluster.kubectl("get", "dnnd", "digits-reader").splitlines()[1].split()
    # NAME MODEL SLO PREDICTED P95 SPLIT REPLICAS... (P95 empty before traffic)
    assert row[1] == "digits"
    assert row[2] == "50"
    assert float(row[3]) > 0
    assert "device:" in row[4]
    events = get(
        cluster,
        "events",
        "--field-selector",
        "involvedObject.kind=DNNDeployment,involvedObject.name=digits-reader",
    )
    messages = [e["message"] for e in events["items"]]
    assert any("predicted" in m and "links device->edge 10 Mbps" in m for m in messages)


def test_bandwidth_change_replans_onto_edge_servers_of_each_zone(
    cluster: LocalCluster, operator: OperatorProcess
) -> None:
    apply(cluster, model("resnet18", "resnet18", [1, 3, 224, 224]), deployment("r18", "resnet18"))
    obj = wait_for("r18 Available", lambda: available(cluster, "r18"), 180)
    # 10 Mbps: 602 KB of input costs 480 ms to send; ResNet-18 stays on the device,
    # and the SLO of 200 ms is reported as unreachable.
    assert obj["status"]["split"].startswith("device:")
    assert "edge" not in obj["status"]["split"]
    assert condition(obj, "SLOMet")["status"] == "False"
    assert "200" in condition(obj, "SLOMet")["message"]
    set_uplink(cluster, 200)
    try:
        obj = wait_for(
            "r18 replanned onto the edge",
            lambda: (o := available(cluster, "r18")) and "edge" in o["status"]["split"] and o,
            120,
        )
        assert condition(obj, "SLOMet")["status"] == "True"
        assert obj["status"]["plan"]["predictedLatencyMs"] < 200
        edge_pods = wait_for(
            "edge pods",
            lambda: len(pods_of(cluster, "r18", "edge")) == 2 and pods_of(cluster, "r18", "edge"),
        )
        for pod in edge_pods:
            node = pod["spec"]["nodeName"]
            assert node_labels(cluster, node)["edgeai.dev/tier"] == "edge"
            assert (
                node_labels(cluster, node)["topology.kubernetes.io/zone"]
                == pod["metadata"]["labels"]["edgeai.dev/zone"]
            )
        services = get(cluster, "svc", "-l", "edgeai.dev/deployment=r18")["items"]
        assert {s["metadata"]["name"] for s in services} >= {"r18-edge-zone-a", "r18-edge-zone-b"}
        events = get(
            cluster,
            "events",
            "--field-selector",
            "involvedObject.kind=DNNDeployment,involvedObject.name=r18",
        )
        assert any(
            e["reason"] == "Replanned" and "200 Mbps" in e["message"] for e in events["items"]
        )
    finally:
        set_uplink(cluster, 10)


def test_stage_pod_command_serves_the_planned_chain(
    cluster: LocalCluster, operator: OperatorProcess, tmp_path: Path
) -> None:
    """The ConfigMap plan and the pods' `edgeai run-stage` args, run as real processes."""
    apply(
        cluster,
        model("alexnet", "alexnet_like", [1, 3, 224, 224]),
        deployment(
            "alex",
            "alexnet",
            slo={"latencyP95Ms": 500},
            placement={"tiers": ["device", "edge"]},
            privacy={"rawInputStaysOnDevice": True},
        ),
    )
    set_uplink(cluster, 300)
    try:
        wait_for(
            "alex split across device and edge",
            lambda: (
                (o := available(cluster, "alex"))
                and "edge" in o["status"]["split"]
                and "device" in o["status"]["split"]
                and o
            ),
            180,
        )
        cm = get(cluster, "configmap", "alex-plan")
        edge = get(cluster, "deployment", "alex-edge-zone-a")
        device = get(cluster, "daemonset", "alex-device-zone-a")
    finally:
        set_uplink(cluster, 10)
    plan_text = cm["data"]["plan-zone-a.yaml"]
    (tmp_path / "plan.yaml").write_text(plan_text)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ports = {}
        for tier, workload in (("edge", edge), ("device", device)):
            args = workload["spec"]["template"]["spec"]["containers"][0]["args"]
            assert args[0] == "run-stage"
            port = _free_port()
            ports[tier] = port
            args = [a for a in args if not a.startswith(("--plan", "--port", "--host", "--next"))]
            args += [
                f"--plan={tmp_path / 'plan.yaml'}",
                f"--port={port}",
                "--host=127.0.0.1",
                f"--workdir={tmp_path / tier}",
            ]
            if tier == "device":
                args.append(f"--next=http://127.0.0.1:{ports['edge']}")
            with (tmp_path / f"{tier}.log").open("wb") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "edgeai_operator.cli", *args],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
            wait_for(f"{tier} stage ready", lambda p=port: _ready(p), 120)
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
        got = _infer(ports["device"], "alexnet_like", x)
        import onnxruntime as ort

        from edgeai_worker import zoo

        session = ort.InferenceSession(str(zoo.export_onnx("alexnet_like")))
        want = session.run(None, {"input": x})[0]
        assert got.shape == want.shape
        assert float(np.max(np.abs(got - want))) <= 1e-4
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=20)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _infer(port: int, name: str, x: np.ndarray) -> np.ndarray:
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        }
    ).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/{name}/infer",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        out = json.loads(resp.read())["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def test_edge_node_failure_migrates_make_before_break(
    cluster: LocalCluster, operator: OperatorProcess
) -> None:
    spare = parse_topology(
        {
            "kind": "Topology",
            "nodeGroups": [
                {
                    "name": "edge2",
                    "tier": "edge",
                    "zones": ["zone-a"],
                    "gflops": 150,
                    "uplinkMbps": 100,
                    "uplinkRttMs": 25,
                }
            ],
        }
    ).nodes[0]
    cluster.kubectl("create", "-f", "-", input_text=yaml.safe_dump(spare.manifest()))
    wait_for("spare edge Ready", lambda: spare.name in cluster.ready_nodes())
    set_uplink(cluster, 200)
    try:
        apply(cluster, deployment("mig", "resnet18"))
        wait_for(
            "mig on the edge",
            lambda: (o := available(cluster, "mig")) and "edge" in o["status"]["split"] and o,
            180,
        )
        before = pods_of(cluster, "mig", "edge")
        victim = next(
            p["spec"]["nodeName"]
            for p in before
            if p["metadata"]["labels"]["edgeai.dev/zone"] == "zone-a"
        )
        t0 = time.monotonic()
        cluster.fail_node(victim, reason="KernelPanic")
        moved = wait_for(
            "zone-a edge stage moved off the failed node",
            lambda: (
                (
                    pods := [
                        p
                        for p in pods_of(cluster, "mig", "edge")
                        if p["metadata"]["labels"]["edgeai.dev/zone"] == "zone-a"
                    ]
                )
                and all(p["spec"]["nodeName"] != victim for p in pods)
                and available(cluster, "mig")
                and pods
            ),
            120,
        )
        elapsed = time.monotonic() - t0
        assert {p["spec"]["nodeName"] for p in moved} == ({"edge-zone-a-0", spare.name} - {victim})
        print(f"edge node failure -> stage migrated and Available in {elapsed:.1f}s")
        events = get(
            cluster,
            "events",
            "--field-selector",
            "involvedObject.kind=DNNDeployment,involvedObject.name=mig",
        )
        assert any(
            e["reason"] == "MigratingStages" and victim in e["message"] for e in events["items"]
        )
    finally:
        set_uplink(cluster, 10)
        cluster.recover_node(victim)
        cluster.kubectl("delete", "node", spare.name, "--wait=false")


def test_device_moving_zone_follows_its_user(
    cluster: LocalCluster, operator: OperatorProcess
) -> None:
    wait_for("digits-reader Available", lambda: available(cluster, "digits-reader"))
    mover = "device-zone-a-2"
    t0 = time.monotonic()
    cluster.kubectl("label", "--overwrite", "node", mover, "topology.kubernetes.io/zone=zone-c")
    try:

        def moved() -> Any:
            pods = [
                p
                for p in pods_of(cluster, "digits-reader", "device")
                if p["spec"].get("nodeName") == mover
            ]
            return (
                len(pods) == 1
                and pods[0]["metadata"]["labels"]["edgeai.dev/zone"] == "zone-c"
                and pods[0]["status"]["phase"] == "Running"
                and available(cluster, "digits-reader")
            )

        obj = wait_for("device pod re-created in zone-c", moved, 90)
        print(f"device zone change -> served in its new zone in {time.monotonic() - t0:.1f}s")
        assert "zone-c" in obj["status"]["plan"]["zones"]
        assert obj["status"]["plan"]["zones"]["zone-c"]["devices"] == [mover]
    finally:
        cluster.kubectl("label", "--overwrite", "node", mover, "topology.kubernetes.io/zone=zone-a")
    wait_for(
        "zone-c released",
        lambda: "zone-c" not in (get(cluster, "dnnd", "digits-reader")["status"]["plan"]["zones"]),
    )
    wait_for(
        "zone-c DaemonSet removed",
        lambda: get(cluster, "daemonset", "digits-reader-device-zone-c") is None,
    )


def test_no_matching_devices_is_degraded_with_an_actionable_reason(
    cluster: LocalCluster, operator: OperatorProcess
) -> None:
    apply(cluster, deployment("doorbell", "digits", devices={"nodeSelector": {"app": "doorbell"}}))
    obj = wait_for(
        "doorbell Degraded",
        lambda: (
            (o := get(cluster, "dnnd", "doorbell"))
            and condition(o, "Degraded").get("status") == "True"
            and o
        ),
    )
    message = condition(obj, "Degraded")["message"]
    assert "spec.devices.nodeSelector app=doorbell" in message
    assert "0 of" not in message  # devices exist and are Ready, the selector matches none
    assert obj["status"]["phase"] == "Degraded"


def test_delete_removes_every_owned_object(
    cluster: LocalCluster, operator: OperatorProcess
) -> None:
    wait_for("r18 Available", lambda: available(cluster, "r18"))
    owned = get(
        cluster, "daemonsets,deployments,services,configmaps", "-l", "edgeai.dev/deployment=r18"
    )["items"]
    assert len(owned) >= 3
    cluster.kubectl("delete", "dnnd", "r18", "--timeout=60s")
    wait_for(
        "r18 children garbage-collected",
        lambda: (
            not get(
                cluster,
                "daemonsets,deployments,services,configmaps,pods",
                "-l",
                "edgeai.dev/deployment=r18",
            )["items"]
        ),
        90,
    )


def test_operator_serves_its_own_metrics(operator: OperatorProcess) -> None:
    with urllib.request.urlopen(operator.metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values["edgeai_operator_reconciles_total"] > 0
    assert values["edgeai_operator_applies_total"] > 0
    assert values["edgeai_operator_models_profiled_total"] >= 3
    assert (
        values['edgeai_operator_reconcile_seconds_bucket{le="+Inf"}']
        == values["edgeai_operator_reconcile_seconds_count"]
    )


# Last in this module: the restarted process starts its own /metrics counters afresh.
def test_restarted_operator_finishes_a_change_made_while_it_was_down(
    cluster: LocalCluster, operator: OperatorProcess
) -> None:
    """A restarted operator knows nothing it applied before: it finds the deployment's
    children by label, so a zone the spec dropped meanwhile is still cleaned up."""
    wait_for("digits-reader Available", lambda: available(cluster, "digits-reader"))
    assert get(cluster, "daemonset", "digits-reader-device-zone-b") is not None
    operator.stop()
    selector = {"app": "camera", "topology.kubernetes.io/zone": "zone-a"}
    try:
        patch = json.dumps({"spec": {"devices": {"nodeSelector": selector}}})
        cluster.kubectl("patch", "dnnd", "digits-reader", "--type=merge", "-p", patch)
        time.sleep(2)
        # nothing acts on it while the operator is down
        assert get(cluster, "daemonset", "digits-reader-device-zone-b") is not None
        operator.start()

        def converged() -> Any:
            obj = available(cluster, "digits-reader")
            return (
                obj
                and obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
                and sorted(obj["status"]["plan"]["zones"]) == ["zone-a"]
                and get(cluster, "daemonset", "digits-reader-device-zone-b") is None
                and obj
            )

        wait_for("zone-b stage removed after the restart", converged, 90)
        assert get(cluster, "daemonset", "digits-reader-device-zone-a") is not None
    finally:
        if not operator.running:
            operator.start()
        # a merge patch keeps map keys it does not mention: null removes the zone
        restore = {"app": "camera", "topology.kubernetes.io/zone": None}
        patch = json.dumps({"spec": {"devices": {"nodeSelector": restore}}})
        cluster.kubectl("patch", "dnnd", "digits-reader", "--type=merge", "-p", patch)
    wait_for(
        "zone-b served again",
        lambda: (
            (obj := available(cluster, "digits-reader"))
            and sorted(obj["status"]["plan"]["zones"]) == ["zone-a", "zone-b"]
        ),
        90,
    )
