"""DNNModel: run its preparation Job, publish the prepared variants, their artefacts and
profiles and per-tier estimates in status, then measure the tiers with profiling Jobs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

import kopf

from edgeai_operator import API_GROUP, API_VERSION, k8s, preparation, profiling
from edgeai_operator.conditions import set_condition
from edgeai_operator.context import context_of
from edgeai_operator.errors import SpecError
from edgeai_operator.handlers.nodes import all_nodes
from edgeai_operator.modelspec import parse_model_spec
from edgeai_operator.planning import NodeState
from edgeai_operator.topology import NodeSpec
from edgeai_operator.trunkplan import TrunkRecord


@kopf.on.resume(API_GROUP, API_VERSION, "dnnmodels")
@kopf.on.create(API_GROUP, API_VERSION, "dnnmodels")
@kopf.on.update(API_GROUP, API_VERSION, "dnnmodels", field="spec")
async def prepare_model(
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    namespace: str | None,
    patch: kopf.Patch,
    body: kopf.Body,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    """Checks the spec and starts this generation's preparation Job at once (the timer
    carries it on). An invalid spec is final: `Prepared=False`, reason InvalidSpec."""
    generation = meta.get("generation")
    try:
        parse_model_spec(spec)
    except SpecError as exc:
        patch.status["conditions"] = set_condition(
            list(status.get("conditions") or []),
            "Prepared",
            False,
            "InvalidSpec",
            str(exc),
            generation,
        )
        patch.status["observedGeneration"] = generation
        raise kopf.PermanentError(str(exc)) from exc
    await _prepare_tick(_model(body, meta, spec, namespace), status, patch, body, memo, kwargs)


def _model(
    body: kopf.Body, meta: kopf.Meta, spec: kopf.Spec, namespace: str | None
) -> dict[str, Any]:
    """The DNNModel as the passes in threads read it: plain data, namespace filled in."""
    return {
        "apiVersion": body.get("apiVersion"),
        "metadata": {**dict(meta), "namespace": namespace or "default"},
        "spec": dict(spec),
    }


async def _prepare_tick(
    model: Mapping[str, Any],
    status: kopf.Status,
    patch: kopf.Patch,
    body: kopf.Body,
    memo: kopf.Memo,
    kwargs: Mapping[str, Any],
) -> None:
    node_index: kopf.Index[str, NodeState] = kwargs["node_index"]
    ctx = context_of(memo)
    step = await asyncio.to_thread(
        preparation_pass,
        model,
        dict(status),
        [n.spec for n in all_nodes(memo, node_index)],
        image=ctx.settings.worker_image,
        default_artifacts=ctx.settings.artifacts_uri,
        ca_bundle_configmap=ctx.settings.ca_bundle_configmap,
    )
    if step.status is not None:
        patch.status.update(step.status)
    for type_, reason, message in step.events:
        kopf.event(body, type=type_, reason=reason, message=message)
    if step.status is not None and "profiles" in step.status:
        ctx.metrics.inc("edgeai_operator_models_profiled_total")


def preparation_pass(
    model: Mapping[str, Any],
    status: Mapping[str, Any],
    nodes: Sequence[NodeSpec],
    *,
    image: str,
    default_artifacts: str | None,
    ca_bundle_configmap: str | None = None,
) -> preparation.Step:
    """One tick of the model's preparation: reads the current attempt's Job and result
    ConfigMap, decides (`preparation.step`) and creates what it asks for."""
    spec = parse_model_spec(model["spec"])
    namespace = model["metadata"]["namespace"]
    name = preparation.current_job(model, status)
    if name is None:
        return preparation.Step()
    observed: dict[str, Any] = {
        "job": k8s.get("batch/v1", "Job", name, namespace),
        "configmap": k8s.get("v1", "ConfigMap", name, namespace),
    }
    if spec.base is not None:
        observed["base"] = k8s.get(
            f"{API_GROUP}/{API_VERSION}", "DNNModel", spec.base.model, namespace
        )
    elif preparation.RESULT_KEY in ((observed["configmap"] or {}).get("data") or {}):
        # a finished preparation looks for a trunk it shares with another model
        observed["peers"] = k8s.list_objects(f"{API_GROUP}/{API_VERSION}", "DNNModel", namespace)
    step = preparation.step(
        model,
        spec,
        status,
        observed,
        nodes,
        image=image,
        artifacts_uri=spec.artifacts_uri or default_artifacts,
        ca_bundle_configmap=ca_bundle_configmap,
        now_s=time.time(),
    )
    for obj in step.create:
        k8s.apply(obj)
    return step


@kopf.index(API_GROUP, API_VERSION, "dnnmodels")
def model_index(
    name: str, namespace: str | None, status: kopf.Status, memo: kopf.Memo, **_: Any
) -> dict[tuple[str, str], list[dict[str, Any]]] | None:
    profiles = status.get("profiles")
    if not profiles or namespace is None:
        return None
    # The index sees the profile land: deployments waiting for it can plan now.
    context_of(memo).wakeups.wake_model_users(namespace, name)
    return {(namespace, name): [dict(p) for p in profiles]}


@kopf.index(API_GROUP, API_VERSION, "dnnmodels")
def model_trunks(
    name: str, namespace: str | None, status: kopf.Status, memo: kopf.Memo, **_: Any
) -> dict[tuple[str, str], TrunkRecord] | None:
    """Each model's verified trunk (`status.trunk`): the deployments of the model and
    of its base plan their trunk stages from these."""
    record = TrunkRecord.from_status(status.get("trunk"))
    if record is None or namespace is None:
        return None
    wakeups = context_of(memo).wakeups
    wakeups.wake_model_users(namespace, name)
    wakeups.wake_model_users(namespace, record.base)
    return {(namespace, name): record}


async def model_jobs(
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    name: str,
    namespace: str | None,
    patch: kopf.Patch,
    body: kopf.Body,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    """Carries the preparation on; once it is done, runs a profiling Job per tier and
    turns finished ones into `status.tiers`.

    Never waits on a Job: each tick creates missing Jobs and reads finished ones."""
    model = _model(body, meta, spec, namespace)
    if preparation.current_job(model, status) is not None:
        await _prepare_tick(model, status, patch, body, memo, kwargs)
        return
    prepared: Mapping[str, Any] = next(
        (c for c in status.get("conditions") or [] if c.get("type") == "Prepared"), {}
    )
    if prepared.get("status") != "True" or prepared.get("observedGeneration") != meta.get(
        "generation"
    ):
        return  # this generation's profile is not written yet
    node_index: kopf.Index[str, NodeState] = kwargs["node_index"]
    ctx = context_of(memo)
    updates, events = await asyncio.to_thread(
        profile_jobs_pass,
        model,
        dict(status),
        all_nodes(memo, node_index),
        image=ctx.settings.worker_image,
    )
    if not updates:
        return
    patch.status.update(updates)
    merged = {t: dict(v) for t, v in (status.get("tiers") or {}).items()}
    for tier, entry in (updates.get("tiers") or {}).items():
        merged.setdefault(tier, {}).update(entry)
    reason, message = profiling.profiled_condition(merged)
    if reason != "AnalyticEstimate":
        patch.status["conditions"] = set_condition(
            list(status.get("conditions") or []),
            "Profiled",
            True,
            reason,
            message,
            meta.get("generation"),
        )
    for reason, message in events:
        kopf.info(body, reason=reason, message=message)
    if "profiles" in updates:
        ctx.wakeups.wake_model_users(namespace or "default", name)


def profile_jobs_pass(
    model: Mapping[str, Any],
    status: Mapping[str, Any],
    nodes: Sequence[NodeState],
    *,
    image: str,
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """One tick: (status updates, events). Creates missing Jobs, reads finished ones."""
    meta, spec = model["metadata"], model["spec"]
    namespace, generation = meta["namespace"], meta.get("generation")
    tiers_status: dict[str, Any] = dict(status.get("tiers") or {})
    profiles = [dict(p) for p in status.get("profiles") or []]
    tiers: dict[str, Any] = {}
    events: list[tuple[str, str]] = []
    zoo = parse_model_spec(spec).zoo
    for tier in profiling.profile_tiers(spec, [n.spec for n in nodes]):
        entry = dict(tiers_status.get(tier) or {})
        if zoo is None:
            why = "profiling Jobs measure zoo models; this model keeps the analytic estimate"
            if entry.get("message") != why:
                tiers[tier] = {"message": why}
            continue
        job_name = profiling.profile_job_name(meta["name"], tier, generation)
        if entry.get("job") == job_name and entry.get("jobResult"):
            continue  # this generation's Job has reported
        job = k8s.get("batch/v1", "Job", job_name, namespace)
        if job is None:
            candidates = sorted(n.spec.name for n in nodes if n.spec.tier == tier and n.usable)
            if not candidates:
                why = f"no Ready, schedulable {tier} node to profile on; analytic estimate"
                if entry.get("message") != why:
                    tiers[tier] = {"message": why}
                continue
            node = candidates[0]
            k8s.apply(profiling.profile_job(model, tier, node, image=image))
            tiers[tier] = {"job": job_name, "message": f"profiling on node {node} (Job {job_name})"}
            continue
        pods = k8s.list_objects("v1", "Pod", namespace, f"batch.kubernetes.io/job-name={job_name}")
        result = profiling.job_result(job, pods)
        if result is None:
            continue
        kind, detail = result
        node = next((p["spec"].get("nodeName") for p in pods if p.get("spec")), None) or "?"
        if kind == "message":
            fp32 = next((i for i, p in enumerate(profiles) if p.get("variant") == "fp32"), 0)
            try:
                summary = profiling.parse_summary(detail, len(profiles[fp32]["segments"]))
            except (ValueError, IndexError, KeyError) as exc:
                kind, detail = "invalidMessage", f"the profiling Job's message is invalid: {exc}"
            else:
                tiers[tier] = profiling.measured_tier(entry, summary, node, job_name)
                profiles[fp32] = profiling.with_measurement(profiles[fp32], tier, summary, node)
                events.append(
                    (
                        "TierProfiled",
                        f"{tier}: {tiers[tier]['message']}, {tiers[tier]['totalMs']:.2f} ms",
                    )
                )
                continue
        tiers[tier] = {
            "source": entry.get("source", "analytic"),
            "job": job_name,
            "jobResult": kind,
            "node": node,
            "message": f"{detail}; keeping the analytic estimate",
        }
        events.append(("TierProfileFailed", f"{tier}: {tiers[tier]['message']}"))
    updates: dict[str, Any] = {}
    if tiers:
        updates["tiers"] = tiers
    if any(t.get("jobResult") == "measured" for t in tiers.values()):
        updates["profiles"] = profiles
    return updates, events


def register_timers(interval_s: float) -> None:
    """The profiling-Job timer, at the interval the settings give (known only once
    `edgeai operator` has read them)."""
    kopf.timer(API_GROUP, API_VERSION, "dnnmodels", interval=interval_s)(model_jobs)
