"""The autoscaler's decisions from real Prometheus text, step by step."""

from __future__ import annotations

import math
from typing import Any

import pytest

from edgeai_operator.autoscaler import (
    ScalePolicy,
    Scrape,
    StageScaler,
    parse_metrics,
    quantile,
    stage_targets,
)
from edgeai_operator.plandoc import PlanDocument

BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


def exposition(counts: dict[float, int], in_flight: int = 0) -> str:
    """Worker-style /metrics text: cumulative buckets for one stage plus a gauge."""
    lines = [
        "# HELP edgeai_stage_latency_seconds Time from receiving a request to answering it.",
        "# TYPE edgeai_stage_latency_seconds histogram",
    ]
    running = 0
    for bound in BOUNDS:
        running += counts.get(bound, 0)
        lines.append(
            f'edgeai_stage_latency_seconds_bucket{{stage="1",tier="edge",le="{bound}"}} {running}'
        )
    running += counts.get(math.inf, 0)
    lines.append(
        f'edgeai_stage_latency_seconds_bucket{{stage="1",tier="edge",le="+Inf"}} {running}'
    )
    lines.append(f'edgeai_stage_latency_seconds_count{{stage="1",tier="edge"}} {running}')
    lines.append("# TYPE edgeai_in_flight_requests gauge")
    lines.append(f"edgeai_in_flight_requests {in_flight}")
    return "\n".join(lines) + "\n"


def test_parse_and_quantile_interpolate_like_prometheus() -> None:
    scrape = parse_metrics(exposition({0.01: 50, 0.05: 50}, in_flight=3))
    assert scrape.in_flight == 3
    assert scrape.buckets[0.01] == 50
    assert scrape.buckets[math.inf] == 100
    # rank 95 of 100 lies 45/50 of the way through the (0.025, 0.05] bucket
    assert quantile(0.95, scrape.buckets) == pytest.approx(0.025 + 0.025 * 45 / 50)
    assert quantile(0.5, scrape.buckets) == pytest.approx(0.01)
    assert quantile(0.95, {}) is None


def _scaler(**kw: float) -> StageScaler:
    policy = ScalePolicy(
        min_replicas=1,
        max_replicas=6,
        target_ms=40,
        stable_window_s=20,
        panic_window_s=4,
        scale_down_delay_s=10,
        **kw,
    )  # type: ignore[arg-type]
    return StageScaler(policy)


def feed(
    scaler: StageScaler,
    t0: float,
    seconds: int,
    per_second: dict[float, int],
    pods: tuple[str, ...] = ("p0",),
    base: dict[str, dict[float, int]] | None = None,
) -> dict[str, dict[float, int]]:
    """Scrape every second for `seconds`, each pod answering `per_second` requests."""
    totals = base or {p: {} for p in pods}
    for s in range(seconds):
        for p in pods:
            for bound, n in per_second.items():
                totals.setdefault(p, {})[bound] = totals[p].get(bound, 0) + n
        scaler.observe(t0 + s, {p: parse_metrics(exposition(totals[p])) for p in pods})
    return totals


def test_panic_window_scales_up_at_once_and_blocks_scale_down() -> None:
    scaler = _scaler()
    totals = feed(scaler, 0, 10, {0.025: 10})  # p95 24 ms: within the 40 ms target
    desired, why = scaler.decide(9, 2)
    assert desired == 2
    assert "within" in why
    totals = feed(scaler, 10, 3, {0.25: 10}, base=totals)  # sudden 250 ms answers
    desired, why = scaler.decide(12, 2)
    assert desired == 4  # ceil(2 * p95/target) capped at doubling
    assert why.startswith("panic")
    assert "target 40.0 ms" in why
    # Back to fast answers: the panic window calms at once, but no scale-down follows
    # while the stable window still holds the burst and the panic hold lasts.
    feed(scaler, 13, 5, {0.005: 10}, base=totals)
    assert scaler.p95_ms(17, 4) == pytest.approx(4.75)
    assert scaler.decide(17, 4)[0] >= 4


def test_stable_window_scales_up_one_step_then_down_when_calm() -> None:
    scaler = _scaler()
    totals = feed(scaler, 0, 20, {0.05: 10})  # 50 ms > 40 ms target, < 2x: not panic
    desired, why = scaler.decide(19, 1)
    assert desired == 2
    assert "above the stage target" in why
    totals = feed(scaler, 20, 25, {0.005: 10}, base=totals)  # calm, past the delay
    desired, why = scaler.decide(44, 2)
    assert desired == 1
    assert "under half" in why


