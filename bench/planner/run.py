"""Planner benchmark: planning time, partitioned vs best single-tier latency, and the
digits variants. Writes the numbers as JSON (`--out`, default `docs/results/planner.json`,
which `make docs-numbers` renders into `docs/planner.md`) and prints the same tables.

    python bench/planner/run.py [--repeats 10] [--slowdown 8] [--rtt-ms 20] [--out FILE]

1. Plan time (median of 20) for a random 200-cut chain and a random 1000-node
   DNN-shaped DAG, three tiers; goals < 10 ms and < 100 ms.
2. For mobilenet_v2, resnet18, vgg_like and alexnet_like, profiles measured on this
   machine with onnxruntime. Two tiers: the cloud is this machine, the device this
   machine slowed down `--slowdown` times (declared, as a node's gflops would be).
   Three tiers: the edge is this machine, the device `--slowdown` times slower, the
   cloud 4x faster behind a 100 Mbps / 25 ms metro link. At 1, 10 and 100 Mbps
   device uplink (RTT `--rtt-ms`) the planned latency is divided by the best
   single-tier latency; below 1 means partitioning wins.
3. The digits variants: held-out accuracy, size, and measured per-image latency.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the renderer beside the benches prints the tables

import render_numbers  # noqa: E402

MODELS = ("mobilenet_v2", "resnet18", "vgg_like", "alexnet_like")
BANDWIDTHS_MBPS = (1.0, 10.0, 100.0)
CLOUD_SPEEDUP = 4.0
# what the result keeps of each digits variant (not its cache path)
DIGITS_KEYS = (
    "name",
    "accuracy",
    "sizeBytes",
    "compressedBytes",
    "nonzeroParameters",
    "parameters",
)


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
    return {
        "device": tuple(base),
        "edge": tuple(b / 8 for b in base),
        "cloud": tuple(b / 40 for b in base),
    }


def random_chain(n: int, seed: int = 0) -> LayerGraph:
    rng = random.Random(seed)
    return LayerGraph.chain(
        _random_ms(rng, n), [int(10 ** rng.uniform(3, 6.5)) for _ in range(n + 1)]
    )


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


def plan_times() -> list[dict[str, Any]]:
    links = (Link(10, 15), Link(100, 25))
    rows = []
    chain = Problem((Variant("fp32", random_chain(200)),), links=links)
    dag = Problem((Variant("fp32", random_dag(1000)),), links=links)
    for label, problem, goal in (("200-cut chain", chain, 10.0), ("1000-node DAG", dag, 100.0)):
        plan = plan_partitions(problem, alternatives=False)
        ms = _median_ms(partial(plan_partitions, problem, alternatives=False))
        rows.append({"instance": label, "solver": plan.method, "ms": ms, "goalMs": goal})
        _say(f"{label}: {ms:.2f} ms ({plan.method})")
    # the constrained path: cloud cost under a latency SLO needs the enumeration
    two_tier = Problem(chain.variants, path=("device", "cloud"), links=(Link(100, 15),))
    fastest = plan_partitions(two_tier, alternatives=False)
    assert fastest.predicted_latency_ms is not None
    slo = replace(
        two_tier, objective="cloudCost", slo_latency_ms=fastest.predicted_latency_ms * 1.05
    )
    plan = plan_partitions(slo, alternatives=False)
    ms = _median_ms(lambda: plan_partitions(slo, alternatives=False), runs=5)
    rows.append(
        {
            "instance": "200-cut chain, 2 tiers, cloudCost under SLO",
            "solver": plan.method,
            "ms": ms,
            "goalMs": None,
        }
    )
    return rows


def measured_profile(name: str, repeats: int) -> dict[str, Any]:
    return profiler.profile_model(zoo.export_onnx(name), name=name, repeats=repeats, progress=_say)


def _chain(profile: dict[str, Any], speed: dict[str, float]) -> LayerGraph:
    """Tier times = this machine's measured times / the tier's speed relative to it."""
    host = [float(s["measuredMs"]) for s in profile["segments"]]
    return LayerGraph.chain(
        {t: [x / f for x in host] for t, f in speed.items()},
        [int(c["sizeBytes"]) for c in profile["cuts"]],
        [tuple(c["tensors"]) for c in profile["cuts"]],
    )


def ratios(
    profiles: dict[str, dict[str, Any]], slowdown: float, rtt_ms: float, three_tier: bool
) -> list[dict[str, Any]]:
    rows = []
    for name, profile in profiles.items():
        if three_tier:
            speed = {"device": 1 / slowdown, "edge": 1.0, "cloud": CLOUD_SPEEDUP}
        else:
            speed = {"device": 1 / slowdown, "cloud": 1.0}
        chain = _chain(profile, speed)
        path = tuple(speed)
        n = chain.size
        for mbps in BANDWIDTHS_MBPS:
            links = (Link(mbps, rtt_ms), *((Link(100, 25),) if three_tier else ()))
            problem = Problem((Variant("fp32", chain),), path=path, links=links)
            plan = plan_partitions(problem, alternatives=False)
            assert plan.predicted_latency_ms is not None
            single = {t: evaluate(problem, chain, [k] * n).latency_ms for k, t in enumerate(path)}
            stages = " + ".join(f"{s.tier}[{s.layers}]" for s in plan.stages)
            rows.append(
                {
                    "model": name,
                    "mbps": mbps,
                    "stages": stages,
                    "sentBytes": plan.transfers[0].bytes if plan.transfers else 0,
                    "planned": plan.predicted_latency_ms,
                    "single": single,
                    "ratio": plan.predicted_latency_ms / min(single.values()),
                }
            )
    return rows


def sweep(
    profiles: dict[str, dict[str, Any]], slowdown: float, rtt_ms: float
) -> list[dict[str, Any]]:
    """Where between 1 and 1000 Mbps a split beats both single tiers (two tiers)."""
    grid = [round(10 ** (e / 10), 2) for e in range(31)]
    rows = []
    for name, profile in profiles.items():
        chain = _chain(profile, {"device": 1 / slowdown, "cloud": 1.0})
        split_at: list[float] = []
        best = (1.0, 0.0)
        for mbps in grid:
            problem = Problem(
                (Variant("fp32", chain),), path=("device", "cloud"), links=(Link(mbps, rtt_ms),)
            )
            plan = plan_partitions(problem, alternatives=False)
            assert plan.predicted_latency_ms is not None
            single = min(evaluate(problem, chain, [k] * chain.size).latency_ms for k in (0, 1))
            if len(plan.stages) > 1:
                split_at.append(mbps)
            best = min(best, (plan.predicted_latency_ms / single, mbps))
        rows.append(
            {
                "model": name,
                "splitMbps": split_at,
                "bestRatio": best[0],
                "atMbps": best[1] if split_at else None,
            }
        )
    return rows


def digits_rows() -> list[dict[str, Any]]:
    _, _, x_test, _ = zoo.digits_split()
    image = np.ascontiguousarray(x_test[:1])
    rows = []
    for variant in variants.digits_variants():
        options = ort.SessionOptions()
        options.log_severity_level = 3
        path = variant["path"]
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        rows.append(
            {
                **{k: variant[k] for k in DIGITS_KEYS},
                "cuts": len(graph.cut_points(onnx.load(path))),
                "msPerImage": _median_ms(partial(session.run, None, {"input": image}), 200),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--slowdown", type=float, default=8.0, help="device tier = this machine x SLOWDOWN"
    )
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument(
        "--out",
        type=Path,
        default=render_numbers.RESULTS_DIR / "planner.json",
        help="where the JSON result goes (default: the file docs/planner.md is rendered from)",
    )
    args = parser.parse_args(argv)

    started = time.monotonic()
    report: dict[str, Any] = {
        "bench": "planner",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python bench/planner/run.py", *(argv or sys.argv[1:])]),
        "cpus": os.cpu_count(),
        "loadAverage": os.getloadavg()[0],
        "settings": {
            "repeats": args.repeats,
            "slowdown": args.slowdown,
            "rttMs": args.rtt_ms,
            "cloudSpeedup": CLOUD_SPEEDUP,
            "backhaul": {"mbps": 100.0, "rttMs": 25.0},
        },
        "planTimes": plan_times(),
    }
    profiles = {name: measured_profile(name, args.repeats) for name in MODELS}
    report["hostGflops"] = profiles[MODELS[0]]["host"]["gflops"]
    report["twoTier"] = ratios(profiles, args.slowdown, args.rtt_ms, three_tier=False)
    report["sweep"] = sweep(profiles, args.slowdown, args.rtt_ms)
    report["threeTier"] = ratios(profiles, args.slowdown, args.rtt_ms, three_tier=True)
    report["digits"] = digits_rows()
    report["elapsedS"] = time.monotonic() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for region in render_numbers.PLANNER_REGIONS:
        print(render_numbers.RENDERERS[region].render(report) + "\n")
    print(f"(written to {args.out}; make docs-numbers renders it into the docs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
