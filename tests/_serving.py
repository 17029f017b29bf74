"""Serving a DNNDeployment's chain as real processes in a cluster test: one camera
device made slow (so even a small model is split device -> edge), a deployment of a
model pinned to it, the chain's pods run by the process kubelet, and an OIP v2 JSON
infer against its entry."""

from __future__ import annotations

import contextlib
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from _cluster_support import Namespace, annotated_nodes, condition, get, wait_for
from _process_kubelet import ProcessKubelet, ServiceProxy

DEVICE = "device-zone-a-0"


@contextlib.contextmanager
def slow_device(ns: Namespace) -> Iterator[None]:
    """A device too slow for small models and a fast uplink: the plans run the first
    operator on the device (the raw input stays there) and offload the rest to the
    edge, so a small model is served by a device -> edge chain."""
    with (
        annotated_nodes(ns.cluster, [DEVICE], "edgeai.dev/gflops", "0.005"),
        annotated_nodes(ns.cluster, [DEVICE], "edgeai.dev/uplink-mbps", "300"),
    ):
        yield


def deployment(name: str, model: str) -> dict[str, Any]:
    return {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNDeployment",
        "metadata": {"name": name},
        "spec": {
            "modelRef": {"name": model},
            "slo": {"latencyP95Ms": 500},
            "devices": {"nodeSelector": {"app": "camera", "kubernetes.io/hostname": DEVICE}},
            "placement": {"tiers": ["device", "edge"]},
            "privacy": {"rawInputStaysOnDevice": True},
            "autoscaling": {"minReplicas": 1, "maxReplicas": 1},
        },
    }


def infer(url: str, model: str, x: np.ndarray, input_name: str = "features") -> np.ndarray:
    body = {
        "inputs": [
            {
                "name": input_name,
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }
    request = urllib.request.Request(
        f"{url}/v2/models/{model}/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        out = json.loads(resp.read())["outputs"][0]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


@contextlib.contextmanager
def serving_chain(
    ns: Namespace, name: str, tmp_path: Path, device_layers: bool = True
) -> Iterator[str]:
    """The deployment's pods run as processes from their own commands (the device
    entry and the edge stage serving; with `device_layers`, once the split runs layers
    on the device); yields the device entry's URL."""

    def split() -> Any:
        obj = get(ns, "dnnd", name)
        ok = condition(obj, "Available").get("status") == "True"
        text = (obj or {}).get("status", {}).get("split", "")
        return ok and ("device" in text or not device_layers) and "edge" in text and obj

    wait_for(f"{name}: a device and an edge stage", split, 180)
    selector = f"edgeai.dev/deployment={name}"
    with ServiceProxy(ns) as proxy, ProcessKubelet(ns, selector, tmp_path, proxy) as kubelet:
        ip = wait_for(f"{name}: device and edge processes serving", kubelet.entry_ip, 180)
        yield f"http://{ip}:8080"
    for pod in sorted(p for p in tmp_path.iterdir() if p.is_dir()):
        fetched = sorted(pod.rglob("model.onnx"))
        parts = sorted(pod.rglob("stage*.onnx"))
        print(
            f"{name} pod {pod.name}: fetched {sum(f.stat().st_size for f in fetched)} B, "
            f"cut partitions totalling {sum(f.stat().st_size for f in parts)} B"
        )
