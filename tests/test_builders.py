"""Child objects as literal dicts: no cluster needed."""

from __future__ import annotations

from typing import Any

from edgeai_operator.builders import (
    DeploymentOptions,
    Owner,
    Workload,
    build_children,
    plan_hash,
    priority_class,
    stage_deployment,
)
from edgeai_operator.conditions import set_condition
from edgeai_operator.plandoc import PlanDocument

OWNER = Owner(name="cam", namespace="vision", uid="u-1")
RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
}


MODEL = {"zoo": "digits_cnn", "input": {"name": "input", "shape": [1, 1, 8, 8], "dtype": "FP32"}}


def plan(edge: bool = True, cloud_in: str = "t2") -> PlanDocument:
    stages = [{"tier": "device", "layers": "0-3", "inputs": ["input"], "outputs": ["t1"]}]
    if edge:
        stages.append({"tier": "edge", "layers": "4-7", "inputs": ["t1"], "outputs": ["t2"]})
    stages.append({"tier": "cloud", "layers": "8-9", "inputs": [cloud_in], "outputs": ["output"]})
    return PlanDocument.from_dict({"model": MODEL, "stages": stages, "predictedLatencyMs": 40.0})


def test_edge_deployment_literal() -> None:
    w = Workload("edge", "zone-a", 1, "plan-zone-a.yaml", 2, "cam-cloud")
    opts = DeploymentOptions(
        image="edgeai-worker:test",
        excluded_nodes=[
            ("edge-a-1", "edge", "zone-a"),
            ("edge-b-0", "edge", "zone-b"),
            ("cloud-0", "cloud", None),
        ],
        priority_class="edgeai-priority-100",
    )
    labels = {
        "app.kubernetes.io/managed-by": "edgeai-operator",
        "app.kubernetes.io/name": "edgeai-worker",
        "app.kubernetes.io/instance": "cam",
        "edgeai.dev/deployment": "cam",
        "edgeai.dev/tier": "edge",
        "edgeai.dev/stage": "1",
        "edgeai.dev/zone": "zone-a",
    }
    assert stage_deployment(OWNER, w, opts, "abc", "cam-edge-zone-a") == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "cam-edge-zone-a",
            "namespace": "vision",
            "labels": labels,
            "ownerReferences": [
                {
                    "apiVersion": "edgeai.dev/v1alpha1",
                    "kind": "DNNDeployment",
                    "name": "cam",
                    "uid": "u-1",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "replicas": 2,
            "selector": {
                "matchLabels": {
                    "edgeai.dev/deployment": "cam",
                    "edgeai.dev/tier": "edge",
                    "edgeai.dev/zone": "zone-a",
                }
            },
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {"labels": labels, "annotations": {"edgeai.dev/plan-hash": "abc"}},
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
                                            },
                                            {
                                                "key": "topology.kubernetes.io/zone",
                                                "operator": "In",
                                                "values": ["zone-a"],
                                            },
                                            {
                                                "key": "kubernetes.io/hostname",
                                                "operator": "NotIn",
                                                "values": ["edge-a-1"],
                                            },
                                        ]
                                    }
                                ]
                            }
                        }
                    },
                    "containers": [
                        {
                            "name": "worker",
                            "image": "edgeai-worker:test",
                            "command": ["edgeai"],
                            "args": [
                                "run-stage",
                                "--plan=/etc/edgeai/plan-zone-a.yaml",
                                "--stage=1",
                                "--port=8080",
                                "--host=0.0.0.0",
                                "--next=http://cam-cloud.vision.svc:8080",
                            ],
                            "ports": [{"name": "http", "containerPort": 8080}],
                            "readinessProbe": {
                                "httpGet": {"path": "/v2/health/ready", "port": "http"},
                                "periodSeconds": 5,
                            },
                            "livenessProbe": {
                                "httpGet": {"path": "/v2/health/live", "port": "http"},
                                "periodSeconds": 10,
                            },
                            "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}},
                            "volumeMounts": [
                                {"name": "plan", "mountPath": "/etc/edgeai", "readOnly": True},
                                {"name": "tmp", "mountPath": "/tmp"},
                            ],
                            "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                                "readOnlyRootFilesystem": True,
                                "runAsNonRoot": True,
                            },
                        }
                    ],
                    "volumes": [
                        {"name": "plan", "configMap": {"name": "cam-plan"}},
                        {"name": "tmp", "emptyDir": {}},
                    ],
                    "terminationGracePeriodSeconds": 15,  # preStop 5 s + drain 10 s
                    "priorityClassName": "edgeai-priority-100",
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 10001,
                        "runAsGroup": 10001,
                        "fsGroup": 10001,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                },
            },
        },
    }


