"""Per-segment profiles measured with onnxruntime on this machine."""

from __future__ import annotations

import math

import onnx
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
    # the heaviest segment (a conv) takes longer than the lightest (a ReLU or a pool)
    heavy = max(segments, key=lambda s: s["flops"])
    light = min(segments, key=lambda s: s["flops"])
    assert heavy["measuredMs"] > light["measuredMs"]
    assert profile["host"]["gflops"] == 10.0
    assert any("segment 5/" in m for m in messages)
    assert any("whole model" in m for m in messages)
    # plain data: survives YAML
    assert yaml.safe_load(yaml.safe_dump(profile)) == profile


def test_host_gflops_is_a_plausible_cpu_figure() -> None:
    gflops = profiler.host_gflops(size=256, repeats=3)
    assert 0.1 < gflops < 100_000


def test_tier_estimates_scale_with_declared_speed() -> None:
    profile = {"host": {"gflops": 40.0}, "segments": [{"measuredMs": 2.0}, {"measuredMs": 0.5}]}
    assert profiler.scaled_ms(profile, 40.0) == [2.0, 0.5]
    assert profiler.scaled_ms(profile, 10.0) == [8.0, 2.0]
    assert profiler.analytic_ms([8_000_000, 0], 8.0) == [1.0, 0.0]
