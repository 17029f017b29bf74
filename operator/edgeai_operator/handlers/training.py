"""DNNTrainingJob: one daemon per job runs a pass every TRAINING_POLL_S seconds until
the job has succeeded or failed. A pass lists the job's pods, reads the training
progress from the pods' own `/status` (the aggregator's, or every gossip worker's),
decides (`trainingbuild.step`) and acts: creates what is missing, writes status, posts
Events, and once training is done copies the trained model into a ConfigMap a DNNModel
can reference, then deletes the pods, Services and PodDisruptionBudget."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from typing import Any

import kopf

from edgeai_operator import API_GROUP, API_VERSION, k8s, trainingbuild
from edgeai_operator.context import context_of
from edgeai_operator.handlers.nodes import all_nodes
from edgeai_operator.planning import NodeState
from edgeai_operator.reconcile import read_pod
from edgeai_operator.trainingbuild import (
    AGGREGATOR_PORT,
    GOSSIP_PORT,
    JOB_LABEL,
    JobRef,
    Placement,
    Step,
)

TRAINING_POLL_S = 2.0
MODEL_READ_TIMEOUT_S = 30.0


def _running_ip(pod: Mapping[str, Any] | None) -> str | None:
    status = (pod or {}).get("status") or {}
    if status.get("phase") != "Running" or (pod or {}).get("metadata", {}).get("deletionTimestamp"):
        return None
    ip = status.get("podIP")
    return str(ip) if ip else None


def _json(body: bytes | None) -> dict[str, Any] | None:
    if body is None:
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _termination_message(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    """A finished worker's final status, which it wrote to its termination log."""
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        message = ((container.get("state") or {}).get("terminated") or {}).get("message")
        if message:
            return _json(message.encode())
    return None


def read_progress(
    job: JobRef, spec: Mapping[str, Any], pods: Mapping[str, Mapping[str, Any]], workers: int
) -> dict[str, Any] | None:
    """The aggregator's `/status`, or the gossip workers' summed up; None when no pod
    answered (not started yet, or restarting)."""
    if not trainingbuild.is_gossip(spec):
        ip = _running_ip(pods.get(trainingbuild.aggregator_name(job)))
        return None if ip is None else _json(read_pod(ip, AGGREGATOR_PORT, "/status"))
    statuses: list[dict[str, Any]] = []
    exited = 0
    for i in range(workers):
        pod = pods.get(trainingbuild.worker_name(job, i)) or {}
        if (pod.get("status") or {}).get("phase") == "Succeeded":
            exited += 1
            final = _termination_message(pod)
            if final is not None:
                statuses.append(final)
            continue
        ip = _running_ip(pod)
        answer = None if ip is None else _json(read_pod(ip, GOSSIP_PORT, "/status"))
        if answer is not None:
            statuses.append(answer)
    return trainingbuild.gossip_progress(statuses, workers, exited)


def training_pass(job: Mapping[str, Any], nodes: Sequence[NodeState], *, image: str) -> Step:
    """One pass over a job (in a thread): observe, decide, act. Returns the step; its
    status is what the caller writes."""
    meta, spec = job["metadata"], job["spec"]
    ref = JobRef(meta["name"], meta["namespace"], str(meta.get("uid")))
    pods = {
        p["metadata"]["name"]: p
        for p in k8s.list_objects("v1", "Pod", ref.namespace, f"{JOB_LABEL}={ref.name}")
    }
    status = job.get("status") or {}
    progress = None
    if status.get("placement") is not None and status.get("phase") not in trainingbuild.TERMINAL:
        workers = len(status["placement"]["workers"])
        progress = read_progress(ref, spec, pods, workers)
    decided = trainingbuild.step(job, nodes, pods, progress, image=image)
    for obj in decided.create:
        k8s.apply(obj)
    if decided.copy_model:
        _copy_model(ref, job, decided, pods)
    if decided.status.get("phase") in trainingbuild.TERMINAL and status.get("placement"):
        for api_version, kind, name in trainingbuild.finished_children(
            ref, Placement.from_dict(status["placement"])
        ):
            k8s.delete(api_version, kind, name, ref.namespace)
    return decided


def _copy_model(
    ref: JobRef, job: Mapping[str, Any], decided: Step, pods: Mapping[str, Mapping[str, Any]]
) -> None:
    """The aggregator's exported model into the `<job>-model` ConfigMap; the job succeeds
    with `status.model` naming it, or fails when the model does not fit."""
    status = {**(job.get("status") or {}), **decided.status}
    generation = job["metadata"].get("generation")
    ip = _running_ip(pods.get(trainingbuild.aggregator_name(ref)))
    model = (
        None
        if ip is None
        else read_pod(ip, AGGREGATOR_PORT, "/model.onnx", timeout_s=MODEL_READ_TIMEOUT_S)
    )
    if model is None:
        return  # the aggregator did not answer: the next pass tries again
    too_large = trainingbuild.model_too_large(len(model))
    if too_large is not None:
        decided.status.update(trainingbuild.fail(status, generation, "ModelTooLarge", too_large))
        decided.events.append(("Warning", "ModelTooLarge", too_large))
        return
    k8s.apply(trainingbuild.model_configmap(ref, model))
    uri = trainingbuild.model_uri(ref)
    round_, accuracy = int(status.get("round") or 0), status.get("accuracy")
    decided.status.update(
        trainingbuild.succeeded(status, generation, round_, accuracy, job["spec"], uri)
    )
    decided.events.append(
        (
            "Normal",
            "Completed",
            f"{trainingbuild.completion_message(round_, accuracy, job['spec'])}; "
            f"model ({len(model)} bytes) at {uri}",
        )
    )


def _snapshot(body: kopf.Body, written: Mapping[str, Any]) -> dict[str, Any]:
    """The job as a pass reads it, with the status this daemon wrote overlaid (the watch
    may not have brought it back yet)."""
    return {
        "metadata": {**dict(body.get("metadata", {})), "namespace": body.metadata.namespace},
        "spec": dict(body.get("spec", {})),
        "status": {**dict(body.get("status", {})), **written},
    }


@kopf.daemon(API_GROUP, API_VERSION, "dnntrainingjobs", cancellation_timeout=10)
async def run_training_job(
    name: str,
    namespace: str | None,
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    logger: kopf.Logger,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    node_index: kopf.Index[str, NodeState] = kwargs["node_index"]
    ctx = context_of(memo)
    written: dict[str, Any] = {}
    while not stopped:
        job = _snapshot(body, written)
        if job["status"].get("phase") in trainingbuild.TERMINAL:
            return
        try:
            decided = await asyncio.to_thread(
                training_pass,
                job,
                all_nodes(memo, node_index),
                image=ctx.settings.trainer_image,
            )
        except Exception as exc:  # keep the daemon alive; the next pass retries
            logger.exception(f"training pass failed: {exc}")
            kopf.event(body, type="Warning", reason="PassFailed", message=str(exc)[:1000])
            decided = Step()
        if decided.status:
            await asyncio.to_thread(
                k8s.patch_status, "dnntrainingjobs", namespace or "default", name, decided.status
            )
            written.update(decided.status)
        for type_, reason, message in decided.events:
            kopf.event(body, type=type_, reason=reason, message=message)
        await stopped.wait(TRAINING_POLL_S)
