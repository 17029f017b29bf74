"""Exact solvers for one model variant: they return the assignment of nodes to tiers
that minimises (objective, latency) lexicographically under the problem's
constraints, or None when no assignment is feasible.

- `chain_dp`: chains, no SLO-vs-objective trade-off. DP over (cut, tier): tier `k`
  ends at cut `c`; with prefix sums the transition is a running minimum, O(n x tiers).
- `mincut`: DAGs, same case. A layered s-t min-cut (DADS for two tiers; for three,
  one copy of the DAG per hop with infinite edges keeping the ideals nested, as in
  Ishikawa's multi-label construction). A tensor read by several nodes above a hop
  is sent once (an auxiliary node) and costs its bytes at the hop's cost per byte
  (transfer, and the per-byte forwarding and serving overheads on either side); the
  hop's fixed cost (RTT, forwarding overhead below, serving overhead above), paid
  once if anything runs above it, is an OR node with infinite edges to that copy of
  the DAG. Exact.
- `enumerate_ideals`: anything with a latency SLO on another objective or a
  throughput floor (a constrained min-cut is NP-hard in general). Enumerates the
  downward-closed node sets (prefixes for a chain; few for DNN-shaped DAGs) and all
  nested tuples of them, vectorised with numpy. Above `MAX_IDEALS` it falls back to
  a Lagrangian sweep of min-cuts, which is marked not exact.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np

from edgeai_operator.planner.maxflow import INF, FlowNetwork
from edgeai_operator.planner.model import (
    Evaluation,
    LayerGraph,
    Problem,
    Weights,
    evaluate,
    feasible,
    weights,
)

MAX_IDEALS = 4096
# Ties on the objective go to the lower latency. The graph solvers fold latency in
# with this small weight; the DP and the enumeration compare pairs exactly.
TIE_EPS = 1e-7


@dataclass(frozen=True)
class Solution:
    evaluation: Evaluation
    method: str
    exact: bool


def key(problem: Problem, ev: Evaluation) -> tuple[float, float]:
    return ev.value(problem.objective), ev.latency_ms


def constrained(problem: Problem) -> bool:
    """Whether the SLO can conflict with the objective (then the fast solvers are not
    enough on their own)."""
    return problem.slo_throughput_rps is not None or (
        problem.slo_latency_ms is not None and problem.objective != "latency"
    )


def _allowed_indices(problem: Problem) -> list[bool]:
    return [t in problem.allowed for t in problem.path]


def _input_consumers(graph: LayerGraph) -> set[int]:
    return {c for t in graph.tensors if t.producer < 0 for c in t.consumers}


# ---------------------------------------------------------------------------
# chains


def chain_dp(problem: Problem, graph: LayerGraph) -> Evaluation | None:
    n = graph.size
    path = problem.path
    tiers = len(path)
    allowed = _allowed_indices(problem)
    wo, wl = weights(problem, problem.objective), weights(problem, "latency")
    sizes = [t.size_bytes for t in graph.tensors]
    out = sizes[n]
    prefix = []
    for tier in path:
        ms = graph.node_ms.get(tier, (0.0,) * n)
        prefix.append(list(itertools.accumulate(ms, initial=0.0)))

    def hop(k: int, c: int, w: Weights) -> float:
        if c >= n:
            return 0.0
        mpb = problem.links[k].ms_per_byte()
        return (
            sizes[c] * problem.hop_byte_cost(k, w)
            + w.down[k] * out * mpb
            + problem.fixed_hop_cost(k, w)
        )

    inf = (INF, INF)
    # best[k][c]: cost of running nodes [0, c) on tiers <= k; choice[k][c]: where tier k began
    best: list[list[tuple[float, float]]] = []
    choice: list[list[int]] = []
    first_ok = [allowed[0] or c == 0 for c in range(n + 1)]
    if problem.raw_input_stays_on_device and n > 0:
        first_ok[0] = False
    device_serving = problem.device_serving(graph)  # paid by every assignment
    best.append(
        [
            (
                wo.compute[0] * (prefix[0][c] + device_serving),
                wl.compute[0] * (prefix[0][c] + device_serving),
            )
            if first_ok[c]
            else inf
            for c in range(n + 1)
        ]
    )
    choice.append([0] * (n + 1))
    for k in range(1, tiers):
        prev = best[k - 1]
        row: list[tuple[float, float]] = []
        picks: list[int] = []
        run: tuple[float, float] = inf
        run_at = -1
        for c in range(n + 1):
            if prev[c][0] < INF:
                g = (
                    prev[c][0] + hop(k - 1, c, wo) - wo.compute[k] * prefix[k][c],
                    prev[c][1] + hop(k - 1, c, wl) - wl.compute[k] * prefix[k][c],
                )
                if not allowed[k]:
                    run, run_at = g, c  # tier k empty: it must start where it ends
                elif g < run:
                    run, run_at = g, c
            elif not allowed[k]:
                run, run_at = inf, -1
            if run_at < 0 or run[0] == INF:
                row.append(inf)
            else:
                row.append(
                    (run[0] + wo.compute[k] * prefix[k][c], run[1] + wl.compute[k] * prefix[k][c])
                )
            picks.append(run_at)
        best.append(row)
        choice.append(picks)
    if best[-1][n][0] == INF:
        return None
    assignment = [0] * n
    c = n
    for k in range(tiers - 1, 0, -1):
        start = choice[k][c]
        for v in range(start, c):
            assignment[v] = k
        c = start
    return evaluate(problem, graph, assignment)


# ---------------------------------------------------------------------------
# DAGs by min-cut


def _combined(a: Weights, b: Weights, factor: float) -> Weights:
    def mix(x: tuple[float, ...], y: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(p + factor * q for p, q in zip(x, y, strict=True))

    return Weights(
        mix(a.compute, b.compute), mix(a.up, b.up), mix(a.down, b.down), mix(a.rtt, b.rtt)
    )


def _mincut_assignment(problem: Problem, graph: LayerGraph, w: Weights) -> list[int] | None:
    """One s-t min-cut over `hops` copies of the DAG; copy k's source side is I_k."""
    n = graph.size
    hops = len(problem.path) - 1
    allowed = _allowed_indices(problem)
    raw = _input_consumers(graph) if problem.raw_input_stays_on_device else set()
    net = FlowNetwork(2 + hops * n)
    s, t = 0, 1
    add = net.add_edge

    def node(k: int, v: int) -> int:
        return 2 + k * n + v

    for v in range(n):

        def unary(j: int, v: int = v) -> float:
            if not allowed[j] or (j > 0 and v in raw):
                return INF
            return w.compute[j] * graph.node_ms[problem.path[j]][v]

        # s -> (hops-1, v) -> ... -> (0, v) -> t; the edge cut is the one of v's tier
        add(s, node(hops - 1, v), unary(hops))
        for j in range(1, hops):
            add(node(j, v), node(j - 1, v), unary(j))
            add(node(j - 1, v), node(j, v), INF)  # I_{j-1} within I_j
        add(node(0, v), t, unary(0))
    for k in range(hops):
        mpb = problem.links[k].ms_per_byte()
        per_byte = problem.hop_byte_cost(k, w)
        # the RTT and the overheads of forwarding and serving are paid once if anything
        # runs above tier k: an OR node
        fixed = problem.fixed_hop_cost(k, w)
        if fixed > 0:
            any_above = net.add_node()
            add(s, any_above, fixed)
            for v in range(n):
                add(any_above, node(k, v), INF)
        for tensor in graph.tensors:
            src = s if tensor.producer < 0 else node(k, tensor.producer)
            up = tensor.size_bytes * per_byte
            consumers = [node(k, c) for c in tensor.consumers]
            if tensor.producer >= 0:
                for c in consumers:
                    add(c, src, INF)  # a consumer below its producer is forbidden
            if len(consumers) == 1:
                add(src, consumers[0], up)
            elif consumers:
                aux = net.add_node()  # sent once however many consumers are above
                add(src, aux, up)
                for c in consumers:
                    add(aux, c, INF)
            if tensor.is_output and tensor.producer >= 0:
                add(s, src, w.down[k] * tensor.size_bytes * mpb)
    value, side = net.min_cut(s, t)
    if value == INF:
        return None
    return [next((k for k in range(hops) if side[node(k, v)]), hops) for v in range(n)]


