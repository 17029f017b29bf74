"""The planning problem of a DNNDeployment, and its plan as a `PlanDocument`.

Shared by `edgeai plan` (offline, a topology file) and the operator (live nodes,
`planning.plan_zones`):

- profiles: `load_profile` reads `edgeai profile` output, `analytic_profile` derives
  cuts, sizes and FLOPs from the ONNX graph alone, `termination_summary` is the
  compact form a profiling Job reports;
- `network` reads tier compute and links of one zone from a `Topology`;
- `build_problem` turns a `DeploymentSpec`, profiles and a topology into the
  planner's `Problem`: tier compute from measured profiles (scaled by host GFLOPS
  over the tier's) or from FLOPs, and per-request serving/forwarding overheads;
- `solve` plans it as `spec.placement.partitioning` says (`binary_offloading` for no
  partitioning: the whole model on the single best tier);
- `plan_document` describes the result as the `PlanDocument` stages and tools read.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgeai_operator import TIERS
from edgeai_operator.deployspec import DeploymentSpec
from edgeai_operator.errors import SpecError, read_yaml_documents
from edgeai_operator.plandoc import (
    ModelIdentity,
    PlanAlternative,
    PlanArtefact,
    PlanDocument,
    PlanExit,
    PlanLink,
    PlanOffload,
    PlanReuseData,
    PlanStage,
    PlanTransfer,
    TensorSpec,
)
from edgeai_operator.planner import (
    Evaluation,
    LayerGraph,
    Link,
    Plan,
    PowerModel,
    Problem,
    Solution,
    Tensor,
    Variant,
    evaluate,
    feasible,
    plan_partitions,
)
from edgeai_operator.planner.plan import describe
from edgeai_operator.topology import NodeSpec, Topology


def zoo_names() -> tuple[str, ...]:
    from edgeai_worker import zoo

    return zoo.ZOO_NAMES


def model_path(model: str, variant: str) -> Path:
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
    from edgeai_worker import zoo

    _, shape, dtype = zoo.input_spec(model)
    return graph_profile(
        model_path(model, "fp32"),
        model=model,
        variant="fp32",
        input_spec={"name": "input", "shape": list(shape), "dtype": dtype},
    )


def graph_profile(
    path: Path,
    *,
    model: str,
    variant: str,
    input_spec: Mapping[str, Any],
    inputs: Sequence[Mapping[str, Any]] = (),
    feeds: Mapping[str, Any] | None = None,
    check_segments: bool = False,
) -> dict[str, Any]:
    """The profile of the ONNX file at `path`: its cuts with their bytes at the input
    shapes `inputs` declare (default: `input_spec` alone; free dimensions they do not
    fix follow `graph.concrete_input_shapes`), and the FLOPs of each segment between
    two cuts (nothing timed; `feeds`, arrays by input name, are what the sizes onnx
    cannot infer are measured on). With `check_segments`, every segment is also cut
    and loaded in onnxruntime on its own. Raises `graph.GraphError` for a graph it
    cannot profile or partition."""
    import onnx

    from edgeai_worker import graph

    declared = list(inputs) or [input_spec]
    shapes = {str(i["name"]): [int(d) for d in i["shape"]] for i in declared}
    loaded = onnx.load(path)
    dag = graph.analyze(loaded, shapes, feeds)
    cuts = graph.graph_cut_points(dag)
    if check_segments:
        graph.segment_models(loaded, dag, cuts, _onnxruntime_session)
    return {
        "kind": "Profile",
        "model": model,
        "variant": variant,
        "input": dict(input_spec),
        **({"inputs": [dict(i) for i in declared]} if len(declared) > 1 else {}),
        **({"held": [h.to_dict() for h in dag.held]} if dag.held else {}),
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


def _onnxruntime_session(model: Any) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failure is reported as a GraphError
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


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
    """A chain over the profile's segments (between the cuts of `graph.cut_points`)."""
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
    if model not in zoo_names():
        raise SpecError(
            "--granularity",
            f"nodes needs a zoo model, got {model!r}",
            "segments, or a profile of a zoo model",
        )
    dag = graph.analyze(onnx.load(model_path(model, str(profile.get("variant", "fp32")))))
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
    if spec.homomorphic_head:
        variants = he_head_variants(variants, profiles, gflops)
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