def _names(children: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(c["kind"], c["metadata"]["name"]) for c in children]


def test_children_per_zone_with_one_shared_cloud_stage() -> None:
    children = build_children(
        OWNER,
        {"zone-a": plan(), "zone-b": plan()},
        {"cam-edge-zone-b": 3},
        DeploymentOptions(device_selector={"app": "camera"}),
    )
    assert _names(children) == [
        ("ConfigMap", "cam-plan"),
        ("Deployment", "cam-edge-zone-a"),
        ("Service", "cam-edge-zone-a"),
        ("Deployment", "cam-cloud"),
        ("Service", "cam-cloud"),
        ("DaemonSet", "cam-device-zone-a"),
        ("Deployment", "cam-edge-zone-b"),
        ("Service", "cam-edge-zone-b"),
        ("DaemonSet", "cam-device-zone-b"),
    ]
    by_name = {c["metadata"]["name"]: c for c in children if c["kind"] != "Service"}
    assert by_name["cam-edge-zone-b"]["spec"]["replicas"] == 3
    assert by_name["cam-edge-zone-a"]["spec"]["replicas"] == 1
    assert set(by_name["cam-plan"]["data"]) == {"plan-zone-a.yaml", "plan-zone-b.yaml"}
    ds = by_name["cam-device-zone-a"]["spec"]["template"]["spec"]
    assert ds["containers"][0]["args"][-1] == "--next=http://cam-edge-zone-a.vision.svc:8080"
    exprs = ds["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ][0]["matchExpressions"]
    assert {"key": "app", "operator": "In", "values": ["camera"]} in exprs


def test_long_zone_names_are_shortened_to_dns_labels_and_stay_unique() -> None:
    owner = Owner(name="c" * 40, namespace="vision", uid="u-1")
    zones = {"z" * 40 + "-north": plan(), "z" * 40 + "-south": plan()}
    children = build_children(owner, zones, {}, DeploymentOptions())
    names = [c["metadata"]["name"] for c in children]
    assert all(len(n) <= 63 for n in names), names
    assert len(set(_names(children))) == len(children)  # no two objects collide
    services = {c["metadata"]["name"] for c in children if c["kind"] == "Service"}
    for ds in (c for c in children if c["kind"] == "DaemonSet"):
        nxt = ds["spec"]["template"]["spec"]["containers"][0]["args"][-1]
        host = nxt.removeprefix("--next=http://").split(".")[0]
        assert host in services  # the device stage forwards to the shortened Service


def test_zones_with_different_cloud_stages_get_their_own() -> None:
    children = build_children(
        OWNER,
        {"zone-a": plan(), "zone-b": plan(edge=False, cloud_in="t1")},
        {},
        DeploymentOptions(),
    )
    names = _names(children)
    assert ("Deployment", "cam-cloud-zone-a") in names
    assert ("Deployment", "cam-cloud-zone-b") in names
    assert ("Deployment", "cam-edge-zone-b") not in names
    ds_b = next(c for c in children if c["metadata"]["name"] == "cam-device-zone-b")
    assert ds_b["spec"]["template"]["spec"]["containers"][0]["args"][-1] == (
        "--next=http://cam-cloud-zone-b.vision.svc:8080"
    )


def test_entry_only_device_stage_forwards_raw_input() -> None:
    remote_only = PlanDocument.from_dict(
        {
            "model": MODEL,
            "stages": [
                {"tier": "edge", "layers": "0-9", "inputs": ["input"], "outputs": ["output"]}
            ],
        }
    )
    children = build_children(OWNER, {"z": remote_only}, {}, DeploymentOptions())
    ds = next(c for c in children if c["kind"] == "DaemonSet")
    assert ds["metadata"]["labels"]["edgeai.dev/stage"] == "entry"
    assert "--stage=-1" in ds["spec"]["template"]["spec"]["containers"][0]["args"]


OCI_URI = "oci://127.0.0.1:5000/edgeai-models:net-int8-1a2b3c4d5e6f"
DIGEST = "sha256:1a2b3c4d5e6f" + "0" * 52


def artefact_plan(uri: str = OCI_URI, digest: str = DIGEST) -> PlanDocument:
    model = {"uri": uri, "digest": digest, "variant": "int8", "input": MODEL["input"]}
    return PlanDocument.from_dict({**plan().to_dict(), "model": model})


def _pod(children: list[dict[str, Any]], name: str) -> dict[str, Any]:
    template: dict[str, Any] = next(
        c for c in children if c["metadata"]["name"] == name and c["kind"] != "Service"
    )["spec"]["template"]
    return template


def test_a_planned_artefact_is_fetched_by_an_init_container_into_an_emptydir() -> None:
    children = build_children(
        OWNER, {"zone-a": artefact_plan()}, {}, DeploymentOptions(image="edgeai-worker:test")
    )
    for name in ("cam-device-zone-a", "cam-edge-zone-a", "cam-cloud"):
        pod = _pod(children, name)
        assert pod["metadata"]["annotations"]["edgeai.dev/model-digest"] == DIGEST
        spec = pod["spec"]
        assert spec["initContainers"] == [
            {
                "name": "fetch",
                "image": "edgeai-worker:test",
                "command": ["edgeai"],
                "args": [
                    "fetch",
                    OCI_URI,
                    "--sha256=1a2b3c4d5e6f" + "0" * 52,
                    "--out=/var/lib/edgeai/model",
                    "--file-name=model.onnx",
                    "--pvc-root=/mnt/pvc",
                ],
                "volumeMounts": [
                    {"name": "model", "mountPath": "/var/lib/edgeai/model"},
                    {"name": "tmp", "mountPath": "/tmp"},
                ],
                "securityContext": RESTRICTED_CONTAINER,
            }
        ]
        assert spec["volumes"] == [
            {"name": "plan", "configMap": {"name": "cam-plan"}},
            {"name": "model", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
        ]
        worker = spec["containers"][0]
        assert "--model-file=/var/lib/edgeai/model/model.onnx" in worker["args"]
        assert worker["volumeMounts"] == [
            {"name": "plan", "mountPath": "/etc/edgeai", "readOnly": True},
            {"name": "model", "mountPath": "/var/lib/edgeai/model", "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ]


def test_an_entry_only_device_fetches_the_model_only_as_its_fallback() -> None:
    stages = [{"tier": "edge", "layers": "0-9", "inputs": ["input"], "outputs": ["output"]}]
    model = {"uri": OCI_URI, "digest": DIGEST, "variant": "int8", "input": MODEL["input"]}

    def entry_pod(**doc: Any) -> dict[str, Any]:
        remote = PlanDocument.from_dict({"model": model, "stages": stages, **doc})
        return _pod(build_children(OWNER, {"z": remote}, {}, DeploymentOptions()), "cam-device-z")

    forwarding = entry_pod()
    assert "initContainers" not in forwarding["spec"]
    assert not any(
        a.startswith("--model-file") for a in forwarding["spec"]["containers"][0]["args"]
    )
    fallback = entry_pod(fallback={"tier": "device", "afterMs": 500})
    assert fallback["spec"]["initContainers"][0]["args"][:2] == ["fetch", OCI_URI]
    assert (
        "--model-file=/var/lib/edgeai/model/model.onnx" in fallback["spec"]["containers"][0]["args"]
    )


def test_a_pvc_artefact_mounts_its_claim_where_fetch_looks_for_it() -> None:
    uri = "pvc://models/prepared/net-fp32-1a2b3c4d5e6f.onnx"
    children = build_children(OWNER, {"z": artefact_plan(uri)}, {}, DeploymentOptions())
    spec = _pod(children, "cam-edge-z")["spec"]
    assert spec["volumes"][-2:] == [
        {"name": "artifacts", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
        {"name": "tmp", "emptyDir": {}},
    ]
    fetch = spec["initContainers"][0]
    assert fetch["args"][:2] == ["fetch", uri]
    assert fetch["volumeMounts"] == [
        {"name": "model", "mountPath": "/var/lib/edgeai/model"},
        {"name": "artifacts", "mountPath": "/mnt/pvc/models", "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    # the worker reads the fetched copy only, never the claim
    assert [m["name"] for m in spec["containers"][0]["volumeMounts"]] == ["plan", "model", "tmp"]


def test_a_user_models_reusing_stage_fetches_its_labelled_rows_beside_the_model() -> None:
    """spec.offload.reuse on a prepared model: the first stage after the device (edge
    here; cloud where the zone has no edge) fetches the plan's reuse data with a second
    init container from the same claim, and runs with --reuse-data; no other stage."""
    uri = "pvc://models/prepared/net-fp32-1a2b3c4d5e6f.onnx"
    data_uri = "pvc://models/prepared/net-data-0a1b2c3d4e5f.npz"
    data_digest = "sha256:" + "d" * 64
    reuse = {"maxEntries": 64, "maxAccuracyLoss": 0.01,
             "data": {"uri": data_uri, "digest": data_digest, "finalOutput": "output"}}  # fmt: skip

    def pods(edge: bool) -> dict[str, dict[str, Any]]:
        doc = {**artefact_plan(uri).to_dict(), "offload": {"reuse": reuse}}
        if not edge:
            doc["stages"] = plan(edge=False, cloud_in="t1").to_dict()["stages"]
        children = build_children(
            OWNER, {"z": PlanDocument.from_dict(doc)}, {}, DeploymentOptions()
        )
        names = [
            c["metadata"]["name"] for c in children if c["kind"] in ("Deployment", "DaemonSet")
        ]
        return {n: _pod(children, n)["spec"] for n in names}

    with_edge = pods(edge=True)
    edge = with_edge["cam-edge-z"]
    fetch, fetch_data = edge["initContainers"]
    assert fetch["args"][:2] == ["fetch", uri]
    assert fetch_data["name"] == "fetch-reuse-data"
    assert fetch_data["args"][:3] == ["fetch", data_uri, "--sha256=" + "d" * 64]
    assert "--file-name=reuse-data.npz" in fetch_data["args"]
    assert fetch_data["volumeMounts"][:2] == fetch["volumeMounts"][:2]  # one claim volume
    assert [v["name"] for v in edge["volumes"]].count("artifacts") == 1
    assert "--reuse-data=/var/lib/edgeai/model/reuse-data.npz" in edge["containers"][0]["args"]
    for name in ("cam-cloud", "cam-device-z"):
        spec = with_edge[name]
        assert len(spec.get("initContainers", [])) <= 1
        assert not any(a.startswith("--reuse-data") for a in spec["containers"][0]["args"])
    without_edge = pods(edge=False)
    cloud = without_edge["cam-cloud"]
    assert [c["name"] for c in cloud["initContainers"]] == ["fetch", "fetch-reuse-data"]
    assert "--reuse-data=/var/lib/edgeai/model/reuse-data.npz" in cloud["containers"][0]["args"]


def test_a_user_models_cascade_is_fetched_by_the_device_entry() -> None:
    """spec.offload.cascade on a prepared model whose plan runs no layer on the device:
    the device entry fetches only the small models (no model: it runs none of its
    layers) and runs with --cascade-model for each, in the plan's order."""
    stages = [{"tier": "edge", "layers": "0-9", "inputs": ["input"], "outputs": ["output"]}]
    model = {"uri": OCI_URI, "digest": DIGEST, "variant": "fp32", "input": MODEL["input"]}
    small = [{"uri": f"{OCI_URI}-small{i}", "digest": "sha256:" + str(i) * 64} for i in (1, 2)]
    cascade = {"rule": "disagreement", "targetAccuracy": 0.9, "models": small,
               "threshold": 0.8, "finalOutput": "output"}  # fmt: skip
    doc = {"model": model, "stages": stages, "offload": {"cascade": cascade}}
    children = build_children(OWNER, {"z": PlanDocument.from_dict(doc)}, {}, DeploymentOptions())
    entry = _pod(children, "cam-device-z")["spec"]
    assert [c["name"] for c in entry["initContainers"]] == ["fetch-cascade-0", "fetch-cascade-1"]
    for init, m, i in zip(entry["initContainers"], small, (0, 1), strict=True):
        assert init["args"][:3] == ["fetch", m["uri"], "--sha256=" + str(i + 1) * 64]
        assert f"--file-name=cascade-{i}.onnx" in init["args"]
    args = entry["containers"][0]["args"]
    assert "--stage=-1" in args
    assert not any(a.startswith("--model-file") for a in args)
    assert [a for a in args if a.startswith("--cascade-model")] == [
        "--cascade-model=/var/lib/edgeai/model/cascade-0.onnx",
        "--cascade-model=/var/lib/edgeai/model/cascade-1.onnx",
    ]
    edge = _pod(children, "cam-edge-z")["spec"]
    assert [c["name"] for c in edge["initContainers"]] == ["fetch"]


def test_a_shared_edge_stage_fetches_the_artefact_too() -> None:
    edge_last = PlanDocument.from_dict(
        {**artefact_plan().to_dict(), "stages": plan().to_dict()["stages"][:2]}
    )
    children = build_children(OWNER, {"z": edge_last}, {}, DeploymentOptions(), shared_model="net")
    shared = next(c for c in children if c["kind"] == "Deployment")
    assert shared["metadata"]["labels"]["edgeai.dev/shared"] == "true"
    pod = shared["spec"]["template"]
    assert pod["metadata"]["annotations"]["edgeai.dev/model-digest"] == DIGEST
    assert pod["spec"]["initContainers"][0]["args"][:2] == ["fetch", OCI_URI]
    assert "--model-file=/var/lib/edgeai/model/model.onnx" in pod["spec"]["containers"][0]["args"]


def test_a_new_artefact_rolls_the_pods() -> None:
    other = "sha256:" + "f" * 64
    before = _pod(
        build_children(OWNER, {"z": artefact_plan()}, {}, DeploymentOptions()), "cam-edge-z"
    )
    after = _pod(
        build_children(OWNER, {"z": artefact_plan(digest=other)}, {}, DeploymentOptions()),
        "cam-edge-z",
    )
    assert after["metadata"]["annotations"]["edgeai.dev/model-digest"] == other
    assert before["metadata"]["annotations"] != after["metadata"]["annotations"]
    assert after["spec"]["initContainers"][0]["args"][2] == "--sha256=" + "f" * 64


def test_a_zoo_plan_and_an_entry_that_only_forwards_fetch_nothing() -> None:
    zoo = build_children(OWNER, {"z": plan()}, {}, DeploymentOptions())
    remote_only = PlanDocument.from_dict(
        {
            **artefact_plan().to_dict(),
            "stages": [
                {"tier": "edge", "layers": "0-9", "inputs": ["input"], "outputs": ["output"]}
            ],
        }
    )
    entry = _pod(build_children(OWNER, {"z": remote_only}, {}, DeploymentOptions()), "cam-device-z")
    for pod in [_pod(zoo, n) for n in ("cam-device-z", "cam-edge-z", "cam-cloud")] + [entry]:
        assert "initContainers" not in pod["spec"]
        assert "edgeai.dev/model-digest" not in pod["metadata"]["annotations"]
        assert pod["spec"]["volumes"] == [
            {"name": "plan", "configMap": {"name": "cam-plan"}},
            {"name": "tmp", "emptyDir": {}},
        ]
        assert not any(a.startswith("--model-file") for a in pod["spec"]["containers"][0]["args"])


def test_plan_hash_changes_with_the_plan_only() -> None:
    assert plan_hash(plan()) == plan_hash(plan())
    assert plan_hash(plan()) != plan_hash(plan(edge=False, cloud_in="t1"))
    assert plan().split == "device:0-3 > edge:4-7 > cloud:8-9"


def test_plan_hash_ignores_what_no_stage_reads() -> None:
    """A new spec.slo (or new predictions) that keeps the split must not roll the pods."""
    doc = plan().to_dict()
    doc.update(
        slo={"latencyP95Ms": 1.0},
        predictedLatencyMs=400.0,
        objectiveValue=3.0,
        tiers={"edge": {"gflops": 9.0}},
    )
    doc["stages"][1]["computeMs"] = 12.5
    assert plan_hash(PlanDocument.from_dict(doc)) == plan_hash(plan())
    doc["stages"][1]["layers"] = "4-6"
    assert plan_hash(PlanDocument.from_dict(doc)) != plan_hash(plan())
    doc = plan().to_dict()
    doc["priority"] = 100  # the stages' queues read it
    assert plan_hash(PlanDocument.from_dict(doc)) != plan_hash(plan())


def test_priority_class_literal() -> None:
    assert priority_class(100) == {
        "apiVersion": "scheduling.k8s.io/v1",
        "kind": "PriorityClass",
        "metadata": {
            "name": "edgeai-priority-100",
            "labels": {"app.kubernetes.io/managed-by": "edgeai-operator"},
        },
        "value": 100,
        "globalDefault": False,
        "preemptionPolicy": "PreemptLowerPriority",
        "description": "edgeai-operator stages of DNNDeployments with spec.priority 100",
    }


def test_conditions_keep_transition_time_until_status_changes() -> None:
    conds = set_condition([], "Available", False, "StagesNotReady", "waiting", 1, now="t0")
    conds = set_condition(conds, "Available", False, "StagesNotReady", "still", 2, now="t1")
    assert conds == [
        {
            "type": "Available",
            "status": "False",
            "reason": "StagesNotReady",
            "message": "still",
            "observedGeneration": 2,
            "lastTransitionTime": "t0",
        }
    ]
    conds = set_condition(conds, "Available", True, "StagesAvailable", "ok", 2, now="t2")
    assert conds[0]["lastTransitionTime"] == "t2"
    assert conds[0]["status"] == "True"


def test_status_merge_patch_removes_dropped_keys() -> None:
    from edgeai_operator.decide import merge_patch

    old = {"plan": {"zones": {"a": {"split": "x"}, "c": {"split": "y"}}, "p": 1}, "gone": 2}
    new = {"plan": {"zones": {"a": {"split": "z"}}, "p": 1}}
    assert merge_patch(old, new) == {
        "gone": None,
        "plan": {"zones": {"c": None, "a": {"split": "z"}}, "p": 1},
    }
