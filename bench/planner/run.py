"""Planner benchmark: planning time, partitioned vs best single-tier latency, and the
digits variants. Prints tables; `docs/planner.md` holds a real run.

    python bench/planner/run.py [--repeats 10] [--slowdown 8] [--rtt-ms 20]

1. Plan time (median of 20) for a random 200-cut chain and a random 1000-node
   DNN-shaped DAG, three tiers; goals < 10 ms and < 100 ms.
2. For mobilenet_v2, resnet18, vgg_like and alexnet_like, profiles measured on this
   machine with onnxruntime: the cloud tier is this machine, the device tier this
   machine slowed down `--slowdown` times (declared, as a node's gflops would be).
   At 1, 10 and 100 Mbps (RTT `--rtt-ms`) the planned latency is divided by the best
   of device-only and cloud-only; below 1 means partitioning wins.
3. The digits variants: held-out accuracy, size, and measured per-image latency.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from edgeai_operator.planner import (
    LayerGraph,
    Link,
    Problem,
    Tensor,
    Variant,
    evaluate,
    plan_partitions,
)
from edgeai_worker import graph, profiler, variants, zoo

MODELS = ("mobilenet_v2", "resnet18", "vgg_like", "alexnet_like")
BANDWIDTHS_MBPS = (1.0, 10.0, 100.0)


def _say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _median_ms(fn: Callable[[], object], runs: int = 20) -> float:
    fn()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def _random_ms(rng: random.Random, n: int) -> dict[str, tuple[float, ...]]:
    base = [rng.uniform(0.1, 5.0) for _ in range(n)]
    return {"device": tuple(base), "edge": tuple(b / 8 for b in base),
            "cloud": tuple(b / 40 for b in base)}


def random_chain(n: int, seed: int = 0) -> LayerGraph:
    rng = random.Random(seed)
    return LayerGraph.chain(_random_ms(rng, n), [int(10 ** rng.uniform(3, 6.5))
                                                  for _ in range(n + 1)])


def random_dag(n: int, seed: int = 0) -> LayerGraph:
    """Residual-network shaped: a backbone where a third of the nodes also read a
    tensor from up to four nodes back (skip connections), some read by several."""
    rng = random.Random(seed)
    readers: dict[int, list[int]] = {v: [] for v in range(-1, n)}
    for v in range(n):
        readers[v - 1].append(v)
        if v >= 3 and rng.random() < 0.33:
            readers[rng.randint(v - 4, v - 2)].append(v)
    tensors = tuple(
        Tensor((f"t{p + 1}",), int(10 ** rng.uniform(3, 6.5)), p, tuple(readers[p]), p == n - 1)
        for p in range(-1, n)
    )
    return LayerGraph(_random_ms(rng, n), tensors)


def plan_times() -> list[tuple[str, str, float, float]]:
    links = (Link(10, 15), Link(100, 25))
    rows = []
    chain = Problem((Variant("fp32", random_chain(200)),), links=links)
    dag = Problem((Variant("fp32", random_dag(1000)),), links=links)
    for label, problem, goal in (("200-cut chain", chain, 10.0), ("1000-node DAG", dag, 100.0)):
        plan = plan_partitions(problem, alternatives=False)
        ms = _median_ms(lambda p=problem: plan_partitions(p, alternatives=False))
        rows.append((label, plan.method, ms, goal))
        _say(f"{label}: {ms:.2f} ms ({plan.method})")
    # the constrained path: cloud cost under a latency SLO needs the enumeration
    two_tier = Problem(chain.variants, path=("device", "cloud"), links=(Link(100, 15),))
    fastest = plan_partitions(two_tier, alternatives=False)
    assert fastest.predicted_latency_ms is not None
    slo = replace(two_tier, objective="cloudCost",
                  slo_latency_ms=fastest.predicted_latency_ms * 1.05)
    plan = plan_partitions(slo, alternatives=False)
    ms = _median_ms(lambda: plan_partitions(slo, alternatives=False), runs=5)
    rows.append(("200-cut chain, 2 tiers, cloudCost under SLO", plan.method, ms, float("nan")))
    return rows


def measured_chain(name: str, repeats: int,
                   slowdown: float) -> tuple[LayerGraph, dict[str, Any]]:
    profile = profiler.profile_model(zoo.export_onnx(name), name=name, repeats=repeats,
                                     progress=_say)
    cloud = [float(s["measuredMs"]) for s in profile["segments"]]
    chain = LayerGraph.chain({"device": [x * slowdown for x in cloud], "cloud": cloud},
                             [int(c["sizeBytes"]) for c in profile["cuts"]],
                             [tuple(c["tensors"]) for c in profile["cuts"]])
    return chain, profile


def ratios(repeats: int, slowdown: float, rtt_ms: float) -> list[dict[str, Any]]:
    rows = []
    for name in MODELS:
        chain, profile = measured_chain(name, repeats, slowdown)
        n = chain.size
        for mbps in BANDWIDTHS_MBPS:
            problem = Problem((Variant("fp32", chain),), path=("device", "cloud"),
                              links=(Link(mbps, rtt_ms),))
            plan = plan_partitions(problem, alternatives=False)
            assert plan.predicted_latency_ms is not None
            device_only = evaluate(problem, chain, [0] * n).latency_ms
            cloud_only = evaluate(problem, chain, [1] * n).latency_ms
            best_single = min(device_only, cloud_only)
            split = sum(1 for k in plan.assignment if k == 0)
            sent = plan.transfers[0].bytes if plan.transfers else 0
            rows.append({"model": name, "mbps": mbps, "segments": n, "deviceSegments": split,
                         "sentBytes": sent, "planned": plan.predicted_latency_ms,
                         "deviceOnly": device_only, "cloudOnly": cloud_only,
                         "ratio": plan.predicted_latency_ms / best_single,
                         "hostGflops": profile["host"]["gflops"]})
    return rows


def digits_rows() -> list[dict[str, Any]]:
    _, _, x_test, _ = zoo.digits_split()
    rows = variants.digits_variants()
    image = np.ascontiguousarray(x_test[:1])
    for row in rows:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(row["path"], options, providers=["CPUExecutionProvider"])
        row["msPerImage"] = _median_ms(lambda s=session: s.run(None, {"input": image}), 200)
        row["cuts"] = len(graph.cut_points(onnx.load(row["path"])))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--slowdown", type=float, default=8.0,
                        help="device tier = this machine x SLOWDOWN")
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    args = parser.parse_args(argv)

    print("## Planning time (median of 20, this machine)\n")
    print("| instance | solver | ms | goal ms |")
    print("|---|---|---:|---:|")
    for label, method, ms, goal in plan_times():
        goal_text = "-" if goal != goal else f"< {goal:g}"
        print(f"| {label} | {method} | {ms:.2f} | {goal_text} |")

    rows = ratios(args.repeats, args.slowdown, args.rtt_ms)
    print(f"\n## Planned latency / best of (device-only, cloud-only)\n\n"
          f"cloud = this machine ({rows[0]['hostGflops']:g} GFLOPS measured), device = "
          f"{args.slowdown:g}x slower, RTT {args.rtt_ms:g} ms, onnxruntime medians of "
          f"{args.repeats}\n")
    print("| model | Mbps | device segs | sent bytes | planned ms | device-only ms "
          "| cloud-only ms | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['mbps']:g} | {r['deviceSegments']}/{r['segments']} "
              f"| {r['sentBytes']} | {r['planned']:.2f} | {r['deviceOnly']:.2f} "
              f"| {r['cloudOnly']:.2f} | {r['ratio']:.3f} |")
    print("\n| model | ratio @1 Mbps | ratio @10 Mbps | ratio @100 Mbps |")
    print("|---|---:|---:|---:|")
    for name in MODELS:
        cells = " | ".join(f"{r['ratio']:.3f}" for r in rows if r["model"] == name)
        print(f"| {name} | {cells} |")

    print("\n## digits_cnn variants (held-out digits, 450 images)\n")
    print("| variant | accuracy | size bytes | zlib bytes | nonzero params | cuts "
          "| ms/image |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in digits_rows():
        print(f"| {r['name']} | {r['accuracy']:.4f} | {r['sizeBytes']} "
              f"| {r['compressedBytes']} | {r['nonzeroParameters']}/{r['parameters']} "
              f"| {r['cuts']} | {r['msPerImage']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
