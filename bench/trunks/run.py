"""Shared trunk vs separate deployments: edge compute per pair of requests (real worker
processes on loopback).

    python bench/trunks/run.py [--frames 300] [--rounds 3]

Two digits applications fine-tuned from one trunk: `digits` (digits_cnn, 10 classes)
and `parity` (odd or even: digits_cnn's frozen trunk with a head trained for it,
`edgeai_worker.trunks`). Each held-out digit is one frame that both applications are
asked about (a pair of requests). Two set-ups, real processes each:

- separate: two edge workers, each serving its application's whole model;
- shared: one trunk stage (`edgeai_worker.trunkstage`, the trunk up to
  `trunks.TRUNK_TENSOR`) forwarding to two head workers (each application's layers
  after the trunk).

Per set-up, over the stream: edge compute per pair as onnxruntime seconds the edge
processes report (`edgeai_stage_compute_seconds_sum` of the workers,
`edgeai_trunk_compute_seconds_total` of the trunk stage) and as FLOPs (partition runs
x the partition's FLOPs from the graph), the edge processes' CPU seconds per pair
(/proc, HTTP handling included), and whether every answer equals the application's
full model run with onnxruntime. Rounds alternate the set-ups; numbers are medians
over rounds; ratios are shared / separate. Written to docs/results/trunks.json,
rendered into docs/trunks.md by bench/render_numbers.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnx
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))

import render_numbers  # noqa: E402
from edgeai_worker import trunks, zoo  # noqa: E402
from edgeai_worker.graph import analyze, extract_partition  # noqa: E402
from edgeai_worker.protocol import (  # noqa: E402
    HEADER_LENGTH,
    InferRequest,
    Tensor,
    decode_response,
    encode_request,
    parse_header_length,
)
from edgeai_worker.runtime import Partition  # noqa: E402

GOAL = 0.6  # shared edge compute per pair <= GOAL x separate
APPS = ("digits", "parity")
# trunk outputs the trunk stage keeps: enough for a pair, not for a later pass
REUSE_ENTRIES = 4
PYTHON = sys.executable


def _port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _flops(path: Path, input_name: str = "input", shape: tuple[int, ...] = (1, 1, 8, 8)) -> int:
    return sum(n.flops for n in analyze(onnx.load(str(path)), {input_name: shape}).nodes)


class Process:
    def __init__(self, args: list[str], log: Path, url: str) -> None:
        self.url = url
        with log.open("wb") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{args[2:4]} exited:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} not ready:\n{log.read_text()}")
            time.sleep(0.05)

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def _sum(text: str, prefix: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def _worker(tmp: Path, name: str, partition: Path) -> Process:
    port = _port()
    config = tmp / f"{name}-{port}.json"
    settings = {"model_name": name, "partitions": [str(partition)], "tier": "edge", "port": port}
    config.write_text(json.dumps(settings))
    args = [PYTHON, "-m", "edgeai_worker", "--config", str(config)]
    return Process(args, tmp / f"{name}-{port}.log", f"http://127.0.0.1:{port}")


def _trunk(tmp: Path, trunk: Path, routes: dict[str, str]) -> Process:
    port = _port()
    args = [PYTHON, "-m", "edgeai_worker.trunkstage", f"--trunk={trunk}", f"--port={port}"]
    args.append(f"--reuse-entries={REUSE_ENTRIES}")
    args += [f"--route={m}={u}" for m, u in routes.items()]
    return Process(args, tmp / f"trunk-{port}.log", f"http://127.0.0.1:{port}")


async def _stream(urls: dict[str, str], requests: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Each request (a batch of frames) asked of both applications, one after the other."""
    answers: dict[str, list[np.ndarray]] = {a: [] for a in APPS}
    async with aiohttp.ClientSession() as session:
        for x in requests:
            request = InferRequest(
                [Tensor.from_numpy("input", x)], parameters={"binary_data_output": True}
            )
            body, headers = encode_request(request)
            for app in APPS:
                url = f"{urls[app]}/v2/models/{app}/infer"
                async with session.post(url, data=body, headers=headers) as resp:
                    data = await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"{app}: HTTP {resp.status}: {data[:200]!r}")
                    length = parse_header_length(resp.headers.get(HEADER_LENGTH), len(data))
                answers[app].append(decode_response(data, length).outputs[0].array)
    return answers


