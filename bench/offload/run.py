"""Per-input offloading benchmark over tc-shaped links between network namespaces
(needs root).

    python bench/offload/run.py [--uplinks 1,10,100] [--requests 600]

One run: builds the digits exits and cascade (`edgeai_worker.offload.build`, torch),
calibrates their thresholds on the validation half of the held-out digits for 99.5 %
of the full model's validation accuracy, and the reuse distance on a validation stream
for at most 0.5 points of accuracy loss. Then, for each uplink rate, a device and an edge
namespace joined by veth (`tc tbf` both ways, bench/dataplane/netns.py) serve the
same stream of the other held-out half with locality (40 % exact repeats and 30 %
perturbed repeats of one of the last 20 inputs, 30 % new ones) through four set-ups,
real worker processes each:

- always-offload: the device forwards the raw input, the edge runs the whole model;
- early-exit: the device runs the model up to features_1 with two exit heads and
  answers at the first confident exit, else forwards features_1;
- cascade: the device runs the small model(s), answers when confident, else forwards the
  raw input to the edge's full model;
- cascade+reuse: the same, and the edge answers near-identical inputs from its cache.

Per set-up: accuracy, mean and p95 latency (the client beside the device stage, after
20 warm-up requests), device energy per request (device compute seconds x computeWatts
+ uplink seconds x txWatts + downlink seconds x rxWatts + the rest of the request x
idleWatts), and uplink bytes per request as the device's veth counts them (IP packets,
headers included). Each set-up runs `--rounds` times (3) in a rotating order, and every
number is the median over the rounds (the machine is shared). Ratios to always-offload
at the same rate are printed side by side and written, with everything else, to
docs/results/offload.json (rendered into docs/offload.md and README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent / "dataplane"))
sys.path.insert(0, str(HERE.parent))

from netns import TierSpec, Topology, set_uplink, topology  # noqa: E402

import render_numbers  # noqa: E402

PYTHON = sys.executable
DEVICE_PORT = 9500
EDGE_PORT = 9501
POWER_W = {"compute": 4.0, "tx": 1.5, "rx": 1.0, "idle": 0.3}
SETUPS = ("always-offload", "early-exit", "cascade", "cascade+reuse")
REUSE_ENTRIES = 256
MAX_REUSE_LOSS = 0.005


def build(workdir: Path) -> dict[str, Any]:
    from edgeai_worker import zoo
    from edgeai_worker.offload.build import (
        _run,
        build_digits_offload,
        calibrate_reuse,
        validation_split,
    )

    x_val, y_val, _, _ = validation_split()
    full_val = _run(zoo.export_onnx("digits_cnn", trained=True), x_val)["output"]
    target = round(0.995 * float(np.mean(full_val.argmax(axis=1) == y_val)), 4)
    calibration = build_digits_offload(workdir, target)
    reuse = calibrate_reuse(workdir, REUSE_ENTRIES, MAX_REUSE_LOSS)
    return {"target": target, "calibration": calibration, "reuse": reuse}


def setups(
    workdir: Path, built: dict[str, Any], cascade_rule: str
) -> dict[str, list[dict[str, Any]]]:
    """Worker settings (device, edge) per set-up."""
    cal = built["calibration"]
    edge_url = f"http://{Topology.edge_down_ip}:{EDGE_PORT}"
    base_device = {
        "model_name": "digits",
        "tier": "device",
        "host": "127.0.0.1",
        "port": DEVICE_PORT,
        "next_urls": [edge_url],
        "uplink_mbps": 1.0,  # no probes: the bench counts every byte on the link
    }
    base_edge = {
        "model_name": "digits",
        "tier": "edge",
        "stage_index": 1,
        "host": "0.0.0.0",
        "port": EDGE_PORT,
    }
    smalls = ["small.onnx", "small2.onnx"] if cascade_rule == "disagreement" else ["small.onnx"]
    cascade = {
        "rule": cascade_rule,
        "cascadeModels": [str(workdir / m) for m in smalls],
        "cascadeThreshold": cal[cascade_rule]["cascadeThreshold"],
    }
    full = {**base_edge, "partitions": [str(workdir / "full.onnx")]}
    return {
        "always-offload": [base_device, full],
        "early-exit": [
            {
                **base_device,
                "partitions": [str(workdir / "device-exits.onnx")],
                "offload": {
                    "rule": "maxProb",
                    "exits": [
                        {"output": f"exit_{k}", "threshold": t}
                        for k, t in enumerate(cal["maxProb"]["exitThresholds"])
                    ],
                },
            },
            {**base_edge, "partitions": [str(workdir / "edge-from-features.onnx")]},
        ],
        "cascade": [{**base_device, "offload": cascade}, full],
        "cascade+reuse": [
            {**base_device, "offload": cascade},
            {
                **full,
                "offload": {
                    "reuseEntries": REUSE_ENTRIES,
                    "reuseMaxDistance": built["reuse"]["max_distance"],
                },
            },
        ],
    }


# ------------------------------------------------------------------------- client


def client(url: str, stream_path: Path) -> None:
    """Runs inside the device namespace: sends the stream one request at a time and
    prints one JSON line (latencies, answers, exits)."""
    import urllib.request

    data = np.load(stream_path)
    xs, ys = data["x"], data["y"]
    opener = urllib.request.build_opener()
    latencies, predicted, exits, reused = [], [], [], 0
    for x, y in zip(xs, ys, strict=True):
        body = json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 1, 8, 8],
                        "datatype": "FP32",
                        "data": x.ravel().tolist(),
                    }
                ],
                "parameters": {"edgeai_label": int(y)},
            }
        ).encode()
        request = urllib.request.Request(
            f"{url}/v2/models/digits/infer", body, {"Content-Type": "application/json"}
        )
        started = time.perf_counter()
        with opener.open(request, timeout=30) as response:
            answer = json.loads(response.read())
        elapsed = time.perf_counter() - started
        latencies.append(elapsed * 1000)
        predicted.append(int(np.argmax(answer["outputs"][0]["data"])))
        params = answer.get("parameters") or {}
        exits.append(params.get("edgeai_exit", "final"))
        reused += int(bool(params.get("edgeai_reused")))
    print(
        json.dumps(
            {"latencies_ms": latencies, "predicted": predicted, "exits": exits, "reused": reused}
        )
    )


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rpartition(" ")[2])
    return total


def _veth_bytes(ns: str, dev: str) -> tuple[int, int]:
    out = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            ns,
            "cat",
            f"/sys/class/net/{dev}/statistics/tx_bytes",
            f"/sys/class/net/{dev}/statistics/rx_bytes",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(out[0]), int(out[1])


def _start(
    topo: Topology, tier: str, settings: dict[str, Any], tmp: Path
) -> subprocess.Popen[bytes]:
    config = tmp / f"{tier}-{settings['port']}.json"
    config.write_text(json.dumps(settings))
    log = (tmp / f"{tier}.log").open("wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEAI_")}
    env["PYTHONPATH"] = f"{ROOT / 'operator'}:{ROOT / 'workers'}"
    return subprocess.Popen(
        topo.wrap(tier, [PYTHON, "-m", "edgeai_worker", "--config", str(config)], limit_cpu=False),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )


def _wait_ready(topo: Topology, tier: str, url: str, process: subprocess.Popen[bytes]) -> None:
    probe = f"import urllib.request as u; u.urlopen('{url}/v2/health/ready', timeout=1)"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{tier} worker exited with {process.returncode}")
        if (
            subprocess.run(
                topo.wrap(tier, [PYTHON, "-c", probe], limit_cpu=False), capture_output=True
            ).returncode
            == 0
        ):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{tier} worker at {url} not ready after 60 s")


def _scrape(topo: Topology, tier: str, url: str) -> str:
    code = (
        f"import urllib.request as u; print(u.urlopen('{url}/metrics', timeout=5).read().decode())"
    )
    return subprocess.run(
        topo.wrap(tier, [PYTHON, "-c", code], limit_cpu=False),
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def measure(
    topo: Topology,
    settings: list[dict[str, Any]],
    stream: Path,
    labels: np.ndarray,
    mbps: float,
    tmp: Path,
    warmup: Path,
) -> dict[str, Any]:
    device_s, edge_s = settings
    edge = _start(topo, "edge", edge_s, tmp)
    device = _start(topo, "device", device_s, tmp)
    device_url = f"http://127.0.0.1:{DEVICE_PORT}"
    try:
        _wait_ready(topo, "edge", f"http://127.0.0.1:{EDGE_PORT}", edge)
        _wait_ready(topo, "device", device_url, device)
        # connections, sessions and caches of the code paths warm before counting
        subprocess.run(
            topo.wrap("device", [PYTHON, __file__, "--client", device_url, "--stream", str(warmup)],
                      limit_cpu=False),
            capture_output=True, text=True, timeout=600, check=True,
        )  # fmt: skip
        tx0, rx0 = _veth_bytes(Topology.ns("device"), "up0")
        before = _scrape(topo, "device", device_url)
        started = time.monotonic()
        run = subprocess.run(
            topo.wrap(
                "device",
                [PYTHON, __file__, "--client", device_url, "--stream", str(stream)],
                limit_cpu=False,
            ),
            capture_output=True,
            text=True,
            timeout=1200,
        )
        wall_s = time.monotonic() - started
        if run.returncode != 0:
            raise RuntimeError(f"client failed:\n{run.stderr[-2000:]}")
        after = _scrape(topo, "device", device_url)
        tx1, rx1 = _veth_bytes(Topology.ns("device"), "up0")
    finally:
        for process in (device, edge):
            process.terminate()
            process.wait(10)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    latencies = np.asarray(result["latencies_ms"])
    n = len(latencies)
    compute_s = _metric(after, "edgeai_stage_compute_seconds_sum") - _metric(
        before, "edgeai_stage_compute_seconds_sum"
    )
    up_bytes, down_bytes = tx1 - tx0, rx1 - rx0
    up_s = up_bytes * 8 / (mbps * 1e6)
    down_s = down_bytes * 8 / (mbps * 1e6)
    busy_s = latencies.sum() / 1000
    idle_s = max(0.0, busy_s - compute_s - up_s - down_s)
    energy_j = (
        compute_s * POWER_W["compute"]
        + up_s * POWER_W["tx"]
        + down_s * POWER_W["rx"]
        + idle_s * POWER_W["idle"]
    )
    exits: dict[str, int] = {}
    for e in result["exits"]:
        exits[e] = exits.get(e, 0) + 1
    return {
        "requests": n,
        "accuracy": float(np.mean(np.asarray(result["predicted"]) == labels)),
        "meanMs": float(latencies.mean()),
        "p95Ms": float(np.percentile(latencies, 95)),
        "deviceEnergyMj": energy_j / n * 1000,
        "uplinkBytesPerRequest": up_bytes / n,
        "downlinkBytesPerRequest": down_bytes / n,
        "deviceComputeMsPerRequest": compute_s / n * 1000,
        "exitShares": {k: v / n for k, v in sorted(exits.items())},
        "reuseHitShare": result["reused"] / n,
        "wallS": wall_s,
    }


def _median(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per number, the median over the rounds (the machine is shared; one slow round
    says little); the rest from the first round."""
    merged = dict(rounds[0])
    for key, value in rounds[0].items():
        if isinstance(value, int | float):
            merged[key] = float(np.median([r[key] for r in rounds]))
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uplinks", default="1,10,100")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3, help="runs per set-up (median)")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--stream", type=Path, help=argparse.SUPPRESS)
    render_numbers.add_result_arguments(parser, "offload.json")
    args = parser.parse_args(argv)
    if args.client:
        client(args.client, args.stream)
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="edgeai-offload-"))
    print(f"[offload] building exits and cascade in {workdir}", file=sys.stderr, flush=True)
    built = build(workdir)
    cal = built["calibration"]
    # the cascade rule with the fewest escalations on the validation half
    cascade_rule = min(cal, key=lambda r: 1 - cal[r]["validation"]["cascade"]["exit_rates"][0])
    from edgeai_worker.offload.build import locality_stream, validation_split

    _, _, x_ho, y_ho = validation_split()
    xs, ys = locality_stream(x_ho, y_ho, args.requests, seed=2)
    stream = workdir / "stream.npz"
    np.savez(stream, x=xs, y=ys)
    x_val, y_val, _, _ = validation_split()
    warmup = workdir / "warmup.npz"
    np.savez(warmup, x=x_val[:20], y=y_val[:20])
    configs = setups(workdir, built, cascade_rule)
    rates = [float(r) for r in args.uplinks.split(",")]
    tiers = {t: TierSpec(t, None, 1) for t in ("device", "edge", "cloud")}
    runs: list[dict[str, Any]] = []
    with topology(tiers, rates[0], 1000.0) as topo:
        for mbps in rates:
            set_uplink(topo, mbps)
            row: dict[str, Any] = {"uplinkMbps": mbps, "setups": {}, "rounds": {}}
            for r in range(args.rounds):
                order = SETUPS[r % len(SETUPS) :] + SETUPS[: r % len(SETUPS)]
                for name in order:
                    print(f"[offload] {mbps:g} Mbit/s round {r + 1}: {name}", file=sys.stderr)
                    result = measure(topo, configs[name], stream, ys, mbps, workdir, warmup)
                    row["rounds"].setdefault(name, []).append(result)
            row["setups"] = {name: _median(row["rounds"][name]) for name in SETUPS}
            base = row["setups"]["always-offload"]
            row["ratios"] = {
                name: {
                    "uplinkBytes": s["uplinkBytesPerRequest"] / base["uplinkBytesPerRequest"],
                    "p95": s["p95Ms"] / base["p95Ms"],
                    "meanLatency": s["meanMs"] / base["meanMs"],
                    "accuracy": s["accuracy"] / base["accuracy"],
                    "deviceEnergy": s["deviceEnergyMj"] / base["deviceEnergyMj"],
                }
                for name, s in row["setups"].items()
            }
            runs.append(row)
            for name, s in row["setups"].items():
                r = row["ratios"][name]
                print(
                    f"{mbps:>5g} Mbit/s {name:<15} acc {s['accuracy']:.4f} ({r['accuracy']:.3f}x) "
                    f"mean {s['meanMs']:.2f} ms p95 {s['p95Ms']:.2f} ms ({r['p95']:.2f}x) "
                    f"up {s['uplinkBytesPerRequest']:.0f} B ({r['uplinkBytes']:.2f}x) "
                    f"energy {s['deviceEnergyMj']:.2f} mJ ({r['deviceEnergy']:.2f}x)",
                    flush=True,
                )
    at1 = next((r for r in runs if r["uplinkMbps"] == 1.0), None)
    goal = None
    if at1 is not None:
        r = at1["ratios"]["cascade+reuse"]
        goal = {
            "uplinkBytesRatio": r["uplinkBytes"],
            "p95Ratio": r["p95"],
            "accuracyRatio": r["accuracy"],
            "met": r["uplinkBytes"] <= 0.3 and r["p95"] <= 0.5 and r["accuracy"] >= 0.99,
        }
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "conditions": args.conditions,
        "requests": args.requests,
        "rounds": args.rounds,
        "powerWatts": POWER_W,
        "targetAccuracy": built["target"],
        "cascadeRule": cascade_rule,
        "calibration": cal,
        "reuse": built["reuse"],
        "runs": runs,
        "goalAt1Mbps": goal,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"[offload] wrote {args.out}; goal at 1 Mbit/s: {goal}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
