"""A DNNTrainingJob's children and its next step (pure: no I/O).

`place` picks the nodes: `workers.count` Ready, schedulable device nodes matching
`workers.nodeSelector` (in zone then name order), and for a job with an aggregator an
edge node in the zone of most workers (or a cloud node, per `aggregator.tier`). The
builders turn the job and its placement into the objects the operator creates, as
literals: the spec ConfigMap every process reads, the aggregator's pod (pinned to its
node, an emptyDir work directory for journal and checkpoints), Service and
PodDisruptionBudget, one worker pod per selected node, and for gossip one Service per
worker so peers address each other by name. `step` decides, from what a pass observed
(the job, its pods, the training progress), what to create, what to delete, the new
status and the Events to post.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeai_operator import API_GROUP, API_VERSION, TIER_LABEL, __version__
from edgeai_operator.builders import MANAGED_BY
from edgeai_operator.conditions import set_condition
from edgeai_operator.planning import NodeState
from edgeai_operator.podsecurity import restricted

DEFAULT_TRAINER_IMAGE = f"edgeai-trainer:{__version__}"
JOB_LABEL = "edgeai.dev/training-job"
ROLE_LABEL = "edgeai.dev/training-role"  # aggregator | worker
INDEX_LABEL = "edgeai.dev/training-index"
AGGREGATOR_PORT = 7000
GOSSIP_PORT = 7100
SPEC_DIR = "/etc/edgeai/training"
SPEC_FILE = "spec.json"
WORK_DIR = "/var/lib/edgeai/training"
TERMINATION_LOG = "/dev/termination-log"  # the container's terminationMessagePath
MODEL_KEY = "model.onnx"
# A ConfigMap holds at most 1 MiB (data and binaryData together); leave room for metadata.
MODEL_CONFIGMAP_MAX_BYTES = 1_000_000
# An aggregator pod recreated this many times (deleted, or failed) fails the job.
MAX_AGGREGATOR_STARTS = 4
# Every this many rounds the job posts an Event with its progress.
ROUND_EVENT_EVERY = 10
TERMINAL = ("Succeeded", "Failed")


@dataclass(frozen=True)
class JobRef:
    """The DNNTrainingJob the children belong to."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": "DNNTrainingJob",
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


@dataclass(frozen=True)
class Placement:
    """Worker nodes in index order, and the aggregator's node (None for gossip)."""

    workers: tuple[str, ...]
    aggregator: str | None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"workers": list(self.workers)}
        if self.aggregator is not None:
            out["aggregator"] = self.aggregator
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Placement:
        return cls(tuple(str(n) for n in raw["workers"]), raw.get("aggregator"))


