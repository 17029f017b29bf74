"""The kind cluster `make kind-up` creates (hack/kind/up.sh): nodes shaped like
hack/topology.yaml, and a real pod of the worker image (real kubelet, containerd, runc)
serving OIP v2, reached from the host through `kubectl port-forward`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from _image_support import (
    INFER_BODY,
    INFER_EXPECTED,
    MODEL_NAME,
    REPO_ROOT,
    SERVE_TINY_MODEL,
    WORKER_IMAGE,
    WORKER_PORT,
    docker_unavailable,
)
from edgeai_operator import GFLOPS_ANNOTATION, TIER_LABEL, ZONE_LABEL
from edgeai_operator.topology import load_topology

pytestmark = [pytest.mark.kind, pytest.mark.slow]

CACHE = Path(os.environ.get("EDGEAI_CACHE", Path.home() / ".cache" / "edgeai"))
CLUSTER = os.environ.get("EDGEAI_KIND_CLUSTER", "edgeai")
KUBECONFIG = CACHE / f"kind-{CLUSTER}.kubeconfig"
KUBECTL = CACHE / "k8s-v1.34.4" / "bin" / "kubectl"


def kubectl(*args: str, check: bool = True, timeout: float = 60) -> str:
    out = subprocess.run(
        [str(KUBECTL), f"--kubeconfig={KUBECONFIG}", *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    if check and out.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}: {out.stderr}")
    return out.stdout


@pytest.fixture(scope="module", autouse=True)
def _cluster() -> None:
    reason = docker_unavailable()
    if reason is None and not (KUBECONFIG.exists() and KUBECTL.exists()):
        reason = f"no kind cluster {CLUSTER} ({KUBECONFIG} missing: make kind-up)"
    if reason is None:
        ping = subprocess.run(
            [str(KUBECTL), f"--kubeconfig={KUBECONFIG}", "get", "--raw=/readyz"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if ping.returncode != 0:
            reason = f"kind cluster {CLUSTER} does not answer (make kind-up): {ping.stderr.strip()}"
    if reason:
        pytest.skip(reason)


def test_nodes_are_shaped_like_the_topology() -> None:
    topology = load_topology(REPO_ROOT / "hack" / "topology.yaml")
    nodes = json.loads(kubectl("get", "nodes", "-o", "json"))["items"]
    workers = [n for n in nodes if TIER_LABEL in n["metadata"]["labels"]]
    assert len(nodes) == 6
    assert len(workers) == 5
    seen = set()
    for node in workers:
        labels, annotations = node["metadata"]["labels"], node["metadata"]["annotations"]
        tier, zone = labels[TIER_LABEL], labels.get(ZONE_LABEL)
        seen.add((tier, zone))
        spec = next(s for s in topology.nodes if s.tier == tier and s.zone == zone)
        expected = spec.manifest(kwok=False)["metadata"]["annotations"]
        assert GFLOPS_ANNOTATION in expected
        assert {key: annotations.get(key) for key in expected} == expected
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
        assert ready == "True", node["metadata"]["name"]
    assert seen == {
        ("device", "zone-a"),
        ("edge", "zone-a"),
        ("device", "zone-b"),
        ("edge", "zone-b"),
        ("cloud", None),
    }


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"edgeai-kind-test-{int(time.time())}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


def http(url: str, body: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(
        url,
        data=None if body is None else body.encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read().decode()


def test_worker_pod_serves_through_port_forward(namespace: str) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "worker", "namespace": namespace},
        "spec": {
            "nodeSelector": {TIER_LABEL: "device", ZONE_LABEL: "zone-a"},
            "containers": [
                {
                    "name": "worker",
                    "image": WORKER_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": SERVE_TINY_MODEL,
                    "ports": [{"name": "http", "containerPort": WORKER_PORT}],
                    "readinessProbe": {
                        "httpGet": {"path": "/v2/health/ready", "port": "http"},
                        "periodSeconds": 2,
                    },
                }
            ],
        },
    }
    subprocess.run(
        [str(KUBECTL), f"--kubeconfig={KUBECONFIG}", "apply", "-f", "-"],
        input=json.dumps(pod), capture_output=True, text=True, check=True,
    )  # fmt: skip
    waited = subprocess.run(
        [str(KUBECTL), f"--kubeconfig={KUBECONFIG}", "-n", namespace, "wait",
         "--for=condition=Ready", "pod/worker", "--timeout=120s"],
        capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    if waited.returncode != 0:
        describe = kubectl("-n", namespace, "describe", "pod", "worker", check=False)
        logs = kubectl("-n", namespace, "logs", "worker", check=False)
        raise AssertionError(f"pod not Ready: {waited.stderr}\n{describe}\n{logs}")
    placed = json.loads(kubectl("-n", namespace, "get", "pod", "worker", "-o", "json"))
    node = json.loads(kubectl("get", "node", placed["spec"]["nodeName"], "-o", "json"))
    assert node["metadata"]["labels"][TIER_LABEL] == "device"

    with subprocess.Popen(
        [str(KUBECTL), f"--kubeconfig={KUBECONFIG}", "-n", namespace, "port-forward",
         "pod/worker", f":{WORKER_PORT}", "--address=127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as forward:  # fmt: skip
        try:
            assert forward.stdout is not None
            line = forward.stdout.readline()  # "Forwarding from 127.0.0.1:PORT -> 8080"
            match = re.search(r"127\.0\.0\.1:(\d+)", line)
            assert match, line + (forward.stderr.read() if forward.poll() is not None else "")
            base = f"http://127.0.0.1:{match.group(1)}"
            status, _ = http(f"{base}/v2/health/ready")
            assert status == 200
            status, body = http(f"{base}/v2/models/{MODEL_NAME}/infer", INFER_BODY)
            assert status == 200
            assert json.loads(body)["outputs"][0]["data"] == INFER_EXPECTED
        finally:
            forward.terminate()
            forward.wait(timeout=10)