def mincut(problem: Problem, graph: LayerGraph, w: Weights | None = None) -> Evaluation | None:
    if w is None:
        w = _combined(weights(problem, problem.objective), weights(problem, "latency"), TIE_EPS)
    if graph.size == 0 or len(problem.path) == 1:
        assignment: list[int] | None = [0] * graph.size
    else:
        assignment = _mincut_assignment(problem, graph, w)
    if assignment is None:
        return None
    ev = evaluate(problem, graph, assignment)
    return ev if _hard_ok(problem, graph, ev) else None


def _hard_ok(problem: Problem, graph: LayerGraph, ev: Evaluation) -> bool:
    """The constraints that are not about the SLO (tiers, direction, privacy)."""
    return feasible(replace(problem, slo_latency_ms=None, slo_throughput_rps=None), graph, ev)


# ---------------------------------------------------------------------------
# constrained: enumeration of ideals


def ideals(graph: LayerGraph, limit: int = MAX_IDEALS) -> np.ndarray | None:
    """Membership matrix (ideals x nodes) of every downward-closed node set, or None
    if there are more than `limit`."""
    if graph.is_chain:
        return np.tri(graph.size + 1, graph.size, -1, dtype=bool)
    return dag_ideals(graph, limit)


def dag_ideals(graph: LayerGraph, limit: int = MAX_IDEALS) -> np.ndarray | None:
    """`ideals` for any DAG, grown breadth-first from the empty set."""
    n = graph.size
    preds = graph.predecessors
    pred_masks = [sum(1 << p for p in ps) for ps in preds]
    seen = {0}
    frontier = [0]
    while frontier:
        nxt: list[int] = []
        for ideal in frontier:
            for v in range(n):
                bit = 1 << v
                if not ideal & bit and pred_masks[v] & ~ideal == 0:
                    grown = ideal | bit
                    if grown not in seen:
                        seen.add(grown)
                        nxt.append(grown)
                        if len(seen) > limit:
                            return None
        frontier = nxt
    ordered = sorted(seen, key=lambda m: (m.bit_count(), m))
    return np.array([[(m >> v) & 1 for v in range(n)] for m in ordered], dtype=bool).reshape(
        len(ordered), n
    )