class PlacementError(Exception):
    """No placement: `reason` for the condition, the message names the field."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def is_gossip(spec: Mapping[str, Any]) -> bool:
    return bool((spec.get("algorithm") or {}).get("mode") == "gossip")


def place(spec: Mapping[str, Any], nodes: Sequence[NodeState]) -> Placement:
    workers = spec.get("workers") or {}
    selector: Mapping[str, str] = workers.get("nodeSelector") or {}
    count = int(workers.get("count", 4))
    matching = sorted(
        (
            n.spec
            for n in nodes
            if n.usable
            and n.spec.tier == "device"
            and all(n.spec.labels.get(k) == v for k, v in selector.items() if k != TIER_LABEL)
            and selector.get(TIER_LABEL, "device") == "device"
        ),
        key=lambda s: (s.zone or "", s.name),
    )
    wanted = ", ".join(f"{k}={v}" for k, v in sorted(selector.items())) or "(none)"
    if not matching:
        raise PlacementError(
            "NoMatchingNodes",
            f"spec.workers.nodeSelector: no Ready, schedulable device node matches {wanted}",
        )
    if len(matching) < count:
        raise PlacementError(
            "NotEnoughNodes",
            f"spec.workers.count: is {count} but only {len(matching)} Ready, schedulable "
            f"device node(s) match spec.workers.nodeSelector {wanted} (one worker per node)",
        )
    chosen = matching[:count]
    if is_gossip(spec):
        return Placement(tuple(s.name for s in chosen), None)
    tier = str((spec.get("aggregator") or {}).get("tier", "edge"))
    zones = [s.zone for s in chosen]
    zone = max(sorted({z or "" for z in zones}), key=lambda z: zones.count(z or None))
    servers = sorted(
        (n.spec for n in nodes if n.usable and n.spec.tier == tier),
        key=lambda s: ((s.zone or "") != zone, s.name),
    )
    if not servers:
        raise PlacementError(
            "NoAggregatorNode",
            f"spec.aggregator.tier: no Ready, schedulable {tier} node for the aggregator",
        )
    return Placement(tuple(s.name for s in chosen), servers[0].name)


# --- names and objects ------------------------------------------------------------------


def aggregator_name(job: JobRef) -> str:
    return f"{job.name}-aggregator"


def worker_name(job: JobRef, index: int) -> str:
    return f"{job.name}-worker-{index}"


def spec_configmap_name(job: JobRef) -> str:
    return f"{job.name}-spec"


def model_configmap_name(job: JobRef) -> str:
    return f"{job.name}-model"


def _labels(job: JobRef, role: str, index: int | None = None) -> dict[str, str]:
    out = {
        **MANAGED_BY,
        "app.kubernetes.io/name": "edgeai-trainer",
        "app.kubernetes.io/instance": job.name,
        JOB_LABEL: job.name,
        ROLE_LABEL: role,
    }
    if index is not None:
        out[INDEX_LABEL] = str(index)
    return out


def _meta(job: JobRef, name: str, labels: Mapping[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": job.namespace,
        "labels": dict(labels),
        "ownerReferences": [job.reference()],
    }


def spec_configmap(job: JobRef, spec: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(job, spec_configmap_name(job), _labels(job, "spec")),
        "data": {SPEC_FILE: json.dumps(dict(spec), sort_keys=True)},
    }


def model_configmap(job: JobRef, model: bytes) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(job, model_configmap_name(job), _labels(job, "model")),
        "binaryData": {MODEL_KEY: base64.b64encode(model).decode()},
    }


def _pod(
    job: JobRef,
    name: str,
    labels: Mapping[str, str],
    node: str,
    image: str,
    args: list[str],
    port: int | None,
    probe_path: str | None,
) -> dict[str, Any]:
    mounts = [{"name": "spec", "mountPath": SPEC_DIR, "readOnly": True}]
    volumes: list[dict[str, Any]] = [
        {"name": "spec", "configMap": {"name": spec_configmap_name(job)}}
    ]
    if port is not None:
        mounts.append({"name": "work", "mountPath": WORK_DIR})
        volumes.append({"name": "work", "emptyDir": {}})
    container: dict[str, Any] = {
        "name": "trainer",
        "image": image,
        "command": ["python", "-m", "edgeai_worker.training"],
        "args": args,
        "volumeMounts": mounts,
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}},
    }
    if port is not None and probe_path is not None:
        container["ports"] = [{"name": "http", "containerPort": port}]
        container["readinessProbe"] = {
            "httpGet": {"path": probe_path, "port": "http"},
            "periodSeconds": 5,
        }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _meta(job, name, labels),
        "spec": restricted(
            {
                "nodeName": node,
                # a failed container restarts in place: its emptyDir (journal, checkpoint) stays
                "restartPolicy": "OnFailure",
                "containers": [container],
                "volumes": volumes,
                # nothing to drain: a replacement worker may start soon after a deletion
                "terminationGracePeriodSeconds": 5,
            }
        ),
    }


def _spec_arg() -> str:
    return f"--spec={SPEC_DIR}/{SPEC_FILE}"


def aggregator_pod(job: JobRef, node: str, image: str) -> dict[str, Any]:
    args = [
        "aggregator",
        _spec_arg(),
        "--host=0.0.0.0",
        f"--port={AGGREGATOR_PORT}",
        f"--workdir={WORK_DIR}",
        "--keep-serving",
    ]
    labels = _labels(job, "aggregator")
    return _pod(job, aggregator_name(job), labels, node, image, args, AGGREGATOR_PORT, "/status")


def _service_url(job: JobRef, name: str, port: int) -> str:
    return f"http://{name}.{job.namespace}.svc:{port}"


def worker_pod(
    job: JobRef, spec: Mapping[str, Any], index: int, node: str, workers: int, image: str
) -> dict[str, Any]:
    labels = _labels(job, "worker", index)
    name = worker_name(job, index)
    if is_gossip(spec):
        peers = ",".join(
            _service_url(job, worker_name(job, i), GOSSIP_PORT) for i in range(workers)
        )
        args = [
            "gossip",
            _spec_arg(),
            f"--index={index}",
            "--host=0.0.0.0",
            f"--port={GOSSIP_PORT}",
            f"--peers={peers}",
            f"--workdir={WORK_DIR}",
            # the final numbers outlive the process: the kubelet keeps them in the pod
            f"--result-file={TERMINATION_LOG}",
        ]
        return _pod(job, name, labels, node, image, args, GOSSIP_PORT, "/health")
    url = _service_url(job, aggregator_name(job), AGGREGATOR_PORT)
    args = ["worker", _spec_arg(), f"--index={index}", f"--aggregator={url}"]
    return _pod(job, name, labels, node, image, args, None, None)


def _service(job: JobRef, name: str, selector: Mapping[str, str], port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(job, name, _labels(job, "service")),
        "spec": {
            "selector": dict(selector),
            "ports": [{"name": "http", "port": port, "targetPort": "http"}],
        },
    }


def aggregator_pdb(job: JobRef) -> dict[str, Any]:
    """Voluntary evictions (a node drain) wait for the aggregator: its emptyDir holds
    the journal and checkpoints, which a new pod would not have."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(job, aggregator_name(job), _labels(job, "aggregator")),
        "spec": {
            "maxUnavailable": 0,
            "selector": {"matchLabels": {JOB_LABEL: job.name, ROLE_LABEL: "aggregator"}},
        },
    }


