"""`edgeai profile` and `edgeai plan`: measure a model, then plan its partitions for
a DNNDeployment on a topology, offline.

Tier compute times come from one of two sources (`--compute`):

- `measured` (the default when a profile is given or `--compute measured`): each
  segment's median onnxruntime time on this machine, scaled by
  `host GFLOPS / tier GFLOPS`. The host's GFLOPS is measured with an fp32
  onnxruntime MatMul (see `edgeai_worker.profiler.host_gflops`), the same kind of
  number the topology declares per node group (`gflops`).
- `analytic` (the default without a profile): FLOPs per segment / tier GFLOPS.

Links come from the topology: the device tier's `uplinkMbps`/`uplinkRttMs` for the
hop to the next tier, the edge tier's for the hop to the cloud. Within a zone the
slowest device and its link bound the plan; a server tier counts at its fastest node.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from edgeai_operator import TIERS
from edgeai_operator.deployspec import DeploymentSpec, load_deployment
from edgeai_operator.errors import SpecError, read_yaml_documents
from edgeai_operator.planner import (
    LayerGraph,
    Link,
    Plan,
    PowerModel,
    Problem,
    Tensor,
    Variant,
    plan_partitions,
)
from edgeai_operator.topology import NodeSpec, Topology, load_topology

DEFAULT_TOPOLOGY = Path(__file__).resolve().parents[2] / "hack" / "topology.yaml"


# ---------------------------------------------------------------------------
# edgeai profile


def _zoo_names() -> tuple[str, ...]:
    from edgeai_worker import zoo

    return zoo.ZOO_NAMES


def _model_path(model: str, variant: str) -> Path:
    from edgeai_worker import zoo

    if model.endswith(".onnx"):
        path = Path(model)
        if not path.is_file():
            raise SpecError("MODEL", f"no such file {model}", "a zoo name or an .onnx file")
        if variant != "fp32":
            raise SpecError("--variant", "variants are built for zoo models only", "fp32")
        return path
    if model not in zoo.ZOO_NAMES:
        raise SpecError(
            "MODEL",
            f"unknown model {model!r}",
            ", ".join(zoo.ZOO_NAMES) + " or a path to an .onnx file",
        )
    if variant == "fp32":
        return zoo.export_onnx(model, trained=model == "digits_cnn")
    from edgeai_worker import variants

    if variant not in variants.VARIANT_NAMES:
        raise SpecError(
            "--variant", f"unknown variant {variant!r}", ", ".join(variants.VARIANT_NAMES)
        )
    return variants.variant_path(model, variant)


def profile_command(args: argparse.Namespace) -> int:
    from edgeai_worker import profiler

    if args.repeats < 1:
        raise SpecError(
            "--repeats", f"must be a positive integer, got {args.repeats}", "an integer >= 1"
        )
    path = _model_path(args.model, args.variant)
    name = Path(args.model).stem if args.model.endswith(".onnx") else args.model
    if args.serving_requests < 0:
        raise SpecError(
            "--serving-requests",
            f"must not be negative, got {args.serving_requests}",
            "an integer >= 0 (0 skips the measurement)",
        )
    idle_ms = profiler.IDLE_MS if args.idle_ms is None else args.idle_ms
    if not 0 <= idle_ms <= profiler.MAX_IDLE_MS:
        bound = f"0-{profiler.MAX_IDLE_MS}"
        raise SpecError(
            "--idle-ms", f"must be in {bound}, got {args.idle_ms:g}", f"milliseconds, {bound}"
        )
    profile = profiler.profile_model(
        path,
        name=name,
        variant=args.variant,
        repeats=args.repeats,
        threads=args.threads,
        idle_ms=idle_ms,
    )
    if args.serving_requests:
        overheads = profiler.serving_overheads(
            profile["input"]["shape"],
            requests=args.serving_requests,
            threads=args.threads,
            model=path,
        )
        profile.update({key: round(ms, 4) for key, ms in overheads.items()})
    if name == "digits_cnn":
        from edgeai_worker import variants

        profile["accuracy"] = round(variants.onnx_accuracy(path), 4)
    text = (
        json.dumps(profile, indent=2)
        if args.output == "json"
        else yaml.safe_dump(profile, sort_keys=False)
    )
    if args.save:
        Path(args.save).write_text(text)
    if args.termination_log:
        Path(args.termination_log).write_text(termination_summary(profile))
    print(text, end="" if text.endswith("\n") else "\n")
    return 0


TERMINATION_LOG = "/dev/termination-log"
# a profile's serving and forwarding overheads, fixed and per 10^6 bytes
# `Problem` field -> the profile/plan key of each per-request overhead
OVERHEAD_FIELDS = {
    "serving_ms": "servingMs",
    "serving_ms_per_mb": "servingMsPerMB",
    "forwarding_ms": "forwardingMs",
    "forwarding_ms_per_mb": "forwardingMsPerMB",
}
OVERHEAD_KEYS = tuple(OVERHEAD_FIELDS.values())
TERMINATION_LIMIT = 4096  # bytes Kubernetes keeps of a container's termination message


def termination_summary(profile: dict[str, Any]) -> str:
    """A compact JSON summary of a profile for a container's termination message
    (Kubernetes keeps at most 4096 bytes): model, variant, repeats, host GFLOPS,
    totalMs, the per-segment measuredMs list, and the serving and forwarding overheads
    (`OVERHEAD_KEYS`) when measured. Precision drops until it fits."""
    for digits in (4, 3, 2, 1, 0):
        summary = {
            "kind": "ProfileSummary",
            "model": profile["model"],
            "variant": profile.get("variant", "fp32"),
            "repeats": profile.get("repeats"),
            "idleMs": profile.get("idleMs"),
            "hostGflops": profile["host"]["gflops"],
            "totalMs": round(float(profile["totalMs"]), 4),
            "segmentsMs": [round(float(s["measuredMs"]), digits) for s in profile["segments"]],
        }
        for key in OVERHEAD_KEYS:
            if profile.get(key) is not None:
                summary[key] = round(float(profile[key]), 4)
        text = json.dumps(summary, separators=(",", ":"))
        if len(text.encode()) < TERMINATION_LIMIT:
            return text
    raise SpecError(
        "--termination-log",
        f"{len(profile['segments'])} segments do not fit in {TERMINATION_LIMIT} bytes",
    )


# ---------------------------------------------------------------------------
# edgeai plan


def load_profile(path: str) -> dict[str, Any]:
    docs = read_yaml_documents(path, "--profile")
    data = docs[0] if len(docs) == 1 else None
    if not isinstance(data, dict) or data.get("kind") != "Profile":
        raise SpecError("--profile", f"{path} is not a profile", "the output of edgeai profile")
    for key in ("model", "cuts", "segments", "host", "input"):
        if key not in data:
            raise SpecError(
                f"--profile {path}: {key}", "is missing", "the output of edgeai profile"
            )
    if len(data["cuts"]) != len(data["segments"]) + 1:
        raise SpecError(f"--profile {path}: cuts", "must be one more than segments")
    return data


def analytic_profile(model: str) -> dict[str, Any]:
    """A profile without measurements: cuts, sizes and FLOPs from the ONNX graph."""
    import onnx

    from edgeai_worker import graph, zoo

    dag = graph.analyze(onnx.load(_model_path(model, "fp32")))
    cuts = graph.graph_cut_points(dag)
    _, shape, dtype = zoo.input_spec(model)
    return {
        "kind": "Profile",
        "model": model,
        "variant": "fp32",
        "input": {"name": "input", "shape": list(shape), "dtype": dtype},
        "host": {},
        "cuts": [
            {
                "index": c.index,
                "tensors": list(c.tensors),
                "sizeBytes": c.size_bytes,
                "position": c.position,
            }
            for c in cuts
        ],
        "segments": [
            {
                "index": i,
                "positions": f"{a.position}-{b.position - 1}",
                "flops": sum(n.flops for n in dag.nodes[a.position : b.position]),
            }
            for i, (a, b) in enumerate(itertools.pairwise(cuts))
        ],
    }


def _tier_nodes(topology: Topology, tier: str, zone: str | None) -> list[NodeSpec]:
    nodes = topology.by_tier(tier)
    if zone is not None:
        in_zone = [n for n in nodes if n.zone in (zone, None)]
        nodes = in_zone or nodes
    return nodes


def network(
    topology: Topology, zone: str | None
) -> tuple[dict[str, float], tuple[str, ...], tuple[Link, ...], float | None]:
    """(GFLOPS per tier, tier path, links, device watts) for one zone."""
    zones = topology.zones()
    if zone is not None and zone not in zones:
        raise SpecError("--zone", f"unknown zone {zone!r}", ", ".join(zones) or "none")
    zone = zone or (zones[0] if zones else None)
    gflops: dict[str, float] = {}
    representative: dict[str, NodeSpec] = {}
    for tier in TIERS:
        nodes = _tier_nodes(topology, tier, zone)
        if not nodes:
            continue
        # the slowest device bounds the SLO; a server tier runs on its fastest node
        node = (
            min(nodes, key=lambda n: n.gflops)
            if tier == "device"
            else max(nodes, key=lambda n: n.gflops)
        )
        representative[tier] = node
        gflops[tier] = node.gflops
    if "device" not in representative:
        raise SpecError("--topology", "has no device tier", "a nodeGroup with tier: device")
    path = tuple(t for t in TIERS if t in representative)
    links: list[Link] = []
    for low in path[:-1]:
        node = representative[low]
        if low == "device":
            devices = _tier_nodes(topology, "device", zone)
            mbps = min((n.uplink_mbps for n in devices if n.uplink_mbps), default=None)
            rtt = max((n.uplink_rtt_ms or 0.0 for n in devices), default=0.0)
        else:
            mbps, rtt = node.uplink_mbps, node.uplink_rtt_ms or 0.0
        if mbps is None:
            suffix = f"-{node.zone}-" if node.zone else "-"
            if suffix in node.name:  # a node of a topology file's group
                group = node.name[: node.name.rindex(suffix)]
                field = f"nodeGroups[{group}].uplinkMbps"
            else:  # a live node named otherwise
                field = f"node {node.name} annotation edgeai.dev/uplink-mbps"
            raise SpecError(
                field,
                "is required for planning",
                "the uplink bandwidth in Mbps to the next tier up",
            )
        links.append(Link(mbps, rtt))
    return gflops, path, tuple(links), representative["device"].power_watts


def _host_ms(
    profile: dict[str, Any], gflops: float, method: str, measured: list[float], flops: list[int]
) -> list[float]:
    if method == "measured":
        return [ms * float(profile["host"]["gflops"]) / gflops for ms in measured]
    return [f / (gflops * 1e6) for f in flops]


def profile_graph(profile: dict[str, Any], gflops: dict[str, float], method: str) -> LayerGraph:
    """A chain over the profile's segments (between single-tensor cuts)."""
    segments = profile["segments"]
    measured = [float(s.get("measuredMs", 0.0)) for s in segments]
    flops = [int(s["flops"]) for s in segments]
    node_ms = {t: _host_ms(profile, g, method, measured, flops) for t, g in gflops.items()}
    cuts = profile["cuts"]
    return LayerGraph.chain(
        node_ms, [int(c["sizeBytes"]) for c in cuts], [tuple(c["tensors"]) for c in cuts]
    )


