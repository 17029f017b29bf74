"""Per-tier estimates and measurements of a prepared DNNModel.

The graph profile of each variant (cuts, tensor sizes, FLOPs per segment) comes from
its preparation Job (`preparation`). Per-tier latency is FLOPs / the tier's effective
GFLOPS (`edgeai.dev/gflops` of the tier's median node, measured annotations win), the
analytic estimate, until a profiling Job measures the tier; the source of every number
is recorded in status so a user can tell. `check_input` holds `spec.input` to the
model's own input.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from edgeai_operator import TIERS
from edgeai_operator.errors import SpecError
from edgeai_operator.modelspec import InputSpec, parse_model_spec
from edgeai_operator.podsecurity import restricted
from edgeai_operator.problem import OVERHEAD_KEYS
from edgeai_operator.topology import NodeSpec

if TYPE_CHECKING:
    import onnx

# ONNX element types of the model inputs spec.input.dtype can name
_ONNX_DTYPES = {1: "FP32", 10: "FP16", 3: "INT8", 2: "UINT8", 6: "INT32", 7: "INT64"}


def tier_estimates(profile: Mapping[str, Any], nodes: Sequence[NodeSpec]) -> dict[str, Any]:
    flops = sum(int(s["flops"]) for s in profile["segments"])
    tiers: dict[str, Any] = {}
    for tier in TIERS:
        members = [n for n in nodes if n.tier == tier]
        if not members:
            continue
        gflops = statistics.median(n.gflops for n in members)
        tiers[tier] = {
            "totalMs": round(flops / (gflops * 1e6), 3),
            "gflops": gflops,
            "nodes": len(members),
            "source": "analytic",
        }
    return tiers


def check_input(declared: InputSpec, model: onnx.ModelProto) -> None:
    """Raises SpecError naming `spec.input.<field>` where `declared` differs from the
    model's first graph input; a symbolic dimension (the batch) matches any size."""
    initializers = {t.name for t in model.graph.initializer}
    actual = next(i for i in model.graph.input if i.name not in initializers)
    tensor = actual.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim]
    shape = "[" + ", ".join(str(d) for d in dims) + "]"
    if declared.name != actual.name:
        raise SpecError(
            "spec.input.name", f"{declared.name!r} is not the model's input", repr(actual.name)
        )
    fits = len(dims) == len(declared.shape) and all(
        isinstance(d, str) or d == want for d, want in zip(dims, declared.shape, strict=True)
    )
    if not fits:
        raise SpecError(
            "spec.input.shape",
            f"{list(declared.shape)} does not fit the model's input {actual.name!r} {shape}",
            f"{shape}, a named dimension taking any size",
        )
    dtype = _ONNX_DTYPES.get(tensor.elem_type, f"ONNX type {tensor.elem_type}")
    if declared.dtype != dtype:
        raise SpecError(
            "spec.input.dtype", f"{declared.dtype} is not the model's input type", dtype
        )


# ---------------------------------------------------------------------------
# Per-tier profiling Jobs
#
# For each tier of `spec.profile.tiers` (default: every tier that has nodes) the
# operator runs `edgeai profile <zoo> --termination-log` as a Job pinned to one node
# of the tier. Kubernetes puts the summary the profiler writes in the container's
# `state.terminated.message`; a valid one makes the tier `source: measured`. A Job
# that succeeds without a message (kwok runs nothing), fails, or runs past
# `spec.profile.timeoutSeconds` (the Job's activeDeadlineSeconds) leaves the tier's
# analytic estimate, and `status.tiers.<tier>.message` says why.

PROFILE_LABELS = {"app.kubernetes.io/managed-by": "edgeai-operator"}


def profile_tiers(spec: Mapping[str, Any], nodes: Sequence[NodeSpec]) -> list[str]:
    """`spec.profile.tiers`, or every tier that has nodes, in tier order."""
    wanted = parse_model_spec(spec).profile.tiers
    if wanted:
        return list(wanted)
    return [t for t in TIERS if any(n.tier == t for n in nodes)]


