"""The planner against brute force on random chains and DAGs, its constraints, its
explanations, and Neurosurgeon's qualitative result on a real zoo model."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import replace

import onnx
import pytest

from edgeai_operator.planner import (
    OBJECTIVES,
    Evaluation,
    LayerGraph,
    Link,
    Problem,
    Tensor,
    Variant,
    brute_force,
    evaluate,
    feasible,
    plan_partitions,
    solvers,
)
from edgeai_operator.planner.brute import monotone_assignments
from edgeai_operator.planner.exits import (
    Exit,
    brute_force_with_exits,
    evaluate_with_exits,
    solve_with_exits,
)

PATHS = (("device", "cloud"), ("device", "edge", "cloud"))


def _node_ms(rng: random.Random, path: tuple[str, ...], n: int) -> dict[str, tuple[float, ...]]:
    base = [rng.uniform(0.1, 20.0) for _ in range(n)]
    ms: dict[str, tuple[float, ...]] = {}
    for k, tier in enumerate(path):
        # higher tiers are usually faster, with noise so that no order is guaranteed
        speed = rng.uniform(1.0, 4.0) ** k
        ms[tier] = tuple(round(b / speed * rng.uniform(0.5, 1.5), 3) for b in base)
    return ms


def _bytes(rng: random.Random) -> int:
    return int(10 ** rng.uniform(1, 6.5))


def random_chain(rng: random.Random, path: tuple[str, ...], n: int) -> LayerGraph:
    return LayerGraph.chain(_node_ms(rng, path, n), [_bytes(rng) for _ in range(n + 1)])


def random_dag(rng: random.Random, path: tuple[str, ...], n: int) -> LayerGraph:
    """DNN-shaped: a backbone with branches and skip connections of short reach."""
    readers: dict[int, list[int]] = {v: [] for v in range(-1, n)}
    for v in range(n):
        first = rng.randint(max(-1, v - 3), v - 1) if v else -1
        readers[first].append(v)
        if v >= 2 and rng.random() < 0.4:
            other = rng.randint(max(-1, v - 4), v - 1)
            if v not in readers[other]:
                readers[other].append(v)
    tensors = [
        Tensor((f"t{p + 1}",), _bytes(rng), p, tuple(sorted(readers[p])), p == n - 1)
        for p in range(-1, n)
    ]
    return LayerGraph(_node_ms(rng, path, n), tuple(tensors))


def random_problem(rng: random.Random, dag: bool, index: int) -> Problem:
    path = PATHS[index % 2]
    objective = OBJECTIVES[(index // 2) % 3]
    # brute force over three-tier DAGs grows fast: 14 nodes keep it to seconds
    limit = 20 if len(path) == 2 or not dag else 14
    n = rng.randint(1, limit)
    make = random_dag if dag else random_chain
    graph = make(rng, path, n)
    variants = [Variant("fp32", graph, 0.97)]
    if rng.random() < 0.3:
        faster = LayerGraph(
            {t: tuple(x * 0.6 for x in ms) for t, ms in graph.node_ms.items()}, graph.tensors
        )
        variants.append(Variant("int8", faster, 0.95))
    links = tuple(Link(10 ** rng.uniform(-0.5, 3), rng.uniform(0, 40)) for _ in path[1:])
    allowed = set(path)
    if rng.random() < 0.25:
        allowed.discard(rng.choice(path))
    problem = Problem(
        variants=tuple(variants),
        path=path,
        links=links,
        allowed=frozenset(allowed),
        objective=objective,
        raw_input_stays_on_device=rng.random() < 0.3,
        min_accuracy=rng.choice([None, None, 0.96]),
        cost_per_ms={"edge": rng.uniform(0, 0.3), "cloud": 1.0},
    )
    if index % 3:
        # per-request serving overheads, fixed and per byte, some tiers without one
        problem = replace(
            problem,
            serving_ms={t: rng.uniform(0, 30) for t in path if rng.random() < 0.8},
            forwarding_ms={t: rng.uniform(0, 10) for t in path[:-1] if rng.random() < 0.8},
            serving_ms_per_mb={t: 10 ** rng.uniform(0, 3) for t in path if rng.random() < 0.7},
            forwarding_ms_per_mb={t: 10 ** rng.uniform(0, 3) for t in path if rng.random() < 0.7},
        )
    if rng.random() < 0.6:
        fastest = _brute(replace(problem, objective="latency"))
        base = fastest[1].latency_ms if fastest else 100.0
        problem = replace(problem, slo_latency_ms=round(base * rng.uniform(0.9, 1.6), 3))
    if rng.random() < 0.2:
        problem = replace(problem, slo_throughput_rps=rng.uniform(5, 200))
    return problem


def _brute(problem: Problem) -> tuple[str, Evaluation] | None:
    best: tuple[str, Evaluation] | None = None
    for variant in problem.variants:
        if problem.min_accuracy is not None and (variant.accuracy or 0) < problem.min_accuracy:
            continue
        ev = brute_force(problem, variant.graph)
        if ev is not None and (
            best is None
            or (ev.value(problem.objective), ev.latency_ms)
            < (best[1].value(problem.objective), best[1].latency_ms)
        ):
            best = (variant.name, ev)
    return best


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)


def _check_against_brute_force(problem: Problem) -> str:
    expected = _brute(problem)
    plan = plan_partitions(problem, alternatives=False)
    if expected is None:
        assert not plan.feasible
        assert plan.reason
        return "infeasible"
    assert plan.feasible, plan.reason
    _, best = expected
    variant = next(v for v in problem.variants if v.name == plan.variant)
    ev = evaluate(problem, variant.graph, plan.assignment)
    assert feasible(problem, variant.graph, ev)
    assert plan.objective_value is not None
    assert plan.predicted_latency_ms is not None
    assert _close(plan.objective_value, ev.value(problem.objective))
    assert _close(plan.predicted_latency_ms, ev.latency_ms)
    brute_value = best.value(problem.objective)
    assert _close(plan.objective_value, brute_value), (plan, best)
    assert plan.predicted_latency_ms <= best.latency_ms * (1 + 1e-6) + 1e-6
    # the stages, the serving overheads and the transfers add up to the prediction
    total = (
        sum(s.compute_ms for s in plan.stages)
        + sum(plan.serving_ms.values())
        + sum(t.ms for t in plan.transfers)
    )
    assert _close(total, plan.predicted_latency_ms)
    return plan.method


@pytest.mark.parametrize("dag", [False, True], ids=["chain", "dag"])
def test_planner_equals_brute_force_on_random_instances(dag: bool) -> None:
    rng = random.Random(20261128 + dag)
    methods: dict[str, int] = {}
    for index in range(300):
        method = _check_against_brute_force(random_problem(rng, dag, index))
        methods[method] = methods.get(method, 0) + 1
    # every solver path and infeasible instances were exercised
    expected = {"infeasible", "ideal-enumeration", "mincut" if dag else "chain-dp"}
    assert expected <= set(methods), methods
    assert all(count >= 5 for count in methods.values()), methods


def test_every_exact_solver_agrees_on_chains_seen_as_dags() -> None:
    rng = random.Random(7)
    for index in range(60):
        path = PATHS[index % 2]
        graph = random_chain(rng, path, rng.randint(1, 15))
        links = tuple(Link(10 ** rng.uniform(-0.5, 3), rng.uniform(0, 40)) for _ in path[1:])
        problem = Problem(
            (Variant("fp32", graph),),
            path,
            links,
            objective=OBJECTIVES[index % 3],
            serving_ms={t: rng.uniform(0, 20) for t in path},
            forwarding_ms={t: rng.uniform(0, 10) for t in path[:-1]},
            serving_ms_per_mb={t: 10 ** rng.uniform(0, 3) for t in path},
            forwarding_ms_per_mb={t: 10 ** rng.uniform(0, 3) for t in path[:-1]},
        )
        by_dp = solvers.chain_dp(problem, graph)
        by_cut = solvers.mincut(problem, graph)
        members = solvers.dag_ideals(graph)
        assert members is not None
        by_enum = solvers.enumerate_ideals(problem, graph, members)
        by_brute = brute_force(problem, graph)
        assert by_dp
        assert by_cut
        assert by_enum
        assert by_brute
        values = [e.value(problem.objective) for e in (by_dp, by_cut, by_enum, by_brute)]
        assert all(_close(v, values[-1]) for v in values), values


def test_dag_ideals_match_monotone_assignments() -> None:
    rng = random.Random(3)
    for _ in range(30):
        graph = random_dag(rng, ("device", "cloud"), rng.randint(1, 12))
        members = solvers.ideals(graph)
        assert members is not None
        two_tier = {tuple(a) for a in monotone_assignments(graph, 2)}
        assert {tuple(int(not x) for x in row) for row in members} == two_tier


def _fixed_chain() -> LayerGraph:
    # device 10 ms per segment, cloud 1 ms; activations shrink after segment 2
    return LayerGraph.chain(
        {"device": (10.0, 10.0, 10.0, 10.0), "edge": (4.0,) * 4, "cloud": (1.0, 1.0, 1.0, 1.0)},
        [100_000, 200_000, 5_000, 5_000, 40],
    )


def test_per_byte_overheads_are_charged_on_the_bytes_each_tier_receives_and_forwards() -> None:
    graph = _fixed_chain()
    base = Problem((Variant("fp32", graph),), links=(Link(100, 1), Link(100, 1)))
    per_mb = replace(
        base,
        serving_ms={"device": 2.0, "edge": 1.0, "cloud": 1.0},
        serving_ms_per_mb={"device": 10.0, "edge": 20.0, "cloud": 40.0},
        forwarding_ms_per_mb={"device": 5.0, "edge": 3.0},
    )
    # device runs segments 0-1, edge 2, cloud 3: the device receives the 100 KB input
    # and forwards cut 2 (5 KB), the edge receives it and forwards cut 3 (5 KB)
    tiers = [0, 0, 1, 2]
    plain, charged = evaluate(base, graph, tiers), evaluate(per_mb, graph, tiers)
    assert charged.serving_ms == pytest.approx(
        (2.0 + 10.0 * 0.1 + 5.0 * 0.005, 1.0 + 20.0 * 0.005 + 3.0 * 0.005, 1.0 + 40.0 * 0.005)
    )
    assert charged.latency_ms == pytest.approx(plain.latency_ms + sum(charged.serving_ms))
    # an empty middle stage receives and forwards what crosses it
    passing = evaluate(per_mb, graph, [0, 2, 2, 2])
    assert passing.serving_ms[1] == pytest.approx(1.0 + (20.0 + 3.0) * 0.2)
    # forwarding the 100 KB input costs the device 20 ms more than the 5 KB of cut 2:
    # the plan that offloads everything keeps the first two segments instead
    assert plan_partitions(base, alternatives=False).assignment == (1, 1, 2, 2)
    heavy = replace(base, forwarding_ms_per_mb={"device": 200.0})
    assert _check_against_brute_force(heavy) == "chain-dp"
    assert plan_partitions(heavy, alternatives=False).assignment == (0, 0, 2, 2)


def test_privacy_keeps_the_raw_input_on_the_device() -> None:
    graph = _fixed_chain()
    base = Problem((Variant("fp32", graph),), links=(Link(1000, 1), Link(1000, 1)))
    free = plan_partitions(base)
    assert free.stages[0].tier != "device"  # fast links: everything offloaded
    private = plan_partitions(replace(base, raw_input_stays_on_device=True))
    assert private.stages[0].tier == "device"
    assert private.stages[0].inputs == ("cut0",)
    assert "cut0" not in private.stages[1].inputs
    blocked = plan_partitions(
        replace(base, raw_input_stays_on_device=True, allowed=frozenset({"edge", "cloud"}))
    )
    assert not blocked.feasible
    assert "rawInputStaysOnDevice" in blocked.reason


def test_infeasible_plans_say_why() -> None:
    graph = _fixed_chain()
    base = Problem((Variant("fp32", graph, 0.9),), links=(Link(10, 5), Link(100, 10)))
    fastest = plan_partitions(base)
    assert fastest.predicted_latency_ms is not None
    tight = plan_partitions(replace(base, slo_latency_ms=fastest.predicted_latency_ms / 2))
    assert not tight.feasible
    assert "latencyP95Ms" in tight.reason
    assert f"{fastest.predicted_latency_ms:.2f} ms" in tight.reason
    accurate = plan_partitions(replace(base, min_accuracy=0.95))
    assert not accurate.feasible
    assert "accuracy floor 0.95" in accurate.reason
    assert "fp32=0.900" in accurate.reason


def test_accuracy_floor_picks_the_variant() -> None:
    graph = _fixed_chain()
    fast = LayerGraph(
        {t: tuple(x / 2 for x in ms) for t, ms in graph.node_ms.items()}, graph.tensors
    )
    problem = Problem(
        (Variant("fp32", graph, 0.98), Variant("int8", fast, 0.96)),
        links=(Link(1, 5), Link(100, 10)),
    )
    assert plan_partitions(problem).variant == "int8"
    assert plan_partitions(replace(problem, min_accuracy=0.97)).variant == "fp32"


def test_objectives_trade_latency_for_energy_and_cost() -> None:
    graph = _fixed_chain()
    problem = Problem(
        (Variant("fp32", graph),),
        path=("device", "cloud"),
        links=(Link(20, 5),),
        cost_per_ms={"cloud": 1.0},
    )
    fastest = plan_partitions(problem)
    cheapest = plan_partitions(replace(problem, objective="cloudCost"))
    frugal = plan_partitions(replace(problem, objective="deviceEnergy"))
    assert cheapest.cloud_cost == 0.0
    assert all(s.tier != "cloud" for s in cheapest.stages)
    assert fastest.cloud_cost is not None
    assert fastest.cloud_cost > 0
    assert frugal.device_energy_mj is not None
    assert fastest.device_energy_mj is not None
    assert frugal.device_energy_mj <= fastest.device_energy_mj
    # with an SLO the cheapest plan must give way to a faster, dearer one
    assert cheapest.predicted_latency_ms is not None
    assert fastest.predicted_latency_ms is not None
    slo = (cheapest.predicted_latency_ms + fastest.predicted_latency_ms) / 2
    bounded = plan_partitions(replace(problem, objective="cloudCost", slo_latency_ms=slo))
    assert bounded.feasible
    assert bounded.predicted_latency_ms is not None
    assert bounded.predicted_latency_ms <= slo
    assert bounded.cloud_cost is not None
    assert bounded.cloud_cost > 0


def _zoo_chain(name: str, device_gflops: float, cloud_gflops: float) -> LayerGraph:
    from edgeai_worker import graph as onnx_graph
    from edgeai_worker import zoo

    dag = onnx_graph.analyze(onnx.load(zoo.export_onnx(name)))
    cuts = onnx_graph.graph_cut_points(dag)
    positions = [c.position for c in cuts]
    flops = [sum(n.flops for n in dag.nodes[a:b]) for a, b in itertools.pairwise(positions)]
    return LayerGraph.chain(
        {
            "device": [f / device_gflops / 1e6 for f in flops],
            "cloud": [f / cloud_gflops / 1e6 for f in flops],
        },
        [c.size_bytes for c in cuts],
        [c.tensors for c in cuts],
    )


@pytest.mark.parametrize("name", ["alexnet_like", "vgg_like"])
def test_neurosurgeon_low_bandwidth_keeps_layers_on_the_device(name: str) -> None:
    graph = _zoo_chain(name, device_gflops=8, cloud_gflops=1500)
    sizes = [t.size_bytes for t in graph.tensors]
    on_device = []
    for mbps in [10 ** (e / 10) for e in range(-5, 31)]:  # 0.3 Mbps to 1 Gbps
        problem = Problem(
            (Variant("fp32", graph),), path=("device", "cloud"), links=(Link(mbps, 10),)
        )
        plan = plan_partitions(problem, alternatives=False)
        device = sum(1 for k in plan.assignment if k == 0)
        on_device.append(device)
        if 0 < device < graph.size:
            # a split happens where activations have shrunk below the raw input
            assert sizes[device] < sizes[0]
            assert sizes[device] <= min(sizes[: device + 1])
    assert on_device == sorted(on_device, reverse=True), on_device
    assert on_device[-1] == 0, "at 1 Gbps everything is offloaded"
    assert on_device[0] > 0, "at 0.3 Mbps the device keeps layers"
    assert any(0 < d < graph.size for d in on_device), "some bandwidth gives a real split"


def test_alternatives_cover_the_bandwidth_range_in_order() -> None:
    graph = _zoo_chain("alexnet_like", device_gflops=8, cloud_gflops=1500)
    problem = Problem((Variant("fp32", graph),), path=("device", "cloud"), links=(Link(10, 10),))
    plan = plan_partitions(problem)
    bands = plan.alternatives
    assert len(bands) >= 2
    assert bands[0].min_mbps == 0
    assert bands[-1].max_mbps is None
    for low, high in itertools.pairwise(bands):
        assert low.max_mbps == high.min_mbps
        assert low.cut_index is not None
        assert high.cut_index is not None
        assert low.cut_index >= high.cut_index  # more bandwidth, fewer device layers
    # the band holding 10 Mbps uses the plan's own split
    band = next(b for b in bands if b.min_mbps <= 10 and (b.max_mbps or math.inf) > 10)
    assert band.cut_index == sum(1 for k in plan.assignment if k == 0)


def test_big_instances_plan_fast() -> None:
    import time

    rng = random.Random(11)
    chain = random_chain(rng, ("device", "edge", "cloud"), 200)
    problem = Problem((Variant("fp32", chain),), links=(Link(10, 10), Link(100, 20)))
    started = time.perf_counter()
    plan = plan_partitions(problem, alternatives=False)
    assert plan.feasible
    assert time.perf_counter() - started < 0.5  # the bench tracks the real figure


def test_wide_constrained_dags_fall_back_to_a_marked_heuristic(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(solvers, "MAX_IDEALS", 1)
    rng = random.Random(5)
    heuristic = 0
    for index in range(40):
        graph = random_dag(rng, ("device", "cloud"), rng.randint(4, 12))
        problem = Problem(
            (Variant("fp32", graph),),
            path=("device", "cloud"),
            links=(Link(10 ** rng.uniform(0, 2.5), rng.uniform(0, 30)),),
            objective=("deviceEnergy", "cloudCost")[index % 2],
        )
        fastest = brute_force(replace(problem, objective="latency"), graph)
        assert fastest is not None
        problem = replace(problem, slo_latency_ms=fastest.latency_ms * rng.uniform(1.02, 1.3))
        best = brute_force(problem, graph)
        assert best is not None  # the fastest plan meets the SLO
        plan = plan_partitions(problem, alternatives=False)
        if plan.method != "lagrangian-mincut":
            continue  # the unconstrained optimum already met the SLO: exact
        heuristic += 1
        assert plan.exact is False
        # a large enough multiplier finds the fastest plan, which meets the SLO
        assert plan.feasible
        ev = evaluate(problem, graph, plan.assignment)
        assert feasible(problem, graph, ev)
        assert ev.value(problem.objective) >= best.value(problem.objective) - 1e-6
    assert heuristic >= 5


def test_band_edges_are_the_crossover_bandwidths() -> None:
    graph = _zoo_chain("mobilenet_v2", device_gflops=8, cloud_gflops=150)
    problem = Problem((Variant("fp32", graph),), path=("device", "cloud"), links=(Link(10, 15),))
    bands = plan_partitions(problem).alternatives
    assert len(bands) >= 3

    def split(mbps: float) -> tuple[tuple[str, str], ...]:
        at = replace(problem, links=(Link(mbps, 15),))
        return tuple((s.tier, s.layers) for s in plan_partitions(at, alternatives=False).stages)

    for low, high in itertools.pairwise(bands):
        edge = high.min_mbps
        assert split(edge * 0.995) == low.stages
        assert split(edge * 1.005) == high.stages
    for band in bands:
        assert split(band.at_mbps) == band.stages
        assert band.meets_slo


# ------------------------------------------------------------------ chains with exits


def _random_exits(rng: random.Random, graph: LayerGraph, path: tuple[str, ...]) -> list[Exit]:
    after = sorted(rng.sample(range(graph.size - 1), rng.randint(1, min(3, graph.size - 1))))
    shares = [rng.uniform(0, 1) for _ in after]
    scale = rng.uniform(0.3, 1.0) / sum(shares)  # sometimes nearly every input exits
    return [
        Exit(a, s * scale, {t: rng.uniform(0, 2) for t in path}, rng.choice([40, 400, 4000]))
        for a, s in zip(after, shares, strict=True)
    ]


def test_exit_planner_equals_brute_force_on_random_instances_with_exits() -> None:
    rng = random.Random(20261202)
    feasible_seen = infeasible_seen = 0
    for index in range(150):
        problem = random_problem(rng, False, index)
        graph = problem.variants[0].graph
        if graph.size < 2:
            continue
        exits = _random_exits(rng, graph, problem.path)
        best = brute_force_with_exits(problem, graph, exits)
        found = solve_with_exits(problem, graph, exits)
        if best is None:
            assert found is None
            infeasible_seen += 1
            continue
        assert found is not None
        feasible_seen += 1
        assert _close(found.value(problem.objective), best.value(problem.objective))
        # the solver's closed form is the reference's cost of the split it chose
        again = evaluate_with_exits(problem, graph, exits, found.tiers)
        for ours, reference in zip(found.outcomes, again.outcomes, strict=True):
            assert all(_close(a, b) for a, b in zip(ours, reference, strict=True))
        assert _close(found.p95_latency_ms, again.p95_latency_ms)
        if problem.slo_latency_ms is not None:
            assert found.p95_latency_ms <= problem.slo_latency_ms + 1e-6
    assert feasible_seen >= 50
    assert infeasible_seen >= 3


def test_the_slo_holds_at_the_p95_of_the_mix_not_its_mean() -> None:
    # two segments; an exit after the first answers 90 % of inputs on the device
    graph = LayerGraph.chain(
        {"device": [1.0, 50.0], "edge": [0.1, 1.0]}, [1000, 1000, 40], [["in"], ["f"], ["out"]]
    )
    exits = [Exit(0, 0.9, {"device": 0.5, "edge": 0.05}, 40)]
    problem = Problem(
        (Variant("fp32", graph),),
        ("device", "edge"),
        (Link(1.0, 20.0),),
        slo_latency_ms=30.0,
    )
    device_only = evaluate_with_exits(problem, graph, exits, [0, 0])
    assert device_only.outcomes[0][1] == pytest.approx(1.5)  # exit: segment 0 + head
    assert device_only.mean_latency_ms < 30.0 < device_only.p95_latency_ms  # 51.5 for 10 %
    split = evaluate_with_exits(problem, graph, exits, [0, 1])
    # escalations: 1.5 ms, 8 ms up, 20 ms RTT, 1 ms at the edge, 0.32 ms down
    assert split.p95_latency_ms == pytest.approx(30.82)
    assert split.mean_latency_ms < 5.0
    best = solve_with_exits(problem, graph, exits)
    assert best is not None
    assert best.tiers == (1, 1)  # everything at the edge: 29.5 ms for every input
    assert best.p95_latency_ms <= 30.0
    relaxed = solve_with_exits(replace(problem, slo_latency_ms=35.0), graph, exits)
    assert relaxed is not None
    assert relaxed.tiers == (0, 1)  # the exit on the device, escalations to the edge
    assert relaxed.uplink_bytes == pytest.approx(0.1 * 1000)  # only escalations upload
