"""Planning with per-input offloading (spec.offload): the split is costed as a mix over
where inputs leave, with the exit and escalation rates measured on validation data.

Pure. The rates come from the model's profile (`offload`, the calibration output of a
prepared `digits_cnn`: `edgeai_worker.offload.exits.profile_section`): the exits (the
tensor each head reads, its FLOPs and logits' size), the cascade's small models' FLOPs
and the validation tables, from which the thresholds for the spec's target and the
shares they give follow (`section_calibration`, the stages' own calibration).

- Exits: `Exit(after=k)` for the segment whose output is the tensor the head reads;
  its head's compute is its FLOPs at each tier's GFLOPS.
- Cascade: the device runs the small model(s) on the raw input before any layer. It
  is planned as exit 0 after a segment prepended to the chain that computes nothing and
  passes the raw input on; off the device its head would take forever (`OFF_DEVICE_MS`),
  so every split the solver keeps holds it on the device, and an escalation sends what
  the device would have sent without it.

`planner.exits.solve_with_exits` picks the split (the SLO held at the mix's p95); the
plan is described on the model's own chain and carries the mix's p95 as its predicted
latency and its expected energy and cost. With partitioning `none` or a graph that is
not a chain the plan is the one without exits, still with the shares it expects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from edgeai_operator.deployspec import DeploymentSpec
from edgeai_operator.errors import SpecError
from edgeai_operator.planner import Problem
from edgeai_operator.planner.exits import Exit, solve_with_exits
from edgeai_operator.planner.model import LayerGraph, Tensor, evaluate
from edgeai_operator.planner.plan import Plan, describe
from edgeai_operator.planner.solvers import Solution
from edgeai_operator.problem import offload_section, solve, zoo_calibration

OFF_DEVICE_MS = 1e9  # the cascade's head anywhere but on the device: never chosen
CASCADE = "cascade"
FINAL = "final"

__all__ = ["check_offload", "expected_shares", "offload_section", "planned_exits", "solve_offload"]


def check_offload(spec: DeploymentSpec, profiles: Sequence[Mapping[str, Any]]) -> None:
    """SpecError naming the field of `spec.offload` the model cannot back: exits on a
    prepared model (its profiles name artefacts) whose profile carries no exit
    calibration (a model that declares no exits, or declares them without labelled data
    to measure them on), a cascade on a prepared model whose profile measured no small
    models (DNNModel spec.smallModels) or with the disagreement rule and one of them,
    reuse on a prepared model other than digits_cnn whose preparation stored no labelled
    rows (no spec.data)."""
    offload = spec.offload
    if offload is None:
        return
    section = offload_section(profiles)
    prepared = any(p.get("artifact") for p in profiles)
    no_exits = section is None or not section.get("exits")
    if offload.exits_rule is not None and no_exits and prepared:
        raise SpecError(
            "spec.offload.exits",
            "the model's profile carries no calibrated exits",
            "a DNNModel whose spec.exits are measured on its labelled spec.data, or the "
            "zoo's digits_cnn",
        )
    cascade = (section or {}).get("cascade")
    digits = zoo_calibration(profiles) is not None
    stored = any(p.get("reuseData") for p in profiles)
    if offload.reuse_entries and prepared and not digits and not stored:
        raise SpecError(
            "spec.offload.reuse",
            "the model's profile carries no labelled data to calibrate the reuse distance on",
            "a DNNModel with spec.data (its preparation stores rows of it for the stages), "
            "or the zoo's digits_cnn",
        )
    if offload.cascade_rule is None:
        return
    if cascade is None and (section is not None or prepared):
        raise SpecError(
            "spec.offload.cascade",
            "the model has no small models to cascade from (its profile carries no "
            "measured spec.smallModels)",
            "a DNNModel with spec.smallModels and spec.data, the zoo's digits_cnn, or "
            "spec.offload without cascade",
        )
    if cascade is not None and offload.cascade_rule == "disagreement" and len(cascade["flops"]) < 2:
        raise SpecError(
            "spec.offload.cascade.rule",
            "disagreement compares two small models, and the model has one",
            "maxProb or entropy, or a second entry in the DNNModel's spec.smallModels",
        )


def expected_shares(spec: DeploymentSpec, section: Mapping[str, Any]) -> dict[str, float]:
    """Per exit (`cascade` first when there is one) and `final`, the share of inputs it
    answers under the spec's rules and targets, on the section's validation data."""
    from edgeai_worker.offload.exits import section_calibration

    offload = spec.offload
    assert offload is not None
    shares: dict[str, float] = {}
    reaching = 1.0  # the share the cascade passes on
    if offload.cascade_rule is not None:
        found = section_calibration(section, offload.cascade_rule, offload.target_accuracy or 0.0)
        reaching = found.escalation_rate
        shares[CASCADE] = round(1.0 - reaching, 4)
    if offload.exits_rule is not None:
        found = section_calibration(
            section, offload.exits_rule, offload.exits_target_accuracy or 0.0
        )
        # the exits see what the cascade escalates; validation shares scale with it
        for head, rate in zip(section["exits"], found.exit_rates, strict=True):
            shares[str(head["output"])] = round(reaching * rate, 4)
    shares[FINAL] = round(max(0.0, 1.0 - sum(shares.values())), 4)
    return shares


def _segment_after(graph: LayerGraph, tensor: str) -> int:
    for k in range(graph.size - 1):
        if tensor in graph.tensors[k + 1].names:
            return k
    raise SpecError(
        "spec.offload.exits",
        f"the exit head reads '{tensor}', which is not a cut of the planned model",
        "a model whose profile cuts at the exits' tensors (the zoo's digits_cnn)",
    )


def _ms(flops: float, gflops: Mapping[str, float]) -> dict[str, float]:
    return {tier: flops / (g * 1e6) for tier, g in gflops.items() if g > 0}


def planned_exits(
    spec: DeploymentSpec,
    graph: LayerGraph,
    section: Mapping[str, Any],
    gflops: Mapping[str, float],
    shares: Mapping[str, float],
) -> tuple[LayerGraph, tuple[Exit, ...], int]:
    """The chain to solve (with the cascade's segment prepended when there is one), its
    exits, and how many segments were prepended."""
    offload = spec.offload
    assert offload is not None
    exits: list[Exit] = []
    shift = 0
    if offload.cascade_rule is not None:
        shift = 1
        flops = section["cascade"]["flops"]
        small = float(sum(flops) if offload.cascade_rule == "disagreement" else flops[0])
        raw = graph.tensors[0]
        graph = LayerGraph(
            {t: (0.0, *ms) for t, ms in graph.node_ms.items()},
            (
                Tensor(raw.names, raw.size_bytes, -1, (0,)),
                *(
                    Tensor(t.names if i else raw.names, t.size_bytes if i else raw.size_bytes,
                           t.producer + 1, tuple(c + 1 for c in t.consumers), t.is_output)
                    for i, t in enumerate(graph.tensors)
                ),
            ),
        )  # fmt: skip
        head = {t: OFF_DEVICE_MS for t in graph.node_ms}
        head["device"] = _ms(small, gflops).get("device", 0.0)
        # the small model answers with logits the size of the model's output
        exits.append(Exit(0, shares[CASCADE], head, graph.tensors[-1].size_bytes))
    if offload.exits_rule is not None:
        for entry in section["exits"]:
            after = _segment_after(graph, str(entry["after"]))
            exits.append(
                Exit(
                    after,
                    shares[str(entry["output"])],
                    _ms(float(entry["headFlops"]), gflops),
                    int(entry["logitsBytes"]),
                )
            )
    return graph, tuple(exits), shift


def solve_offload(
    spec: DeploymentSpec,
    problem: Problem,
    section: Mapping[str, Any] | None,
    gflops: Mapping[str, float],
) -> tuple[Plan, dict[str, float] | None]:
    """The plan `problem.solve` makes, replanned with the exit shares when the spec
    offloads per input and the profile has the calibration; and the shares."""
    plan = solve(spec, problem)
    offload = spec.offload
    if section is None or offload is None:
        return plan, None
    if offload.cascade_rule is None and offload.exits_rule is None:
        return plan, None
    shares = expected_shares(spec, section)
    if spec.partitioning == "none":
        return plan, shares
    # the variant the plan without exits picks (without the SLO, where it meets none:
    # the exits may be what meets it)
    relaxed = replace(problem, slo_latency_ms=None, slo_throughput_rps=None)
    chosen = plan if plan.feasible else solve(spec, relaxed)
    if not chosen.feasible:
        return plan, shares
    variant = next(v for v in problem.variants if v.name == chosen.variant)
    if not variant.graph.is_chain:
        return plan, shares
    graph, exits, shift = planned_exits(spec, variant.graph, section, gflops, shares)
    found = solve_with_exits(problem, graph, exits)
    if found is None:
        reason = "no split meets the latency SLO at the p95 of the exit mix"
        return Plan(feasible=False, reason=reason, objective=problem.objective), shares
    tiers = found.tiers[shift:]
    solution = Solution(evaluate(problem, variant.graph, tiers), "exits", True)
    described = describe(problem, variant, solution)
    mixed = replace(
        described,
        alternatives=chosen.alternatives,  # the adaptive split's bands, as planned
        predicted_latency_ms=found.p95_latency_ms,
        objective_value=found.value(problem.objective),
        device_energy_mj=found.device_energy_mj,
        cloud_cost=found.cloud_cost,
    )
    return mixed, shares