def runtime_children(
    job: JobRef, spec: Mapping[str, Any], placement: Placement, image: str
) -> list[dict[str, Any]]:
    """Every object of a running job: spec ConfigMap, Services, PDB, then the pods."""
    out = [spec_configmap(job, spec)]
    workers = len(placement.workers)
    if placement.aggregator is not None:
        out.append(
            _service(
                job,
                aggregator_name(job),
                {JOB_LABEL: job.name, ROLE_LABEL: "aggregator"},
                AGGREGATOR_PORT,
            )
        )
        out.append(aggregator_pdb(job))
        out.append(aggregator_pod(job, placement.aggregator, image))
    else:
        for i in range(workers):
            selector = {JOB_LABEL: job.name, ROLE_LABEL: "worker", INDEX_LABEL: str(i)}
            out.append(_service(job, worker_name(job, i), selector, GOSSIP_PORT))
    for i, node in enumerate(placement.workers):
        out.append(worker_pod(job, spec, i, node, workers, image))
    return out


# --- progress and status ----------------------------------------------------------------

PROGRESS_FIELDS = (
    "round",
    "accuracy",
    "loss",
    "bytesUp",
    "bytesDown",
    "compressionRatio",
    "participants",
    "stragglers",
    "epsilon",
    "delta",
)


def gossip_progress(
    statuses: Sequence[Mapping[str, Any]], workers: int, exited: int
) -> dict[str, Any]:
    """The job's progress from its gossip workers' statuses (a running worker's `/status`,
    a finished one's final status from its termination message): the slowest one's
    round, the mean accuracy, bytes summed. A finished gossip worker stops listening and
    exits, so the job has succeeded once all `workers` pods have exited successfully
    (`exited`)."""
    if not statuses:
        return {"phase": "Succeeded" if exited >= workers else "Pending"}
    accuracies = [float(s["accuracy"]) for s in statuses if s.get("accuracy") is not None]
    return {
        "phase": "Succeeded" if exited >= workers else "Running",
        "round": min(int(s.get("round") or 0) for s in statuses),
        "accuracy": round(sum(accuracies) / len(accuracies), 4) if accuracies else None,
        "bytesUp": sum(int(s.get("bytesUp") or 0) for s in statuses),
        "bytesDown": sum(int(s.get("bytesDown") or 0) for s in statuses),
    }