def node_graph(profile: dict[str, Any], gflops: dict[str, float], method: str) -> LayerGraph:
    """The full DAG of compute nodes (for DADS-style cuts through residual blocks). A
    measured segment's time is shared among its nodes in proportion to their FLOPs."""
    import onnx

    from edgeai_worker import graph

    model = str(profile["model"])
    if model not in _zoo_names():
        raise SpecError(
            "--granularity",
            f"nodes needs a zoo model, got {model!r}",
            "segments, or a profile of a zoo model",
        )
    dag = graph.analyze(onnx.load(_model_path(model, str(profile.get("variant", "fp32")))))
    flops = [n.flops for n in dag.nodes]
    measured = [0.0] * len(dag.nodes)
    if method == "measured":
        for segment in profile["segments"]:
            low, high = (int(x) for x in str(segment["positions"]).split("-"))
            share = flops[low : high + 1]
            total = sum(share)
            for i in range(low, high + 1):
                weight = flops[i] / total if total else 1.0 / (high - low + 1)
                measured[i] = float(segment["measuredMs"]) * weight
    node_ms = {t: _host_ms(profile, g, method, measured, flops) for t, g in gflops.items()}
    producer = dag.producer()
    readers: dict[str, list[int]] = {}
    for node in dag.nodes:
        for name in node.inputs:
            readers.setdefault(name, []).append(node.index)
    names = [*dag.inputs, *(t for n in dag.nodes for t in n.outputs)]
    tensors = tuple(
        Tensor(
            (name,),
            dag.tensors[name].size_bytes,
            producer.get(name, -1),
            tuple(readers.get(name, ())),
            name in dag.outputs,
        )
        for name in names
    )
    return LayerGraph(
        {t: tuple(ms) for t, ms in node_ms.items()}, tensors, tuple(n.name for n in dag.nodes)
    )


