"""A DNNTrainingJob's placement, children and next step (trainingbuild.py), as
literals, no cluster; and the CRD's schema held to what the controller writes."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from _training_samples import BAD, GOOD
from edgeai_operator.localcluster import REPO_ROOT
from edgeai_operator.planning import NodeState
from edgeai_operator.topology import NodeSpec
from edgeai_operator.trainingbuild import (
    MODEL_CONFIGMAP_MAX_BYTES,
    JobRef,
    Placement,
    PlacementError,
    aggregator_pod,
    finished_children,
    gossip_progress,
    model_configmap,
    model_too_large,
    place,
    runtime_children,
    step,
    worker_pod,
)
from edgeai_worker.training.spec import TrainingSpecError, parse_spec

JOB = JobRef("digits", "team-a", "uid-1")
OWNER = {
    "apiVersion": "edgeai.dev/v1alpha1",
    "kind": "DNNTrainingJob",
    "name": "digits",
    "uid": "uid-1",
    "controller": True,
    "blockOwnerDeletion": True,
}
IMAGE = "edgeai-trainer:test"


def node(
    name: str, tier: str, zone: str | None, *, usable: bool = True, **labels: str
) -> NodeState:
    spec = NodeSpec(name, tier, zone, {}, 1.0, None, None, None, labels=dict(labels))
    return NodeState(spec=spec, ready=usable, schedulable=True)


NODES = [
    node("device-b-0", "device", "zone-b", app="camera"),
    node("device-a-1", "device", "zone-a", app="camera"),
    node("device-a-0", "device", "zone-a", app="camera"),
    node("device-a-2", "device", "zone-a", usable=False, app="camera"),
    node("device-a-3", "device", "zone-a", app="drone"),
    node("edge-b", "edge", "zone-b"),
    node("edge-a", "edge", "zone-a"),
    node("cloud-0", "cloud", None),
]


def spec(**sections: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": {"zoo": "digits_cnn"},
        "workers": {"nodeSelector": {"app": "camera"}, "count": 3},
        "algorithm": {"mode": "fedavg"},
    }
    out.update(sections)
    return out


def job(status: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "digits", "namespace": "team-a", "uid": "uid-1", "generation": 1},
        "spec": spec(**sections),
        "status": status or {},
    }


# --- placement --------------------------------------------------------------------------


def test_workers_go_to_matching_usable_devices_and_the_aggregator_to_their_zone() -> None:
    assert place(spec(), NODES) == Placement(("device-a-0", "device-a-1", "device-b-0"), "edge-a")
    assert place(spec(aggregator={"tier": "cloud"}), NODES).aggregator == "cloud-0"
    gossip = spec(algorithm={"mode": "gossip"}, workers={"count": 2})
    assert place(gossip, NODES) == Placement(("device-a-0", "device-a-1"), None)


@pytest.mark.parametrize(
    ("sections", "reason", "names"),
    [
        ({"workers": {"nodeSelector": {"app": "tv"}}}, "NoMatchingNodes", "app=tv"),
        ({"workers": {"nodeSelector": {"app": "camera"}, "count": 4}}, "NotEnoughNodes", "count"),
    ],
)
def test_no_placement_names_the_field(sections: dict[str, Any], reason: str, names: str) -> None:
    with pytest.raises(PlacementError) as caught:
        place(spec(**sections), NODES)
    assert caught.value.reason == reason
    assert str(caught.value).startswith("spec.workers.")
    assert names in str(caught.value)
    only_devices = [n for n in NODES if n.spec.tier == "device"]
    with pytest.raises(PlacementError, match=r"spec\.aggregator\.tier: no Ready, schedulable edge"):
        place(spec(), only_devices)


# --- children ---------------------------------------------------------------------------


def test_the_aggregator_pod_is_pinned_with_a_work_directory_and_keeps_serving() -> None:
    assert aggregator_pod(JOB, "edge-a", IMAGE) == {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "digits-aggregator",
            "namespace": "team-a",
            "labels": {
                "app.kubernetes.io/managed-by": "edgeai-operator",
                "app.kubernetes.io/name": "edgeai-trainer",
                "app.kubernetes.io/instance": "digits",
                "edgeai.dev/training-job": "digits",
                "edgeai.dev/training-role": "aggregator",
            },
            "ownerReferences": [OWNER],
        },
        "spec": {
            "nodeName": "edge-a",
            "restartPolicy": "OnFailure",
            "containers": [
                {
                    "name": "trainer",
                    "image": IMAGE,
                    "command": ["python", "-m", "edgeai_worker.training"],
                    "args": [
                        "aggregator",
                        "--spec=/etc/edgeai/training/spec.json",
                        "--host=0.0.0.0",
                        "--port=7000",
                        "--workdir=/var/lib/edgeai/training",
                        "--keep-serving",
                    ],
                    "volumeMounts": [
                        {"name": "spec", "mountPath": "/etc/edgeai/training", "readOnly": True},
                        {"name": "work", "mountPath": "/var/lib/edgeai/training"},
                        {"name": "tmp", "mountPath": "/tmp"},
                    ],
                    "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}},
                    "ports": [{"name": "http", "containerPort": 7000}],
                    "readinessProbe": {
                        "httpGet": {"path": "/status", "port": "http"},
                        "periodSeconds": 5,
                    },
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                        "readOnlyRootFilesystem": True,
                        "runAsNonRoot": True,
                    },
                }
            ],
            "volumes": [
                {"name": "spec", "configMap": {"name": "digits-spec"}},
                {"name": "work", "emptyDir": {}},
                {"name": "tmp", "emptyDir": {}},
            ],
            "terminationGracePeriodSeconds": 5,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 10001,
                "runAsGroup": 10001,
                "fsGroup": 10001,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
        },
    }


def test_workers_reach_the_aggregator_or_every_peer_in_index_order() -> None:
    worker = worker_pod(JOB, spec(), 1, "device-a-1", 3, IMAGE)
    assert worker["spec"]["nodeName"] == "device-a-1"
    assert worker["metadata"]["labels"]["edgeai.dev/training-index"] == "1"
    assert worker["spec"]["containers"][0]["args"] == [
        "worker",
        "--spec=/etc/edgeai/training/spec.json",
        "--index=1",
        "--aggregator=http://digits-aggregator.team-a.svc:7000",
    ]
    assert "readinessProbe" not in worker["spec"]["containers"][0]  # it serves nothing
    gossip = worker_pod(JOB, spec(algorithm={"mode": "gossip"}), 2, "device-b-0", 3, IMAGE)
    args = gossip["spec"]["containers"][0]["args"]
    assert args[0] == "gossip"
    assert "--index=2" in args
    assert "--result-file=/dev/termination-log" in args  # its final numbers outlive it
    peers = "--peers=" + ",".join(f"http://digits-worker-{i}.team-a.svc:7100" for i in range(3))
    assert peers in args
    assert gossip["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/health"


def test_every_child_is_owned_by_the_job() -> None:
    placement = Placement(("device-a-0", "device-a-1"), "edge-a")
    objs = runtime_children(JOB, spec(workers={"count": 2}), placement, IMAGE)
    assert [(o["kind"], o["metadata"]["name"]) for o in objs] == [
        ("ConfigMap", "digits-spec"),
        ("Service", "digits-aggregator"),
        ("PodDisruptionBudget", "digits-aggregator"),
        ("Pod", "digits-aggregator"),
        ("Pod", "digits-worker-0"),
        ("Pod", "digits-worker-1"),
    ]
    assert all(o["metadata"]["ownerReferences"] == [OWNER] for o in objs)
    service, pdb = objs[1], objs[2]
    assert service["spec"]["selector"] == {
        "edgeai.dev/training-job": "digits",
        "edgeai.dev/training-role": "aggregator",
    }
    assert pdb["spec"] == {
        "maxUnavailable": 0,
        "selector": {"matchLabels": service["spec"]["selector"]},
    }
    # the spec the processes read is the job's, and their parser takes it
    assert parse_spec(yaml.safe_load(objs[0]["data"]["spec.json"])).workers == 2
    gossip_spec = spec(algorithm={"mode": "gossip"}, workers={"count": 2})
    gossip = runtime_children(JOB, gossip_spec, Placement(("a", "b"), None), IMAGE)
    assert [(o["kind"], o["metadata"]["name"]) for o in gossip] == [
        ("ConfigMap", "digits-spec"),
        ("Service", "digits-worker-0"),
        ("Service", "digits-worker-1"),
        ("Pod", "digits-worker-0"),
        ("Pod", "digits-worker-1"),
    ]
    assert gossip[1]["spec"]["selector"]["edgeai.dev/training-index"] == "0"
    assert finished_children(JOB, Placement(("a", "b"), None)) == [
        ("v1", "Pod", "digits-worker-0"),
        ("v1", "Pod", "digits-worker-1"),
        ("v1", "Service", "digits-worker-0"),
        ("v1", "Service", "digits-worker-1"),
    ]


def test_the_model_configmap_holds_the_bytes_and_refuses_what_does_not_fit() -> None:
    cm = model_configmap(JOB, b"\x00onnx")
    assert cm["metadata"]["name"] == "digits-model"
    assert cm["binaryData"] == {"model.onnx": "AG9ubng="}
    assert model_too_large(MODEL_CONFIGMAP_MAX_BYTES) is None
    assert "more than a ConfigMap holds" in (model_too_large(MODEL_CONFIGMAP_MAX_BYTES + 1) or "")


# --- steps ------------------------------------------------------------------------------

PLACED = {"placement": {"workers": ["device-a-0", "device-a-1"], "aggregator": "edge-a"}}


def pods(*names: str, **status: Any) -> dict[str, dict[str, Any]]:
    return {n: {"metadata": {"name": n}, "status": dict(status)} for n in names}


def test_the_first_step_places_and_creates_everything() -> None:
    first = step(job(workers={"count": 2}), NODES, {}, None, image=IMAGE)
    assert first.status["placement"] == {
        "workers": ["device-a-0", "device-a-1"],
        "aggregator": "edge-a",
    }
    assert first.status["phase"] == "Pending"
    assert [e[1] for e in first.events] == ["PodsCreated"]
    assert len(first.create) == 6


def test_no_node_fails_the_job_with_the_reason() -> None:
    failed = step(job(workers={"nodeSelector": {"app": "tv"}}), NODES, {}, None, image=IMAGE)
    assert failed.status["phase"] == "Failed"
    assert failed.status["reason"] == "NoMatchingNodes"
    assert failed.create == []
    assert failed.status["conditions"][0]["type"] == "Succeeded"
    assert step(job(failed.status), NODES, {}, None, image=IMAGE).status == {}  # final


def test_a_missing_worker_is_recreated_until_training_is_done() -> None:
    present = pods("digits-aggregator", "digits-worker-0", phase="Running")
    again = step(job(dict(PLACED), workers={"count": 2}), NODES, present, None, image=IMAGE)
    assert [o["metadata"]["name"] for o in again.create] == ["digits-worker-1"]
    assert again.events[0][1] == "WorkerRecreated"
    done = step(job(dict(PLACED)), NODES, present, {"phase": "Succeeded", "round": 5}, image=IMAGE)
    assert done.create == []
    assert done.copy_model
    codistilled = job(dict(PLACED), algorithm={"mode": "codistillation"})
    ended = step(codistilled, NODES, present, {"phase": "Succeeded", "round": 5}, image=IMAGE)
    assert not ended.copy_model  # its workers keep their own models
    assert ended.status["phase"] == "Succeeded"


def test_progress_moves_the_status_and_posts_milestones() -> None:
    present = pods("digits-aggregator", "digits-worker-0", "digits-worker-1", phase="Running")
    progress = {"phase": "Running", "round": 1, "accuracy": 0.5, "bytesUp": 10, "bytesDown": 20}
    first = step(job(dict(PLACED)), NODES, present, progress, image=IMAGE)
    assert first.status["phase"] == "Running"
    assert first.status["uplinkBytes"] == first.status["bytesUp"] == 10
    assert [e[1] for e in first.events] == ["FirstRound"]
    later = step(
        job({**PLACED, "phase": "Running", "round": 9}),
        NODES,
        present,
        {**progress, "round": 11},
        image=IMAGE,
    )
    assert [e[1] for e in later.events] == ["Progress"]
    assert "phase" not in later.status  # already Running


def test_a_failed_or_lost_aggregator_fails_the_job_at_last() -> None:
    failed = pods("digits-aggregator", phase="Failed")
    out = step(job(dict(PLACED)), NODES, failed, None, image=IMAGE)
    assert (out.status["phase"], out.status["reason"]) == ("Failed", "AggregatorFailed")
    gone = step(job(dict(PLACED)), NODES, {}, None, image=IMAGE)
    assert gone.status["aggregatorStarts"] == 1
    assert "digits-aggregator" in [o["metadata"]["name"] for o in gone.create]
    last = step(job({**PLACED, "aggregatorStarts": 3}), NODES, {}, None, image=IMAGE)
    assert last.status["phase"] == "Failed"


def test_gossip_succeeds_when_every_worker_has_exited() -> None:
    statuses = [
        {"round": 4, "accuracy": 0.8, "bytesUp": 5},
        {"round": 3, "accuracy": 0.9, "bytesUp": 7},
    ]
    assert gossip_progress(statuses, 3, 0) == {
        "phase": "Running",
        "round": 3,
        "accuracy": 0.85,
        "bytesUp": 12,
        "bytesDown": 0,
    }
    assert gossip_progress([], 3, 3) == {"phase": "Succeeded"}
    assert gossip_progress(statuses, 2, 2)["phase"] == "Succeeded"
    assert gossip_progress([], 3, 1) == {"phase": "Pending"}
    placed = {
        "placement": {"workers": ["a", "b"], "aggregator": None},
        "round": 7,
        "accuracy": 0.93,
    }
    out = step(
        job(placed, algorithm={"mode": "gossip"}), NODES, {}, {"phase": "Succeeded"}, image=IMAGE
    )
    assert out.status["phase"] == "Succeeded"
    assert not out.copy_model
    assert "round 7, accuracy 0.93" in out.status["message"]


# --- the CRD ----------------------------------------------------------------------------

CRD = yaml.safe_load((REPO_ROOT / "crds" / "edgeai.dev_dnntrainingjobs.yaml").read_text())
VERSION = CRD["spec"]["versions"][0]


def _undescribed(schema: dict[str, Any], path: str) -> list[str]:
    out = [] if schema.get("description") else [path]
    for name, sub in (schema.get("properties") or {}).items():
        out += _undescribed(sub, f"{path}.{name}")
    return out


def test_every_field_has_a_description() -> None:
    assert _undescribed(VERSION["schema"]["openAPIV3Schema"], "DNNTrainingJob") == []


def test_printer_columns_read_fields_the_controller_writes() -> None:
    present = pods("digits-aggregator", "digits-worker-0", "digits-worker-1", phase="Running")
    progress = {"phase": "Running", "round": 1, "accuracy": 0.5, "bytesUp": 10}
    written = step(job(dict(PLACED)), NODES, present, progress, image=IMAGE).status
    columns = {c["name"]: c["jsonPath"] for c in VERSION["additionalPrinterColumns"]}
    assert list(columns) == ["MODE", "ROUND", "ACCURACY", "UPLINK-BYTES", "PHASE", "AGE"]
    for name in ("ROUND", "ACCURACY", "UPLINK-BYTES", "PHASE"):
        field = columns[name].removeprefix(".status.")
        assert field in written, name
    assert VERSION["subresources"] == {"status": {}}


def test_the_example_job_parses() -> None:
    doc = yaml.safe_load((REPO_ROOT / "examples" / "digits-training.yaml").read_text())
    assert doc["kind"] == "DNNTrainingJob"
    assert parse_spec(copy.deepcopy(doc["spec"])).algorithm.mode == "fedavg"


@pytest.mark.parametrize(("case", "raw", "field"), BAD, ids=[c[0] for c in BAD])
def test_the_parser_refuses_what_the_crd_refuses(
    case: str, raw: dict[str, Any], field: str
) -> None:
    """The same samples test_crd_validation sends to the API server."""
    with pytest.raises(TrainingSpecError) as caught:
        parse_spec(raw)
    assert caught.value.field == field, case


def test_the_good_sample_parses() -> None:
    assert parse_spec(GOOD).algorithm.moving_rate == 0.4