@dataclass
class Step:
    """What one pass does: objects to create, pods to delete, status, Events, and
    whether the trained model is to be copied now."""

    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[tuple[str, str, str]] = field(default_factory=list)  # apiVersion, kind, name
    status: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # type, reason, message
    copy_model: bool = False


def _pod_failed(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status") or {}
    restarts = sum(int(c.get("restartCount") or 0) for c in status.get("containerStatuses") or [])
    return status.get("phase") == "Failed" or restarts >= MAX_AGGREGATOR_STARTS


def fail(
    status: Mapping[str, Any], generation: int | None, reason: str, message: str
) -> dict[str, Any]:
    conditions = set_condition(
        list(status.get("conditions") or []), "Succeeded", False, reason, message, generation
    )
    conditions = set_condition(conditions, "Running", False, reason, message, generation)
    return {"phase": "Failed", "reason": reason, "message": message, "conditions": conditions}


def step(
    job: Mapping[str, Any],
    nodes: Sequence[NodeState],
    pods: Mapping[str, Mapping[str, Any]],
    progress: Mapping[str, Any] | None,
    *,
    image: str,
) -> Step:
    """The next step of a job from what a pass observed: `pods` by name, `progress` the
    aggregator's `/status` (or `gossip_progress`), None when not read."""
    meta, spec = job["metadata"], job["spec"]
    status: Mapping[str, Any] = job.get("status") or {}
    ref = JobRef(meta["name"], meta["namespace"], str(meta.get("uid")))
    generation = meta.get("generation")
    out = Step()
    if status.get("phase") in TERMINAL:
        return out
    if status.get("placement") is None:
        try:
            placement = place(spec, nodes)
        except PlacementError as err:
            out.status = fail(status, generation, err.reason, str(err))
            out.events.append(("Warning", err.reason, str(err)))
            return out
        out.status["placement"] = placement.to_dict()
        out.status["phase"] = "Pending"
        out.status["aggregatorStarts"] = 0
        where = f"workers on {', '.join(placement.workers)}"
        if placement.aggregator:
            where += f", aggregator on {placement.aggregator}"
        out.events.append(("Normal", "PodsCreated", f"{len(placement.workers)} {where}"))
        out.status["conditions"] = set_condition(
            list(status.get("conditions") or []),
            "Running",
            False,
            "PodsCreated",
            where,
            generation,
        )
        out.create = runtime_children(ref, spec, placement, image)
        return out
    placement = Placement.from_dict(status["placement"])
    starts = int(status.get("aggregatorStarts") or 0)
    agg = pods.get(aggregator_name(ref))
    if placement.aggregator is not None:
        if agg is not None and _pod_failed(agg):
            message = f"aggregator pod {agg['metadata']['name']} failed"
            out.status = fail(status, generation, "AggregatorFailed", message)
            out.events.append(("Warning", "AggregatorFailed", message))
            return out
        if agg is None:
            if starts + 1 >= MAX_AGGREGATOR_STARTS:
                message = f"aggregator pod gone {starts + 1} times; giving up"
                out.status = fail(status, generation, "AggregatorFailed", message)
                out.events.append(("Warning", "AggregatorFailed", message))
                return out
            out.status["aggregatorStarts"] = starts + 1
            out.events.append(
                (
                    "Warning",
                    "AggregatorRecreated",
                    "the aggregator pod was gone: recreated (its work directory, and the "
                    "rounds in it, went with the old pod)",
                )
            )
            out.create.append(aggregator_pod(ref, placement.aggregator, image))
    done = progress is not None and progress.get("phase") == "Succeeded"
    if not done:
        for i, node in enumerate(placement.workers):
            if worker_name(ref, i) not in pods:
                out.create.append(worker_pod(ref, spec, i, node, len(placement.workers), image))
                out.events.append(
                    ("Normal", "WorkerRecreated", f"worker {i} on {node} was gone: recreated")
                )
    if progress is None:
        return out
    new = {k: progress.get(k) for k in PROGRESS_FIELDS if k in progress}
    new["uplinkBytes"] = progress.get("bytesUp")
    out.status.update(new)
    old_round = int(status.get("round") or 0)
    # a finished gossip job's progress has no numbers: its last ones are in status
    round_ = int(progress.get("round", status.get("round")) or 0)
    accuracy = progress.get("accuracy", status.get("accuracy"))
    if old_round == 0 and round_ >= 1:
        out.events.append(("Normal", "FirstRound", f"round 1 closed, accuracy {accuracy}"))
    elif round_ // ROUND_EVENT_EVERY > old_round // ROUND_EVENT_EVERY:
        out.events.append(
            (
                "Normal",
                "Progress",
                f"round {round_}, accuracy {accuracy}, uplink bytes {progress.get('bytesUp')}",
            )
        )
    if done:
        # gossip and codistillation workers keep their own models: none to copy
        mode = (spec.get("algorithm") or {}).get("mode")
        out.copy_model = placement.aggregator is not None and mode != "codistillation"
        if not out.copy_model:
            out.status.update(succeeded(status, generation, round_, accuracy, spec, None))
            out.events.append(("Normal", "Completed", completion_message(round_, accuracy, spec)))
        return out
    running = progress.get("phase") == "Running" or round_ >= 1
    if running and status.get("phase") != "Running":
        out.status["phase"] = "Running"
        out.status["conditions"] = set_condition(
            list(status.get("conditions") or []),
            "Running",
            True,
            "Training",
            "every worker has joined; rounds are running",
            generation,
        )
    return out


def completion_message(round_: int, accuracy: Any, spec: Mapping[str, Any]) -> str:
    stop = spec.get("stop") or {}
    target = float(stop.get("targetAccuracy", 1.0))
    why = (
        f"target accuracy {target:g} reached"
        if accuracy is not None and float(accuracy) >= target
        else f"round limit {stop.get('maxRounds', 100)} reached"
    )
    return f"{why}: round {round_}, accuracy {accuracy}"


def succeeded(
    status: Mapping[str, Any],
    generation: int | None,
    round_: int,
    accuracy: Any,
    spec: Mapping[str, Any],
    model_uri: str | None,
) -> dict[str, Any]:
    message = completion_message(round_, accuracy, spec)
    conditions = set_condition(
        list(status.get("conditions") or []), "Succeeded", True, "Completed", message, generation
    )
    conditions = set_condition(conditions, "Running", False, "Completed", message, generation)
    out: dict[str, Any] = {"phase": "Succeeded", "conditions": conditions, "message": message}
    if model_uri is not None:
        out["model"] = model_uri
    return out


def model_too_large(size_bytes: int) -> str | None:
    if size_bytes <= MODEL_CONFIGMAP_MAX_BYTES:
        return None
    return (
        f"the trained model is {size_bytes} bytes, more than a ConfigMap holds "
        f"({MODEL_CONFIGMAP_MAX_BYTES} bytes)"
    )


def model_uri(job: JobRef) -> str:
    """Where a DNNModel in the job's namespace finds the trained model (its
    `configmap://NAME/KEY` source)."""
    return f"configmap://{model_configmap_name(job)}/{MODEL_KEY}"


def finished_children(job: JobRef, placement: Placement) -> list[tuple[str, str, str]]:
    """What a finished job no longer needs: its pods, Services and PDB (the spec and
    model ConfigMaps stay)."""
    out: list[tuple[str, str, str]] = [
        ("v1", "Pod", worker_name(job, i)) for i in range(len(placement.workers))
    ]
    if placement.aggregator is not None:
        out += [
            ("v1", "Pod", aggregator_name(job)),
            ("v1", "Service", aggregator_name(job)),
            ("policy/v1", "PodDisruptionBudget", aggregator_name(job)),
        ]
    else:
        out += [("v1", "Service", worker_name(job, i)) for i in range(len(placement.workers))]
    return out
