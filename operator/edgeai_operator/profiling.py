"""DNNModel status: the model's cut points and per-segment costs, per-tier estimates
and its variants' accuracy and size.

The graph profile (cuts, tensor sizes, FLOPs per segment) comes from the ONNX graph
itself. Per-tier latency is FLOPs / the tier's effective GFLOPS (`edgeai.dev/gflops`
of the tier's median node, measured annotations win), i.e. the analytic estimate;
the source of every number is recorded in status so a user can tell.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from edgeai_operator import TIERS
from edgeai_operator.errors import SpecError
from edgeai_operator.plancli import analytic_profile
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