def enumerate_ideals(problem: Problem, graph: LayerGraph, members: np.ndarray) -> Evaluation | None:
    n = graph.size
    path = problem.path
    tiers = len(path)
    allowed = _allowed_indices(problem)
    m = members.shape[0]
    full: np.ndarray = np.asarray(members.all(axis=1))
    empty: np.ndarray = np.asarray(~members.any(axis=1))
    ms = [np.asarray(graph.node_ms.get(t, (0.0,) * n), dtype=float) for t in path]
    sums = [members @ x if n else np.zeros(m) for x in ms]
    totals = [float(x.sum()) for x in ms]
    up_bytes = np.zeros(m)
    down_bytes = np.zeros(m)
    raw_ok: np.ndarray = np.ones(m, dtype=bool)
    for tensor in graph.tensors:
        made = np.ones(m, dtype=bool) if tensor.producer < 0 else members[:, tensor.producer]
        if tensor.consumers:
            needed_above = ~members[:, list(tensor.consumers)].all(axis=1)
            up_bytes += tensor.size_bytes * (made & needed_above)
            if tensor.producer < 0 and problem.raw_input_stays_on_device:
                raw_ok &= ~needed_above
        if tensor.is_output:
            down_bytes += tensor.size_bytes * ~made
    # candidate tuples (I_0 within I_1 within ...), one index array per hop
    if tiers == 1:
        idx: list[np.ndarray] = []
    elif tiers == 2:
        idx = [np.arange(m)]
    else:
        inside = members.astype(np.int32) @ (~members).astype(np.int32).T == 0
        a, b = np.nonzero(inside)
        idx = [a, b]
    count = len(idx[0]) if idx else 1
    ok = np.ones(count, dtype=bool)
    compute = []
    for k in range(tiers):
        low = sums[k][idx[k - 1]] if k > 0 else np.zeros(count)
        high = sums[k][idx[k]] if k < tiers - 1 else np.full(count, totals[k])
        compute.append(high - low)
        if not allowed[k]:
            if tiers == 1:
                ok &= n == 0
            elif k == 0:
                ok &= empty[idx[0]]
            elif k < tiers - 1:
                ok &= idx[k] == idx[k - 1]
            else:
                ok &= full[idx[k - 1]]
    up_ms, down_ms, rtt_ms = [], [], []
    serving = [np.full(count, problem.device_serving(graph))]
    for k in range(tiers - 1):
        used = ~full[idx[k]]
        mpb = problem.links[k].ms_per_byte()
        up_ms.append(up_bytes[idx[k]] * mpb * used)
        down_ms.append(down_bytes[idx[k]] * mpb * used)
        rtt_ms.append(problem.links[k].rtt_ms * used)
        sent = up_bytes[idx[k]]
        serving[k] = (
            serving[k] + (problem.forwarding(k) + problem.forwarding_per_byte(k) * sent) * used
        )
        serving.append((problem.serving(k + 1) + problem.serving_per_byte(k + 1) * sent) * used)
    if problem.raw_input_stays_on_device and tiers > 1 and n:
        ok &= raw_ok[idx[0]]

    def total(w: Weights) -> np.ndarray:
        out = sum((w.compute[k] * (compute[k] + serving[k]) for k in range(tiers)), np.zeros(count))
        for k in range(tiers - 1):
            out = out + w.up[k] * up_ms[k] + w.down[k] * down_ms[k] + w.rtt[k] * rtt_ms[k]
        return out

    latency = total(weights(problem, "latency"))
    objective = total(weights(problem, problem.objective))
    if problem.slo_latency_ms is not None:
        ok &= latency <= problem.slo_latency_ms + 1e-9
    if problem.slo_throughput_rps is not None:
        busy = np.maximum(compute[0] + serving[0], up_ms[0] if up_ms else 0.0)
        ok &= busy <= 1000.0 / problem.slo_throughput_rps + 1e-9
    candidates = np.nonzero(ok)[0]
    if not len(candidates):
        return None
    order = np.lexsort((latency[candidates], objective[candidates]))
    pick = int(candidates[order[0]])
    assignment = np.zeros(n, dtype=int)
    for k in range(tiers - 1):
        assignment += ~members[idx[k][pick]]
    return evaluate(problem, graph, [int(x) for x in assignment])


