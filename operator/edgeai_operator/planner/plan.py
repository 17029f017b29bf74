"""From a problem to a plan: pick the variant, solve, describe stages and transfers,
precompute the splits for other uplink bandwidths, explain infeasibility."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from edgeai_operator.planner.model import (
    Evaluation,
    LayerGraph,
    Link,
    Problem,
    Variant,
)
from edgeai_operator.planner.solvers import Solution, key, solve

# uplink bandwidths (Mbps) at which alternative splits are precomputed: 1-2-5 steps
BANDWIDTH_GRID_MBPS = (
    *(round(m * 10.0**e, 6) for e in range(-1, 4) for m in (1, 2, 5)),
    10000.0,
)


@dataclass(frozen=True)
class Stage:
    index: int
    tier: str
    nodes: tuple[int, ...]
    layers: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    variant: str
    compute_ms: float


@dataclass(frozen=True)
class Transfer:
    from_tier: str
    to_tier: str
    bytes: int
    return_bytes: int
    ms: float


@dataclass(frozen=True)
class Alternative:
    min_mbps: float
    max_mbps: float | None
    cut_index: int | None
    stages: tuple[tuple[str, str], ...]  # (tier, layers)
    predicted_latency_ms: float
    at_mbps: float
    meets_slo: bool = True


@dataclass(frozen=True)
class Plan:
    feasible: bool
    reason: str
    objective: str
    variant: str | None = None
    objective_value: float | None = None
    predicted_latency_ms: float | None = None
    device_energy_mj: float | None = None
    cloud_cost: float | None = None
    stages: tuple[Stage, ...] = ()
    transfers: tuple[Transfer, ...] = ()
    alternatives: tuple[Alternative, ...] = ()
    method: str = ""
    exact: bool = True
    assignment: tuple[int, ...] = field(default=(), repr=False)
    # tier -> fixed overhead paid per request (serving, and forwarding where the tier
    # forwards), for the tiers the request passes through that have one
    serving_ms: Mapping[str, float] = field(default_factory=dict)


def layer_ranges(nodes: Sequence[int]) -> str:
    """`[0, 1, 2, 5, 7, 8]` -> `"0-2,5,7-8"`."""
    parts: list[str] = []
    run: list[int] = []
    for v in sorted(nodes):
        if run and v == run[-1] + 1:
            run.append(v)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [v]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def _crossing(graph: LayerGraph, tiers: Sequence[int], k: int) -> tuple[str, ...]:
    """Tensor names leaving tiers <= k (the inputs for k = -1)."""
    names: list[str] = []
    for t in graph.tensors:
        src = 0 if t.producer < 0 else tiers[t.producer]
        if t.producer >= 0 and src > k:
            continue
        above = any(tiers[c] > k for c in t.consumers) or (
            t.is_output and k < max(tiers, default=0)
        )
        if k < 0 and t.producer < 0:
            above = True
        if above:
            names.extend(n for n in t.names if n not in names)
    return tuple(names)


def _outputs(graph: LayerGraph) -> tuple[str, ...]:
    return tuple(n for t in graph.tensors if t.is_output for n in t.names)


def describe(problem: Problem, variant: Variant, solution: Solution) -> Plan:
    ev = solution.evaluation
    graph = variant.graph
    tiers = ev.tiers
    stages: list[Stage] = []
    top = max(tiers, default=0)
    for k, tier in enumerate(problem.path):
        nodes = tuple(v for v, t in enumerate(tiers) if t == k)
        if not nodes:
            continue
        inputs = (
            _crossing(graph, tiers, k - 1)
            if k > 0
            else tuple(n for t in graph.tensors if t.producer < 0 for n in t.names)
        )
        outputs = _outputs(graph) if k == top else _crossing(graph, tiers, k)
        stages.append(
            Stage(
                len(stages),
                tier,
                nodes,
                layer_ranges(nodes),
                inputs,
                outputs,
                variant.name,
                ev.compute_ms[k],
            )
        )
    transfers = tuple(
        Transfer(
            problem.path[k], problem.path[k + 1], ev.up_bytes[k], ev.down_bytes[k], ev.hop_ms[k]
        )
        for k in range(len(problem.path) - 1)
        if ev.hop_used[k]
    )
    return Plan(
        feasible=True,
        reason="",
        objective=problem.objective,
        variant=variant.name,
        objective_value=ev.value(problem.objective),
        predicted_latency_ms=ev.latency_ms,
        device_energy_mj=ev.device_energy_mj,
        cloud_cost=ev.cloud_cost,
        stages=tuple(stages),
        transfers=transfers,
        method=solution.method,
        exact=solution.exact,
        assignment=tiers,
        serving_ms={t: ms for t, ms in zip(problem.path, ev.serving_ms, strict=True) if ms > 0},
    )


def candidate_variants(problem: Problem) -> list[Variant]:
    if problem.min_accuracy is None:
        return list(problem.variants)
    return [
        v for v in problem.variants if v.accuracy is not None and v.accuracy >= problem.min_accuracy
    ]


def best_solution(problem: Problem) -> tuple[Variant, Solution] | None:
    best: tuple[Variant, Solution] | None = None
    for variant in candidate_variants(problem):
        found = solve(problem, variant.graph)
        if found is None:
            continue
        if best is None or key(problem, found.evaluation) < key(problem, best[1].evaluation):
            best = (variant, found)
    return best


def _reason(problem: Problem) -> str:
    variants = candidate_variants(problem)
    if not variants:
        known = [f"{v.name}={v.accuracy:.3f}" for v in problem.variants if v.accuracy is not None]
        return (
            f"no variant reaches the accuracy floor {problem.min_accuracy} "
            f"(spec.slo.minAccuracy; measured: {', '.join(known) or 'none'})"
        )
    allowed = [t for t in problem.path if t in problem.allowed]
    if problem.raw_input_stays_on_device and "device" not in problem.allowed:
        return "rawInputStaysOnDevice needs the device tier in the allowed tiers"
    relaxed = replace(problem, objective="latency", slo_latency_ms=None, slo_throughput_rps=None)
    fastest = best_solution(relaxed)
    if fastest is None:
        return f"no placement on the allowed tiers {allowed} respects the constraints"
    variant, solution = fastest
    ev = solution.evaluation
    if problem.slo_latency_ms is not None and ev.latency_ms > problem.slo_latency_ms:
        split = describe(relaxed, variant, solution)
        where = " + ".join(f"{s.tier}[{s.layers}]" for s in split.stages)
        return (
            f"SLO latencyP95Ms={problem.slo_latency_ms:g} cannot be met: the fastest "
            f"placement ({variant.name}: {where}) takes {ev.latency_ms:.2f} ms"
        )
    if problem.slo_throughput_rps is not None:
        return (
            f"SLO throughputRps={problem.slo_throughput_rps:g} cannot be met together "
            f"with the latency SLO: the device stage would be busy longer than "
            f"{1000.0 / problem.slo_throughput_rps:.2f} ms per request"
        )
    return "no feasible placement"


_Sample = tuple[float, Evaluation, Variant, bool]  # mbps, plan, variant, meets the SLO
REFINE_STEPS = 10  # bisections per band edge: edges within 0.1 % of the crossover


def _sample(problem: Problem, mbps: float) -> _Sample | None:
    """The plan at one uplink bandwidth; where the SLO cannot be met there, the fastest
    plan (the device still has to pick something)."""
    at = replace(problem, links=(Link(mbps, problem.links[0].rtt_ms), *problem.links[1:]))
    best = best_solution(at)
    if best is not None:
        return mbps, best[1].evaluation, best[0], True
    relaxed = replace(at, objective="latency", slo_latency_ms=None, slo_throughput_rps=None)
    best = best_solution(relaxed)
    return None if best is None else (mbps, best[1].evaluation, best[0], False)


def _same(a: _Sample, b: _Sample) -> bool:
    return a[1].tiers == b[1].tiers and a[2] is b[2]


def _refine(problem: Problem, low: _Sample, high: _Sample, steps: int) -> list[_Sample]:
    """Samples strictly between two that differ, bisecting (in log space) towards each
    change of plan."""
    if steps == 0:
        return []
    mid = _sample(problem, math.sqrt(low[0] * high[0]))
    if mid is None:
        return []
    if _same(mid, low):
        return [mid, *_refine(problem, mid, high, steps - 1)]
    if _same(mid, high):
        return [*_refine(problem, low, mid, steps - 1), mid]
    return [*_refine(problem, low, mid, steps - 1), mid, *_refine(problem, mid, high, steps - 1)]


def _alternatives(problem: Problem) -> tuple[Alternative, ...]:
    if len(problem.path) < 2:
        return ()
    grid = [x for x in (_sample(problem, m) for m in BANDWIDTH_GRID_MBPS) if x is not None]
    samples: list[_Sample] = []
    for item in grid:
        if samples and not _same(samples[-1], item):
            samples.extend(_refine(problem, samples[-1], item, REFINE_STEPS))
        samples.append(item)
    bands: list[list[_Sample]] = []
    for item in samples:
        if bands and _same(bands[-1][-1], item):
            bands[-1].append(item)
        else:
            bands.append([item])
    alternatives: list[Alternative] = []
    for i, band in enumerate(bands):
        lo = 0.0 if i == 0 else math.sqrt(bands[i - 1][-1][0] * band[0][0])
        hi = None if i == len(bands) - 1 else math.sqrt(band[-1][0] * bands[i + 1][0][0])
        centre = math.sqrt((lo or band[0][0]) * (hi or band[-1][0]))
        mbps, ev, variant, _ = min(band, key=lambda x: abs(math.log(x[0] / centre)))
        groups: dict[int, list[int]] = {}
        for v, k in enumerate(ev.tiers):
            groups.setdefault(k, []).append(v)
        stages = tuple(
            (problem.path[k], layer_ranges(nodes)) for k, nodes in sorted(groups.items())
        )
        cut = len(groups.get(0, [])) if variant.graph.is_chain else None
        alternatives.append(
            Alternative(
                round(lo, 4),
                None if hi is None else round(hi, 4),
                cut,
                stages,
                ev.latency_ms,
                round(mbps, 4),
                all(x[3] for x in band),
            )
        )
    return tuple(alternatives)


def plan_partitions(problem: Problem, *, alternatives: bool = True) -> Plan:
    """The optimal plan for `problem` (see the package docstring for the model)."""
    problem.validate()
    best = best_solution(problem)
    if best is None:
        return Plan(feasible=False, reason=_reason(problem), objective=problem.objective)
    plan = describe(problem, *best)
    if alternatives:
        plan = replace(plan, alternatives=_alternatives(problem))
    return plan
