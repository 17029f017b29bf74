"""Data-plane benchmark over shaped links between network namespaces (needs root).

    python bench/dataplane/run.py [--models alexnet_like,resnet18] [--uplinks 1,10,100]

Builds device, edge and cloud namespaces joined by veth (device<->edge shaped with
`tc tbf` at each uplink rate in turn, edge<->cloud at the backhaul rate), gives each tier
a CPU quota or slows its onnxruntime down (device slowest: 4x by default, see
`slowcpu.py`), profiles the model per tier inside its namespace, asks the
planner (`edgeai_operator.planner`) for a plan per uplink, runs it as real worker
processes, and prints side by side:

1. end-to-end latency / the planner's prediction (goal 0.9-1.1);
2. partitioned latency / min(device-only, cloud-only) (goal <= 1.0);
3. per-hop time of the OIP binary path (a stage without a model; also through an Identity
   model) / a raw aiohttp echo of the same bytes (<= 1.5);
4. binary / JSON encoding of a 1x3x224x224 FP32 tensor.

The full report goes to `--out` (bench/results/dataplane.json); its summary is added as
run `--label` to docs/results/dataplane.json, which `make docs-numbers` renders into the
docs. Namespaces and cgroups are removed on exit, also after errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # the renderer beside the benches

from netns import TIERS, TierSpec, Topology, set_uplink, topology  # noqa: E402

import render_numbers  # noqa: E402

PYTHON = sys.executable
AGENT = str(HERE / "agent.py")
ECHO_PORT = 9100
IDENTITY_PORT = 9200
STAGE_PORT = 9300
SERVING_PORT = 9400
# the planner's overhead fields (`Problem`) and the profile keys they are measured as
OVERHEAD_FIELDS = {
    "serving_ms": "servingMs",
    "serving_ms_per_mb": "servingMsPerMB",
    "forwarding_ms": "forwardingMs",
    "forwarding_ms_per_mb": "forwardingMsPerMB",
}


def agent(
    topo: Topology, tier: str, *argv: str, limit_cpu: bool = True, timeout: float = 600
) -> dict[str, Any]:
    run = subprocess.run(
        topo.wrap(tier, [PYTHON, AGENT, *argv], limit_cpu=limit_cpu),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if run.returncode != 0:
        raise RuntimeError(f"agent {argv[0]} in {tier} failed:\n{run.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return result


def wait_ready(topo: Topology, tier: str, url: str, process: subprocess.Popen[bytes]) -> None:
    probe = (
        "import sys, time, urllib.request\n"
        "end = time.time() + 120\n"
        "while time.time() < end:\n"
        "    try:\n"
        f"        urllib.request.urlopen('{url}', timeout=2); sys.exit(0)\n"
        "    except Exception: time.sleep(0.1)\n"
        "sys.exit(1)\n"
    )
    code = subprocess.run(["ip", "netns", "exec", topo.ns(tier), PYTHON, "-c", probe]).returncode
    if code != 0 or process.poll() is not None:
        raise RuntimeError(f"{url} in {tier} did not become ready")


class Fleet:
    """Worker and helper processes started in the namespaces; stopped together."""

    def __init__(self, topo: Topology, workdir: Path) -> None:
        self.topo = topo
        self.workdir = workdir
        self.processes: list[subprocess.Popen[bytes]] = []

    def spawn(self, tier: str, argv: Sequence[str], log_name: str) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEAI_")}
        with (self.workdir / f"{log_name}.log").open("wb") as log:
            process = subprocess.Popen(
                self.topo.wrap(tier, argv), stdout=log, stderr=subprocess.STDOUT, env=env
            )
        self.processes.append(process)
        return process

    def worker(self, tier: str, config: dict[str, Any], name: str) -> str:
        path = self.workdir / f"{name}.json"
        path.write_text(json.dumps(config))
        process = self.spawn(tier, [PYTHON, "-m", "edgeai_worker", "--config", str(path)], name)
        url = f"http://{config['host']}:{config['port']}"
        wait_ready(self.topo, tier, f"{url}/v2/health/ready", process)
        return url

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self.processes.clear()


def tier_host(topo: Topology, tier: str) -> str:
    return {"device": "127.0.0.1", "edge": topo.edge_down_ip, "cloud": topo.cloud_ip}[tier]


def deploy(
    fleet: Fleet,
    stages: list[dict[str, Any]],
    model_path: Path,
    name: str,
    uplink: float | None,
    alternatives: list[dict[str, Any]] | None = None,
    port_base: int = STAGE_PORT,
) -> tuple[str, list[tuple[str, str]]]:
    """Start one worker per stage (last first); the device's infer URL and every
    stage's (tier, URL). With `alternatives`, the device gets the plan's adaptive splits
    and measures the uplink itself (`uplink` None)."""
    from edgeai_operator.partitions import build_partitions
    from edgeai_operator.plandoc import PlanAlternative, PlanStage

    workdir = fleet.workdir / name
    workdir.mkdir(exist_ok=True)
    plan_stages = [
        PlanStage(i, s["tier"], s.get("layers", "?"), tuple(s["inputs"]), tuple(s["outputs"]),
                  None, 0.0)
        for i, s in enumerate(stages)
    ]  # fmt: skip
    splits = [
        PlanAlternative(a["minMbps"], a["maxMbps"], a["cutIndex"],
                        tuple((x["tier"], x["layers"]) for x in a["stages"]),
                        a["predictedLatencyMs"], a["atMbps"])
        for a in alternatives or []
    ]  # fmt: skip
    specs = build_partitions(plan_stages, splits, model_path, workdir, adaptive=bool(alternatives))
    next_url: list[str] = []
    started: list[tuple[str, str]] = []
    for spec in reversed(specs):
        tier = spec.tier
        config = {
            "model_name": "bench",
            "host": tier_host(fleet.topo, tier),
            "port": port_base + spec.index,
            "tier": tier,
            "stage_index": spec.index,
            "partitions": [str(p) for p in spec.partitions],
            "next_urls": next_url,
            "intra_op_threads": fleet.topo.tiers[tier].threads,
        }
        if tier == "device" and uplink is not None:
            config["uplink_mbps"] = uplink
        if spec.splits:
            config["splits"] = spec.splits
        url = fleet.worker(tier, config, f"{name}-stage{spec.index}-{tier}")
        next_url = [url]
        started.insert(0, (tier, url))
    return f"{next_url[0]}/v2/models/bench/infer", started


def stage_metrics(topo: Topology, started: list[tuple[str, str]]) -> dict[str, dict[str, float]]:
    """Each stage's latency and onnxruntime histogram sums and counts, from /metrics."""
    return {
        tier: agent(topo, tier, "metrics", "--url", f"{url}/metrics", limit_cpu=False)
        for tier, url in started
    }


