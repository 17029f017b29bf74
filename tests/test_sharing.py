"""Shared backbone (`spec.sharing: backbone`): DNNDeployments whose plans give an
identical edge stage share one edge Deployment+Service per zone, owned by all of them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from _cluster_support import Namespace, get, wait_for
from edgeai_operator.builders import DeploymentOptions, Owner, build_children, shared_edge
from edgeai_operator.partitions import load_plan, stage_settings
from edgeai_operator.plandoc import PlanDocument

NS = "default"
SHARED = "digits-shared-edge-zone-a-db0a097b"


def _plan(stages: list[dict[str, Any]]) -> PlanDocument:
    return PlanDocument.from_dict(
        {
            "kind": "Plan",
            "deployment": "ignored",
            "model": {
                "zoo": "digits_cnn",
                "variant": "fp32",
                "input": {"name": "input", "shape": [1, 1, 8, 8], "dtype": "FP32"},
            },
            "predictedLatencyMs": 20.0,
            "stages": stages,
            "alternatives": [],
        }
    )


EDGE_ONLY = _plan(
    [
        {
            "index": 0,
            "tier": "edge",
            "layers": "0-8",
            "inputs": ["input"],
            "outputs": ["output"],
            "variant": "fp32",
            "computeMs": 0.0045,
        }
    ]
)
A = Owner("cam-a", NS, "uid-a")
B = Owner("cam-b", NS, "uid-b")


def _by_name(children: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(c["kind"], c["metadata"]["name"]): c for c in children}


def test_users_of_one_edge_stage_build_the_same_shared_workload() -> None:
    opts = DeploymentOptions(image="img:1")
    a = _by_name(build_children(A, {"zone-a": EDGE_ONLY}, {}, opts, shared_model="digits"))
    b = _by_name(build_children(B, {"zone-a": EDGE_ONLY}, {SHARED: 3}, opts, shared_model="digits"))
    assert sorted(a) == [
        ("ConfigMap", "cam-a-plan"),
        ("ConfigMap", SHARED),
        ("DaemonSet", "cam-a-device-zone-a"),
        ("Deployment", SHARED),
        ("Service", SHARED),
    ]
    for kind in ("ConfigMap", "Deployment", "Service"):
        meta = a[(kind, SHARED)]["metadata"]
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "edgeai.dev/v1alpha1",
                "kind": "DNNDeployment",
                "name": "cam-a",
                "uid": "uid-a",
                "controller": False,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["labels"] == {
            "app.kubernetes.io/managed-by": "edgeai-operator",
            "app.kubernetes.io/name": "edgeai-worker",
            "app.kubernetes.io/instance": SHARED,
            "edgeai.dev/shared": "true",
            "edgeai.dev/backbone": SHARED,
            "edgeai.dev/model": "digits",
            "edgeai.dev/tier": "edge",
            "edgeai.dev/zone": "zone-a",
            "edgeai.dev/stage": "0",
        }
        assert b[(kind, SHARED)]["metadata"]["ownerReferences"][0]["uid"] == "uid-b"
    deploy_a, deploy_b = a[("Deployment", SHARED)], b[("Deployment", SHARED)]
    # Each user states its own replica wish; the pod template is the same for both.
    assert deploy_a["metadata"]["annotations"] == {"replicas.edgeai.dev/cam-a": "1"}
    assert deploy_b["metadata"]["annotations"] == {"replicas.edgeai.dev/cam-b": "3"}
    assert deploy_a["spec"]["selector"] == {"matchLabels": {"edgeai.dev/backbone": SHARED}}
    template_a = deploy_a["spec"]["template"]
    assert template_a == deploy_b["spec"]["template"]
    assert template_a["spec"]["volumes"] == [
        {"name": "plan", "configMap": {"name": SHARED}},
        {"name": "tmp", "emptyDir": {}},
    ]
    assert template_a["spec"]["containers"][0]["args"][:3] == [
        "run-stage",
        "--plan=/etc/edgeai/plan.yaml",
        "--stage=0",
    ]
    assert a[("ConfigMap", SHARED)]["data"] == b[("ConfigMap", SHARED)]["data"]
    assert a[("Service", SHARED)]["spec"]["selector"] == {"edgeai.dev/backbone": SHARED}
    # The device entry forwards to the shared Service.
    device = a[("DaemonSet", "cam-a-device-zone-a")]["spec"]["template"]["spec"]
    assert device["containers"][0]["args"][-1] == (f"--next=http://{SHARED}.default.svc:8080")


def test_shared_plan_is_a_runnable_stage(tmp_path: Path) -> None:
    children = build_children(
        A, {"zone-a": EDGE_ONLY}, {}, DeploymentOptions(), shared_model="digits"
    )
    configmap = _by_name(children)[("ConfigMap", SHARED)]
    path = tmp_path / "plan.yaml"
    path.write_text(configmap["data"]["plan.yaml"])
    settings = stage_settings(
        load_plan(path), 0, plan_path=path, workdir=tmp_path, host="127.0.0.1", port=8080
    )
    assert settings["tier"] == "edge"
    assert len(settings["partitions"]) == 1
    assert settings["default_priority"] == 0
    assert "skip_unchanged_threshold" not in settings  # the device stage's setting


def test_what_is_not_shared() -> None:
    opts = DeploymentOptions()
    # Without sharing: the deployment's own edge workload, as before.
    names = {c["metadata"]["name"] for c in build_children(A, {"zone-a": EDGE_ONLY}, {}, opts)}
    assert "cam-a-edge-zone-a" in names
    assert SHARED not in names
    # Another zone, model or PriorityClass is another shared workload; another
    # deployment's prediction for the same stages is the same one.
    assert shared_edge(EDGE_ONLY, "digits", "zone-a", opts).name == SHARED  # type: ignore[union-attr]
    other = replace(EDGE_ONLY, deployment="cam-b", predicted_latency_ms=99.0)
    assert shared_edge(other, "digits", "zone-a", opts).name == SHARED  # type: ignore[union-attr]
    assert shared_edge(EDGE_ONLY, "digits", "zone-b", opts).name != SHARED  # type: ignore[union-attr]
    assert shared_edge(EDGE_ONLY, "other", "zone-a", opts).name != SHARED  # type: ignore[union-attr]
    urgent = DeploymentOptions(priority_class="edgeai-priority-5")
    assert shared_edge(EDGE_ONLY, "digits", "zone-a", urgent).name != SHARED  # type: ignore[union-attr]
    # An edge stage that forwards to a cloud stage is not shared (its next hop is
    # the deployment's own cloud stage).
    two = _plan(
        [
            {"index": 0, "tier": "edge", "layers": "0-3", "inputs": ["input"], "outputs": ["t"]},
            {"index": 1, "tier": "cloud", "layers": "4-8", "inputs": ["t"], "outputs": ["output"]},
        ]
    )
    assert shared_edge(two, "digits", "zone-a", opts) is None
    names = {
        c["metadata"]["name"]
        for c in build_children(A, {"zone-a": two}, {}, opts, shared_model="digits")
    }
    assert {"cam-a-edge-zone-a", "cam-a-cloud"} <= names


# ---------------------------------------------------------------------------
# Against the real control plane


def _deployment(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNDeployment",
        "metadata": {"name": name},
        "spec": {
            "modelRef": {"name": "shared-digits"},
            "slo": {"latencyP95Ms": 200},
            "devices": {"nodeSelector": {"app": "camera"}},
            "placement": {"tiers": ["edge"]},
            "sharing": "backbone",
            # a shared stage serves several deployments: plain HTTP between stages
            "security": {"stageTLS": "disabled"},
        },
    }


@pytest.mark.cluster
@pytest.mark.slow
def test_two_deployments_share_one_edge_stage_per_zone(ns: Namespace, operator: Any) -> None:
    model = {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNModel",
        "metadata": {"name": "shared-digits"},
        "spec": {
            "source": {"zoo": "digits_cnn"},
            "input": {"name": "input", "shape": [1, 1, 8, 8], "dtype": "FP32"},
        },
    }
    docs = [model, _deployment("share-a"), _deployment("share-b")]
    ns.kubectl("apply", "-f", "-", input_text=yaml.safe_dump_all(docs))

    def shared() -> list[dict[str, Any]]:
        items = get(ns, "deployments", "-l", "edgeai.dev/shared=true")["items"]
        return [d for d in items if d["metadata"]["name"].startswith("shared-digits-")]

    def available(name: str) -> Any:
        obj = get(ns, "dnnd", name)
        conds = (obj or {}).get("status", {}).get("conditions", [])
        ok = any(c["type"] == "Available" and c["status"] == "True" for c in conds)
        return obj if ok else None

    def two_owners() -> Any:
        items = shared()
        return (
            len(items) == 2
            and all(len(d["metadata"].get("ownerReferences", [])) == 2 for d in items)
            and items
        )

    items = wait_for("a shared edge Deployment per zone with two owners", two_owners, 180)
    zones = sorted(d["metadata"]["labels"]["edgeai.dev/zone"] for d in items)
    assert zones == ["zone-a", "zone-b"]
    uids = {get(ns, "dnnd", n)["metadata"]["uid"] for n in ("share-a", "share-b")}
    for d in items:
        name = d["metadata"]["name"]
        zone = d["metadata"]["labels"]["edgeai.dev/zone"]
        assert name.startswith(f"shared-digits-shared-edge-{zone}-")
        refs = d["metadata"]["ownerReferences"]
        assert {r["uid"] for r in refs} == uids
        assert all(r["controller"] is False for r in refs)
        assert get(ns, "service", name) is not None
        for user in ("share-a", "share-b"):
            ds = get(ns, "daemonset", f"{user}-device-{zone}")
            args = ds["spec"]["template"]["spec"]["containers"][0]["args"]
            assert f"--next=http://{name}.{ns.name}.svc:8080" in args
    # Neither user has an edge Deployment of its own.
    own = get(ns, "deployments", "-l", "edgeai.dev/deployment in (share-a,share-b)")
    assert own["items"] == []
    for user in ("share-a", "share-b"):

        def user_available(u: str = user) -> Any:
            return available(u)

        obj = wait_for(f"{user} Available", user_available, 120)
        for d in items:
            assert f"{d['metadata']['name']}:" in obj["status"]["replicas"]

    ns.kubectl("delete", "dnnd", "share-a", "--timeout=60s")

    def one_owner() -> Any:
        items = shared()
        return (
            len(items) == 2
            and all(len(d["metadata"].get("ownerReferences", [])) == 1 for d in items)
            and items
        )

    items = wait_for("the shared workloads left with one owner", one_owner, 90)
    b_uid = get(ns, "dnnd", "share-b")["metadata"]["uid"]
    assert all(d["metadata"]["ownerReferences"][0]["uid"] == b_uid for d in items)
    assert available("share-b")

    ns.kubectl("delete", "dnnd", "share-b", "--timeout=60s")
    wait_for("the shared workloads garbage-collected", lambda: not shared(), 90)
    services = get(ns, "services", "-l", "edgeai.dev/shared=true")["items"]
    assert not [s for s in services if s["metadata"]["name"].startswith("shared-digits-")]
    ns.kubectl("delete", "dnnm", "shared-digits", "--timeout=60s")
