"""Brute force: every assignment of nodes to tiers that never sends data down the
path, judged by `evaluate` and `feasible`. Exponential; the reference for tests."""

from __future__ import annotations

from collections.abc import Iterator

from edgeai_operator.planner.model import Evaluation, LayerGraph, Problem, evaluate, feasible


def monotone_assignments(graph: LayerGraph, tiers: int) -> Iterator[list[int]]:
    """Every tier vector where no node runs below a node it reads from."""
    n = graph.size
    preds = graph.predecessors
    assignment = [0] * n

    def extend(v: int) -> Iterator[list[int]]:
        if v == n:
            yield list(assignment)
            return
        low = max((assignment[p] for p in preds[v]), default=0)
        for k in range(low, tiers):
            assignment[v] = k
            yield from extend(v + 1)

    yield from extend(0)


def brute_force(problem: Problem, graph: LayerGraph) -> Evaluation | None:
    best: Evaluation | None = None
    for assignment in monotone_assignments(graph, len(problem.path)):
        ev = evaluate(problem, graph, assignment)
        if not feasible(problem, graph, ev):
            continue
        if best is None or (ev.value(problem.objective), ev.latency_ms) < (
            best.value(problem.objective),
            best.latency_ms,
        ):
            best = ev
    return best
