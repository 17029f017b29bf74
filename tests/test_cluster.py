"""The foundation on the real control plane: CRDs served, the real scheduler binding
pods by tier, and node health changes seen through a watch."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config, watch

from _cluster_support import Namespace, failed_node, wait_for
from edgeai_operator.localcluster import REPO_ROOT, LocalCluster

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture(scope="module")
def api(cluster: LocalCluster) -> Iterator[client.ApiClient]:
    api_client = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    yield api_client
    api_client.close()


def test_control_plane_reports_pinned_version(cluster: LocalCluster) -> None:
    version = json.loads(cluster.kubectl("version", "-o", "json"))
    assert version["serverVersion"]["gitVersion"] == "v1.34.4"
    assert version["clientVersion"]["gitVersion"] == "v1.34.4"


def test_topology_nodes_ready_with_labels(cluster: LocalCluster) -> None:
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json"))["items"]
    by_tier: dict[str, list[str]] = {}
    for node in nodes:
        labels = node["metadata"]["labels"]
        by_tier.setdefault(labels["edgeai.dev/tier"], []).append(node["metadata"]["name"])
        assert float(node["metadata"]["annotations"]["edgeai.dev/gflops"]) > 0
    assert {t: len(n) for t, n in by_tier.items()} == {"device": 6, "edge": 2, "cloud": 1}
    assert cluster.ready_nodes() >= {n["metadata"]["name"] for n in nodes}


def test_crds_applied_and_served(ns: Namespace) -> None:
    cluster = ns.cluster
    for crd in sorted((REPO_ROOT / "crds").glob("*.yaml")):
        cluster.kubectl("apply", "--server-side", "-f", str(crd))
    cluster.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/dnnmodels.edgeai.dev",
        "crd/dnndeployments.edgeai.dev",
        "crd/dnntrainingjobs.edgeai.dev",
    )
    model = {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNModel",
        "metadata": {"name": "digits"},
        "spec": {
            "source": {"zoo": "digits_cnn"},
            "input": {"name": "input", "shape": [1, 1, 8, 8], "dtype": "FP32"},
        },
    }
    ns.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(model))
    got = json.loads(ns.kubectl("get", "dnnm", "digits", "-o", "json"))
    assert got["spec"]["input"]["shape"] == [1, 1, 8, 8]
    listed = ns.kubectl("get", "edgeai", "-o", "name")
    assert "dnnmodel.edgeai.dev/digits" in listed
    bad = dict(
        model,
        metadata={"name": "bad"},
        spec={**model["spec"], "source": {}},
    )
    out = _kubectl_fails(ns, "apply", "-f", "-", input_text=yaml.safe_dump(bad))
    assert "spec.source sets exactly one of zoo or uri" in out


def _kubectl_fails(ns: Namespace, *args: str, input_text: str) -> str:
    import subprocess

    cluster = ns.cluster
    result = subprocess.run(
        [cluster.binary("kubectl"), "--kubeconfig", str(cluster.kubeconfig), "-n", ns.name, *args],
        input=input_text,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0, result.stdout
    return result.stderr


def test_scheduler_binds_edge_affinity_pods_to_edge_nodes_running(ns: Namespace) -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "edge-only"},
        "spec": {
            "replicas": 4,
            "selector": {"matchLabels": {"app": "edge-only"}},
            "template": {
                "metadata": {"labels": {"app": "edge-only"}},
                "spec": {
                    "affinity": {
                        "nodeAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": {
                                "nodeSelectorTerms": [
                                    {
                                        "matchExpressions": [
                                            {
                                                "key": "edgeai.dev/tier",
                                                "operator": "In",
                                                "values": ["edge"],
                                            }
                                        ]
                                    }
                                ]
                            }
                        }
                    },
                    "containers": [
                        {
                            "name": "w",
                            "image": "edgeai-worker:dev",
                            "resources": {"requests": {"cpu": "100m"}},
                        }
                    ],
                },
            },
        },
    }
    ns.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(deployment))
    ns.kubectl("rollout", "status", "deployment/edge-only", "--timeout=60s")
    pods = json.loads(ns.kubectl("get", "pods", "-l", "app=edge-only", "-o", "json"))
    assert len(pods["items"]) == 4
    edge_nodes = {"edge-zone-a-0", "edge-zone-b-0"}
    for pod in pods["items"]:
        assert pod["spec"]["nodeName"] in edge_nodes
        assert pod["status"]["phase"] == "Running"
        assert pod["status"]["podIP"]
    # Both edge servers are used: the scheduler spreads replicas.
    assert {p["spec"]["nodeName"] for p in pods["items"]} == edge_nodes


def test_node_not_ready_observed_through_watch(
    cluster: LocalCluster, api: client.ApiClient
) -> None:
    core = client.CoreV1Api(api)
    victim = "device-zone-b-2"
    start = core.list_node()
    with failed_node(cluster, victim, "PowerLost"):
        t0 = time.monotonic()
        seen = None
        stream = watch.Watch()
        for event in stream.stream(
            core.list_node,
            resource_version=start.metadata.resource_version,
            field_selector=f"metadata.name={victim}",
            timeout_seconds=60,
        ):
            node = event["object"]
            ready = next(c for c in node.status.conditions if c.type == "Ready")
            if ready.status != "True":
                seen = (event["type"], ready.status, ready.reason)
                stream.stop()
        assert seen == ("MODIFIED", "False", "PowerLost"), seen
        print(f"node NotReady observed {time.monotonic() - t0:.1f}s after the failure")
        # The real node-lifecycle controller reacts to it: the not-ready NoExecute taint.
        wait_for(
            "the not-ready taint",
            lambda: (
                "node.kubernetes.io/not-ready"
                in [t.key for t in (core.read_node(victim).spec.taints or [])]
            ),
            30,
        )


def test_kubeconfig_points_at_loopback(cluster: LocalCluster) -> None:
    kc = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    assert kc["clusters"][0]["cluster"]["server"].startswith("https://127.0.0.1:")
