"""Render the benchmark tables of README.md and docs/*.md from the JSON results in
docs/results/, so that no number in them is pasted by hand.

    python bench/render_numbers.py          # rewrite the marked regions (make docs-numbers)
    python bench/render_numbers.py --check  # exit 1 naming each region that differs

A region is the text between `<!-- numbers:NAME -->` and `<!-- /numbers -->`; NAME
selects a renderer, which reads one JSON file of docs/results/ and returns markdown.
Text outside the regions is left as it is.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "docs" / "results"
CLOSE = "<!-- /numbers -->"
MARKER = re.compile(r"<!-- (?:numbers:([a-z0-9-]+)|/numbers) -->")


class NumbersError(Exception):
    """A doc's markers or a result file that cannot be rendered; the message names both."""


@dataclass(frozen=True)
class Renderer:
    """What one region shows: `render` applied to the JSON file `source` of the results."""

    source: str
    render: Callable[[Mapping[str, Any]], str]


def add_result_arguments(parser: argparse.ArgumentParser, results_file: str) -> None:
    """A bench's `--out` (default: its file of docs/results/) and `--conditions`."""
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR / results_file,
        help="where the JSON result goes (default: the file the docs are rendered from)",
    )
    parser.add_argument(
        "--conditions",
        default="not recorded (--conditions)",
        help="what else ran on the machine, recorded with the result",
    )


def default_docs(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


# --- planner (bench/planner/run.py) -----------------------------------------------------


def _table(header: Sequence[str], align: str, rows: Iterable[Sequence[str]]) -> str:
    """A markdown table; `align` has one letter per column, l (left) or r (right)."""
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "".join("---|" if a == "l" else "---:|" for a in align))
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def planner_run(report: Mapping[str, Any]) -> str:
    return (
        f"Run of {report['date']} (`{report['command']}`, {report['cpus']} CPUs, load "
        f"average {report['loadAverage']:.1f} at its start, {report['elapsedS']:.0f} s)."
    )


def planner_time(report: Mapping[str, Any]) -> str:
    return _table(
        ("instance", "solver", "ms", "goal ms"),
        "llrr",
        (
            (
                r["instance"],
                r["solver"],
                f"{r['ms']:.2f}",
                "-" if r["goalMs"] is None else f"< {r['goalMs']:g}",
            )
            for r in report["planTimes"]
        ),
    )


def _ratio_tables(rows: Sequence[Mapping[str, Any]]) -> str:
    tiers = list(rows[0]["single"])
    detail = _table(
        (
            "model",
            "Mbps",
            "plan",
            "sent bytes",
            "planned ms",
            *(f"{t}-only ms" for t in tiers),
            "ratio",
        ),
        "lrlrr" + "r" * len(tiers) + "r",
        (
            (
                r["model"],
                f"{r['mbps']:g}",
                r["stages"],
                str(r["sentBytes"]),
                f"{r['planned']:.2f}",
                *(f"{r['single'][t]:.2f}" for t in tiers),
                f"{r['ratio']:.3f}",
            )
            for r in rows
        ),
    )
    models = list(dict.fromkeys(r["model"] for r in rows))
    bandwidths = list(dict.fromkeys(r["mbps"] for r in rows))
    ratio = {(r["model"], r["mbps"]): r["ratio"] for r in rows}
    summary = _table(
        ("model", *(f"ratio @{b:g} Mbps" for b in bandwidths)),
        "l" + "r" * len(bandwidths),
        ((m, *(f"{ratio[m, b]:.3f}" for b in bandwidths)) for m in models),
    )
    return f"{detail}\n\n{summary}"


def planner_two_tier(report: Mapping[str, Any]) -> str:
    s = report["settings"]
    return (
        f"cloud = this machine ({report['hostGflops']:g} GFLOPS measured), device = "
        f"{s['slowdown']:g}x slower, device->cloud RTT {s['rttMs']:g} ms; onnxruntime "
        f"medians of {s['repeats']} per segment\n\n" + _ratio_tables(report["twoTier"])
    )


def planner_three_tier(report: Mapping[str, Any]) -> str:
    s = report["settings"]
    return (
        f"edge = this machine, device = {s['slowdown']:g}x slower, cloud = "
        f"{s['cloudSpeedup']:g}x faster; device->edge at the given Mbps with RTT "
        f"{s['rttMs']:g} ms, edge->cloud {s['backhaul']['mbps']:g} Mbps with RTT "
        f"{s['backhaul']['rttMs']:g} ms\n\n" + _ratio_tables(report["threeTier"])
    )


def planner_sweep(report: Mapping[str, Any]) -> str:
    rows = []
    for r in report["sweep"]:
        split = r["splitMbps"]
        where = f"{split[0]:g}-{split[-1]:g}" if split else "none"
        at = "-" if r["atMbps"] is None else f"{r['atMbps']:g}"
        rows.append((r["model"], where, f"{r['bestRatio']:.3f}", at))
    return _table(("model", "Mbps where a split is planned", "best ratio", "at Mbps"), "llrr", rows)


def planner_digits(report: Mapping[str, Any]) -> str:
    return _table(
        ("variant", "accuracy", "size bytes", "zlib bytes", "nonzero params", "cuts", "ms/image"),
        "lrrrrrr",
        (
            (
                r["name"],
                f"{r['accuracy']:.4f}",
                str(r["sizeBytes"]),
                str(r["compressedBytes"]),
                f"{r['nonzeroParameters']}/{r['parameters']}",
                str(r["cuts"]),
                f"{r['msPerImage']:.3f}",
            )
            for r in report["digits"]
        ),
    )


# --- operator at scale (bench/operator/run.py) ------------------------------------------

# (key in a run, label, format); a run without the key shows "-"
OPERATOR_METRICS: tuple[tuple[str, str, str], ...] = (
    ("deploymentsAvailable", "DNNDeployments Available", "{}"),
    ("applyToAvailableP50S", "apply-to-Available p50 (s)", "{:.1f}"),
    ("applyToAvailableP99S", "apply-to-Available p99 (s)", "{:.1f}"),
    ("lastAvailableS", "last DNNDeployment Available (s)", "{:.1f}"),
    ("directAvailableS", "direct workloads all available (s)", "{:.1f}"),
    ("availableRatio", "operator / direct, all available", "{:.2f}"),
    ("directPodsRunningS", "pods Running, direct (s)", "{:.1f}"),
    ("operatorPodsRunningS", "pods Running, through the operator (s)", "{:.1f}"),
    ("podsRunningRatio", "operator / direct (goal <= 1.2)", "{:.2f}"),
    ("directRequestsPerS", "API requests/s, direct phase (all clients)", "{:.0f}"),
    ("operatorPhaseRequestsPerS", "API requests/s, operator phase (all clients)", "{:.0f}"),
    ("operatorRequestsPerSRollout", "API requests/s by the operator, rollout", "{:.0f}"),
    ("operatorRequestsPerSSteady", "API requests/s by the operator, steady state", "{:.1f}"),
    ("operatorCpuSRollout", "operator CPU s, start to rollout done", "{:.1f}"),
    ("operatorCpuShareSteady", "operator CPU share, steady state (of one core)", "{:.3f}"),
    ("operatorPeakRssMiB", "operator peak RSS (MiB)", "{:.0f}"),
)


def _cell(run: Mapping[str, Any], key: str, fmt: str) -> str:
    return "-" if run.get(key) is None else fmt.format(run[key])


def operator_table(report: Mapping[str, Any]) -> str:
    runs = report["runs"]
    header = ("metric", *(f"{r['label']} ({r['date']})" for r in runs))
    rows = ((label, *(_cell(r, key, fmt) for r in runs)) for key, label, fmt in OPERATOR_METRICS)
    notes = "\n".join(f"- {r['label']}: {r['conditions']}" for r in runs)
    return _table(header, "l" + "r" * len(runs), rows) + "\n\n" + notes


def _span(values: Sequence[float], fmt: str) -> str:
    low, high = fmt.format(min(values)), fmt.format(max(values))
    return low if low == high else f"{low}-{high}"