def stage_breakdown(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """Mean onnxruntime time and mean time in the stage (its downstream included) per
    stage over the timed requests only (warm-up runs excluded)."""
    breakdown: dict[str, dict[str, float]] = {}
    for tier, end in after.items():
        start = before.get(tier, {})

        def delta(name: str, end: dict[str, float] = end, start: dict[str, float] = start) -> float:
            return end.get(name, 0.0) - start.get(name, 0.0)

        runs = delta("edgeai_stage_compute_seconds_count")
        requests = delta("edgeai_stage_latency_seconds_count") or 1.0
        breakdown[tier] = {
            "compute_ms": 1000 * delta("edgeai_stage_compute_seconds_sum") / runs if runs else 0.0,
            "in_stage_ms": 1000 * delta("edgeai_stage_latency_seconds_sum") / requests,
        }
    return breakdown


def full_stages(plan: Any, inputs: list[str]) -> list[dict[str, Any]]:
    """The plan's stages, with empty forwarding stages for the tiers below its first
    stage (requests enter at the device and travel the path)."""
    from edgeai_operator.problem import plan_stages

    stages = [s.to_dict() for s in plan_stages(plan)]
    first = TIERS.index(stages[0]["tier"])
    lead = [{"tier": t, "inputs": inputs, "outputs": inputs} for t in TIERS[:first]]
    return lead + stages


def encoding_ratio() -> dict[str, float]:
    from edgeai_worker.protocol import InferRequest, Tensor, decode_request, encode_request

    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    request = InferRequest([Tensor.from_numpy("input", x)])

    def median_ms(fn: Any, repeats: int) -> float:
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - started) * 1000)
        return statistics.median(samples)

    binary_body, binary_headers = encode_request(request, binary=True)
    json_body, _ = encode_request(request, binary=False)
    length = int(binary_headers["Inference-Header-Content-Length"])
    result = {
        "binary_bytes": len(binary_body),
        "json_bytes": len(json_body),
        "binary_encode_ms": median_ms(lambda: encode_request(request, binary=True), 30),
        "json_encode_ms": median_ms(lambda: encode_request(request, binary=False), 5),
        "binary_decode_ms": median_ms(lambda: decode_request(binary_body, length), 30),
        "json_decode_ms": median_ms(lambda: decode_request(json_body, None), 5),
    }
    result["size_ratio"] = result["binary_bytes"] / result["json_bytes"]
    result["encode_ratio"] = result["binary_encode_ms"] / result["json_encode_ms"]
    result["decode_ratio"] = result["binary_decode_ms"] / result["json_decode_ms"]
    return result