def overheads_ms(
    profiles: list[dict[str, Any]], gflops: dict[str, float]
) -> dict[str, dict[str, float]]:
    """Each tier's per-request serving and forwarding overheads, as the `Problem` fields
    `serving_ms`, `serving_ms_per_mb`, `forwarding_ms`, `forwarding_ms_per_mb`: a
    profile's measured `servingMs`, `servingMsPerMB`, `forwardingMs` and
    `forwardingMsPerMB` (see `edgeai_worker.profiler`; absent ones are 0) scaled like
    compute, host GFLOPS over the tier's. Empty (no overhead) when no profile measured
    `servingMs`."""
    for profile in profiles:
        host = (profile.get("host") or {}).get("gflops")
        if profile.get("servingMs") is not None and host:
            scale = {t: float(host) / g for t, g in gflops.items()}
            return {
                name: {t: float(profile.get(key) or 0.0) * r for t, r in scale.items()}
                for name, key in OVERHEAD_FIELDS.items()
            }
    return {name: {} for name in OVERHEAD_FIELDS}


def build_problem(
    spec: DeploymentSpec,
    profiles: list[dict[str, Any]],
    topology: Topology,
    *,
    zone: str | None,
    method: str,
    granularity: str = "segments",
) -> tuple[Problem, dict[str, Any]]:
    gflops, path, links, device_watts = network(topology, zone)
    variants = []
    for profile in profiles:
        if method == "measured" and not profile["host"].get("gflops"):
            raise SpecError(
                "--compute",
                "measured needs a measured profile",
                "--profile FILE from edgeai profile, or --compute analytic",
            )
        build = node_graph if granularity == "nodes" else profile_graph
        graph = build(profile, gflops, method)
        accuracy = profile.get("accuracy")
        variants.append(
            Variant(
                str(profile.get("variant", "fp32")),
                graph,
                float(accuracy) if accuracy is not None else None,
            )
        )
    if spec.variant is not None:
        variants = [v for v in variants if v.name == spec.variant]
        if not variants:
            raise SpecError(
                "spec.model.variant",
                f"no profile for variant {spec.variant!r}",
                ", ".join(str(p.get("variant")) for p in profiles),
            )
    overheads = overheads_ms(profiles, gflops)
    allowed = frozenset(spec.tiers) & frozenset(path)
    if not allowed:
        raise SpecError(
            "spec.placement.tiers",
            f"none of {list(spec.tiers)} is in the topology",
            ", ".join(path),
        )
    power = PowerModel(
        compute_w=spec.compute_watts or device_watts or 4.0,
        tx_w=spec.tx_watts,
        rx_w=spec.rx_watts,
        idle_w=spec.idle_watts,
    )
    problem = Problem(
        variants=tuple(variants),
        path=path,
        links=links,
        allowed=allowed,
        objective=spec.objective,
        slo_latency_ms=spec.slo_latency_ms,
        slo_throughput_rps=spec.slo_throughput_rps,
        raw_input_stays_on_device=spec.raw_input_stays_on_device,
        min_accuracy=spec.min_accuracy,
        power=power,
        cost_per_ms={"edge": spec.edge_cost_per_ms, "cloud": spec.cloud_cost_per_ms},
        serving_ms=overheads["serving_ms"],
        serving_ms_per_mb=overheads["serving_ms_per_mb"],
        forwarding_ms=overheads["forwarding_ms"],
        forwarding_ms_per_mb=overheads["forwarding_ms_per_mb"],
    )
    context = {
        "tiers": {
            t: {
                "gflops": g,
                "totalMs": round(sum(variants[0].graph.node_ms[t]), 4),
                **{
                    key: round(overheads[name][t], 4)
                    for name, key in OVERHEAD_FIELDS.items()
                    if t in overheads[name]
                },
            }
            for t, g in gflops.items()
        },
        "links": [
            {"from": a, "to": b, "mbps": link.mbps, "rttMs": link.rtt_ms}
            for a, b, link in zip(path, path[1:], links, strict=False)
        ],
    }
    return problem, context


