"""Migration under traffic: a device stage and an edge stage run as real processes
(`_process_kubelet`), requests flow through the device stage's entry without pause, an
edge node fails, and the operator moves the edge stage off it make-before-break. The
Ready replicas of every stage are recorded from a pod watch the whole time."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from kubernetes import client

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
from _process_kubelet import Informer, ProcessKubelet, ServiceProxy, is_ready
from conftest import OperatorProcess

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(900)]
NAME = "moving"
DEVICE = "device-zone-a-0"
MODEL = "alexnet_like"
SERVED = "alexnet"  # the DNNModel's name, which its stages serve the model under


class ReadyRecord:
    """(monotonic time, {tier: Ready pods}) after every pod event of the deployment."""

    def __init__(self, ns: Namespace) -> None:
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.informer = Informer(
            ns,
            lambda a: client.CoreV1Api(a).list_namespaced_pod,
            f"edgeai.dev/deployment={NAME}",
            self._record,
        )

    def _record(self, pods: dict[str, Any]) -> None:
        counts = {"device": 0, "edge": 0}
        for pod in pods.values():
            if is_ready(pod):
                counts[pod["metadata"]["labels"]["edgeai.dev/tier"]] += 1
        self.samples.append((time.monotonic(), counts))

    def minimum(self, since: float, until: float) -> dict[str, int]:
        """The fewest Ready pods of each tier from `since` (the state then included) on."""
        before = [c for t, c in self.samples if t <= since][-1:]
        during = before + [c for t, c in self.samples if since < t <= until]
        return {tier: min(c[tier] for c in during) for tier in ("device", "edge")}


class Load:
    """Clients sending OIP v2 requests to one address until stopped; each answer is
    checked against the whole model's output on the same input."""

    def __init__(self, url: str, x: np.ndarray, want: np.ndarray, clients: int = 2) -> None:
        self.url, self.want, self.clients = url, want, clients
        self.body = json_infer_body(x)
        self.sent = 0
        self.failures: list[tuple[float, str]] = []
        self.crash: BaseException | None = None  # what ended the clients' thread early
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def sent_at_least(self, count: int) -> bool:
        """Whether `count` requests were sent; raises what stopped the clients, if any,
        so a broken load shows its own error rather than a timeout."""
        if self.crash is not None:
            raise AssertionError(f"the load's clients stopped: {self.crash!r}") from self.crash
        return self.sent >= count

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:
            self.crash = exc

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(*(self._client(session) for _ in range(self.clients)))

    async def _client(self, session: aiohttp.ClientSession) -> None:
        # Closed loop: each client sends its next request when the last one is answered.
        while not self._stop.is_set():
            self.sent += 1
            try:
                async with session.post(
                    f"{self.url}/v2/models/{SERVED}/infer",
                    # A stream, not bytes: aiohttp warns on a raw body over 1 MiB (this
                    # one is about 3 MB of JSON) and the test suite makes warnings errors.
                    data=io.BytesIO(self.body),
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    text = await resp.text()
                if resp.status != 200:
                    self.failures.append((time.monotonic(), f"HTTP {resp.status}: {text[:300]}"))
                    continue
                out = json.loads(text)["outputs"][0]
                got = np.asarray(out["data"], np.float32).reshape(out["shape"])
                if got.shape != self.want.shape or np.max(np.abs(got - self.want)) > 1e-4:
                    self.failures.append((time.monotonic(), f"wrong output {got.ravel()[:4]}"))
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.failures.append((time.monotonic(), f"{type(exc).__name__}: {exc}"))


def _whole_model(x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    from edgeai_worker import zoo

    session = ort.InferenceSession(str(zoo.export_onnx(MODEL)))
    out: np.ndarray = session.run(None, {"input": x})[0]
    return out


def test_edge_node_failure_under_traffic_loses_no_request(
    ns: Namespace, operator: OperatorProcess, tmp_path: Path
) -> None:
    # A second edge server in zone-a, so the stage's two replicas can sit on two nodes;
    # a fast uplink pushes all but the first layers onto the edge.
    with (
        spare_edge_node(ns.cluster, f"spare-{ns.name[-6:]}", "zone-a") as spare,
        annotated_nodes(ns.cluster, [DEVICE], "edgeai.dev/uplink-mbps", "300"),
    ):
        _run(ns, operator, spare, tmp_path)


def _run(ns: Namespace, operator: OperatorProcess, spare: str, tmp_path: Path) -> None:
    cluster = ns.cluster
    apply(
        ns,
        {
            "apiVersion": "edgeai.dev/v1alpha1",
            "kind": "DNNModel",
            "metadata": {"name": SERVED},
            "spec": {
                "source": {"zoo": MODEL},
                "input": {"name": "input", "shape": [1, 3, 224, 224], "dtype": "FP32"},
            },
        },
        {
            "apiVersion": "edgeai.dev/v1alpha1",
            "kind": "DNNDeployment",
            "metadata": {"name": NAME},
            "spec": {
                "modelRef": {"name": SERVED},
                "slo": {"latencyP95Ms": 500},
                # One device: one device-stage process on this 2-core machine.
                "devices": {"nodeSelector": {"app": "camera", "kubernetes.io/hostname": DEVICE}},
                "placement": {"tiers": ["device", "edge"]},
                "privacy": {"rawInputStaysOnDevice": True},
                "autoscaling": {"minReplicas": 2, "maxReplicas": 2},
            },
        },
    )

    def split() -> Any:
        obj = get(ns, "dnnd", NAME)
        ok = condition(obj, "Available").get("status") == "True"
        return (
            ok and "edge" in obj["status"]["split"] and "device" in obj["status"]["split"] and obj
        )

    obj = wait_for("a device stage and an edge stage", split, 240)
    print(f"split: {obj['status']['split']}")
    record = ReadyRecord(ns)
    record.informer.start()
    # Stopped on failure too: its watch would outlive the control plane.
    try:
        selector = f"edgeai.dev/deployment={NAME},edgeai.dev/zone=zone-a"
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
        want = _whole_model(x)
        with (
            ServiceProxy(ns) as proxy,
            ProcessKubelet(ns, selector, tmp_path, proxy) as kubelet,
        ):

            def serving(tier: str) -> list[str]:
                pods = [
                    p
                    for p in get(ns, "pods", "-l", f"{selector},edgeai.dev/tier={tier}")["items"]
                    if is_ready(p)
                ]
                return [
                    p["metadata"]["name"]
                    for p in pods
                    if kubelet.serving.get(p["metadata"]["name"])
                ]

            wait_for("both edge processes Ready", lambda: len(serving("edge")) == 2, 180)
            device = wait_for("the device process Ready", lambda: serving("device"), 180)[0]
            edge_pods = get(ns, "pods", "-l", f"{selector},edgeai.dev/tier=edge")["items"]
            nodes = sorted(p["spec"]["nodeName"] for p in edge_pods)
            # The builders set no spread of their own: the scheduler's default spreading
            # placed the two replicas; the test needs them on two nodes.
            assert nodes == sorted(["edge-zone-a-0", spare]), nodes
            device_ip = kubelet.procs[device][0]
            with Load(f"http://{device_ip}:8080", x, want) as load:
                wait_for("traffic flowing", lambda: load.sent_at_least(5), 60)
                victim = "edge-zone-a-0"
                old = {p["metadata"]["name"] for p in edge_pods if p["spec"]["nodeName"] == victim}
                t_fail = time.monotonic()
                with failed_node(cluster, victim, "KernelPanic"):

                    def migrated() -> bool:
                        pods = get(ns, "pods", "-l", f"{selector},edgeai.dev/tier=edge")["items"]
                        names = {p["metadata"]["name"] for p in pods}
                        return (
                            not names & old
                            and all(p["spec"]["nodeName"] != victim for p in pods)
                            and len(serving("edge")) == 2
                        )

                    wait_for("the edge stage moved off the failed node", migrated, 240)
                    t_done = time.monotonic()
                    sent_at_done = load.sent
                    # A little traffic after the move, through the new replicas only.
                    wait_for(
                        "traffic after the move", lambda: load.sent_at_least(sent_at_done + 10), 60
                    )
    finally:
        record.informer.stop()
    lowest = record.minimum(t_fail, t_done)
    print(
        f"migration under traffic: {load.sent} requests sent, {len(load.failures)} failed, "
        f"min Ready replicas during the failure {lowest}, migrated in {t_done - t_fail:.1f}s, "
        f"{proxy.rejected} connections to the Services found no Ready endpoint"
    )
    for when, what in load.failures[:20]:
        print(f"  failed at +{when - t_fail:.1f}s: {what}")
    events = get(
        ns,
        "events",
        "--field-selector",
        f"involvedObject.kind=DNNDeployment,involvedObject.name={NAME}",
    )["items"]
    assert any(e["reason"] == "MigratingStages" and victim in e["message"] for e in events)
    assert min(lowest.values()) >= 1, lowest
    assert len(load.failures) == 0, load.failures[:5]
