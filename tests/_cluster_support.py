"""Small helpers shared by the tests that talk to the real control plane."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import yaml

from edgeai_operator.localcluster import LocalCluster
from edgeai_operator.topology import parse_topology


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 90) -> Any:
    """Polls `check` until it returns something truthy, and returns that."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)  # the poll interval; each check is a kubectl call
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what} (last: {last!r})")


class Kubectl(Protocol):
    def kubectl(self, *args: str, input_text: str | None = None, check: bool = True) -> str: ...


class Namespace:
    """One test's namespace on the shared cluster: `kubectl` runs in it (cluster-scoped
    objects such as nodes are unaffected), `cluster` is the control plane itself."""

    def __init__(self, cluster: LocalCluster, name: str) -> None:
        self.cluster = cluster
        self.name = name

    def kubectl(self, *args: str, input_text: str | None = None, check: bool = True) -> str:
        return self.cluster.kubectl(
            "--namespace", self.name, *args, input_text=input_text, check=check
        )


def get(cluster: Kubectl, *args: str) -> Any:
    """`kubectl get ARGS -o json`, parsed; None when the object does not exist."""
    out = cluster.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(out) if out else None


def condition(obj: Any, type_: str) -> dict[str, Any]:
    conds = (obj or {}).get("status", {}).get("conditions", [])
    return next((c for c in conds if c["type"] == type_), {})


DIGITS_INPUT = {"name": "input", "shape": [1, 1, 8, 8], "dtype": "FP32"}


def dnn_model(
    name: str, source: dict[str, Any], input_spec: dict[str, Any] = DIGITS_INPUT, **spec: Any
) -> dict[str, Any]:
    """A DNNModel from `source` with `spec.input` (digits' one 8x8 image by default)."""
    return {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNModel",
        "metadata": {"name": name},
        "spec": {"source": source, "input": dict(input_spec), **spec},
    }


def apply(cluster: Kubectl, *docs: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", input_text=yaml.safe_dump_all(docs))


@contextlib.contextmanager
def annotated_nodes(
    cluster: LocalCluster, nodes: list[str], key: str, value: str
) -> Iterator[None]:
    """Sets one annotation on shared (cluster-scoped) nodes for the block, then puts back
    each node's earlier value, so no other test sees the change."""
    saved = {n: get(cluster, "node", n)["metadata"].get("annotations", {}).get(key) for n in nodes}
    try:
        for node in nodes:
            cluster.kubectl("annotate", "--overwrite", "node", node, f"{key}={value}")
        yield
    finally:
        for node, old in saved.items():
            if old is None:
                cluster.kubectl("annotate", "node", node, f"{key}-")
            else:
                cluster.kubectl("annotate", "--overwrite", "node", node, f"{key}={old}")


@contextlib.contextmanager
def failed_node(cluster: LocalCluster, node: str, reason: str) -> Iterator[None]:
    """`cluster.fail_node` for the block; afterwards the node is recovered and Ready again."""
    try:
        cluster.fail_node(node, reason=reason)
        yield
    finally:
        cluster.recover_node(node)
        wait_for(f"{node} Ready again", lambda: node in cluster.ready_nodes(), 60)


@contextlib.contextmanager
def spare_edge_node(cluster: LocalCluster, name: str, zone: str) -> Iterator[str]:
    """One more edge server (a kwok node) in `zone` for the block; yields its node name.
    Nodes are shared by every test: it is deleted afterwards, and waited for."""
    group = {"name": name, "tier": "edge", "zones": [zone], "gflops": 150, "uplinkMbps": 100}
    node = parse_topology({"kind": "Topology", "nodeGroups": [group | {"uplinkRttMs": 25}]})
    spare = node.nodes[0]
    cluster.kubectl("create", "-f", "-", input_text=yaml.safe_dump(spare.manifest()))
    try:
        wait_for(f"{spare.name} Ready", lambda: spare.name in cluster.ready_nodes())
        yield spare.name
    finally:
        cluster.kubectl("delete", "node", spare.name, "--wait=false")
        wait_for(f"{spare.name} gone", lambda: get(cluster, "node", spare.name) is None, 60)


def json_infer_body(x: np.ndarray, name: str = "input") -> bytes:
    """An OIP v2 JSON inference request with one FP32 input tensor."""
    tensor = {"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}).encode()
