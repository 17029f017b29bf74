"""Per-segment profiles: measured onnxruntime latency on this machine, bytes at each
cut, FLOPs per segment, and the machine's effective GFLOPS to scale them by.

A profile is plain data (`dict` ready for YAML/JSON) of this shape:

    kind: Profile
    model: resnet18
    variant: fp32
    host: {gflops: 61.3, method: "...", threads: 2}
    input: {name: input, shape: [1, 3, 224, 224], dtype: FP32}
    repeats: 20
    totalMs: 95.1              # sum of the segments' medians
    wholeModelMs: 88.0         # the unsplit model, for comparison
    totalFlops: 3633038848
    cuts: [{index, tensors, sizeBytes, position}]
    segments: [{index, positions: "a-b", flops, measuredMs}]

Host GFLOPS is the median throughput of an fp32 onnxruntime MatMul (1024 x 1024), the
same kind of number a node's `edgeai.dev/gflops` annotation declares, so that a
tier's time is `measuredMs x host.gflops / tier.gflops`. The analytic alternative,
`flops / tier.gflops`, assumes a model runs at the declared peak.
"""

from __future__ import annotations

import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from edgeai_worker import graph as onnx_graph

Progress = Callable[[str], None]


def stderr_progress(message: str) -> None:
    print(f"[edgeai profile] {message}", file=sys.stderr, flush=True)


def _session(model: onnx.ModelProto, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _time_ms(
    session: ort.InferenceSession, feeds: dict[str, np.ndarray], warmup: int, repeats: int
) -> tuple[float, list[np.ndarray]]:
    outputs: list[np.ndarray] = []
    for _ in range(warmup):
        outputs = session.run(None, feeds)
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        outputs = session.run(None, feeds)
        samples.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(samples), outputs


def host_gflops(size: int = 1024, repeats: int = 10, threads: int | None = None) -> float:
    """Effective fp32 GFLOPS of this machine through onnxruntime (a square MatMul)."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((size, size)).astype(np.float32)
    b = onnx.numpy_helper.from_array(weight, "b")
    g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul", [a], [c], [b])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    ms, _ = _time_ms(_session(model, threads), {"a": weight}, 3, repeats)
    return 2.0 * size**3 / (ms / 1000.0) / 1e9


def _dtype(elem_type: int) -> Any:
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type)


def example_feed(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs matching the model's declared inputs (symbolic dims as 1)."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    initializers = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
        feeds[vi.name] = rng.standard_normal(shape).astype(_dtype(tt.elem_type))
    return feeds


def profile_model(
    model: onnx.ModelProto | str | Path,
    *,
    name: str = "model",
    variant: str = "fp32",
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    gflops: float | None = None,
    progress: Progress | None = stderr_progress,
) -> dict[str, Any]:
    """Measures every segment between single-tensor cuts (median of `repeats` after
    `warmup` runs), feeding each the previous segment's real output."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    say = progress or (lambda _: None)
    dag = onnx_graph.analyze(model)
    cuts = onnx_graph.graph_cut_points(dag)
    if gflops is None:
        say("measuring this machine's GFLOPS (onnxruntime MatMul 1024x1024)")
        gflops = host_gflops(threads=threads)
    feeds = example_feed(model)
    whole_ms, _ = _time_ms(_session(model, threads), feeds, warmup, repeats)
    say(f"{name}: whole model {whole_ms:.2f} ms; {len(cuts) - 1} segments to measure")
    partitioner = onnx_graph.Partitioner(model)
    segments: list[dict[str, Any]] = []
    values = dict(feeds)
    started = time.monotonic()
    for i, (a, b) in enumerate(itertools.pairwise(cuts)):
        part = partitioner.extract(a.tensors, b.tensors)
        session = _session(part, threads)
        inputs = {x.name: values[x.name] for x in session.get_inputs()}
        ms, outputs = _time_ms(session, inputs, warmup, repeats)
        values.update(zip([o.name for o in session.get_outputs()], outputs, strict=True))
        flops = sum(n.flops for n in dag.nodes[a.position : b.position])
        segments.append(
            {
                "index": i,
                "positions": f"{a.position}-{b.position - 1}",
                "flops": flops,
                "measuredMs": round(ms, 4),
            }
        )
        if (i + 1) % 5 == 0 or i + 2 == len(cuts):
            say(
                f"{name}: segment {i + 1}/{len(cuts) - 1} "
                f"({time.monotonic() - started:.1f}s elapsed)"
            )
    input_vi = model.graph.input[0]
    dims = [
        d.dim_value if d.HasField("dim_value") else 1 for d in input_vi.type.tensor_type.shape.dim
    ]
    return {
        "kind": "Profile",
        "model": name,
        "variant": variant,
        "host": {
            "gflops": round(gflops, 3),
            "threads": threads or os.cpu_count(),
            "method": "median fp32 onnxruntime MatMul 1024x1024",
        },
        "input": {"name": input_vi.name, "shape": dims, "dtype": "FP32"},
        "repeats": repeats,
        "totalMs": round(sum(s["measuredMs"] for s in segments), 4),
        "wholeModelMs": round(whole_ms, 4),
        "totalFlops": sum(n.flops for n in dag.nodes),
        "cuts": [
            {
                "index": c.index,
                "tensors": list(c.tensors),
                "sizeBytes": c.size_bytes,
                "position": c.position,
            }
            for c in cuts
        ],
        "segments": segments,
    }


def scaled_ms(profile: dict[str, Any], tier_gflops: float) -> list[float]:
    """A tier's per-segment time from the measured profile: host time x host/tier speed."""
    ratio = float(profile["host"]["gflops"]) / tier_gflops
    return [float(s["measuredMs"]) * ratio for s in profile["segments"]]


def analytic_ms(flops: Sequence[int], tier_gflops: float) -> list[float]:
    """A tier's per-segment time from FLOPs alone, at the tier's declared GFLOPS."""
    return [f / (tier_gflops * 1e6) for f in flops]
