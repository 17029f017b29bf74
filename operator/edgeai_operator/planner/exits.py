"""Planning a chain with early exits (or a cascade's small model as exit 0): the cost of
a split is a mix over where inputs leave, weighted by the exit shares measured on
validation data, and the SLO holds at the p95 of that mix, not at its mean.

An `Exit` reads the output of chain segment `after`; its head runs on that segment's
tier for every input that gets there and answers a `share` of all inputs (shares are
unconditional: exit k answers share_k of the stream; the rest, 1 - sum, reach the
model's output). For one assignment of segments to tiers there is one outcome per exit
and one for the output: the request runs segments 0..after (with the heads of the exits
it passes) and the answer, `logits_bytes` long, returns from that tier. Each outcome is
costed by `model.evaluate` on the truncated chain (`evaluate_with_exits`, the
reference), so every rule of the cost model (RTT, serving and forwarding overheads,
the power model) applies as for a whole model.

`solve_with_exits` finds the best split over the cut positions in closed form (prefix
sums, one pass per cut vector) and is checked against `brute_force_with_exits` (every
monotone assignment judged by the reference) on random instances.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edgeai_operator.planner.brute import monotone_assignments
from edgeai_operator.planner.model import (
    Evaluation,
    LayerGraph,
    Problem,
    Weights,
    evaluate,
    feasible,
    weights,
)

P95 = 0.95


@dataclass(frozen=True)
class Exit:
    after: int  # the chain segment whose output the head reads
    share: float  # fraction of all inputs this exit answers (validation data)
    head_ms: Mapping[str, float]  # the head's compute per tier
    logits_bytes: int


@dataclass(frozen=True)
class ExitEvaluation:
    tiers: tuple[int, ...]
    outcomes: tuple[tuple[float, float, float, int], ...]  # (share, ms, mJ, uplink bytes)
    mean_latency_ms: float
    p95_latency_ms: float
    device_energy_mj: float  # expected per request
    uplink_bytes: float  # expected per request, hop 0 up
    cloud_cost: float

    def value(self, objective: str) -> float:
        return {
            "latency": self.mean_latency_ms,
            "deviceEnergy": self.device_energy_mj,
            "cloudCost": self.cloud_cost,
        }[objective]


def check_exits(graph: LayerGraph, exits: Sequence[Exit]) -> None:
    if not graph.is_chain:
        raise ValueError("exits are planned on chains")
    if [e.after for e in exits] != sorted({e.after for e in exits}):
        raise ValueError("exits must be in chain order, one per segment")
    if any(not 0 <= e.after < graph.size - 1 for e in exits):
        raise ValueError(f"an exit must follow one of segments 0..{graph.size - 2}")
    if any(e.share < 0 for e in exits) or sum(e.share for e in exits) > 1 + 1e-9:
        raise ValueError("exit shares must be >= 0 and sum to at most 1")


def p95(outcomes: Sequence[tuple[float, float]]) -> float:
    """The 95th percentile of a discrete mix of (share, latency): the smallest latency
    at or below which at least 95 % of requests finish."""
    seen = 0.0
    for share, ms in sorted(outcomes, key=lambda o: o[1]):
        seen += share
        if seen >= P95 - 1e-12:
            return ms
    return max(ms for _, ms in outcomes)


def _truncated(graph: LayerGraph, exits: Sequence[Exit], k: int | None) -> LayerGraph:
    """The chain a request leaving at exit `k` (None: the output) runs."""
    last = graph.size - 1 if k is None else exits[k].after
    passed = exits if k is None else exits[: k + 1]
    ms = {t: list(v[: last + 1]) for t, v in graph.node_ms.items()}
    for e in passed:
        for t in ms:
            ms[t][e.after] += float(e.head_ms.get(t, 0.0))
    cut_bytes = [graph.tensors[i].size_bytes for i in range(last + 1)]
    out = graph.tensors[-1].size_bytes if k is None else exits[k].logits_bytes
    return LayerGraph.chain(ms, [*cut_bytes, out])


def _mix(tiers: Sequence[int], parts: Sequence[tuple[float, Evaluation]]) -> ExitEvaluation:
    rows = tuple((s, ev.latency_ms, ev.device_energy_mj, ev.up_bytes[0] if ev.up_bytes else 0)
                 for s, ev in parts)  # fmt: skip
    return ExitEvaluation(
        tuple(tiers),
        rows,
        sum(s * ms for s, ms, _, _ in rows),
        p95([(s, ms) for s, ms, _, _ in rows]),
        sum(s * mj for s, _, mj, _ in rows),
        sum(s * b for s, _, _, b in rows),
        sum(s * ev.cloud_cost for s, ev in parts),
    )


def evaluate_with_exits(
    problem: Problem, graph: LayerGraph, exits: Sequence[Exit], tiers: Sequence[int]
) -> ExitEvaluation:
    """The reference: each outcome costed by `evaluate` on its truncated chain."""
    parts = [
        (e.share, evaluate(problem, _truncated(graph, exits, k), tiers[: e.after + 1]))
        for k, e in enumerate(exits)
    ]
    rest = 1.0 - sum(e.share for e in exits)
    parts.append((rest, evaluate(problem, _truncated(graph, exits, None), tiers)))
    return _mix(tiers, parts)


def _ok(problem: Problem, graph: LayerGraph, tiers: Sequence[int], ev: ExitEvaluation) -> bool:
    """Placement and privacy as `feasible` says (its SLO check off: the SLO holds at
    the mix's p95 here), and throughput on the whole path."""
    plain = Problem(
        problem.variants, problem.path, problem.links, problem.allowed, problem.objective,
        None, None, problem.raw_input_stays_on_device,
    )  # fmt: skip
    if not feasible(plain, graph, evaluate(plain, graph, tiers)):
        return False
    return problem.slo_latency_ms is None or ev.p95_latency_ms <= problem.slo_latency_ms + 1e-9


def _better(a: ExitEvaluation, b: ExitEvaluation | None, objective: str) -> bool:
    return b is None or (a.value(objective), a.p95_latency_ms) < (
        b.value(objective),
        b.p95_latency_ms,
    )


def brute_force_with_exits(
    problem: Problem, graph: LayerGraph, exits: Sequence[Exit]
) -> ExitEvaluation | None:
    """Every monotone assignment, judged by the reference."""
    check_exits(graph, exits)
    best: ExitEvaluation | None = None
    for tiers in monotone_assignments(graph, len(problem.path)):
        ev = evaluate_with_exits(problem, graph, exits, tiers)
        if _ok(problem, graph, tiers, ev) and _better(ev, best, problem.objective):
            best = ev
    return best


def _closed_form(
    problem: Problem, graph: LayerGraph, exits: Sequence[Exit], tiers: Sequence[int]
) -> ExitEvaluation:
    """The same costs as the reference, from prefix sums of the chain."""
    path, hops = problem.path, len(problem.path) - 1
    n = graph.size
    w_energy = weights(problem, "deviceEnergy")
    w_cost = weights(problem, "cloudCost")
    ends = [(e.share, e.after, e.logits_bytes, exits[: i + 1]) for i, e in enumerate(exits)]
    ends.append((1.0 - sum(e.share for e in exits), n - 1, graph.tensors[-1].size_bytes, exits))
    parts: list[tuple[float, float, float, int, float]] = []
    raw = graph.tensors[0].size_bytes
    for share, last, out_bytes, passed in ends:
        compute = [0.0] * len(path)
        for v in range(last + 1):
            k = tiers[v]
            compute[k] += graph.node_ms[path[k]][v] + _head(passed, v, path[k])
        top = tiers[last]
        up = [0] * hops
        for k in range(top):
            first_above = next(v for v in range(last + 1) if tiers[v] > k)
            up[k] = graph.tensors[first_above].size_bytes
        used = [k < top for k in range(hops)]
        up_ms = [up[k] * problem.links[k].ms_per_byte() if used[k] else 0.0 for k in range(hops)]
        down_ms = [
            out_bytes * problem.links[k].ms_per_byte() if used[k] else 0.0 for k in range(hops)
        ]
        rtt = [problem.links[k].rtt_ms if used[k] else 0.0 for k in range(hops)]
        serving = [0.0] * len(path)
        serving[0] = problem.serving(0) + problem.serving_per_byte(0) * raw
        for k in range(hops):
            if used[k]:
                serving[k + 1] += problem.serving(k + 1) + problem.serving_per_byte(k + 1) * up[k]
                serving[k] += problem.forwarding(k) + problem.forwarding_per_byte(k) * up[k]
        busy = [c + s for c, s in zip(compute, serving, strict=True)]
        latency = sum(busy) + sum(up_ms) + sum(down_ms) + sum(rtt)

        energy = _weighted(w_energy, busy, up_ms, down_ms, rtt)
        cost = _weighted(w_cost, busy, up_ms, down_ms, rtt)
        parts.append((share, latency, energy, up[0] if hops else 0, cost))
    rows = tuple((s, ms, mj, b) for s, ms, mj, b, _ in parts)
    return ExitEvaluation(
        tuple(tiers),
        rows,
        sum(s * ms for s, ms, _, _ in rows),
        p95([(s, ms) for s, ms, _, _ in rows]),
        sum(s * mj for s, _, mj, _ in rows),
        sum(s * b for s, _, _, b in rows),
        sum(s * c for s, _, _, _, c in parts),
    )


def _weighted(
    w: Weights,
    busy: Sequence[float],
    up_ms: Sequence[float],
    down_ms: Sequence[float],
    rtt: Sequence[float],
) -> float:
    total = sum(a * b for a, b in zip(w.compute, busy, strict=True))
    for k in range(len(up_ms)):
        total += w.up[k] * up_ms[k] + w.down[k] * down_ms[k] + w.rtt[k] * rtt[k]
    return total


def _head(exits: Sequence[Exit], v: int, tier: str) -> float:
    return sum(float(e.head_ms.get(tier, 0.0)) for e in exits if e.after == v)


def solve_with_exits(
    problem: Problem, graph: LayerGraph, exits: Sequence[Exit]
) -> ExitEvaluation | None:
    """The best split of a chain with exits: every vector of cut positions (a chain's
    monotone assignments are exactly these), costed in closed form."""
    check_exits(graph, exits)
    n, tiers_on_path = graph.size, len(problem.path)
    best: ExitEvaluation | None = None
    for cuts in itertools.combinations_with_replacement(range(n + 1), tiers_on_path - 1):
        bounds = [0, *cuts, n]
        tiers = [k for k in range(tiers_on_path) for _ in range(bounds[k], bounds[k + 1])]
        ev = _closed_form(problem, graph, exits, tiers)
        if _ok(problem, graph, tiers, ev) and _better(ev, best, problem.objective):
            best = ev
    return best