def operator_summary(report: Mapping[str, Any]) -> str:
    runs = report["runs"]
    first, rest = runs[0], runs[1:]
    others = "".join(
        f"; {r['label']}: {r['directPodsRunningS']:.0f} s vs {r['operatorPodsRunningS']:.0f} s, "
        f"{r['podsRunningRatio']:.2f}"
        for r in rest
    )
    return (
        f"{first['label']} ({first['date']}; {first['scale']}): pods Running "
        f"{first['directPodsRunningS']:.0f} s directly vs {first['operatorPodsRunningS']:.0f} s "
        f"through the operator ({first['podsRunningRatio']:.2f}, goal <= 1.2{others}), "
        f"last DNNDeployment Available / every direct workload available "
        f"{_span([r['availableRatio'] for r in runs], '{:.2f}')}, "
        f"{_span([r['operatorRequestsPerSRollout'] for r in runs], '{:.0f}')} operator API "
        f"requests/s during the rollout and "
        f"{_span([r['operatorRequestsPerSSteady'] for r in runs], '{:.1f}')} in steady state, "
        f"operator peak RSS {_span([r['operatorPeakRssMiB'] for r in runs], '{:.0f}')} MiB."
    )


# --- models (bench/models/run.py) -------------------------------------------------------


def models_prepare(report: Mapping[str, Any]) -> str:
    rows = (
        (
            f"`{m['model']}`",
            f"`{m['source'].split('://', 1)[0]}://`",
            f"{m['variantsReady']}/{m['variantsRequested']}",
            f"{m['applyToPreparedS']:.1f}",
            f"{m['artifactBytes'].get('fp32', 0):,}",
        )
        for m in report["models"]
    )
    header = ("DNNModel", "source", "variants ready", "apply -> Prepared (s)", "fp32 artefact (B)")
    run = (
        f"Run of {report['date']} (`{report['command']}`, {report['cpus']} CPUs, "
        f"{report['conditions']}; {report['elapsedS']:.0f} s in all)."
    )
    return _table(header, "llrrr", rows) + "\n\n" + run


def models_fetch(report: Mapping[str, Any]) -> str:
    rows = (
        (
            f"`{p['deployment']}`",
            f"{p['tier']} (stage {p['stage']})",
            p["variant"],
            f"{p['fetchedBytes']:,}",
            f"{p['partitionBytes']:,}",
            str(p["partitions"]),
            f"{100 * p['partitionBytes'] / p['fetchedBytes']:.2f}%",
        )
        for p in report["pods"]
    )
    header = (
        "deployment",
        "pod",
        "variant",
        "fetched by its init container (B)",
        "partition files it runs (B)",
        "files",
        "runs / fetched",
    )
    return _table(header, "lllrrrr", rows)


# --- data plane (bench/dataplane/run.py) ------------------------------------------------


def dataplane_history(report: Mapping[str, Any]) -> str:
    history = report["history"]
    groups = history["groups"]
    return _table(
        ("goal", *(g["label"] for g in groups)),
        "l" * (len(groups) + 1),
        ((goal, *(g["cells"][i] for g in groups)) for i, goal in enumerate(history["goals"])),
    )


def _goal1(run: Mapping[str, Any]) -> str:
    g = run["goal1"]
    span = f"{g['ratioMin']:.2f}-{g['ratioMax']:.2f}" if g.get("ratioMax") else ""
    misses = "; ".join(f"{m['config']} {m['ratio']:.2f}" for m in g["misses"])
    return (
        f"{g['inRange']} of {g['of']}"
        + (f" ({span})" if span else "")
        + (f"; out of range: {misses}" if misses else "")
    )