def _binary(problem: Problem) -> Plan:
    """Binary offloading: the whole model on the single best tier."""
    best: Plan | None = None
    infeasible: list[str] = []
    for tier in problem.path:
        if tier not in problem.allowed:
            continue
        candidate = plan_partitions(replace(problem, allowed=frozenset({tier})), alternatives=False)
        if not candidate.feasible:
            infeasible.append(f"{tier}: {candidate.reason}")
        elif best is None or (candidate.objective_value, candidate.predicted_latency_ms) < (
            best.objective_value,
            best.predicted_latency_ms,
        ):
            best = candidate
    if best is None:
        return Plan(feasible=False, reason="; ".join(infeasible), objective=problem.objective)
    return best


def plan_document(
    spec: DeploymentSpec,
    profiles: list[dict[str, Any]],
    plan: Plan,
    context: dict[str, Any],
    method: str,
) -> dict[str, Any]:
    profile = next((p for p in profiles if p.get("variant") == plan.variant), profiles[0])
    body = plan.to_dict()
    doc: dict[str, Any] = {
        "kind": "Plan",
        "deployment": spec.name,
        "model": {
            "zoo": profile["model"],
            "variant": plan.variant or profile.get("variant"),
            "input": dict(profile["input"]),
        },
        "objective": plan.objective,
        "feasible": plan.feasible,
        "reason": plan.reason,
        "predictedLatencyMs": body["predictedLatencyMs"],
        "objectiveValue": body["objectiveValue"],
        "deviceEnergyMj": body["deviceEnergyMj"],
        "cloudCost": body["cloudCost"],
        "slo": spec.slo_dict(),
        "stages": body["stages"],
        "transfers": body["transfers"],
        "servingMs": body["servingMs"],
        "alternatives": body["alternatives"] if spec.adaptive_split else [],
        "privacy": {
            "rawInputStaysOnDevice": spec.raw_input_stays_on_device,
            "featureNoiseStd": spec.feature_noise_std,
        },
        "compute": {
            "method": method,
            "hostGflops": profile["host"].get("gflops") if method == "measured" else None,
        },
        "solver": body["solver"],
        **context,
    }
    return doc