def _counters(procs: dict[str, Process]) -> dict[str, float]:
    texts = {n: p.metrics() for n, p in procs.items()}
    return {
        "cpu_s": sum(p.cpu_s() for p in procs.values()),
        "compute_s": sum(_sum(texts[a], "edgeai_stage_compute_seconds_sum") for a in APPS)
        + _sum(texts.get("trunk", ""), "edgeai_trunk_compute_seconds_total"),
        "cpu_compute_s": sum(
            _sum(t, "edgeai_stage_compute_cpu_seconds_total") for t in texts.values()
        ),
        "trunk_runs": _sum(texts.get("trunk", ""), "edgeai_trunk_runs_total"),
    }


def _run(
    setup: str,
    tmp: Path,
    paths: dict[str, Any],
    warmup: list[np.ndarray],
    requests: list[np.ndarray],
    expected: dict[str, np.ndarray],
) -> dict[str, Any]:
    pairs = len(requests)
    frames = sum(len(x) for x in requests)
    if setup == "separate":
        procs = {a: _worker(tmp, a, paths["full"][a]) for a in APPS}
        entry = {a: p.url for a, p in procs.items()}
    else:
        procs = {a: _worker(tmp, a, paths["head"][a]) for a in APPS}
        procs["trunk"] = _trunk(tmp, paths["trunk"], {a: procs[a].url for a in APPS})
        entry = {a: procs["trunk"].url for a in APPS}
    try:
        asyncio.run(_stream(entry, warmup))  # sessions, arenas and connections warm
        before = _counters(procs)
        answers = asyncio.run(_stream(entry, requests))
        after = _counters(procs)
    finally:
        for p in procs.values():
            p.stop()
    delta = {k: after[k] - before[k] for k in after}
    if setup == "separate":
        flops = frames * sum(paths["flops"]["full"][a] for a in APPS)
    else:
        # the trunk's FLOPs scale with the frames of each run: every run here is one request
        flops = delta["trunk_runs"] * (frames / pairs) * paths["flops"]["trunk"]
        flops += frames * sum(paths["flops"]["head"][a] for a in APPS)
    got = {a: np.concatenate(answers[a]) for a in APPS}
    return {
        "setup": setup,
        "computeMsPerPair": 1000 * delta["compute_s"] / pairs,
        "computeCpuMsPerPair": 1000 * delta["cpu_compute_s"] / pairs,
        "cpuMsPerPair": 1000 * delta["cpu_s"] / pairs,
        "flopsPerPair": flops / pairs,
        "trunkRuns": int(delta["trunk_runs"]),
        "maxAbsDiff": max(float(np.abs(got[a] - expected[a]).max()) for a in APPS),
        "identicalTop1": all(bool((got[a].argmax(1) == expected[a].argmax(1)).all()) for a in APPS),
    }