def identity_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        "identity",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", "C", "H", "W"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", "C", "H", "W"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def measure_overheads(
    topo: Topology,
    workdir: Path,
    tier: str,
    input_shape: list[int],
    requests: int,
    model_path: Path,
) -> tuple[dict[str, float], dict[str, float]]:
    """The tier's per-request serving and forwarding overheads, fixed and per MB (the
    profile's `servingMs`, `servingMsPerMB`, `forwardingMs`, `forwardingMsPerMB`): a
    real worker serving the profiler's tiny serving-probe model and a forward-only
    worker in front of it, both inside the tier's namespace and CPU quota or slowdown, and
    a client in the namespace outside them (as the application, or the stage below, is)
    sending binary requests with the model's input and with a one-element tensor to
    each in turn; then the fixed serving part calibrated on a worker serving the model
    itself, in the same quota (`profiler.calibrate_serving`). Also returns what the
    calibration saw: the probe's fixed part, and the model's round trip, compute and
    serving overhead (means of the middle half)."""
    from edgeai_worker.profiler import (
        SERVING_MODEL_NAME,
        calibrate_serving,
        central_mean,
        serving_model,
    )

    model = serving_model(input_shape, workdir / f"serving-{'x'.join(map(str, input_shape))}.onnx")
    host = tier_host(topo, tier)
    fleet = Fleet(topo, workdir)
    try:
        common = {"model_name": SERVING_MODEL_NAME, "host": host, "tier": tier}
        threads = topo.tiers[tier].threads
        probe = fleet.worker(
            tier,
            {
                **common,
                "port": SERVING_PORT,
                "partitions": [str(model)],
                "intra_op_threads": threads,
            },
            f"serving-{tier}",
        )
        # a device stage fixes its uplink estimate here: its probes would load the quota
        fixed = {"uplink_mbps": 1000.0} if tier == "device" else {}
        front = fleet.worker(
            tier,
            {**common, **fixed, "port": SERVING_PORT + 1, "next_urls": [probe]},
            f"forwarding-{tier}",
        )
        path = f"/v2/models/{SERVING_MODEL_NAME}/infer"
        result = agent(
            topo, tier, "serving", "--url", probe + path, "--front-url", front + path,
            "--shape", json.dumps(input_shape), "--requests", str(requests), limit_cpu=False,
        )  # fmt: skip
        served = fleet.worker(
            tier,
            {
                **common,
                "model_name": "model",
                "port": SERVING_PORT + 2,
                "partitions": [str(model_path)],
                "intra_op_threads": threads,
            },
            f"model-serving-{tier}",
        )
        with_model = agent(
            topo, tier, "model-serving", "--url", f"{served}/v2/models/model/infer",
            "--model", str(model_path), "--requests", str(max(10, requests // 2)),
            limit_cpu=False,
        )  # fmt: skip
    finally:
        fleet.stop()
    probe_fit = {key: float(ms) for key, ms in result.items()}
    samples = [(float(rt), float(c)) for rt, c in with_model["samples"]]
    calibration = {
        "probeServingMs": probe_fit["servingMs"],
        "roundTripMs": central_mean([rt for rt, _ in samples]),
        "computeMs": central_mean([c for _, c in samples]),
        "overheadMs": central_mean([max(0.0, rt - c) for rt, c in samples]),
    }
    return calibrate_serving(probe_fit, int(with_model["inputBytes"]), samples), calibration


def profile_tiers(
    topo: Topology,
    workdir: Path,
    model: str,
    model_path: Path,
    input_shape: list[int],
    repeats: int,
    serving_requests: int,
) -> tuple[Any, dict[str, Any], dict[str, dict[str, float]]]:
    """Profile the model's segments (chained, as shares of the whole model) and the
    serving and forwarding overheads (fixed and per MB) on every tier, inside its
    namespace and CPU quota or slowdown; the planner's layer graph and overheads from them
    (`OVERHEAD_FIELDS`: the `Problem` fields, tier -> ms)."""
    from edgeai_operator.planner.model import LayerGraph

    profiles: dict[str, Any] = {}
    overheads: dict[str, dict[str, float]] = {field: {} for field in OVERHEAD_FIELDS}
    for tier in TIERS:
        spec = topo.tiers[tier]
        print(f"[bench] profiling {model} on {tier} ({spec.describe()})", flush=True)
        profiles[tier] = agent(
            topo, tier, "profile", "--model", str(model_path), "--threads", str(spec.threads),
            "--repeats", str(repeats),
        )  # fmt: skip
        if serving_requests:
            measured, calibration = measure_overheads(
                topo, workdir, tier, input_shape, serving_requests, model_path
            )
            for field, key in OVERHEAD_FIELDS.items():
                overheads[field][tier] = measured[key]
            profiles[tier]["servingCalibration"] = calibration
        print(
            f"[bench]   whole model {profiles[tier]['wholeModelMs']:.1f} ms, segments "
            f"chained {profiles[tier]['chainMs']:.1f} ms, overheads ms (+ ms/MB) "
            f"serving {overheads['serving_ms'].get(tier, 0):.1f} "
            f"(+{overheads['serving_ms_per_mb'].get(tier, 0):.1f}), forwarding "
            f"{overheads['forwarding_ms'].get(tier, 0):.1f} "
            f"(+{overheads['forwarding_ms_per_mb'].get(tier, 0):.1f})",
            flush=True,
        )
    graph = LayerGraph.chain(
        {t: [s["measuredMs"] for s in p["segments"]] for t, p in profiles.items()},
        [c["sizeBytes"] for c in profiles["device"]["cuts"]],
        [c["tensors"] for c in profiles["device"]["cuts"]],
    )
    return graph, profiles, overheads


def measure_hops(topo: Topology, fleet: Fleet, workdir: Path) -> list[dict[str, Any]]:
    """OIP binary inference to a stage without a model (it answers its input: the
    binary path alone) and through an Identity model vs a raw aiohttp echo of the same
    bytes, across the shaped edge->cloud link and within one namespace."""
    passthrough = fleet.worker(
        "cloud",
        {"model_name": "identity", "host": topo.cloud_ip, "port": IDENTITY_PORT + 1,
         "tier": "cloud"},
        "passthrough",
    )  # fmt: skip
    identity = fleet.worker(
        "cloud",
        {
            "model_name": "identity", "host": topo.cloud_ip, "port": IDENTITY_PORT,
            "tier": "cloud", "partitions": [str(identity_model(workdir / "identity.onnx"))],
        },
        "identity",
    )  # fmt: skip
    hops = []
    for shape in ([1, 3, 224, 224], [1, 64, 13, 13]):
        for where, tier in (("edge->cloud, shaped", "edge"), ("same namespace", "cloud")):
            print(f"[bench] per-hop overhead {shape} {where}", flush=True)
            hop = agent(
                topo, tier, "hop", "--oip", f"{passthrough}/v2/models/identity/infer",
                "--oip-model", f"{identity}/v2/models/identity/infer",
                "--echo", f"http://{topo.cloud_ip}:{ECHO_PORT}/echo", "--shape", json.dumps(shape),
                limit_cpu=False,
            )  # fmt: skip
            hop.update(
                shape=shape,
                path=where,
                ratio=hop["oip_ms"] / hop["echo_ms"],
                model_ratio=hop["model_ms"] / hop["echo_ms"],
            )
            hops.append(hop)
    return hops


def run_scenarios(
    topo: Topology,
    workdir: Path,
    model: str,
    uplinks: Sequence[float],
    backhaul_mbps: float,
    requests: int,
    profile_repeats: int,
    serving_requests: int,
) -> tuple[dict[str, Any], Any, dict[str, dict[str, float]]]:
    """For each uplink: plan, then run the plan, device-only and cloud-only. Returns the
    report, the planner's layer graph built from the profiles and the tiers' serving
    and forwarding overheads."""
    import onnx

    from edgeai_operator.planner.model import Link, Problem, Variant, evaluate
    from edgeai_operator.planner.plan import plan_partitions
    from edgeai_worker import zoo
    from edgeai_worker.graph import cut_points
    from edgeai_worker.profiler import IDLE_MS

    model_path = zoo.export_onnx(model)
    cuts = cut_points(onnx.load(str(model_path)))
    model_input, model_output = list(cuts[0].tensors), list(cuts[-1].tensors)
    input_path = workdir / f"{model}-input.npy"
    np.save(input_path, zoo.example_input(model))
    graph, profiles, overheads = profile_tiers(
        topo, workdir, model, model_path, list(zoo.example_input(model).shape),
        profile_repeats, serving_requests,
    )  # fmt: skip
    nodes = len(profiles["device"]["segments"])
    result: dict[str, Any] = {
        "model": model,
        "profiles": {
            t: {
                "wholeModelMs": p["wholeModelMs"],
                "chainMs": p["chainMs"],
                **(
                    {"servingCalibration": p["servingCalibration"]}
                    if "servingCalibration" in p
                    else {}
                ),
            }
            for t, p in profiles.items()
        },
        **overheads,
        "scenarios": [],
    }
    for uplink in uplinks:
        set_uplink(topo, uplink)
        echo_edge = f"http://{topo.edge_down_ip}:{ECHO_PORT}/echo"
        echo_cloud = f"http://{topo.cloud_ip}:{ECHO_PORT}/echo"
        rtt0 = agent(topo, "device", "rtt", "--url", echo_edge, limit_cpu=False)["rtt_ms"]
        rtt1 = agent(topo, "edge", "rtt", "--url", echo_cloud, limit_cpu=False)["rtt_ms"]
        problem = Problem(
            variants=(Variant("fp32", graph),),
            links=(Link(uplink, rtt0), Link(backhaul_mbps, rtt1)),
            serving_ms=overheads["serving_ms"],
            serving_ms_per_mb=overheads["serving_ms_per_mb"],
            forwarding_ms=overheads["forwarding_ms"],
            forwarding_ms_per_mb=overheads["forwarding_ms_per_mb"],
        )
        plan = plan_partitions(problem, alternatives=False)
        device_only = [{"tier": "device", "inputs": model_input, "outputs": model_output}]
        cloud_only = [
            {"tier": "device", "inputs": model_input, "outputs": model_input},
            {"tier": "edge", "inputs": model_input, "outputs": model_input},
            {"tier": "cloud", "inputs": model_input, "outputs": model_output},
        ]
        single = {"device-only": [0] * nodes, "cloud-only": [2] * nodes}
        same_as = next((k for k, a in single.items() if list(plan.assignment) == a), None)
        configs = {
            "partitioned (planner)": (
                full_stages(plan, model_input),
                evaluate(problem, graph, list(plan.assignment)),
            ),
            "device-only": (device_only, evaluate(problem, graph, single["device-only"])),
            "cloud-only": (cloud_only, evaluate(problem, graph, single["cloud-only"])),
        }
        scenario: dict[str, Any] = {
            "uplink_mbps": uplink,
            "rtt_ms": [rtt0, rtt1],
            "plan": " + ".join(f"{s.tier}[{s.layers}]" for s in plan.stages),
            "plan_is": same_as,
            "results": {},
        }
        # A plan that is a single-tier configuration is that deployment: it runs once.
        deployed = [name for name in configs if not (same_as and name.startswith("partitioned"))]
        print(
            f"[bench] {model}, uplink {uplink:g} Mbps: plan {scenario['plan']}"
            + (f" (= {same_as})" if same_as else "")
            + f"; deploying {', '.join(deployed)} side by side",
            flush=True,
        )
        stage_fleet = Fleet(topo, workdir)
        try:
            entries: dict[str, tuple[str, list[tuple[str, str]]]] = {}
            for j, name in enumerate(deployed):
                tag = f"{model}-{int(uplink)}mbps-{name.split()[0]}"
                entries[name] = deploy(
                    stage_fleet, configs[name][0], model_path, tag, uplink,
                    port_base=STAGE_PORT + 10 * j,
                )  # fmt: skip
            urls = [entries[name][0] for name in deployed]
            # Slow configurations (seconds per request) get fewer requests.
            counts = [
                requests if configs[name][1].latency_ms < 1000 else max(3, requests // 2)
                for name in deployed
            ]
            # The client is the device's application: in the device's namespace,
            # outside the device stage's slowdown (the planner models the stages). It
            # sends to the deployments in turn, so all see the same machine load, and
            # each request after as much idleness as the profile's runs had: the
            # planner predicts a request to an idle chain (back to back, on this host,
            # the device computed up to 16 % faster in the row with the fastest turns).
            client_args = [a for url in urls for a in ("--url", url)]
            client_args += ["--pause-ms", f"{IDLE_MS:g}"]
            agent(
                topo, "device", "client", *client_args, "--input", str(input_path),
                "--requests", "1", "--warmup", "2", limit_cpu=False,
            )  # fmt: skip
            before = {name: stage_metrics(topo, entries[name][1]) for name in deployed}
            measured = agent(
                topo, "device", "client", *client_args, "--input", str(input_path),
                "--counts", ",".join(map(str, counts)), "--warmup", "0", limit_cpu=False,
            )  # fmt: skip
            after = {name: stage_metrics(topo, entries[name][1]) for name in deployed}
        finally:
            stage_fleet.stop()
        for i, name in enumerate(deployed):
            evaluation = configs[name][1]
            predicted = evaluation.latency_ms
            median = measured["per_url"][i]["median_ms"]
            row = {
                "measured_ms": median,
                "predicted_ms": predicted,
                "ratio": median / predicted,
                "requests": counts[i],
                "stages": stage_breakdown(before[name], after[name]),
                "predicted_compute_ms": dict(zip(TIERS, evaluation.compute_ms, strict=True)),
                "predicted_serving_ms": dict(zip(TIERS, evaluation.serving_ms, strict=True)),
            }
            scenario["results"][name] = row
            print(
                f"[bench]   {name}: measured {median:.1f} ms, predicted {predicted:.1f} ms",
                flush=True,
            )
        if same_as:
            scenario["results"] = {
                "partitioned (planner)": {**scenario["results"][same_as], "same_as": same_as},
                **scenario["results"],
            }
        results = scenario["results"]
        best_single = min(
            results["device-only"]["measured_ms"], results["cloud-only"]["measured_ms"]
        )
        scenario["partitioned_vs_best_single"] = (
            results["partitioned (planner)"]["measured_ms"] / best_single
        )
        result["scenarios"].append(scenario)
    return result, graph, overheads


def split_label(cut_index: int | None, last: int) -> str:
    """The device stage's label for the split at `cut_index` (see runlocal)."""
    if cut_index == 0:
        return "raw"
    if cut_index == last:
        return "stage0-device-whole"
    return f"stage0-device-cut{cut_index}"


def run_adaptive(
    topo: Topology,
    workdir: Path,
    model: str,
    graph: Any,
    overheads: dict[str, dict[str, float]],
    base_uplink: float,
    phases: Sequence[float],
    phase_s: float,
    backhaul_mbps: float,
) -> dict[str, Any]:
    """Deploy the plan for `base_uplink` with its alternatives, then change the shaped
    uplink phase by phase under a steady stream of requests and record which split the
    device chose for each request."""
    import onnx

    from edgeai_operator.planner.model import Link, Problem, Variant
    from edgeai_operator.planner.plan import plan_partitions
    from edgeai_operator.problem import plan_alternatives
    from edgeai_worker import zoo
    from edgeai_worker.graph import cut_points

    model_path = zoo.export_onnx(model)
    cuts = cut_points(onnx.load(str(model_path)))
    model_input = list(cuts[0].tensors)
    set_uplink(topo, base_uplink)
    problem = Problem(
        variants=(Variant("fp32", graph),),
        links=(Link(base_uplink, 0.5), Link(backhaul_mbps, 0.5)),
        serving_ms=overheads["serving_ms"],
        serving_ms_per_mb=overheads["serving_ms_per_mb"],
        forwarding_ms=overheads["forwarding_ms"],
        forwarding_ms_per_mb=overheads["forwarding_ms_per_mb"],
    )
    plan = plan_partitions(problem)
    alternatives = [a.to_dict() for a in plan_alternatives(plan)]
    stages = full_stages(plan, model_input)
    result: dict[str, Any] = {
        "model": model,
        "base_uplink_mbps": base_uplink,
        "plan": " + ".join(f"{s.tier}[{s.layers}]" for s in plan.stages),
        "alternatives": [
            {k: a[k] for k in ("minMbps", "maxMbps", "cutIndex", "predictedLatencyMs")}
            for a in alternatives
        ],
        "phases": [],
    }
    if len(stages) < 2:
        result["skipped"] = "the plan at the base uplink has a single stage"
        return result
    fleet = Fleet(topo, workdir)
    try:
        print(f"[bench] adaptive split: {model}, plan {result['plan']}", flush=True)
        entry, _ = deploy(fleet, stages, model_path, f"{model}-adaptive", None, alternatives)
        input_path = workdir / f"{model}-input.npy"
        for mbps in phases:
            set_uplink(topo, mbps)
            band = next(
                (
                    a
                    for a in alternatives
                    if a["minMbps"] <= mbps and (a["maxMbps"] is None or mbps < a["maxMbps"])
                ),
                None,
            )
            expected = split_label(band["cutIndex"], len(cuts) - 1) if band else "?"
            print(f"[bench]   uplink now {mbps:g} Mbps (plan's band: {expected})", flush=True)
            measured = agent(
                topo, "device", "client", "--url", entry, "--input", str(input_path),
                "--warmup", "0", "--duration-s", str(phase_s), limit_cpu=False,
            )  # fmt: skip
            splits, offsets = measured["splits"], measured["offsets_s"]
            first = next((t for t, s in zip(offsets, splits, strict=True) if s == expected), None)
            late = [
                ms
                for t, ms in zip(offsets, measured["latencies_ms"], strict=True)
                if t >= phase_s / 2
            ]
            counts: dict[str, int] = {}
            for label in splits:
                counts[label] = counts.get(label, 0) + 1
            result["phases"].append(
                {
                    "uplink_mbps": mbps,
                    "expected": expected,
                    "splits": counts,
                    "first_expected_at_s": first,
                    "share_expected": counts.get(expected, 0) / len(splits),
                    "median_ms_second_half": statistics.median(late) if late else None,
                    "requests": len(splits),
                }
            )
    finally:
        fleet.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", default="alexnet_like,resnet18", help="zoo models, comma-separated"
    )
    parser.add_argument("--uplinks", default="1,10,100", help="device<->edge Mbps, comma-separated")
    parser.add_argument("--backhaul-mbps", type=float, default=100.0)
    parser.add_argument("--requests", type=int, default=20, help="timed requests per config")
    parser.add_argument("--profile-repeats", type=int, default=20)
    parser.add_argument(
        "--serving-requests",
        type=int,
        default=60,
        help="requests per tier measuring the fixed serving and forwarding overheads "
        "(0: the planner gets none)",
    )
    parser.add_argument(
        "--device-slowdown",
        type=float,
        default=4.0,
        help="the device computes onnxruntime this many times slower than the host "
        "(slowcpu.py; 1: host speed)",
    )
    parser.add_argument(
        "--device-cpus",
        type=float,
        default=None,
        help="a CFS quota for the device tier in CPUs (e.g. 0.25 with --device-slowdown 1)",
    )
    parser.add_argument("--edge-cpus", type=float, default=1.0)
    parser.add_argument("--cloud-threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE.parent / "results" / "dataplane.json")
    parser.add_argument(
        "--results",
        type=Path,
        default=render_numbers.RESULTS_DIR / "dataplane.json",
        help="the committed results this run's summary is added to",
    )
    parser.add_argument(
        "--label", help="the run's name in the results (default: its start time, UTC)"
    )
    parser.add_argument(
        "--adaptive-model", help="model for the adaptive-split run (default: the first; '' skips)"
    )
    parser.add_argument("--adaptive-base-mbps", type=float, default=100.0)
    parser.add_argument("--adaptive-phases", default="100,1,10,100", help="uplink Mbps per phase")
    parser.add_argument("--adaptive-phase-s", type=float, default=10.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("error: needs root (ip netns, tc, cgroups)", file=sys.stderr)
        return 2
    if not args.device_slowdown >= 1:
        print(
            f"error: --device-slowdown must be >= 1, got {args.device_slowdown:g}", file=sys.stderr
        )
        return 2
    # SIGTERM unwinds like Ctrl-C, so the namespaces and cgroups are removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    uplinks = [float(u) for u in args.uplinks.split(",")]
    tiers = {
        "device": TierSpec("device", args.device_cpus, 1, args.device_slowdown),
        "edge": TierSpec("edge", args.edge_cpus, 1),
        "cloud": TierSpec("cloud", None, args.cloud_threads),
    }
    workdir = Path(tempfile.mkdtemp(prefix="edgeai-bench-"))
    started = time.monotonic()
    report: dict[str, Any] = {
        "tiers": {k: vars(v) for k, v in tiers.items()},
        "backhaul_mbps": args.backhaul_mbps,
        "models": [],
    }
    print("[bench] encoding a 1x3x224x224 FP32 tensor", flush=True)
    report["encoding"] = encoding_ratio()
    with topology(tiers, uplinks[0], args.backhaul_mbps) as topo:
        report["cgroups"] = topo.cgroups
        fleet = Fleet(topo, workdir)
        try:
            for tier in ("edge", "cloud"):
                host = tier_host(topo, tier)
                process = fleet.spawn(
                    tier,
                    [PYTHON, AGENT, "echo-server", "--host", host, "--port", str(ECHO_PORT)],
                    f"echo-{tier}",
                )
                wait_ready(topo, tier, f"http://{host}:{ECHO_PORT}/health", process)
            report["hops"] = measure_hops(topo, fleet, workdir)
            models = args.models.split(",")
            adaptive_model = args.adaptive_model if args.adaptive_model is not None else models[0]
            for model in models:
                result, graph, overheads = run_scenarios(
                    topo, workdir, model, uplinks, args.backhaul_mbps, args.requests,
                    args.profile_repeats, args.serving_requests,
                )  # fmt: skip
                report["models"].append(result)
                if model == adaptive_model:
                    report["adaptive"] = run_adaptive(
                        topo, workdir, model, graph, overheads, args.adaptive_base_mbps,
                        [float(p) for p in args.adaptive_phases.split(",")],
                        args.adaptive_phase_s, args.backhaul_mbps,
                    )  # fmt: skip
        finally:
            fleet.stop()
    report["elapsed_s"] = time.monotonic() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_report(report)
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    results = json.loads(args.results.read_text())
    results["runs"].append(render_numbers.dataplane_run_summary(report, args.label or date, date))
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"\n(raw numbers: {args.out}; summary added to {args.results}, which make "
        f"docs-numbers renders; {report['elapsed_s']:.0f} s)"
    )
    return 0


def print_report(report: dict[str, Any]) -> None:
    tiers = report["tiers"]
    print()
    print(
        "tiers: "
        + ", ".join(f"{t} {TierSpec(**v).describe()}" for t, v in tiers.items())
        + f"; cgroup CPU quotas {'on' if report['cgroups'] else 'OFF'}; "
        f"device<->edge shaped per row, edge<->cloud {report['backhaul_mbps']:g} Mbps (tc tbf)"
    )
    print()
    print("1+2. end-to-end latency vs the planner (median, client in the device namespace)")
    for m in report["models"]:
        print()
        print(
            f"model {m['model']}; profile ms, whole model / segments chained: "
            + ", ".join(
                f"{t} {p['wholeModelMs']:.1f}/{p['chainMs']:.1f}" for t, p in m["profiles"].items()
            )
        )
        per_mb = {f: m.get(f"{f}_per_mb", {}) for f in ("serving_ms", "forwarding_ms")}
        print(
            "overhead per request, serving/forwarding ms + ms/MB (tiny model through workers, "
            "serving's fixed part calibrated below): "
            + (
                ", ".join(
                    f"{t} {ms:.1f}+{per_mb['serving_ms'].get(t, 0):.1f}/"
                    f"{m['forwarding_ms'][t]:.1f}+{per_mb['forwarding_ms'].get(t, 0):.1f}"
                    for t, ms in m["serving_ms"].items()
                )
                or "not measured"
            )
        )
        calibrated = {
            t: p["servingCalibration"]
            for t, p in m["profiles"].items()
            if "servingCalibration" in p
        }
        if calibrated:
            print(
                "serving overhead at the model's input, a worker serving the model "
                "(round trip - its onnxruntime ms), sets the fixed part (the probe's in brackets): "
                + ", ".join(
                    f"{t} {c['roundTripMs']:.1f}-{c['computeMs']:.1f} = {c['overheadMs']:.1f} "
                    f"({m['serving_ms'][t]:.1f}; {c['probeServingMs']:.1f})"
                    for t, c in calibrated.items()
                )
            )
        print(
            f"{'uplink':>7} {'config':<22} {'measured ms':>12} {'predicted ms':>13} "
            f"{'meas/pred':>10}  plan"
        )
        for s in m["scenarios"]:
            for name, r in s["results"].items():
                plan = s["plan"] if name.startswith("partitioned") else ""
                if r.get("same_as"):
                    plan += f"  (= {r['same_as']}: that deployment's measurement)"
                print(
                    f"{s['uplink_mbps']:>5g}Mb {name:<22} {r['measured_ms']:>12.1f} "
                    f"{r['predicted_ms']:>13.1f} {r['ratio']:>10.2f}  {plan}"
                )
                if r.get("same_as"):
                    continue
                serving = sum(r.get("predicted_serving_ms", {}).values())
                print(
                    f"{'':>31}onnxruntime ms measured/planner: "
                    + ", ".join(
                        f"{t} {b['compute_ms']:.1f}/{r['predicted_compute_ms'][t]:.1f}"
                        for t, b in r["stages"].items()
                        if b["compute_ms"] or r["predicted_compute_ms"][t]
                    )
                    + f"; planner's serving+forwarding ms {serving:.1f}"
                )
            print(
                f"{'':>7} partitioned / min(device-only, cloud-only) = "
                f"{s['partitioned_vs_best_single']:.2f}   "
                f"(rtt ms {s['rtt_ms'][0]:.2f}, {s['rtt_ms'][1]:.2f})"
            )
    adaptive = report.get("adaptive")
    if adaptive:
        print()
        print(
            f"5. adaptive split: {adaptive['model']}, deployed with the plan for "
            f"{adaptive['base_uplink_mbps']:g} Mbps ({adaptive['plan']}) and its alternatives"
        )
        for a in adaptive["alternatives"]:
            print(
                f"   band [{a['minMbps']:g}, {a['maxMbps'] if a['maxMbps'] is not None else 'inf'})"
                f" Mbps: cut {a['cutIndex']}, predicted {a['predictedLatencyMs']:.1f} ms"
            )
        if adaptive.get("skipped"):
            print(f"   skipped: {adaptive['skipped']}")
        for ph in adaptive["phases"]:
            first = ph["first_expected_at_s"]
            when = f"first used after {first:.1f} s" if first is not None else "never used"
            median = ph["median_ms_second_half"]
            print(
                f"   uplink {ph['uplink_mbps']:>5g} Mbps: band's split {ph['expected']} {when}, "
                f"{ph['share_expected']:.0%} of {ph['requests']} requests; median "
                f"{median if median is None else round(median, 1)} ms in the second half; "
                f"splits used {ph['splits']}"
            )
    print()
    print(
        "3. per-hop: OIP binary inference to a stage without a model (the binary path) "
        "/ raw aiohttp echo of the same bytes; and through an Identity model (+ onnxruntime)"
    )
    print(
        f"{'tensor':<18} {'path':<22} {'bytes':>9} {'OIP ms':>8} {'echo ms':>8} {'ratio':>6}"
        f" {'Identity ms':>12} {'ratio':>6}"
    )
    for h in report["hops"]:
        print(
            f"{h['shape']!s:<18} {h['path']:<22} {h['bytes']:>9} {h['oip_ms']:>8.2f} "
            f"{h['echo_ms']:>8.2f} {h['ratio']:>6.2f} {h['model_ms']:>12.2f} "
            f"{h['model_ratio']:>6.2f}"
        )
    e = report["encoding"]
    print()
    print("4. binary / JSON for a 1x3x224x224 FP32 tensor")
    print(f"   size   {e['binary_bytes']} / {e['json_bytes']} bytes = {e['size_ratio']:.3f}")
    print(
        f"   encode {e['binary_encode_ms']:.2f} / {e['json_encode_ms']:.1f} ms "
        f"= {e['encode_ratio']:.4f}"
    )
    print(
        f"   decode {e['binary_decode_ms']:.2f} / {e['json_decode_ms']:.1f} ms "
        f"= {e['decode_ratio']:.4f}"
    )


if __name__ == "__main__":
    sys.exit(main())