def render_table(doc: dict[str, Any]) -> str:
    lines = [
        f"deployment {doc['deployment']}: model {doc['model']['zoo']} "
        f"variant {doc['model']['variant']}, objective {doc['objective']}, "
        f"compute {doc['compute']['method']}"
    ]
    tiers = ", ".join(f"{t} {v['gflops']:g} GFLOPS" for t, v in doc["tiers"].items())
    links = ", ".join(
        f"{x['from']}->{x['to']} {x['mbps']:g} Mbps/{x['rttMs']:g} ms" for x in doc["links"]
    )
    lines.append(f"tiers: {tiers}; links: {links}")
    if not doc["feasible"]:
        lines.append(f"INFEASIBLE: {doc['reason']}")
        return "\n".join(lines) + "\n"
    rows = [("STAGE", "TIER", "LAYERS", "INPUT", "OUTPUT", "COMPUTE(ms)")]
    for s in doc["stages"]:
        rows.append(
            (
                str(s["index"]),
                s["tier"],
                s["layers"],
                ",".join(s["inputs"]),
                ",".join(s["outputs"]),
                f"{s['computeMs']:.3f}",
            )
        )
    for t in doc["transfers"]:
        rows.append(
            (
                "",
                f"{t['from']}->{t['to']}",
                "",
                f"{t['bytes']} B up",
                f"{t['returnBytes']} B back",
                f"{t['ms']:.3f}",
            )
        )
    for tier, ms in doc.get("servingMs", {}).items():
        rows.append(("", tier, "serving", "", "", f"{ms:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    slo = doc["slo"].get("latencyP95Ms")
    lines.append(
        f"predicted latency {doc['predictedLatencyMs']:.3f} ms"
        + (f" (SLO {slo:g} ms)" if slo is not None else "")
        + f", device energy {doc['deviceEnergyMj']:.2f} mJ,"
        f" cloud cost {doc['cloudCost']:.3f}"
    )
    if doc["alternatives"]:
        lines.append("adaptive split (device uplink):")
        for a in doc["alternatives"]:
            high = "inf" if a["maxMbps"] is None else f"{a['maxMbps']:g}"
            where = " + ".join(f"{s['tier']}[{s['layers']}]" for s in a["stages"])
            lines.append(
                f"  {a['minMbps']:g}-{high} Mbps: {where}  "
                f"{a['predictedLatencyMs']:.2f} ms at {a['atMbps']:g} Mbps"
                + ("" if a.get("meetsSlo", True) else " (misses the SLO)")
            )
    return "\n".join(lines) + "\n"


def _resolve_model(spec: DeploymentSpec, profiles: list[dict[str, Any]]) -> str:
    if profiles:
        names = {str(p["model"]) for p in profiles}
        if len(names) > 1:
            raise SpecError(
                "--profile",
                f"profiles of different models {sorted(names)}",
                "profiles of one model (one per variant)",
            )
        return names.pop()
    if spec.zoo:
        if spec.zoo not in _zoo_names():
            raise SpecError(
                "spec.model.zoo", f"unknown zoo model {spec.zoo!r}", ", ".join(_zoo_names())
            )
        return spec.zoo
    assert spec.model_ref is not None
    candidate = spec.model_ref.replace("-", "_")
    if candidate in _zoo_names():
        return candidate
    raise SpecError(
        "spec.modelRef.name",
        f"DNNModel {spec.model_ref!r} cannot be resolved offline",
        "a name matching a zoo model (mobilenet-v2), spec.model.zoo, or --profile",
    )


def plan_command(args: argparse.Namespace) -> int:
    spec = load_deployment(args.file)
    topology = load_topology(args.topology)
    profiles = [load_profile(p) for p in args.profile or []]
    model = _resolve_model(spec, profiles)
    method = args.compute
    if method == "auto":
        method = "measured" if profiles else "analytic"
    if not profiles:
        if method == "measured":
            from edgeai_worker import profiler

            profiles = [profiler.profile_model(_model_path(model, "fp32"), name=model, repeats=10)]
        else:
            profiles = [analytic_profile(model)]
    problem, context = build_problem(
        spec, profiles, topology, zone=args.zone, method=method, granularity=args.granularity
    )
    context["granularity"] = args.granularity
    if spec.partitioning == "binary":
        plan = _binary(problem)
    else:
        plan = plan_partitions(problem, alternatives=spec.adaptive_split)
    doc = plan_document(spec, profiles, plan, context, method)
    if args.output == "yaml":
        sys.stdout.write(yaml.safe_dump(doc, sort_keys=False))
    elif args.output == "json":
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        sys.stdout.write(render_table(doc))
    if args.save:
        Path(args.save).write_text(yaml.safe_dump(doc, sort_keys=False))
    return 0 if plan.feasible else 1


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    profile = subparsers.add_parser(
        "profile", help="measure a model's per-segment latency, cut sizes and FLOPs"
    )
    profile.add_argument("model", metavar="MODEL", help="a zoo model name or an .onnx file")
    profile.add_argument("--variant", default="fp32", help="fp32 or a compressed variant")
    profile.add_argument("--repeats", type=int, default=20, help="timed runs per segment")
    profile.add_argument("--threads", type=int, default=None, help="onnxruntime threads")
    profile.add_argument(
        "--idle-ms",
        type=float,
        default=None,
        help="idleness before each timed run, as a request finds a stage that is not "
        "saturated (default 100; 0 times runs back to back)",
    )
    profile.add_argument(
        "--serving-requests",
        type=int,
        default=60,
        help="requests through a worker to measure the fixed per-request serving and "
        "forwarding overheads (servingMs, forwardingMs); 0 skips them",
    )
    profile.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml")
    profile.add_argument("--save", metavar="FILE", help="also write the profile to FILE")
    profile.add_argument(
        "--termination-log",
        metavar="PATH",
        nargs="?",
        const=TERMINATION_LOG,
        default=None,
        help="also write a compact JSON summary (< 4096 bytes) to PATH, "
        f"default {TERMINATION_LOG} (the container's termination message)",
    )
    profile.set_defaults(func=profile_command)

    plan = subparsers.add_parser(
        "plan", help="plan a DNNDeployment's partitions over a topology (offline)"
    )
    plan.add_argument("-f", "--file", required=True, help="a DNNDeployment manifest")
    plan.add_argument("--topology", default=str(DEFAULT_TOPOLOGY), help="a topology file")
    plan.add_argument(
        "--profile", action="append", help="a profile from edgeai profile (repeat once per variant)"
    )
    plan.add_argument(
        "--compute",
        choices=("auto", "measured", "analytic"),
        default="auto",
        help="tier compute from measured profiles or from FLOPs",
    )
    plan.add_argument("--zone", default=None, help="the zone whose devices to plan for")
    plan.add_argument(
        "--granularity",
        choices=("segments", "nodes"),
        default="segments",
        help="plan over segments between single-tensor cuts (chain, exact DP) "
        "or over every ONNX node (DAG, min-cut); layers then count nodes",
    )
    plan.add_argument("-o", "--output", choices=("table", "yaml", "json"), default="table")
    plan.add_argument("--save", metavar="FILE", help="also write the plan YAML to FILE")
    plan.set_defaults(func=plan_command)