def _goal3_sets(report: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(which runs, goal 3 ratios) of the report: its runs together, then each run's own."""
    current = report.get("currentCode")
    sets = [(f"runs {current['runs']}", current)] if current else []
    return sets + [(f"run {r['run']}", r) for r in report["runs"] if "goal3" in r]


def dataplane_runs(report: Mapping[str, Any]) -> str:
    def pairs(values: Mapping[str, float], unit: str = "") -> str:
        return ", ".join(f"{k} {v:.2f}{unit}" for k, v in values.items())

    runs = _table(
        (
            "run",
            "date",
            "1. measured / predicted in 0.9-1.1",
            "2. plan / min(device-only, cloud-only), where the plan is neither",
            "a split's speedup over device-only",
        ),
        "lllll",
        (
            (
                r["run"],
                r["date"],
                _goal1(r),
                pairs(r["goal2"]),
                pairs(r["splitSpeedupOverDeviceOnly"], "x"),
            )
            for r in report["runs"]
        ),
    )
    sets = _goal3_sets(report)
    tensors = list(dict.fromkeys(t for _, s in sets for p in s["goal3"].values() for t in p))
    hops = _table(
        ("3. OIP / raw aiohttp echo", *tensors),
        "l" + "r" * len(tensors),
        (
            (
                f"{path}, {which}",
                *(_span(ratios[t], "{:.2f}") if t in ratios else "-" for t in tensors),
            )
            for which, s in sets
            for path, ratios in s["goal3"].items()
        ),
    )
    encoding = "\n".join(
        f"- {which}: size {s['goal4']['sizeRatio']:.3f}, encoding time "
        f"{_span(s['goal4']['encodeRatio'], '{:.4f}')}, decoding time "
        f"{_span(s['goal4']['decodeRatio'], '{:.4f}')}"
        for which, s in sets
    )
    return f"{runs}\n\n{hops}\n\n4. Binary / JSON for the 1x3x224x224 FP32 input:\n\n{encoding}"


def dataplane_summary(report: Mapping[str, Any]) -> str:
    runs = report["runs"]
    in_range = ", ".join(str(r["goal1"]["inRange"]) for r in runs)
    full = [r for r in runs if r["goal1"]["inRange"] == r["goal1"]["of"]]
    misses = [m for r in runs for m in r["goal1"]["misses"]]
    g2 = [v for r in runs for v in r["goal2"].values()]
    # [binary path, with an Identity model] x (over the shaped link, within one namespace)
    shaped: list[list[float]] = [[], []]
    loopback: list[list[float]] = [[], []]
    for _, s in _goal3_sets(report):
        for i, by_tensor in enumerate(s["goal3"].values()):
            for tensor, values in by_tensor.items():
                (shaped if tensor.endswith("shaped link") else loopback)[i].extend(values)
    full_span = _span([r["goal1"][k] for r in full for k in ("ratioMin", "ratioMax")], "{:.2f}")
    miss_text = "".join(
        f"; {m['config']} {m['ratio']:.2f} in run {m['run']}"
        + (f": {m['note']}" if "note" in m else "")
        for m in misses
    )
    sizes = [s["goal4"]["sizeRatio"] for _, s in _goal3_sets(report)]
    return (
        f"Runs {runs[0]['run']}-{runs[-1]['run']}: measured / predicted latency within "
        f"0.9-1.1 on {in_range} of {runs[0]['goal1']['of']} configurations "
        f"({full_span} in the runs with all in range{miss_text}); partitioned / best single "
        f"tier {_span(g2, '{:.2f}')} where the plan is neither single tier; one hop of the "
        f"OIP binary path / a raw aiohttp echo {_span(shaped[0], '{:.2f}')} over "
        f"the shaped link and {_span(loopback[0], '{:.2f}')} on loopback "
        f"({_span(loopback[1], '{:.2f}')} with an Identity model's onnxruntime "
        f"run added); binary / JSON size {_span(sizes, '{:.3f}')}."
    )


def dataplane_run_summary(report: Mapping[str, Any], run: str, date: str) -> dict[str, Any]:
    """One entry of docs/results/dataplane.json's `runs` from a full report of
    bench/dataplane/run.py (what the tables above show of it)."""
    configs = []
    goal2: dict[str, float] = {}
    speedup: dict[str, float] = {}
    for m in report["models"]:
        for s in m["scenarios"]:
            where = f"{m['model']} @{s['uplink_mbps']:g} Mb"
            results = s["results"]
            planned = results["partitioned (planner)"]
            for name, r in results.items():
                if not r.get("same_as"):
                    configs.append((f"{m['model']} {name} @{s['uplink_mbps']:g} Mb", r["ratio"]))
            if not planned.get("same_as"):
                goal2[where] = s["partitioned_vs_best_single"]
                if " + " in s["plan"]:
                    speedup[where] = results["device-only"]["measured_ms"] / planned["measured_ms"]
    in_range = [r for _, r in configs if 0.9 <= r <= 1.1]
    goal3: dict[str, dict[str, list[float]]] = {
        "binary path (a stage without a model)": {},
        "with an Identity model (+ onnxruntime)": {},
    }
    for h in report["hops"]:
        where = "shaped link" if "shaped" in h["path"] else "one namespace"
        tensor = f"{h['bytes'] / 1000:.0f} KB, {where}"
        binary, identity = goal3.values()
        binary[tensor] = [h["ratio"], h["ratio"]]
        identity[tensor] = [h["model_ratio"], h["model_ratio"]]
    e = report["encoding"]
    return {
        "run": run,
        "date": date,
        "goal1": {
            "inRange": len(in_range),
            "of": len(configs),
            "ratioMin": min(r for _, r in configs),
            "ratioMax": max(r for _, r in configs),
            "misses": [
                {"run": run, "config": c, "ratio": r} for c, r in configs if not 0.9 <= r <= 1.1
            ],
        },
        "goal2": goal2,
        "splitSpeedupOverDeviceOnly": speedup,
        "goal3": goal3,
        "goal4": {
            "sizeRatio": e["size_ratio"],
            "encodeRatio": [e["encode_ratio"]] * 2,
            "decodeRatio": [e["decode_ratio"]] * 2,
        },
    }


# --- corpus (bench/corpus/run.py) -------------------------------------------------------


def corpus_table(report: Mapping[str, Any]) -> str:
    return _table(
        ("package", "model", "nodes (compute)", "in/out", "cuts", "largest cut bytes",
         "split at 10 Mbit/s", "max abs diff", "3 stages: max abs diff",
         "every cut: max diff (rel. above 1)"),
        "llrrrrlrrr",
        (
            (
                r["package"],
                r["model"],
                f"{r['onnxNodes']} ({r['computeNodes']})",
                f"{r['inputs']}/{r['outputs']}",
                str(r["cuts"]),
                f"{r['largestCutBytes']:,}",
                r["split"].replace(" > ", " &gt; "),
                f"{r['maxAbsDiff']:.1e}",
                "-" if r["threeStageMaxAbsDiff"] is None else f"{r['threeStageMaxAbsDiff']:.1e}",
                f"{r['cutsMaxRelDiff']:.1e}",
            )
            for r in report["rows"]
        ),
    )  # fmt: skip


def corpus_analysis(report: Mapping[str, Any]) -> str:
    largest = report["largest"]
    slowest = max(report["rows"], key=lambda r: r["analysisS"])
    return (
        f"Run of {report['date']} ({report['seconds']:.0f} s; "
        + ", ".join(f"{k} {v}" for k, v in report["packages"].items())
        + f"). Graph analysis of the largest model, {largest['model']} "
        f"({largest['onnxNodes']} ONNX nodes, {largest['computeNodes']} compute nodes): "
        f"{largest['analysisS']:.2f} s (goal: at most 2 s for 1000 nodes); the slowest, "
        f"{slowest['model']} ({slowest['onnxNodes']} nodes): {slowest['analysisS']:.2f} s."
    )


# --- training (bench/training/run.py) ---------------------------------------------------


def _opt(value: Any, fmt: str = "{}") -> str:
    return "not reached" if value is None else fmt.format(value)


def training_results(report: Mapping[str, Any]) -> str:
    setup = report["setup"]
    parts = [
        f"Run of {report['generated']} ({report['host']['cpus']} CPUs; "
        f"{report['host']['conditions']}; {report['benchSeconds']:.0f} s), "
        f"{setup['workers']} workers, batch {setup['batchSize']}, learning rate "
        f"{setup['learningRate']}, every job real processes over HTTP.",
        "",
        f"Compression: synchronous SGD, {setup['compressionRounds']} rounds each, same seeds "
        "and data split; uplink bytes are the request bodies the aggregator read.",
        "",
        _table(
            ("update", "uplink bytes", "fewer bytes than dense", "accuracy", "vs dense"),
            "lrrrr",
            (
                (
                    c["name"],
                    f"{c['bytesUp']:,}",
                    f"{c['uplinkReduction']:.1f}x",
                    f"{c['accuracy']:.4f}",
                    f"{c['accuracyRatio']:.4f}x",
                )
                for c in report["compression"]
            ),
        ),
    ]
    fed = report["fedavgRounds"]
    parts += [
        "",
        f"Rounds to {fed['target']:.2f} held-out accuracy: dense sync SGD "
        f"{_opt(fed['syncSGDRounds'])}, FedAvg with {fed['localSteps']} local steps "
        f"{_opt(fed['fedavgRounds'])} ({_opt(fed['ratio'], '{:.2f}x')} the rounds).",
        "",
        "DP-SGD (FedAvg, 10 local steps, per-example clipping), epsilon from opacus's RDP "
        "accountant:",
        "",
        _table(
            ("noise multiplier", "clip norm", "rounds", "accuracy", "epsilon", "delta"),
            "rrrrrr",
            (
                (
                    f"{p['noiseMultiplier']:g}",
                    f"{p['clipNorm']:g}",
                    str(p["rounds"]),
                    f"{p['accuracy']:.4f}",
                    f"{p['epsilon']:.2f}",
                    f"{p['delta']:g}",
                )
                for p in report["privacy"]
            ),
        ),
        "",
        "IID against non-IID shards:",
        "",
        _table(
            ("mode", "split", "rounds", "accuracy", "rounds to 0.90"),
            "llrrr",
            (
                (
                    s["mode"],
                    s["split"] + (f" (alpha {s['alpha']:g})" if s["alpha"] else ""),
                    str(s["rounds"]),
                    f"{s['accuracy']:.4f}",
                    _opt(s["roundsTo90"]),
                )
                for s in report["split"]
            ),
        ),
    ]
    if "shaped" in report:
        shaped = report["shaped"]
        parts += [
            "",
            f"{shaped['workers']} workers, each in its own network namespace behind a "
            f"{shaped['linkMbps']:g} Mbit/s `tc tbf` link, to {shaped['target']:.2f} accuracy:",
            "",
            _table(
                ("", "rounds", "accuracy", "training wall time (s)", "bytes sent"),
                "lrrrr",
                (
                    (
                        f"{name} ({r['mode']})",
                        str(r["rounds"]),
                        f"{r['accuracy']:.4f}",
                        f"{r['trainingSeconds']:.1f}",
                        f"{r['bytesUp']:,}",
                    )
                    for name, r in (
                        ("parameter server", shaped["parameterServer"]),
                        ("gossip, ring", shaped["gossip"]),
                    )
                ),
            ),
        ]
    return "\n".join(parts)


def training_summary(report: Mapping[str, Any]) -> str:
    by_kind = {c["kind"]: c for c in report["compression"]}
    top, sign = by_kind["topk"], by_kind["sign"]
    fed = report["fedavgRounds"]
    return (
        f"top-1% sparsification with error feedback sends {top['uplinkReduction']:.0f}x fewer "
        f"uplink bytes than dense sync SGD at {top['accuracyRatio']:.3f}x its accuracy, sign "
        f"with error feedback {sign['uplinkReduction']:.0f}x at {sign['accuracyRatio']:.3f}x; "
        f"FedAvg with {fed['localSteps']} local steps needs {_opt(fed['ratio'], '{:.2f}x')} the "
        f"rounds to {fed['target']:.2f} accuracy"
    )


# --- protocol (bench/protocol/run.py) --------------------------------------------------

PROTOCOL_MODES = {
    "rest_binary": "REST, binary tensors",
    "rest_json": "REST, JSON (orjson)",
    "rest_json_stdlib": "REST, JSON (json module)",
    "grpc": "gRPC, raw contents",
}


def protocol_table(report: Mapping[str, Any]) -> str:
    rows = []
    for row in report["rows"]:
        rows.append(
            [
                row["model"],
                PROTOCOL_MODES[row["mode"]],
                str(row["clients"]),
                f"{row['p50Ms']:.2f}",
                f"{row['p95Ms']:.2f}",
                f"{row['perSecond']:.0f}",
            ]
        )
    for row in report["chain"]:
        rows.append(
            [
                "conv, 2 stages",
                f"forwarding over {row['forwarding'].upper()}",
                str(row["clients"]),
                f"{row['p50Ms']:.2f}",
                f"{row['p95Ms']:.2f}",
                f"{row['perSecond']:.0f}",
            ]
        )
    header = ["model", "protocol", "clients", "p50 ms", "p95 ms", "requests/s"]
    clients = {PROTOCOL_MODES[r["mode"]]: r["client"] for r in report["rows"] if "client" in r}
    used = "; ".join(f"{mode}: {client}" for mode, client in clients.items())
    return _table(header, "lllrrr", rows) + (
        (f"\n\nClients: {used}." if used else "")
        + f"\n\n{report['date']}, {report['cpus']} CPUs, 1-minute load average "
        f"{report['loadAverage'][0]} at the start and {report['loadAverage'][1]} at the end; "
        f"conditions: {report['conditions']}."
    )


def _chain_grpc_over_http(report: Mapping[str, Any]) -> float:
    """p50 of the chain forwarding over gRPC / over HTTP, one client."""
    http, grpc_ = (
        next(c for c in report["chain"] if c["forwarding"] == kind and c["clients"] == 1)
        for kind in ("http", "grpc")
    )
    return float(grpc_["p50Ms"] / http["p50Ms"])


def protocol_summary(report: Mapping[str, Any]) -> str:
    r = report["ratios"]
    return (
        f"p50 with one client: JSON through orjson takes {r['convJsonOrjsonOverStdlib']:.2f}x "
        f"the json module's time on the conv input ({r['mlpJsonOrjsonOverStdlib']:.2f}x on "
        f"the MLP); gRPC takes {r['convGrpcOverBinary']:.2f}x REST binary's time on the conv "
        f"model and {r['mlpGrpcOverBinary']:.2f}x on the MLP; JSON (orjson) takes "
        f"{r['convJsonOverBinary']:.2f}x binary's on the conv model, "
        f"{r['mlpJsonOverBinary']:.2f}x on the MLP. A two-stage chain forwarding over gRPC "
        f"takes {_chain_grpc_over_http(report):.2f}x the time of one forwarding over HTTP."
    )


def protocol_cpu(report: Mapping[str, Any]) -> str:
    """CPU per request with one client, REST binary beside gRPC: where the time goes."""
    rows = []
    for row in report["rows"]:
        if row["clients"] != 1 or row["mode"] not in ("rest_binary", "grpc"):
            continue
        rows.append(
            [
                row["model"],
                PROTOCOL_MODES[row["mode"]],
                f"{row['p50Ms']:.2f}",
                str(row["clientCpuUs"]),
                str(row["serverLoopCpuUs"]),
                str(row["serverThreadsCpuUs"]),
            ]
        )
    header = [
        "model",
        "protocol",
        "p50 ms",
        "client CPU us",
        "worker event loop CPU us",
        "worker other threads CPU us",
    ]
    return _table(header, "llrrrr", rows)


def protocol_goals(report: Mapping[str, Any]) -> str:
    r = report["ratios"]

    def goal(value: float, limit: float) -> str:
        return f"{value:.2f}x (goal <= {limit:g}x: {'met' if value <= limit else 'not met'})"

    return (
        f"gRPC / REST binary p50, one client ({report['date']}): MLP "
        f"{goal(r['mlpGrpcOverBinary'], 1.0)}, conv {goal(r['convGrpcOverBinary'], 1.2)}; "
        f"a two-stage chain forwarding over gRPC / over HTTP: "
        f"{_chain_grpc_over_http(report):.2f}x. With no model at all, a bare grpc.aio "
        f"server's no-op method takes {report['floor']['grpcNoopOverRestHealth']:.2f}x the "
        f"time of the worker's REST health check (the worker's gRPC ServerLive "
        f"{report['floor']['grpcServerLiveOverRestHealth']:.2f}x), same clients, same run. "
        f"The host's 1-minute load average was "
        f"{report['loadAverage'][0]} at the start of the run and {report['loadAverage'][1]} "
        f"at the end ({report['cpus']} CPUs)."
    )


# --- stage TLS (bench/tls/run.py) ------------------------------------------------------

TLS_PATHS = {"hop": "client -> stage", "chain": "entry -> stage (forwarded)"}


def tls_table(report: Mapping[str, Any]) -> str:
    rows = []
    for ratio in report["ratios"]:
        key = (ratio["tensor"], ratio["link"], ratio["path"], ratio["clients"])
        plain, tls = (
            next(
                r
                for r in report["rows"]
                if (r["tensor"], r["link"], r["path"], r["clients"]) == key
                and r["transport"] == transport
            )
            for transport in ("plain", "tls")
        )
        rows.append(
            [
                ratio["tensor"],
                ratio["link"],
                TLS_PATHS[ratio["path"]],
                str(ratio["clients"]),
                f"{plain['p50Ms']:.2f}",
                f"{tls['p50Ms']:.2f}",
                f"{ratio['p50Ratio']:.2f}",
                f"{plain['perSecond']:.0f}",
                f"{tls['perSecond']:.0f}",
                f"{ratio['throughputRatio']:.2f}",
                f"{plain['cpuMsPerRequest']:.2f}",
                f"{tls['cpuMsPerRequest']:.2f}",
                f"{ratio['cpuRatio']:.2f}",
            ]
        )
    header = [
        "tensor",
        "between",
        "hop",
        "clients",
        "plain p50 ms",
        "mTLS p50 ms",
        "p50 mTLS/plain",
        "plain req/s",
        "mTLS req/s",
        "req/s mTLS/plain",
        "plain CPU ms/req",
        "mTLS CPU ms/req",
        "CPU mTLS/plain",
    ]
    return _table(header, "lllrrrrrrrrrr", rows) + (
        f"\n\n{report['date']}, {report['cpus']} CPUs, 1-minute load average "
        f"{report['loadAverage'][0]} at the start and {report['loadAverage'][1]} at the end; "
        f"{report['tls']}; medians of {report['rows'][0]['rounds']} alternating rounds of "
        f"{report['requestsPerRow']} requests ({report['linkRequestsPerRow']} over the link); "
        f"conditions: {report['conditions']}."
    )


def tls_summary(report: Mapping[str, Any]) -> str:
    one = [r for r in report["ratios"] if r["clients"] == 1]
    met = [r for r in one if r["p50Ratio"] <= report["goal"]]
    links = sorted({r["link"] for r in one}, key=lambda link: link != "loopback")

    def ratios(key: str, link: str) -> str:
        return ", ".join(
            f"{r['tensor']} {TLS_PATHS[r['path']]} {r[key]:.2f}x" for r in one if r["link"] == link
        )

    per_link = "; ".join(f"{link}: {ratios('p50Ratio', link)}" for link in links)
    return (
        f"p50 with one client, mTLS / plain, {per_link}; {len(met)} of {len(one)} within "
        f"the goal of {report['goal']}x. Worker CPU per request on loopback, mTLS / plain: "
        f"{ratios('cpuRatio', 'loopback')} ({report['date']}, 1-minute load average "
        f"{report['loadAverage'][0]}-{report['loadAverage'][1]} on {report['cpus']} CPUs)."
    )


def tls_crypto(report: Mapping[str, Any]) -> str:
    """The record crypto floor per tensor beside the plain loopback hop it adds to."""
    parts = []
    for label, crypto in report["crypto"].items():
        plain = next(
            r
            for r in report["rows"]
            if (r["tensor"], r["link"], r["path"], r["clients"], r["transport"])
            == (label, "loopback", "hop", 1, "plain")
        )
        floor = (plain["p50Ms"] + crypto["msPerRequest"]) / plain["p50Ms"]
        parts.append(
            f"{label}: {crypto['msPerRequest']:.2f} ms per request and answer, against a "
            f"plain loopback hop's p50 of {plain['p50Ms']:.2f} ms (a floor of {floor:.2f}x "
            "where nothing overlaps it)"
        )
    first = next(iter(report["crypto"].values()))
    return (
        f"Record encryption and decryption alone, on both ends ({first['version']}, "
        f"{first['cipher']}, measured in the same run): " + "; ".join(parts) + "."
    )


# --- per-input offloading (bench/offload/run.py) ----------------------------------------


def offload_table(report: Mapping[str, Any]) -> str:
    rows = []
    for run in report["runs"]:
        for name, s in run["setups"].items():
            r = run["ratios"][name]
            rows.append(
                [
                    f"{run['uplinkMbps']:g}",
                    name,
                    f"{s['accuracy']:.4f} ({r['accuracy']:.3f}x)",
                    f"{s['meanMs']:.2f}",
                    f"{s['p95Ms']:.2f} ({r['p95']:.2f}x)",
                    f"{s['deviceEnergyMj']:.2f} ({r['deviceEnergy']:.2f}x)",
                    f"{s['uplinkBytesPerRequest']:.0f} ({r['uplinkBytes']:.3f}x)",
                    ", ".join(f"{k} {v:.3f}" for k, v in s["exitShares"].items()),
                    f"{s['reuseHitShare']:.3f}",
                ]
            )
    header = [
        "Mbit/s",
        "set-up",
        "accuracy",
        "mean ms",
        "p95 ms",
        "device mJ/request",
        "uplink B/request",
        "answered by",
        "reused",
    ]
    return _table(header, "llrrrrrll", rows) + (
        f"\n\n{report['date']}, {report['requests']} requests per set-up and rate, median of "
        f"{report['rounds']} rounds; conditions: {report['conditions']}."
    )


def offload_goal(report: Mapping[str, Any]) -> str:
    goal = report["goalAt1Mbps"]
    at1 = next(r for r in report["runs"] if r["uplinkMbps"] == 1.0)["setups"]
    base, best = at1["always-offload"], at1["cascade+reuse"]
    return (
        f"at 1 Mbit/s cascade + reuse sends {goal['uplinkBytesRatio']:.3f}x the uplink bytes "
        f"of always-offload ({best['uplinkBytesPerRequest']:.0f} vs "
        f"{base['uplinkBytesPerRequest']:.0f} B/request; goal <= 0.3), p95 "
        f"{goal['p95Ratio']:.2f}x (goal <= 0.5), accuracy {goal['accuracyRatio']:.3f}x "
        f"(goal >= 0.99) on held-out digits ({report['date']})"
    )


def offload_summary(report: Mapping[str, Any]) -> str:
    goal = report["goalAt1Mbps"]
    cal = report["calibration"]
    rule = report["cascadeRule"]
    cascade = cal[rule]["heldout"]["cascade"]
    exits = cal["maxProb"]["heldout"]["exits"]
    met = "met" if goal["met"] else "not met"
    return (
        f"Goal at 1 Mbit/s ({met}): cascade + reuse sends {goal['uplinkBytesRatio']:.3f}x the "
        f"uplink bytes of always-offload (goal <= 0.3), its p95 is {goal['p95Ratio']:.2f}x "
        f"(goal <= 0.5), its accuracy {goal['accuracyRatio']:.3f}x (goal >= 0.99). "
        f"Thresholds were calibrated for {report['targetAccuracy']:.4f} on the validation "
        f"half; on the held-out half the full model scores "
        f"{cal[rule]['heldout']['finalAccuracy']:.4f}, the cascade ({rule}) "
        f"{cascade['accuracy']:.4f} escalating {cascade['escalationRate']:.3f} of inputs, the "
        f"exits (maxProb) {exits['accuracy']:.4f} answering "
        f"{exits['exitRates'][0]:.3f} at exit_0 and {exits['exitRates'][1]:.3f} at exit_1. "
        f"The reuse distance ({report['reuse']['max_distance']:.3f} RMS) hit "
        f"{report['reuse']['hit_rate']:.2f} of a validation stream at an accuracy cost of "
        f"{report['reuse']['accuracy_loss']:.4f}."
    )


# --- private inference (bench/privacy/run.py) --------------------------------------------


def privacy_table(report: Mapping[str, Any]) -> str:
    clean = report["cleanAccuracy"]
    rows = []
    for name, cut in report["cuts"].items():
        for r in cut["rows"]:
            rows.append(
                [
                    f"{name} ({cut['featureSize']})",
                    f"{r['std']:g}",
                    f"{r['accuracyPlain']:.4f} ({r['accuracyPlain'] / clean:.3f}x)",
                    f"{r['accuracyNoiseTrained']:.4f} ({r['accuracyNoiseTrained'] / clean:.3f}x)",
                    f"{r['reconstructionMse']:.4f}",
                    f"{r['recognised']:.3f} ({r['recognised'] / report['chance']:.1f}x chance)",
                ]
            )
    header = [
        "cut (floats)",
        "noise std",
        "accuracy, plain",
        "accuracy, noise-trained",
        "inversion MSE",
        "reconstructions recognised",
    ]
    return _table(header, "lrrrrr", rows) + (
        f"\n\n{report['date']}, held-out digits, clean accuracy {clean:.4f}, mean over "
        f"{report['draws']} noise draws; predicting the mean image scores an MSE of "
        f"{next(iter(report['cuts'].values()))['meanImageMse']:.4f}; conditions: "
        f"{report['conditions']}."
    )


def privacy_membership(report: Mapping[str, Any]) -> str:
    rows = [
        [
            f"{r['noiseMultiplier']:g}",
            "inf" if r["epsilon"] is None else f"{r['epsilon']:.2f}",
            f"{r['trainAccuracy']:.3f}",
            f"{r['testAccuracy']:.3f}",
            f"{r['advantage']:.3f}",
        ]
        for r in report["membership"]
    ]
    header = ["noise multiplier", "epsilon", "member accuracy", "test accuracy", "advantage"]
    return _table(header, "rrrrr", rows)


def privacy_goal(report: Mapping[str, Any]) -> str:
    parts = []
    for name, cut in report["cuts"].items():
        goal = cut["goal"]
        if goal is None:
            best = min(cut["rows"], key=lambda r: r["recognised"])
            parts.append(
                f"{name}: not met (at no noise level tried do reconstructions fall to "
                f"{report['goals']['recognised']:.1f} while the noise-trained model keeps "
                f"{report['goals']['accuracyRatio']:.2f}x; the least recognised, "
                f"{best['recognised']:.3f} at std {best['std']:g}, keeps "
                f"{best['accuracyNoiseTrained'] / report['cleanAccuracy']:.3f}x)"
            )
        else:
            parts.append(
                f"{name}: met at std {goal['std']:g} ({goal['accuracyRatio']:.3f}x clean "
                f"accuracy, reconstructions recognised {goal['recognised']:.3f})"
            )
    return f"Goal ({report['date']}): {'; '.join(parts)}."


def privacy_summary(report: Mapping[str, Any]) -> str:
    rows = {r["noiseMultiplier"]: r for r in report["membership"]}
    without, with_dp = rows[0.0], rows[1.0]
    return (
        f"{privacy_goal(report)} Membership inference: advantage {without['advantage']:.3f} "
        f"without DP noise (noise multiplier 0), {with_dp['advantage']:.3f} with noise "
        f"multiplier 1.0 (epsilon {with_dp['epsilon']:.1f}); test accuracy "
        f"{without['testAccuracy']:.3f} and {with_dp['testAccuracy']:.3f}."
    )


def privacy_he(report: Mapping[str, Any]) -> str:
    section = report["homomorphicHead"]
    plain, he = section["plain"], section["he"]
    he_ms = he["encryptMs"] + he["evaluateMs"] + he["decryptMs"]

    def row(name: str, steps: list[str], total_ms: float, side: Mapping[str, Any]) -> list[str]:
        total = f"{total_ms:.3f}" if total_ms < 1 else f"{total_ms:.1f}"
        sizes = [f"{side['upBytes']:,}", f"{side['downBytes']:,}"]
        return [name, *steps, total, *sizes, f"{side['accuracy']:.4f}"]

    rows = [
        [
            *row(
                "plaintext (onnxruntime)",
                ["-", f"{plain['headMs']:.3f}", "-"],
                plain["headMs"],
                plain,
            ),
            "1",
        ],
        [
            *row(
                "CKKS (TenSEAL)",
                [f"{he['encryptMs']:.1f}", f"{he['evaluateMs']:.1f}", f"{he['decryptMs']:.2f}"],
                he_ms,
                he,
            ),
            f"{he['agreement']:.4f}",
        ],
    ]
    header = [
        "head",
        "device encrypt p50 (ms)",
        "edge compute p50 (ms)",
        "device decrypt p50 (ms)",
        "sum (ms)",
        "bytes up",
        "bytes down",
        "accuracy",
        "argmax agreement",
    ]
    scheme, served = section["scheme"], section["served"]
    return (
        _table(header, "lrrrrrrrr", rows)
        + (
            f"\n\n{section['date']}, digits_cnn's last dense layer ({section['inputs']} -> "
            f"{section['outputs']}) on each of the {section['samples']} held-out digits, one per "
            f"request; CKKS N={scheme['polyModulusDegree']}, moduli "
            f"{'-'.join(str(b) for b in scheme['coeffModBitSizes'])} bits, scale "
            f"2^{scheme['scaleBits']}. Ciphertext / plaintext: {he_ms / plain['headMs']:,.0f}x the "
            f"time, {he['upBytes'] / plain['upBytes']:,.0f}x the bytes up and "
            f"{he['downBytes'] / plain['downBytes']:,.0f}x down; largest logit difference "
            f"{he['maxAbsError']:.1e}. Once per device: key generation "
            f"{section['keygenMs']:,.0f} ms; once per device and edge replica: the device's "
            f"public context, {section['contextBytes']:,} bytes, sent up. Host "
            f"{section['hostGflops']:g} GFLOPS; conditions: {section['conditions']}."
        )
        + (
            f"\n\nServed by worker processes on loopback (the planner's split "
            f"`{served['split']}`, one digit per binary request, {served['requests']} each, the "
            f"two chains taking turns): p50 {served['plainMs']:.1f} ms in plaintext, "
            f"{served['heMs']:.1f} ms with the homomorphic head "
            f"({served['heMs'] / served['plainMs']:.1f}x); the first request, which carries the "
            f"context, {served['heFirstMs']:,.0f} ms; the two chains' answers agree on "
            f"{served['agreement']:.4f} of the digits."
        )
    )


def privacy_he_summary(report: Mapping[str, Any]) -> str:
    section = report["homomorphicHead"]
    plain, he = section["plain"], section["he"]
    return (
        f"homomorphic head ({section['date']}; digits_cnn's last dense layer, "
        f"{section['samples']} held-out digits): device encrypt {he['encryptMs']:.1f} ms, "
        f"edge compute {he['evaluateMs']:.1f} ms (plaintext {plain['headMs']:.3f} ms), "
        f"device decrypt {he['decryptMs']:.2f} ms (p50); {he['upBytes']:,} bytes up and "
        f"{he['downBytes']:,} down per digit (plaintext {plain['upBytes']} and "
        f"{plain['downBytes']}); argmax agreement with the plaintext head "
        f"{he['agreement']:.4f}, accuracy {he['accuracy']:.4f} (plaintext "
        f"{plain['accuracy']:.4f})"
    )


# --- shared trunks (bench/trunks/run.py) -------------------------------------------------


def trunks_table(report: Mapping[str, Any]) -> str:
    rows = []
    for batch, entry in report["batches"].items():
        sep, shared, ratios = (
            entry["summary"]["separate"],
            entry["summary"]["shared"],
            entry["ratios"],
        )
        rows.append(
            [
                batch,
                f"{sep['flopsPerPair']:,.0f} / {shared['flopsPerPair']:,.0f}",
                f"{ratios['flopsPerPair']:.3f}",
                f"{sep['computeCpuMsPerPair']:.3f} / {shared['computeCpuMsPerPair']:.3f}",
                f"{ratios['computeCpuMsPerPair']:.3f}",
                f"{sep['computeMsPerPair']:.3f} / {shared['computeMsPerPair']:.3f}",
                f"{ratios['computeMsPerPair']:.3f}",
                f"{sep['cpuMsPerPair']:.2f} / {shared['cpuMsPerPair']:.2f}",
                f"{ratios['cpuMsPerPair']:.3f}",
            ]
        )
    header = [
        "digits per request",
        "FLOPs per pair, separate / shared",
        "ratio",
        "onnxruntime CPU ms per pair",
        "ratio",
        "stage compute ms per pair",
        "ratio",
        "edge process CPU ms per pair",
        "ratio",
    ]
    summaries = [s for e in report["batches"].values() for s in e["summary"].values()]
    same = all(s["identicalTop1"] and s["maxAbsDiff"] == 0 for s in summaries)
    return _table(header, "rrrrrrrrr", rows) + (
        f"\n\n{report['date']}, {report['pairs']} pairs of requests x {report['rounds']} "
        f"rounds (medians), each request asked of both applications; answers "
        f"{'identical to' if same else 'NOT identical to'} each application's full model "
        f"(largest difference {max(s['maxAbsDiff'] for s in summaries):g}); "
        f"conditions: {report['conditions']}."
    )


def trunks_goal(report: Mapping[str, Any]) -> str:
    goal = report["goal"]

    def met(ratios: Mapping[str, float]) -> str:
        at = [b for b, r in ratios.items() if r <= goal]
        return f"({'met at ' + ', '.join(at) if at else 'not met'})"

    def verdict(key: str) -> str:
        ratios = {b: e["ratios"][key] for b, e in report["batches"].items()}
        return ", ".join(f"{r:.3f}x at {b}" for b, r in ratios.items()) + " " + met(ratios)

    text = (
        f"Goal: shared-trunk edge compute per pair of requests <= {goal:g}x two separate "
        f"deployments ({report['date']}, by digits per request). In FLOPs: "
        f"{verdict('flopsPerPair')}. In onnxruntime CPU time: "
        f"{verdict('computeCpuMsPerPair')}. In the stages' measured compute time: "
        f"{verdict('computeMsPerPair')}. In edge process CPU time: {verdict('cpuMsPerPair')}."
    )
    alone = {b: e["inProcess"] for b, e in report["batches"].items() if "inProcess" in e}
    if alone:
        cells = ", ".join(
            f"{a['ratio']:.3f}x at {b} ({a['separateCpuMsPerPair']:.3f} / "
            f"{a['sharedCpuMsPerPair']:.3f} ms)"
            for b, a in alone.items()
        )
        text += (
            " The same onnxruntime runs alone in one process (no HTTP, no other process "
            f"between calls; separate / shared CPU ms per pair): {cells} "
            f"{met({b: a['ratio'] for b, a in alone.items()})}."
        )
    return text


# --- kind end to end (hack/kind/e2e.py) and the demo (hack/kind/demo.py) ---------------


def _step(report: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    return report["steps"].get(name) or {"ok": False, "notRun": True, "seconds": 0}


def _outcome(step: Mapping[str, Any], text: str) -> str:
    if step["ok"]:
        return text
    if step.get("notRun"):
        return "not run"
    return "failed: " + str(step["error"]).split("\n")[0][:300]


def e2e_kind_build(report: Mapping[str, Any]) -> str:
    build = _step(report, "build")
    if not build["ok"]:
        return _outcome(build, "")
    cold, warm = build.get("coldBuild") or {}, build["stepSeconds"]
    labels = (
        ("host", "hack/kind/host.sh (Docker from Debian, network, guards)"),
        ("images", "hack/images/build.sh (operator + worker images)"),
        ("nodeImage", "hack/kind/node-image.sh (Go builds, component images, node image)"),
        ("kindCreate", "kind create cluster (6 nodes)"),
        ("kindLoad", "kind load docker-image (both images, 6 nodes)"),
        ("up", "hack/kind/up.sh in all (create, annotations, load)"),
    )
    rows = [
        (label, _cell(cold, key, "{:.0f}"), _cell(warm, key, "{:.0f}")) for key, label in labels
    ]
    sizes = ", ".join(
        f"`{image}` {size / 1e6:.0f} MB" for image, size in build["imageSizeBytes"].items()
    )
    return (
        _table(("step", "fresh machine, s", "this run, s"), "lrr", rows)
        + f"\n\nImage sizes (`docker image inspect`): {sizes}."
    )


def _links_text(step: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{ln['tier']} {ln['node']}: {ln['mbps']:g} -> {ln['tcRateMbps']:g} -> "
        f"{ln['measuredMbps']:g}"
        for ln in step["links"]
    )


def _inference_rows(inf: Mapping[str, Any]) -> list[tuple[str, str]]:
    cj, cb, obs = inf["clientJson"], inf["clientBinary"], inf["statusObserved"]
    checked = "yes" if inf["checkedAgainstOnnxruntime"] else "JSON = binary (no file to check)"
    return [
        ("first inference through the zone-a device pod", f"{inf['firstInferenceS']} s"),
        (
            f"client p50 / p95: JSON ({cj['requests']} requests), binary ({cb['requests']})",
            f"{cj['p50Ms']} / {cj['p95Ms']} ms, {cb['p50Ms']} / {cb['p95Ms']} ms "
            f"(SLO p95 {inf['sloP95Ms']} ms)",
        ),
        (
            "status p95 (from the pods' /metrics)",
            f"{obs.get('p95LatencyMs')} ms at {obs.get('requestsPerSecond')} req/s",
        ),
        ("outputs: JSON = binary = onnxruntime here on the fetched file", checked),
    ]


def _change_text(change: Mapping[str, Any]) -> str:
    if "planDeclared" in change:
        return _link_replan_text(change)
    head = f"{change['shapedMbps']} Mbit/s shaped, {change['measuredMbps']} measured: "
    if change["replanned"]:
        return (
            head + f"replanned in {change['replanS']} s, split `{change['planBefore']}` -> "
            f"`{change['planAfter']}`"
        )
    return head + f"no replan within 60 s (split stays `{change['planAfter']}`)"


def _link_replan_text(change: Mapping[str, Any]) -> str:
    head = (
        f"{change['model']}, zone-a's device link {change['declaredMbps']:g} Mbit/s declared "
        f"(split `{change['planDeclared']}`), shaped to {change['shapedMbps']:g}, "
        f"{change['measuredMbps']} measured: "
    )
    if not change["replanned"]:
        return head + "no replan within 120 s"
    text = head + f"replanned in {change['replanS']} s to `{change['planAfter']}`"
    if change["backToDeclared"]:
        return text + f"; link restored, back to the declared split in {change['backS']} s"
    return text + "; link restored, no replan back within 120 s"


def _edge_stop_text(stop: Mapping[str, Any]) -> str:
    text = f"{stop['lostRequests']} of {stop['traffic']['requests']} requests lost"
    if "answeredByDeviceAlone" not in stop:  # a run from before the device fallback
        return text + f", served again {stop['servedAgainAfterS']} s after the stop"
    return text + (
        f", {stop['answeredByDeviceAlone']} answered by the device alone (fallback: device); "
        f"the chain served again {stop['chainAgainAfterS']} s after the node had stopped"
    )


def _replicas(replicas: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(replicas.items()))


E2E_ROWS: tuple[tuple[str, str, Callable[[Mapping[str, Any]], str]], ...] = (
    ("links", "links shaped with tc (declared -> tc -> measured Mbit/s)", _links_text),
    (
        "helmInstall",
        "helm install to operator pods Ready",
        lambda h: (
            f"{h['podsReadyS']} s ({h['operatorPods']} pods, ServiceAccount "
            f"`{h['serviceAccount']}`, can-i '*' '*': {h['canDoEverything']}"
            + (f", can-i list secrets: {h['canListSecrets']})" if "canListSecrets" in h else ")")
            + (
                f"; samples' namespace enforces Pod Security `{h['namespacePodSecurity']}` "
                "(a privileged pod refused by the API server)"
                if h.get("privilegedPodRefused")
                else ""
            )
        ),
    ),
    (
        "samples",
        "samples applied to DNNModel Prepared / DNNDeployment Available",
        lambda s: (
            f"{s['preparedS']} s / {s['availableS']} s, split `{s['split']}` (the "
            f"sample's own: `{s['sampleSplit']}`); the sample's `zoo:` source: "
            + ("prepared" if s["zooSource"]["prepared"] else f"failed, {s['zooSource']['error']}")
        ),
    ),
    (
        "networkPolicy",
        "NetworkPolicies enforced (hack/kind/netpol): connects from another pod / from the "
        "device stage",
        lambda n: (
            ", ".join(f"{k} {v}" for k, v in n["fromAnotherPod"].items())
            + " / "
            + ", ".join(f"{k} {v}" for k, v in n["fromTheDeviceStage"].items())
        ),
    ),
    (
        "scale",
        "scale up under load (SLO 1 ms) / down (SLO back, no load)",
        lambda s: (
            f"{s['scaleUpS']} s to {_replicas(s['replicasUp'])} / {s['scaleDownS']} s "
            f"from {_replicas(s['replicasPeak'])} to {_replicas(s['replicasDown'])}; load "
            f"{s['load']['requests']} requests, {s['load']['failed']} failed"
            + ("; the SLO change kept the device pods running" if s.get("devicePodsKept") else "")
        ),
    ),
    ("linkChange", "device uplink shaped, measured rate annotated (replan)", _change_text),
    (
        "edgeStop",
        "`docker stop` of zone-a's edge node under traffic",
        _edge_stop_text,
    ),
    (
        "zoneMove",
        "a device moved to zone-b / back",
        lambda s: f"{s['movedS']} s / {s['movedBackS']} s",
    ),
    (
        "helmUpgrade",
        "helm upgrade (a changed value reaches the operator pods; then a spec change on "
        "each deployment is observed)",
        lambda s: f"{s['upgradeS']} s; observed {s['specChangeObservedS']} s later",
    ),
    (
        "training",
        "examples/digits-training.yaml on real pods, its model then served",
        lambda t: (
            f"{t['mode']}, {t['workers']} device workers + aggregator on "
            f"{t['placement'].get('aggregator')}: {t['rounds']} rounds in {t['trainS']} s, "
            f"held-out accuracy {t['accuracy']} ({t['heldOutAccuracyHere']} here on the "
            f"exported file), {t['uplinkBytes']} uplink bytes (compression "
            f"{t['compressionRatio']}x); served {t['servedAfterS']} s later through "
            f"device -> edge pods, largest difference from onnxruntime "
            f"{t['servedMaxAbsDiff']:.1e}; "
            f"trainer image {t['trainerImageBytes'] / 1e9:.2f} GB, loaded into "
            f"{len(t['trainerNodes'])} nodes in {t['trainerLoadS']} s"
        ),
    ),
    (
        "cleanup",
        "delete: children gone / helm uninstall; objects left",
        lambda s: (
            f"{s['childrenGoneS']} s / {s['uninstallS']} s; none (Helm keeps the "
            f"{len(s['crdsKept'])} CRDs)"
        ),
    ),
    ("deleteCluster", "kind delete cluster", lambda s: f"{s['kindDeleteS']} s"),
)


def e2e_kind_results(report: Mapping[str, Any]) -> str:
    if report.get("skipped"):
        raise NumbersError(
            f"the e2e report left out {', '.join(report['skipped'])} (--skip): "
            "render a run of every step"
        )
    rows: list[tuple[str, str]] = []
    for name, label, text in E2E_ROWS:
        step = _step(report, name)
        rows.append((label, text(step) if step["ok"] else _outcome(step, "")))
        if name == "samples":
            inf = _step(report, "inference")
            rows += _inference_rows(inf) if inf["ok"] else [("inference", _outcome(inf, ""))]
    failed = ", ".join(report["failures"]) or "none"
    return (
        f"Run of {report['date']} (`{report['command']}`, {report['host']['cpus']} CPUs, "
        f"load average {report['loadAverageAtStart']:.1f} at its start, "
        f"{report['elapsedS']:.0f} s; {report['conditions']}). Failed steps: {failed}.\n\n"
        + _table(("step", "measured"), "ll", rows)
    )


def demo_transcript(report: Mapping[str, Any]) -> str:
    return f"`make demo` of {report['date']}:\n\n```\n{report['transcript'].rstrip()}\n```"


RENDERERS: dict[str, Renderer] = {
    "corpus-table": Renderer("corpus.json", corpus_table),
    "corpus-analysis": Renderer("corpus.json", corpus_analysis),
    "planner-run": Renderer("planner.json", planner_run),
    "planner-time": Renderer("planner.json", planner_time),
    "planner-two-tier": Renderer("planner.json", planner_two_tier),
    "planner-sweep": Renderer("planner.json", planner_sweep),
    "planner-three-tier": Renderer("planner.json", planner_three_tier),
    "planner-digits": Renderer("planner.json", planner_digits),
    "operator-table": Renderer("operator.json", operator_table),
    "operator-summary": Renderer("operator.json", operator_summary),
    "dataplane-history": Renderer("dataplane.json", dataplane_history),
    "dataplane-runs": Renderer("dataplane.json", dataplane_runs),
    "dataplane-summary": Renderer("dataplane.json", dataplane_summary),
    "models-prepare": Renderer("models.json", models_prepare),
    "models-fetch": Renderer("models.json", models_fetch),
    "training-results": Renderer("training.json", training_results),
    "training-summary": Renderer("training.json", training_summary),
    "protocol-table": Renderer("protocol.json", protocol_table),
    "protocol-summary": Renderer("protocol.json", protocol_summary),
    "protocol-cpu": Renderer("protocol.json", protocol_cpu),
    "protocol-goals": Renderer("protocol.json", protocol_goals),
    "tls-table": Renderer("tls.json", tls_table),
    "tls-summary": Renderer("tls.json", tls_summary),
    "tls-goal": Renderer("tls.json", tls_summary),  # the same summary, in docs/security.md
    "tls-crypto": Renderer("tls.json", tls_crypto),
    "e2e-kind-build": Renderer("e2e-kind.json", e2e_kind_build),
    "e2e-kind-results": Renderer("e2e-kind.json", e2e_kind_results),
    "demo": Renderer("demo.json", demo_transcript),
    "offload-table": Renderer("offload.json", offload_table),
    "offload-summary": Renderer("offload.json", offload_summary),
    "offload-goal": Renderer("offload.json", offload_goal),
    "privacy-table": Renderer("privacy.json", privacy_table),
    "privacy-membership": Renderer("privacy.json", privacy_membership),
    "privacy-goal": Renderer("privacy.json", privacy_goal),
    "privacy-summary": Renderer("privacy.json", privacy_summary),
    "privacy-he": Renderer("privacy.json", privacy_he),
    "privacy-he-summary": Renderer("privacy.json", privacy_he_summary),
    "trunks-table": Renderer("trunks.json", trunks_table),
    "trunks-goal": Renderer("trunks.json", trunks_goal),
}
PLANNER_REGIONS = tuple(name for name in RENDERERS if name.startswith("planner-"))


# --- regions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    text: str
    regions: tuple[str, ...]  # every region of the doc, in order
    changed: tuple[str, ...]  # those whose rendered content differs from the doc's


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def render_text(
    text: str,
    doc: str,
    renderers: Mapping[str, Renderer],
    load: Callable[[str, str], Mapping[str, Any]],
) -> Rendered:
    """`text` with every marked region's content replaced by its renderer's output.
    `load(source, region)` returns a result file's JSON. Raises NumbersError naming
    `doc`, the line and the marker for an unknown region or unbalanced markers."""
    out: list[str] = []
    regions: list[str] = []
    changed: list[str] = []
    pos = 0
    opened: re.Match[str] | None = None
    for marker in MARKER.finditer(text):
        name = marker.group(1)
        where = f"{doc}:{_line(text, marker.start())}"
        if name is not None:
            if opened is not None:
                raise NumbersError(
                    f"{where}: {marker.group(0)} opens while <!-- numbers:{opened.group(1)} --> "
                    f"(line {_line(text, opened.start())}) is not closed by {CLOSE}"
                )
            if name not in renderers:
                raise NumbersError(
                    f"{where}: unknown region {marker.group(0)} "
                    f"(accepted: {', '.join(sorted(renderers))})"
                )
            out.append(text[pos : marker.end()])
            opened, pos = marker, marker.end()
            continue
        if opened is None:
            raise NumbersError(f"{where}: {CLOSE} without an opening <!-- numbers:NAME -->")
        region = opened.group(1)
        renderer = renderers[region]
        # A region inside a list item keeps the item's indentation (that of its marker).
        before = text[text.rfind("\n", 0, opened.start()) + 1 : opened.start()]
        indent = before if before.isspace() else ""
        rendered = renderer.render(load(renderer.source, region)).strip("\n").split("\n")
        body = "\n".join(indent + line if line else line for line in rendered)
        content = f"\n{body}\n{indent}"
        regions.append(region)
        if text[pos : marker.start()] != content:
            changed.append(region)
        out.append(content)
        opened, pos = None, marker.start()
    if opened is not None:
        raise NumbersError(
            f"{doc}:{_line(text, opened.start())}: {opened.group(0)} is never closed "
            f"({CLOSE} missing)"
        )
    out.append(text[pos:])
    return Rendered("".join(out), tuple(regions), tuple(changed))


def json_loader(results_dir: Path) -> Callable[[str, str], Mapping[str, Any]]:
    cache: dict[str, Mapping[str, Any]] = {}

    def load(source: str, region: str) -> Mapping[str, Any]:
        if source not in cache:
            path = results_dir / source
            try:
                cache[source] = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                raise NumbersError(
                    f"region numbers:{region}: cannot read {path}: {error}"
                ) from None
        return cache[source]

    return load


def render_docs(
    docs: Sequence[Path],
    renderers: Mapping[str, Renderer] = RENDERERS,
    results_dir: Path = RESULTS_DIR,
) -> dict[Path, Rendered]:
    """Every doc rendered. Raises NumbersError when a renderer's region appears in none
    of `docs` (its numbers would be shown nowhere) or appears twice."""
    load = json_loader(results_dir)
    rendered = {doc: render_text(doc.read_text(), doc.name, renderers, load) for doc in docs}
    seen = [region for r in rendered.values() for region in r.regions]
    for name in renderers:
        if name not in seen:
            raise NumbersError(
                f"region numbers:{name} ({renderers[name].source}) is in none of "
                f"{', '.join(d.name for d in docs)}: add <!-- numbers:{name} --> {CLOSE}"
            )
        if seen.count(name) > 1:
            raise NumbersError(f"region numbers:{name} appears {seen.count(name)} times")
    return rendered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if a doc is out of date"
    )
    args = parser.parse_args(argv)
    try:
        rendered = render_docs(default_docs())
    except NumbersError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    stale = [(doc, r) for doc, r in rendered.items() if r.changed]
    for doc, r in stale:
        name = doc.relative_to(ROOT)
        if args.check:
            for region in r.changed:
                print(
                    f"{name}: numbers:{region} differs from docs/results/"
                    f"{RENDERERS[region].source}; run make docs-numbers",
                    file=sys.stderr,
                )
        else:
            doc.write_text(r.text)
            print(f"rendered {name}: {', '.join(r.changed)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