def model_owner(model: Mapping[str, Any]) -> dict[str, Any]:
    """The ownerReference to DNNModel `model` (its body) its Jobs and ConfigMaps carry."""
    meta = model["metadata"]
    return {
        "apiVersion": str(model.get("apiVersion", "edgeai.dev/v1alpha1")),
        "kind": "DNNModel",
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def finished_conditions(job: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The Job's conditions that hold (status True), by type: `Complete` or `Failed`
    once it has finished."""
    conditions = (job.get("status") or {}).get("conditions") or []
    return {c.get("type"): c for c in conditions if c.get("status") == "True"}


def profile_job_name(model: str, tier: str, generation: int | None) -> str:
    return f"{model}-profile-{tier}-{generation or 0}"


def profile_job(model: Mapping[str, Any], tier: str, node: str, *, image: str) -> dict[str, Any]:
    """The Job that profiles DNNModel `model` (its body) on `node`, a node of `tier`."""
    meta = model["metadata"]
    spec = parse_model_spec(model.get("spec"))
    lbls = {**PROFILE_LABELS, "edgeai.dev/model": meta["name"], "edgeai.dev/tier": tier}
    exprs = [
        {"key": "edgeai.dev/tier", "operator": "In", "values": [tier]},
        {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]},
    ]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": profile_job_name(meta["name"], tier, meta.get("generation")),
            "namespace": meta["namespace"],
            "labels": lbls,
            "ownerReferences": [model_owner(model)],
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": spec.profile.timeout_s,
            "template": {
                "metadata": {"labels": lbls},
                "spec": restricted(
                    {
                        "restartPolicy": "Never",
                        "affinity": {
                            "nodeAffinity": {
                                "requiredDuringSchedulingIgnoredDuringExecution": {
                                    "nodeSelectorTerms": [{"matchExpressions": exprs}]
                                }
                            }
                        },
                        "containers": [
                            {
                                "name": "profile",
                                "image": image,
                                "command": ["edgeai"],
                                "args": [
                                    "profile",
                                    spec.zoo,
                                    f"--repeats={spec.profile.repeats}",
                                    f"--idle-ms={spec.profile.idle_ms}",
                                    "-o",
                                    "json",
                                    "--termination-log",
                                ],
                                "terminationMessagePath": "/dev/termination-log",
                                "terminationMessagePolicy": "File",
                            }
                        ],
                    }
                ),
            },
        },
    }


def parse_summary(message: str, segments: int) -> dict[str, Any]:
    """A termination message written by `edgeai profile --termination-log`, checked;
    raises ValueError saying what is wrong."""
    data = json.loads(message)
    if not isinstance(data, dict) or data.get("kind") != "ProfileSummary":
        raise ValueError("not a ProfileSummary")
    times = data.get("segmentsMs")
    if not isinstance(times, list) or len(times) != segments:
        raise ValueError(f"expected {segments} segment times, got {times!r:.80}")
    if not all(isinstance(t, int | float) and t >= 0 for t in times):
        raise ValueError("segment times must be non-negative numbers")
    gflops = data.get("hostGflops")
    if not isinstance(gflops, int | float) or gflops <= 0:
        raise ValueError("hostGflops must be a positive number")
    for key in (*OVERHEAD_KEYS, "idleMs"):
        value = data.get(key)
        if value is not None and (not isinstance(value, int | float) or value < 0):
            raise ValueError(f"{key} must be a non-negative number")
    return data


def job_result(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> tuple[str, str] | None:
    """(result, message or detail) of a finished profiling Job, None while it runs.

    result: `message` (detail = the termination message), `noMessage`, `failed`,
    `timedOut`."""
    done = finished_conditions(job)
    if "Failed" in done:
        failed = done["Failed"]
        if failed.get("reason") == "DeadlineExceeded":
            deadline = (job.get("spec") or {}).get("activeDeadlineSeconds")
            return (
                "timedOut",
                f"the profiling Job ran past spec.profile.timeoutSeconds ({deadline} s)",
            )
        return (
            "failed",
            f"the profiling Job failed: {failed.get('reason')}: {failed.get('message')}",
        )
    if "Complete" not in done:
        return None
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (cs.get("state") or {}).get("terminated") or {}
            if terminated.get("message"):
                return "message", str(terminated["message"])
    return "noMessage", "the profiling Job succeeded without a termination message"


def measured_tier(
    analytic: Mapping[str, Any], summary: Mapping[str, Any], node: str, job: str
) -> dict[str, Any]:
    """`status.tiers.<tier>` from a profiling Job's summary."""
    idle_ms = summary.get("idleMs")
    idle = "" if idle_ms is None else f", each after {idle_ms:g} ms idle"
    return {
        **analytic,
        "totalMs": round(float(summary["totalMs"]), 3),
        "source": "measured",
        "node": node,
        "hostGflops": float(summary["hostGflops"]),
        "job": job,
        "jobResult": "measured",
        "message": f"measured by Job {job} on node {node} ({summary.get('repeats')} repeats{idle})",
    }


def with_measurement(
    profile: Mapping[str, Any], tier: str, summary: Mapping[str, Any], node: str
) -> dict[str, Any]:
    """The profile with `measuredTiers.<tier>` (what planning reads) set."""
    out = dict(profile)
    out["measuredTiers"] = {
        **(profile.get("measuredTiers") or {}),
        tier: {
            "node": node,
            "hostGflops": float(summary["hostGflops"]),
            "segmentsMs": [float(t) for t in summary["segmentsMs"]],
            # the fixed per-request costs of serving there, when the Job measured them
            **{key: float(summary[key]) for key in OVERHEAD_KEYS if summary.get(key) is not None},
        },
    }
    return out


def profiled_condition(tiers: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
    """(reason, message) of the `Profiled` condition once Jobs have reported: which
    tiers are measured and which keep the analytic estimate."""
    measured = sorted(t for t, v in tiers.items() if v.get("source") == "measured")
    analytic = sorted(t for t in tiers if t not in measured)
    if not measured:
        reason = "AnalyticEstimate"
    elif analytic:
        reason = "PartlyMeasured"
    else:
        reason = "Measured"
    parts = [f"{t} {float(tiers[t].get('totalMs') or 0):.2f} ms measured" for t in measured]
    parts += [f"{t} {float(tiers[t].get('totalMs') or 0):.2f} ms analytic" for t in analytic]
    return reason, ", ".join(parts)
