"""Per-segment profiles measured with onnxruntime on this machine."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml

from edgeai_worker import graph, profiler, zoo


def test_profile_measures_every_segment_and_reports_progress() -> None:
    messages: list[str] = []
    model = onnx.load(zoo.export_onnx("alexnet_like"))
    profile = profiler.profile_model(
        model, name="alexnet_like", repeats=3, warmup=1, gflops=10.0, progress=messages.append
    )
    dag = graph.analyze(model)
    cuts = graph.graph_cut_points(dag)
    assert [c["sizeBytes"] for c in profile["cuts"]] == [c.size_bytes for c in cuts]
    assert [tuple(c["tensors"]) for c in profile["cuts"]] == [c.tensors for c in cuts]
    segments = profile["segments"]
    assert len(segments) == len(cuts) - 1
    assert (
        sum(s["flops"] for s in segments)
        == profile["totalFlops"]
        == sum(n.flops for n in dag.nodes)
    )
    assert all(s["measuredMs"] > 0 for s in segments)
    assert math.isclose(profile["totalMs"], sum(s["measuredMs"] for s in segments), abs_tol=1e-3)
    # the segments are shares of the whole model, measured chained as a stage runs them
    assert math.isclose(profile["totalMs"], profile["wholeModelMs"], rel_tol=1e-3)
    assert profile["chainMs"] > 0
    # the heaviest segment (a conv) takes longer than the lightest (a ReLU or a pool)
    heavy = max(segments, key=lambda s: s["flops"])
    light = min(segments, key=lambda s: s["flops"])
    assert heavy["measuredMs"] > light["measuredMs"]
    assert profile["host"]["gflops"] == 10.0
    assert any("pass 4/4 over the model and 19 segments" in m for m in messages)
    assert any("whole model" in m for m in messages)
    # plain data: survives YAML
    assert yaml.safe_load(yaml.safe_dump(profile)) == profile


def test_every_timed_run_follows_the_idle_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(profiler.time, "sleep", slept.append)
    profile = profiler.profile_model(
        zoo.export_onnx("digits_cnn"), repeats=4, warmup=2, gflops=1.0, idle_ms=30, progress=None
    )
    # four timed whole-model runs and four timed chained passes; warm-up runs unpaused
    assert slept == [0.03] * 8
    assert profile["idleMs"] == 30
    with pytest.raises(ValueError, match="idle_ms must be in 0-10000, got -1"):
        profiler.profile_model(zoo.export_onnx("digits_cnn"), gflops=1.0, idle_ms=-1)


def test_host_gflops_is_a_plausible_cpu_figure() -> None:
    gflops = profiler.host_gflops(size=256, repeats=3)
    assert 0.1 < gflops < 100_000


def test_tier_estimates_scale_with_declared_speed() -> None:
    profile = {"host": {"gflops": 40.0}, "segments": [{"measuredMs": 2.0}, {"measuredMs": 0.5}]}
    assert profiler.scaled_ms(profile, 40.0) == [2.0, 0.5]
    assert profiler.scaled_ms(profile, 10.0) == [8.0, 2.0]
    assert profiler.analytic_ms([8_000_000, 0], 8.0) == [1.0, 0.0]


def test_serving_model_answers_one_number_per_sample(tmp_path: Path) -> None:
    path = profiler.serving_model([1, 3, 8, 8], tmp_path / "serving.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.arange(2 * 3 * 8 * 8, dtype=np.float32).reshape(2, 3, 8, 8)
    (out,) = session.run(None, {"input": x})
    assert out.shape == (2, 1)
    assert np.allclose(out[:, 0], x.reshape(2, -1).mean(axis=1))


def test_serving_model_takes_any_size_of_its_rank(tmp_path: Path) -> None:
    path = profiler.serving_model([1, 3, 8, 8], tmp_path / "serving.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in profiler.fit_shapes([1, 3, 8, 8]):
        (out,) = session.run(None, {"input": np.ones(shape, np.float32)})
        assert out.tolist() == [[1.0]]


def test_serving_overheads_are_measured_through_real_workers() -> None:
    messages: list[str] = []
    overheads = profiler.serving_overheads(
        [1, 3, 16, 16], requests=5, warmup=2, progress=messages.append
    )
    assert set(overheads) == {"servingMs", "servingMsPerMB", "forwardingMs", "forwardingMsPerMB"}
    assert overheads["servingMs"] + overheads["servingMsPerMB"] > 0
    assert all(ms >= 0 for ms in overheads.values())
    assert any("forward-only worker" in m and "[1, 1, 1, 262144]" in m for m in messages)


def test_serving_overhead_is_calibrated_with_the_model_itself() -> None:
    """Given the model, a worker serving it answers requests that report their compute
    time; the fixed serving part is set from what those requests spent beyond it."""
    messages: list[str] = []
    path = zoo.export_onnx("digits_cnn")
    overheads = profiler.serving_overheads(
        [1, 1, 8, 8], requests=6, warmup=2, progress=messages.append, model=path
    )
    assert set(overheads) == {"servingMs", "servingMsPerMB", "forwardingMs", "forwardingMsPerMB"}
    assert all(ms >= 0 for ms in overheads.values())
    assert any("serving the model" in m for m in messages)


def test_time_model_requests_reports_round_trip_and_compute(tmp_path: Path) -> None:
    from _worker_support import start_worker

    path = zoo.export_onnx("digits_cnn")
    worker = start_worker(tmp_path, {"model_name": "digits", "partitions": [str(path)]})
    try:
        feeds = profiler.example_feed(onnx.load(str(path)))
        samples = profiler.time_model_requests(
            f"{worker.url}/v2/models/digits/infer", feeds, requests=4, warmup=1
        )
    finally:
        worker.stop()
    assert len(samples) == 4
    for round_trip, compute in samples:
        assert 0 < compute < round_trip


def test_calibration_keeps_the_slope_and_moves_the_fixed_part() -> None:
    fitted = {"servingMs": 14.0, "servingMsPerMB": 20.0, "forwardingMs": 1.0,
              "forwardingMsPerMB": 2.0}  # fmt: skip
    # round trip - compute: 12, 13, 14, 15 and an outlier of 100; the middle three: 14
    samples = [(62.0, 50.0), (60.0, 47.0), (64.0, 50.0), (63.0, 48.0), (140.0, 40.0)]
    calibrated = profiler.calibrate_serving(fitted, 500_000, samples)
    assert calibrated["servingMs"] == pytest.approx(14.0 - 20.0 * 0.5)
    assert {k: calibrated[k] for k in ("servingMsPerMB", "forwardingMs", "forwardingMsPerMB")} == {
        "servingMsPerMB": 20.0, "forwardingMs": 1.0, "forwardingMsPerMB": 2.0}  # fmt: skip
    # never below zero
    assert profiler.calibrate_serving(fitted, 2_000_000, samples)["servingMs"] == 0.0


def test_overheads_fit_a_fixed_part_and_one_per_byte() -> None:
    fit = profiler.fit_overheads(4, (2.0, 1.0), 1_000_004, (5.0, 1.5))
    # the fixed part is the line's value at 0 bytes
    expected = {
        "servingMs": 2.0 - 3.0 * 4e-6,
        "servingMsPerMB": 3.0,
        "forwardingMs": 1.0 - 0.5 * 4e-6,
        "forwardingMsPerMB": 0.5,
    }
    assert fit == pytest.approx(expected, rel=1e-9)
    # noise that makes the small payload dearer: no per-byte part, the large one's cost
    fit = profiler.fit_overheads(4, (2.0, 1.0), 600_000, (1.8, 1.5))
    assert fit["servingMsPerMB"] == 0.0
    assert fit["servingMs"] == 1.8
    assert profiler.tensor_bytes([1, 3, 224, 224]) == 602_112
    # the model's input where it is large enough; else 1 MiB, so the slope is not noise
    assert profiler.fit_shapes([1, 3, 512, 512]) == ([1, 1, 1, 1], [1, 3, 512, 512])
    assert profiler.fit_shapes([1, 3, 224, 224]) == ([1, 1, 1, 1], [1, 1, 1, 262_144])


def test_forwarding_is_what_a_forward_only_stage_adds_beyond_serving() -> None:
    # through the front stage: its serving + forwarding + the probe's serving
    assert profiler.overheads_from_round_trips([2.0, 3.0, 2.5], [7.0, 6.0, 6.5]) == (2.5, 1.5)
    assert profiler.overheads_from_round_trips([2.0], [3.0]) == (2.0, 0.0)
