"""Autoscaling end to end: kwok pods of the edge stage are served by real worker
processes (the pods' own `edgeai run-stage` command) listening on the pod IPs, which
kwok hands out from the loopback range. A load generator drives them over mutual TLS
with the device stage's certificate, as the device stage does; the operator
scrapes their real /metrics, scales the Deployment up, and back down once calm."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import yaml

from _cluster_support import Kubectl, Namespace, annotated_nodes, get, wait_for
from _process_kubelet import ProcessKubelet
from conftest import OperatorProcess

# Load for a minute, then a calm stable window: longer than the default timeout allows.
pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(900)]
NAME = "autoscaled"


def _device_tls(ns: Namespace, tmp_path: Path) -> ssl.SSLContext:
    """The device stage's TLS as its forwarder sets it up, from the Secret the operator
    issued: the edge pods take inference over mutual TLS from the device stage only."""
    data = get(ns, "secret", f"{NAME}-device-tls")["data"]
    for key in ("tls.crt", "tls.key", "ca.crt"):
        (tmp_path / key).write_bytes(base64.b64decode(data[key]))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(tmp_path / "ca.crt"))
    ctx.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    return ctx


async def _load(
    kubelet: ProcessKubelet,
    model: str,
    seconds: float,
    concurrency: int,
    latencies: list[tuple[float, float, int]],
    tls: ssl.SSLContext,
) -> None:
    """Closed-loop clients sending binary OIP v2 requests round-robin over ready pods,
    as the device stage does: over mutual TLS to their port 8443."""
    ip = kubelet.ready[0]
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{ip}:8080/v2/models/{model}") as resp,
    ):
        meta = await resp.json()
    spec = meta["inputs"][0]
    shape = [1 if d < 0 else d for d in spec["shape"]]
    data = np.random.default_rng(0).standard_normal(shape).astype(np.float32).tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": spec["name"],
                    "shape": shape,
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(data)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    body = header + data
    deadline = time.monotonic() + seconds
    counter = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal counter
        while time.monotonic() < deadline:
            targets = kubelet.ready
            counter += 1
            target = targets[counter % len(targets)]
            t0 = time.monotonic()
            async with session.post(
                f"https://{target}:8443/v2/models/{model}/infer",
                ssl=tls,
                data=body,
                headers={
                    "Inference-Header-Content-Length": str(len(header)),
                    "Content-Type": "application/octet-stream",
                },
            ) as r:
                await r.read()
                assert r.status == 200, await r.text()
            latencies.append((t0, time.monotonic() - t0, len(targets)))

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))


def _replicas(cluster: Kubectl, workload: str) -> int:
    obj = get(cluster, "deployment", workload)
    return int(obj["spec"]["replicas"]) if obj else 0


def test_stage_scales_up_under_load_and_down_when_calm(
    ns: Namespace, operator: OperatorProcess, tmp_path: Path
) -> None:
    devices = [
        n["metadata"]["name"]
        for n in get(ns.cluster, "nodes", "-l", "edgeai.dev/tier=device")["items"]
    ]
    with annotated_nodes(ns.cluster, devices, "edgeai.dev/uplink-mbps", "300"):
        _scale_up_and_down(ns, tmp_path)


def _scale_up_and_down(cluster: Namespace, tmp_path: Path) -> None:
    cluster.kubectl(
        "apply",
        "-f",
        "-",
        input_text=yaml.safe_dump_all(
            [
                {
                    "apiVersion": "edgeai.dev/v1alpha1",
                    "kind": "DNNModel",
                    "metadata": {"name": "alexnet-scaled"},
                    "spec": {
                        "source": {"zoo": "alexnet_like"},
                        "input": {"name": "input", "shape": [1, 3, 224, 224], "dtype": "FP32"},
                    },
                },
                {
                    "apiVersion": "edgeai.dev/v1alpha1",
                    "kind": "DNNDeployment",
                    "metadata": {"name": NAME},
                    "spec": {
                        "modelRef": {"name": "alexnet-scaled"},
                        "slo": {"latencyP95Ms": 40},
                        "devices": {"nodeSelector": {"app": "camera"}},
                        "placement": {"tiers": ["device", "edge"]},
                        "autoscaling": {
                            "minReplicas": 1,
                            "maxReplicas": 3,
                            "stableWindowSeconds": 15,
                            "panicWindowSeconds": 6,
                            "scaleDownDelaySeconds": 5,
                        },
                    },
                },
            ]
        ),
    )
    workload = f"{NAME}-edge-zone-a"
    wait_for("an edge stage", lambda: _replicas(cluster, workload) == 1, 240)
    plan_text = get(cluster, "configmap", f"{NAME}-plan")["data"]["plan-zone-a.yaml"]
    plan = yaml.safe_load(plan_text)
    edge_stage = next(s for s in plan["stages"] if s["tier"] == "edge")
    selector = f"edgeai.dev/deployment={NAME},edgeai.dev/tier=edge,edgeai.dev/zone=zone-a"
    latencies: list[tuple[float, float, int]] = []
    with ProcessKubelet(cluster, selector, tmp_path) as kubelet:
        wait_for("the edge worker serving its pod IP", lambda: kubelet.ready, 120)
        assert kubelet.ready[0].startswith("127.244.")
        t0 = time.monotonic()
        tls = _device_tls(cluster, tmp_path)
        asyncio.run(_load(kubelet, "alexnet-scaled", 60, 8, latencies, tls))
        scaled_up = max(_replicas(cluster, workload), 1)
        events = get(
            cluster,
            "events",
            "--field-selector",
            f"involvedObject.kind=DNNDeployment,involvedObject.name={NAME}",
        )["items"]
        ups = [e["message"] for e in events if e["reason"] == "ScaledUp"]
        assert ups, "no scale-up under load"
        assert scaled_up >= 2
        assert any("p95" in m and "stage target" in m and workload in m for m in ups)
        status = get(cluster, "dnnd", NAME)["status"]
        assert status["observed"]["stages"][workload]["p95LatencyMs"] > 0
        # Calm: no requests for a stable window -> back to minReplicas.
        wait_for("scale-down to 1", lambda: _replicas(cluster, workload) == 1, 90)
        calm = time.monotonic() - t0
    events = get(
        cluster,
        "events",
        "--field-selector",
        f"involvedObject.kind=DNNDeployment,involvedObject.name={NAME}",
    )["items"]
    downs = [e["message"] for e in events if e["reason"] == "ScaledDown"]
    assert downs
    one = [d for _, d, n in latencies if n == 1]
    many = [d for _, d, n in latencies if n >= 2]
    print(
        f"edge stage {edge_stage['layers']}: {len(latencies)} requests; "
        f"p95 with 1 replica {np.percentile(one, 95) * 1000 if one else float('nan'):.1f} ms, "
        f"with >=2 replicas {np.percentile(many, 95) * 1000 if many else float('nan'):.1f} ms; "
        f"max replicas {scaled_up}; back to 1 after {calm:.0f}s\n"
        f"up: {ups}\ndown: {downs}"
    )