def test_scale_down_waits_for_the_delay_after_a_scale_up() -> None:
    scaler = _scaler()
    scaler.last_scale_up = 100.0
    feed(scaler, 95, 10, {0.005: 10})
    assert scaler.decide(104, 3)[0] == 3  # 4 s after the scale-up, delay is 10 s
    feed(scaler, 105, 8, {0.005: 10}, base={"p0": {0.005: 100}})
    assert scaler.decide(112, 3)[0] == 2


def test_no_requests_for_a_stable_window_returns_to_min() -> None:
    scaler = _scaler()
    totals = feed(scaler, 0, 3, {0.01: 5})
    feed(scaler, 3, 22, {}, base=totals)
    desired, why = scaler.decide(24, 4)
    assert desired == 1
    assert "no requests" in why


def test_latency_is_pooled_over_replicas_and_restarts_start_afresh() -> None:
    scaler = _scaler()
    feed(scaler, 0, 5, {0.01: 5}, pods=("a", "b"))
    assert scaler.requests(4, 20) == 2 * 4 * 5  # deltas over 4 s, both pods
    # pod a restarted: its counters fell, its history starts again
    scaler.observe(
        5,
        {"a": Scrape({0.01: 1.0, math.inf: 1.0}, 0.0), "b": parse_metrics(exposition({0.01: 30}))},
    )
    assert len(scaler.pods["a"].samples) == 1


def test_bounds_are_respected() -> None:
    scaler = _scaler()
    feed(scaler, 0, 3, {1.0: 10})
    assert scaler.decide(2, 6)[0] == 6  # max_replicas
    assert scaler.decide(2, 9)[0] == 6


def test_stage_targets_subtract_what_comes_before() -> None:
    doc: dict[str, Any] = {
        "model": {"zoo": "digits_cnn", "input": {"shape": [1, 1, 8, 8], "dtype": "FP32"}},
        "stages": [
            {"tier": "device", "computeMs": 10.0, "inputs": ["input"], "outputs": ["a"]},
            {"tier": "edge", "computeMs": 20.0, "inputs": ["a"], "outputs": ["b"]},
            {"tier": "cloud", "computeMs": 5.0, "inputs": ["b"], "outputs": ["output"]},
        ],
        "transfers": [
            {"from": "device", "to": "edge", "bytes": 10, "ms": 15.0},
            {"from": "edge", "to": "cloud", "bytes": 10, "ms": 30.0},
        ],
    }
    targets = stage_targets(PlanDocument.from_dict(doc), 100.0)
    assert targets == {"device": 100.0, "edge": 75.0, "cloud": 25.0}
    # the fixed serving overheads the plan counts are spent too
    doc["servingMs"] = {"device": 4.0, "edge": 2.0, "cloud": 1.0}
    targets = stage_targets(PlanDocument.from_dict(doc), 100.0)
    assert targets == {"device": 100.0, "edge": 71.0, "cloud": 19.0}


def test_idle_detection_works_with_slow_scrapes() -> None:
    """Scrapes 5 s apart (a busy operator): a quiet stable window still scales to min."""
    scaler = _scaler()
    totals: dict[float, int] = {0.025: 0}
    for t in range(0, 20, 5):
        totals[0.025] += 50
        scaler.observe(t, {"p0": parse_metrics(exposition(totals))})
    assert scaler.decide(15, 3)[0] == 3  # traffic in the window, p95 24 ms: hold
    for t in range(20, 45, 5):
        scaler.observe(t, {"p0": parse_metrics(exposition(totals))})
    desired, why = scaler.decide(40, 3)
    assert desired == 1
    assert "no requests" in why


def test_a_missed_scrape_keeps_the_pod_history() -> None:
    scaler = _scaler()
    feed(scaler, 0, 5, {0.01: 5}, pods=("a", "b"))
    scaler.observe(5, {"a": parse_metrics(exposition({0.01: 30}))})
    assert set(scaler.pods) == {"a", "b"}
    scaler.observe(60, {"a": parse_metrics(exposition({0.01: 30}))})
    assert set(scaler.pods) == {"a"}