def _in_process(paths: dict[str, Any], requests: list[np.ndarray], rounds: int) -> dict[str, Any]:
    """The same onnxruntime work with nothing around it: every partition in this one
    process (sessions as the workers open them), the pairs run back to back, CPU time
    of the calling thread per pair; separate = each application's full model, shared =
    the trunk once and each head. Set-ups alternate per round; medians."""

    def load(path: Path) -> Partition:
        part = Partition(path)
        part.load()
        return part

    full = {a: load(paths["full"][a]) for a in APPS}
    trunk = load(paths["trunk"])
    heads = {a: load(paths["head"][a]) for a in APPS}

    def separate(x: np.ndarray) -> None:
        for a in APPS:
            full[a].run({"input": x})

    def shared(x: np.ndarray) -> None:
        features = trunk.run({"input": x})
        for a in APPS:
            heads[a].run(features)

    setups = {"separate": separate, "shared": shared}
    for run in setups.values():
        for x in requests[:20]:
            run(x)
    per_pair: dict[str, list[float]] = {s: [] for s in setups}
    for r in range(rounds):
        for name in sorted(setups, reverse=r % 2 == 1):
            started = time.thread_time()
            for x in requests:
                setups[name](x)
            per_pair[name].append(1000 * (time.thread_time() - started) / len(requests))
    sep, sha = (statistics.median(per_pair[s]) for s in ("separate", "shared"))
    return {"separateCpuMsPerPair": sep, "sharedCpuMsPerPair": sha, "ratio": sha / sep}


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def _models(tmp: Path) -> dict[str, Any]:
    full = {
        "digits": zoo.export_onnx("digits_cnn", trained=True),
        "parity": trunks.digits_head("parity"),
    }
    trunk = tmp / "trunk.onnx"
    whole = onnx.load(str(full["digits"]))
    onnx.save(extract_partition(whole, ["input"], [trunks.TRUNK_TENSOR]), str(trunk))
    heads = {}
    for a in APPS:
        heads[a] = tmp / f"head-{a}.onnx"
        part = extract_partition(onnx.load(str(full[a])), [trunks.TRUNK_TENSOR], ["output"])
        onnx.save(part, str(heads[a]))
    return {
        "full": full,
        "head": heads,
        "trunk": trunk,
        "flops": {
            "full": {a: _flops(full[a]) for a in APPS},
            "trunk": _flops(trunk),
            "head": {a: _flops(heads[a], trunks.TRUNK_TENSOR, (1, 32, 4, 4)) for a in APPS},
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,16,64", help="frames per request, one set each")
    parser.add_argument("--pairs", type=int, default=400, help="pairs of requests per round")
    parser.add_argument("--warmup", type=int, default=20, help="pairs before measuring")
    parser.add_argument("--rounds", type=int, default=3)
    render_numbers.add_result_arguments(parser, "trunks.json")
    args = parser.parse_args(argv)
    started = time.monotonic()
    x_train, _, x_test, _ = zoo.digits_split()
    report: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "conditions": args.conditions,
        "pairs": args.pairs,
        "rounds": args.rounds,
        "goal": GOAL,
        "batches": {},
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        paths = _models(tmp)
        report["flops"] = paths["flops"]
        sessions = {
            a: ort.InferenceSession(str(paths["full"][a]), providers=["CPUExecutionProvider"])
            for a in APPS
        }
        for batch in (int(b) for b in args.batches.split(",")):
            # the held-out digits in order, cycled; the trunk keeps only a few outputs,
            # so a digit met again a pass later is computed again
            index = np.arange(args.pairs * batch) % len(x_test)
            requests = [x_test[index[i : i + batch]] for i in range(0, len(index), batch)]
            warmup = [x_train[i * batch : (i + 1) * batch] for i in range(args.warmup)]
            frames = np.concatenate(requests)
            expected = {a: sessions[a].run(None, {"input": frames})[0] for a in APPS}
            runs: dict[str, list[dict[str, Any]]] = {"separate": [], "shared": []}
            for r in range(args.rounds):
                order = ("separate", "shared") if r % 2 == 0 else ("shared", "separate")
                for setup in order:
                    result = _run(setup, tmp, paths, warmup, requests, expected)
                    runs[setup].append(result)
                    print(
                        f"[trunks] batch {batch} round {r + 1}/{args.rounds} {setup}: "
                        f"{result['computeMsPerPair']:.4f} ms compute, "
                        f"{result['cpuMsPerPair']:.2f} ms CPU per pair, "
                        f"max |diff| {result['maxAbsDiff']:.2e}",
                        flush=True,
                    )
            summary = {
                setup: {key: _median(rs, key) for key in _KEYS}
                | {"identicalTop1": all(r["identicalTop1"] for r in rs)}
                for setup, rs in runs.items()
            }
            ratios = {k: summary["shared"][k] / summary["separate"][k] for k in _RATIO_KEYS}
            alone = _in_process(paths, requests, args.rounds)
            print(f"[trunks] batch {batch}: onnxruntime alone, shared / separate: "
                  f"{alone['ratio']:.3f}", flush=True)  # fmt: skip
            report["batches"][str(batch)] = {
                "summary": summary,
                "ratios": ratios,
                "inProcess": alone,
                "runs": runs,
            }
            for key, ratio in ratios.items():
                print(f"[trunks] batch {batch}: shared / separate {key}: {ratio:.3f}")
    report["seconds"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"[trunks] wrote {args.out} in {report['seconds']:.0f}s (make docs-numbers renders it)")
    return 0


_KEYS = (
    "computeMsPerPair",
    "computeCpuMsPerPair",
    "cpuMsPerPair",
    "flopsPerPair",
    "trunkRuns",
    "maxAbsDiff",
)
_RATIO_KEYS = ("flopsPerPair", "computeCpuMsPerPair", "computeMsPerPair", "cpuMsPerPair")


if __name__ == "__main__":
    raise SystemExit(main())
