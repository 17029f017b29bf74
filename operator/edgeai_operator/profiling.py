"""DNNModel status: the model's cut points and per-segment costs, per-tier estimates
and its variants' accuracy and size.

The graph profile (cuts, tensor sizes, FLOPs per segment) comes from the ONNX graph
itself. Per-tier latency is FLOPs / the tier's effective GFLOPS (`edgeai.dev/gflops`
of the tier's median node, measured annotations win), i.e. the analytic estimate;
the source of every number is recorded in status so a user can tell.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from edgeai_operator import TIERS
from edgeai_operator.errors import SpecError
from edgeai_operator.problem import OVERHEAD_KEYS, analytic_profile
from edgeai_operator.topology import NodeSpec

# spec.variants[] kind -> the variant builder's name (edgeai_worker.variants)
_VARIANT_BUILDERS = {
    ("quantize", "dynamic"): "int8-dynamic",
    ("quantize", "static"): "int8-static",
    ("prune", None): "pruned-50",
    ("distill", None): "distilled",
}


def zoo_name(spec: Mapping[str, Any]) -> str:
    source = spec.get("source") or {}
    if "zoo" in source:
        return str(source["zoo"])
    raise SpecError(
        "spec.source.onnx",
        "ONNX sources are not profiled by this operator version",
        "spec.source.zoo with a zoo model name",
    )


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


def variant_builder(variant: Mapping[str, Any]) -> str:
    name = str(variant.get("name", "?"))
    if "quantize" in variant:
        mode = (variant["quantize"] or {}).get("mode")
        return _VARIANT_BUILDERS[("quantize", mode)]
    if "prune" in variant:
        sparsity = float((variant["prune"] or {}).get("sparsity", 0.5))
        if abs(sparsity - 0.5) > 1e-9:
            raise SpecError(
                f"spec.variants[{name}].prune.sparsity",
                f"{sparsity:g} is not built by this operator version",
                "0.5",
            )
        return _VARIANT_BUILDERS[("prune", None)]
    if "distill" in variant:
        return _VARIANT_BUILDERS[("distill", None)]
    return "fp32"


def variant_report(model: str, variant: Mapping[str, Any]) -> dict[str, Any]:
    """Accuracy (held-out digits) and size of one variant, or why it is unavailable."""
    name = str(variant.get("name"))
    try:
        builder = variant_builder(variant)
    except SpecError as exc:
        return {"name": name, "ready": False, "message": str(exc)}
    if model != "digits_cnn" and builder != "fp32":
        return {
            "name": name,
            "kind": builder,
            "ready": False,
            "message": f"{builder} variants are built for digits_cnn (it has labelled data)",
        }
    from edgeai_worker import variants, zoo

    path = (
        zoo.export_onnx(model, trained=model == "digits_cnn")
        if builder == "fp32"
        else variants.variant_path(model, builder)
    )
    report: dict[str, Any] = {
        "name": name,
        "kind": builder,
        "ready": True,
        "sizeBytes": path.stat().st_size,
    }
    if model == "digits_cnn":
        report["accuracy"] = round(variants.onnx_accuracy(path), 4)
    return report


def model_status(spec: Mapping[str, Any], nodes: Sequence[NodeSpec]) -> dict[str, Any]:
    model = zoo_name(spec)
    profile = analytic_profile(model)
    declared = spec.get("variants") or []
    reports = [variant_report(model, {"name": "fp32"})]
    reports += [variant_report(model, v) for v in declared if v.get("name") != "fp32"]
    fp32 = reports[0]
    if fp32.get("accuracy") is not None:
        profile["accuracy"] = fp32["accuracy"]
    return {
        "cuts": len(profile["cuts"]),
        "flops": sum(int(s["flops"]) for s in profile["segments"]),
        "tiers": tier_estimates(profile, nodes),
        "profiles": [profile],
        "variants": reports,
        "variantNames": ",".join(r["name"] for r in reports if r.get("ready")),
    }


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
DEFAULT_TIMEOUT_S = 300


def profile_tiers(spec: Mapping[str, Any], nodes: Sequence[NodeSpec]) -> list[str]:
    """`spec.profile.tiers`, or every tier that has nodes, in tier order."""
    wanted = (spec.get("profile") or {}).get("tiers")
    if wanted:
        return [t for t in TIERS if t in wanted]
    return [t for t in TIERS if any(n.tier == t for n in nodes)]


def profile_job_name(model: str, tier: str, generation: int | None) -> str:
    return f"{model}-profile-{tier}-{generation or 0}"


def profile_job(model: Mapping[str, Any], tier: str, node: str, *, image: str) -> dict[str, Any]:
    """The Job that profiles DNNModel `model` (its body) on `node`, a node of `tier`."""
    meta, spec = model["metadata"], model.get("spec") or {}
    profile = spec.get("profile") or {}
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
            "ownerReferences": [
                {
                    "apiVersion": str(model.get("apiVersion", "edgeai.dev/v1alpha1")),
                    "kind": "DNNModel",
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": int(profile.get("timeoutSeconds", DEFAULT_TIMEOUT_S)),
            "template": {
                "metadata": {"labels": lbls},
                "spec": {
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
                                zoo_name(spec),
                                f"--repeats={int(profile.get('repeats', 20))}",
                                f"--idle-ms={int(profile.get('idleMs', 100))}",
                                "-o",
                                "json",
                                "--termination-log",
                            ],
                            "terminationMessagePath": "/dev/termination-log",
                            "terminationMessagePolicy": "File",
                        }
                    ],
                },
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
    conditions = (job.get("status") or {}).get("conditions") or []
    done = {c.get("type"): c for c in conditions if c.get("status") == "True"}
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