# --- the homomorphic head (spec.privacy.homomorphicHead, edgeai_worker.he) ------------

HE_FIELD = "spec.privacy.homomorphicHead"
# what bench/privacy measured for the head on ciphertexts (`--only he` writes it)
HE_COST_FILE = Path(__file__).with_name("he_cost.json")


@functools.cache
def he_cost_table() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(HE_COST_FILE.read_text())
    return data


def he_head_cost(inputs: int, outputs: int) -> dict[str, Any]:
    """The measured cost of a dense head of `inputs` x `outputs` values on ciphertexts:
    encryptMs, evaluateMs, decryptMs (on a host of the table's hostGflops), upBytes,
    downBytes per sample."""
    table = he_cost_table()
    for head in table["heads"]:
        if (int(head["inputs"]), int(head["outputs"])) == (inputs, outputs):
            return dict(head)
    known = ", ".join(f"{h['inputs']} -> {h['outputs']}" for h in table["heads"])
    raise SpecError(
        HE_FIELD,
        f"the model's last segment reads {inputs} and writes {outputs} values, and the "
        f"homomorphic head's cost is measured for dense heads of {known} values only",
        "a model whose last layer is a dense layer of a measured shape (the zoo's digits_cnn)",
    )


def he_head_variants(
    variants: Sequence[Variant], profiles: Sequence[Mapping[str, Any]], gflops: Mapping[str, float]
) -> list[Variant]:
    """The fp32 variant with its last segment priced as the homomorphic head: that
    segment on a tier above the device costs the measured evaluation, the device pays
    encryption and decryption with its last segment before it, and the head's input and
    output cross the links as ciphertexts (all scaled like measured compute, host
    GFLOPS over the tier's)."""
    fp32 = [v for v in variants if v.name == "fp32"]
    if not fp32:
        raise SpecError(
            HE_FIELD,
            f"is planned for the fp32 variant, and the plan may use only "
            f"{', '.join(v.name for v in variants)}",
            "spec.model.variant fp32 or unset",
        )
    (variant,) = fp32
    graph = variant.graph
    n = graph.size
    if not graph.is_chain or n < 2:
        raise SpecError(
            HE_FIELD,
            "needs a chain of at least two segments, the last one the dense head",
            "a chain model such as digits_cnn (spec.placement granularity segments)",
        )
    head_in, head_out = graph.tensors[n - 1], graph.tensors[n]
    cost = he_head_cost(head_in.size_bytes // 4, head_out.size_bytes // 4)
    host = float(he_cost_table()["hostGflops"])
    node_ms = {}
    for tier, times in graph.node_ms.items():
        scale = host / gflops[tier]
        ms = list(times)
        if tier == "device":
            ms[n - 2] += (float(cost["encryptMs"]) + float(cost["decryptMs"])) * scale
        else:
            ms[n - 1] = float(cost["evaluateMs"]) * scale
        node_ms[tier] = tuple(ms)
    tensors = (
        *graph.tensors[: n - 1],
        replace(head_in, size_bytes=int(cost["upBytes"])),
        replace(head_out, size_bytes=int(cost["downBytes"])),
    )
    return [replace(variant, graph=LayerGraph(node_ms, tensors, graph.labels))]


def homomorphic_head_plan(problem: Problem) -> Plan:
    """Every segment but the last on the device, the last (the head on ciphertexts) on
    the allowed tier above it that is best for the objective (`he_head_variants` priced
    it)."""
    problem.validate()
    best: Evaluation | None = None
    (variant,) = problem.variants
    graph = variant.graph
    for k in range(1, len(problem.path)):
        if problem.path[k] not in problem.allowed:
            continue
        ev = evaluate(problem, graph, [0] * (graph.size - 1) + [k])
        if feasible(problem, graph, ev) and (
            best is None
            or (ev.value(problem.objective), ev.latency_ms)
            < (best.value(problem.objective), best.latency_ms)
        ):
            best = ev
    if best is None:
        return Plan(
            feasible=False,
            reason=f"no tier above the device meets the SLO with the homomorphic head ({HE_FIELD})",
            objective=problem.objective,
        )
    return describe(problem, variant, Solution(best, "homomorphicHead", True))


def binary_offloading(problem: Problem) -> Plan:
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


def solve(spec: DeploymentSpec, problem: Problem) -> Plan:
    """The plan `spec.placement.partitioning` asks for: split across tiers (`auto`,
    with the adaptive split's alternatives when `adaptiveSplit` is on) or the whole
    model on the single best tier (`none`); with the homomorphic head, the one split
    before the model's last segment."""
    if spec.homomorphic_head:
        return homomorphic_head_plan(problem)
    if spec.partitioning == "none":
        return binary_offloading(problem)
    return plan_partitions(problem, alternatives=spec.adaptive_split)


def _num(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def plan_stages(plan: Plan) -> tuple[PlanStage, ...]:
    """The solver's stages as the plan document carries them."""
    return tuple(
        PlanStage(s.index, s.tier, s.layers, s.inputs, s.outputs, s.variant, round(s.compute_ms, 4))
        for s in plan.stages
    )


def plan_alternatives(plan: Plan) -> tuple[PlanAlternative, ...]:
    """The solver's adaptive-split bands as the plan document carries them."""
    return tuple(
        PlanAlternative(
            a.min_mbps,
            a.max_mbps,
            a.cut_index,
            a.stages,
            round(a.predicted_latency_ms, 4),
            a.at_mbps,
            a.meets_slo,
        )
        for a in plan.alternatives
    )


def offload_section(profiles: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The calibration a profile carries (`offload`), if any."""
    return next((p["offload"] for p in profiles if p.get("offload")), None)


def declared_exits(
    spec: DeploymentSpec, profiles: Sequence[Mapping[str, Any]]
) -> tuple[tuple[PlanExit, ...], str | None]:
    """The exits the model declares (its profile's `offload` section has `finalOutput`)
    with thresholds for `spec.offload.exits`, and the model's final output; none for
    the digits heads (grafted by the stages) and without `spec.offload.exits`."""
    section = offload_section(profiles)
    offload = spec.offload
    if section is None or "finalOutput" not in section:
        return (), None
    if offload is None or offload.exits_rule is None:
        return (), None
    from edgeai_worker.offload.exits import section_calibration

    found = section_calibration(section, offload.exits_rule, offload.exits_target_accuracy or 0.0)
    exits = tuple(
        PlanExit(str(e["output"]), str(e["after"]), threshold)
        for e, threshold in zip(section["exits"], found.exit_thresholds, strict=True)
    )
    return exits, str(section["finalOutput"])


def zoo_calibration(profiles: Sequence[Mapping[str, Any]]) -> str | None:
    """The zoo model whose prebuilt calibration the model's offload uses: digits_cnn for
    a prepared copy of it (its profile's cascade names no stored small models); None
    otherwise."""
    section = offload_section(profiles)
    cascade = (section or {}).get("cascade")
    return "digits_cnn" if cascade is not None and "models" not in cascade else None


def cascade_models(
    spec: DeploymentSpec, profiles: Sequence[Mapping[str, Any]]
) -> tuple[tuple[PlanArtefact, ...], float | None, str | None]:
    """With `spec.offload.cascade` on a user's model, its stored small models (those the
    rule runs: the first, both for disagreement), the threshold calibrated for the
    target on its profile's tables and the model's final output; none for digits_cnn
    (its stages read the prebuilt small models)."""
    offload = spec.offload
    section = offload_section(profiles)
    if offload is None or offload.cascade_rule is None or section is None:
        return (), None, None
    stored = section.get("cascade", {}).get("models")
    if not stored:
        return (), None, None
    from edgeai_worker.offload.exits import section_calibration

    found = section_calibration(section, offload.cascade_rule, offload.target_accuracy or 0.0)
    used = stored[:2] if offload.cascade_rule == "disagreement" else stored[:1]
    models = tuple(PlanArtefact(str(m["uri"]), str(m["digest"])) for m in used)
    return models, found.cascade_threshold, str(section["finalOutput"])


def reuse_data(spec: DeploymentSpec, profiles: Sequence[Mapping[str, Any]]) -> PlanReuseData | None:
    """With `spec.offload.reuse`, the labelled rows a user's model's preparation stored
    for calibrating it (a profile's `reuseData`); None otherwise (the zoo's digits_cnn
    calibrates on its own held-out digits)."""
    if spec.offload is None or not spec.offload.reuse_entries:
        return None
    found = next((p["reuseData"] for p in profiles if p.get("reuseData")), None)
    if found is None:
        return None
    return PlanReuseData(str(found["uri"]), str(found["digest"]), str(found["finalOutput"]))


def plan_document(
    spec: DeploymentSpec,
    profiles: list[dict[str, Any]],
    plan: Plan,
    context: dict[str, Any],
    method: str,
    *,
    zone: str | None = None,
    granularity: str | None = None,
    measured_on: dict[str, str | None] | None = None,
    exit_shares: Mapping[str, float] | None = None,
) -> PlanDocument:
    """The `PlanDocument` of `plan`: the model as profiled (the planned variant's
    profile; its prepared artefact, uri and digest, when the profile names one, else
    the zoo model), the spec's privacy, preprocessing and priority, and `context` from
    `build_problem` (tiers and links the plan was computed for)."""
    profile = next((p for p in profiles if p.get("variant") == plan.variant), profiles[0])
    tensor = profile["input"]
    build = profile.get("build")
    artifact = profile.get("artifact")
    model = ModelIdentity(
        name=str(profile["model"]),
        zoo=None if artifact else str(profile["model"]),
        path=None,
        # the network the profile and its accuracy came from (model_path: digits
        # trained); an artefact is that network already
        trained=not artifact and profile["model"] == "digits_cnn",
        variant=plan.variant or profile.get("variant"),
        build=None if build is None else str(build),
        input=TensorSpec(
            str(tensor.get("name", "input")),
            tuple(int(d) for d in tensor["shape"]),
            str(tensor.get("dtype", "FP32")),
        ),
        uri=str(artifact["uri"]) if artifact else None,
        digest=str(artifact["digest"]) if artifact else None,
    )
    host = profile["host"].get("gflops") if method == "measured" else None
    exits, final_output = declared_exits(spec, profiles)
    cascade = cascade_models(spec, profiles)
    return PlanDocument(
        deployment=spec.name,
        model=model,
        stages=plan_stages(plan),
        transfers=tuple(
            PlanTransfer(t.from_tier, t.to_tier, t.bytes, t.return_bytes, round(t.ms, 4))
            for t in plan.transfers
        ),
        links=tuple(
            PlanLink(x["from"], x["to"], float(x["mbps"]), float(x["rttMs"]))
            for x in context["links"]
        ),
        serving_ms={t: round(ms, 4) for t, ms in plan.serving_ms.items()},
        predicted_latency_ms=_num(plan.predicted_latency_ms),
        feasible=plan.feasible,
        reason=plan.reason,
        objective=plan.objective,
        zone=zone,
        skip_unchanged_threshold=spec.skip_unchanged_threshold,
        priority=spec.priority,
        raw_input_stays_on_device=spec.raw_input_stays_on_device,
        feature_noise_std=spec.feature_noise_std,
        noise_training=spec.noise_training,
        noise_accuracy_floor=spec.noise_accuracy_floor,
        homomorphic_head=spec.homomorphic_head,
        fallback=spec.fallback,
        fallback_after_ms=float(spec.fallback_after_ms),
        objective_value=_num(plan.objective_value),
        device_energy_mj=_num(plan.device_energy_mj),
        cloud_cost=_num(plan.cloud_cost),
        slo=spec.slo_dict(),
        alternatives=plan_alternatives(plan) if spec.adaptive_split else (),
        compute_method=method,
        host_gflops=None if host is None else float(host),
        measured_on=measured_on,
        solver_method=plan.method,
        solver_exact=plan.exact,
        tiers=context["tiers"],
        granularity=granularity,
        held=tuple(
            f"nodes {h['positions']} ({', '.join(h['tensors'])}): {h['reason']}"
            for h in profile.get("held", [])
        ),
        offload=(
            None
            if spec.offload is None
            else PlanOffload(
                spec.offload.cascade_rule,
                spec.offload.target_accuracy,
                spec.offload.reuse_entries,
                spec.offload.reuse_max_accuracy_loss,
                spec.offload.exits_rule,
                spec.offload.exits_target_accuracy,
                exit_shares or {},
                exits,
                final_output or cascade[2],
                reuse_data(spec, profiles),
                cascade[0],
                cascade[1],
                zoo_calibration(profiles),
            )
        ),
    )