def lagrangian(problem: Problem, graph: LayerGraph) -> Evaluation | None:
    """Heuristic for constrained DAGs too wide to enumerate: min-cuts of
    objective + lambda x latency over a sweep of lambda; the best feasible one."""
    best: Evaluation | None = None
    wo, wl = weights(problem, problem.objective), weights(problem, "latency")
    for lam in [0.0] + [10.0**e for e in range(-3, 7)]:
        ev = mincut(problem, graph, _combined(_combined(wo, wl, lam), wl, TIE_EPS))
        if (
            ev is not None
            and feasible(problem, graph, ev)
            and (best is None or key(problem, ev) < key(problem, best))
        ):
            best = ev
    return best


def solve(problem: Problem, graph: LayerGraph) -> Solution | None:
    """The best feasible assignment for one variant, or None."""
    if graph.is_chain:
        ev, method = chain_dp(problem, graph), "chain-dp"
    else:
        ev, method = mincut(problem, graph), "mincut"
    if ev is not None and feasible(problem, graph, ev):
        return Solution(ev, method, True)
    if ev is None or not constrained(problem):
        return None  # the relaxed optimum already misses the SLO (or nothing fits)
    members = ideals(graph, MAX_IDEALS)
    if members is None:
        found = lagrangian(problem, graph)
        return Solution(found, "lagrangian-mincut", False) if found else None
    found = enumerate_ideals(problem, graph, members)
    return Solution(found, "ideal-enumeration", True) if found else None
