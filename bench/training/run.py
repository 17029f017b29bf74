"""Distributed training on digits: update compression, FedAvg's rounds, privacy, data
skew, and gossip against a parameter server over shaped links, measured in one run.

    python bench/training/run.py [--out docs/results/training.json] [--no-netns]

Every job is real processes (`python -m edgeai_worker.training ...`) talking HTTP.
- Compression: dense synchronous SGD and the same job (seeds, data split, rounds) with
  top-1 % + error feedback, 8-bit, QSGD (4-bit) and sign + error feedback: the uplink
  bytes the aggregator read, and the held-out accuracy after the last round.
- FedAvg with 10 local steps: rounds to the target accuracy against dense sync SGD's.
- DP-SGD (FedAvg, 10 local steps): accuracy and (epsilon, delta) at noise multipliers
  0.5 and 1.0.
- IID against non-IID (Dirichlet alpha = 0.1) for FedAvg and EASGD.
- 8 workers, each in its own network namespace behind a 10 Mbit/s `tc tbf` link, with a
  parameter server (FedAvg) and with ring gossip: training wall time to the target
  (root only; skipped with --no-netns).

Writes JSON (`--out`, default docs/results/training.json; `make docs-numbers` renders it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edgeai_worker.training.localjob import LocalJob
from edgeai_worker.training.spec import TrainingSpec, parse_spec, with_sections

BENCH = Path(__file__).resolve().parent.parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH / "dataplane"))
sys.path.insert(0, str(BENCH))
import netns  # noqa: E402  (the dataplane bench's namespace and tc helpers)

import render_numbers  # noqa: E402

JOB_S = 900.0
COMPRESSION_ROUNDS = 150
TARGET = 0.95  # FedAvg vs sync SGD: rounds to this held-out accuracy
LINK_MBPS = 10.0
HUB = "eait-hub"


def spec(mode: str, **overrides: Any) -> TrainingSpec:
    base = {
        "algorithm": {"mode": mode, "learningRate": 0.1, "batchSize": 32},
        "workers": {"count": 4},
        "stop": {"targetAccuracy": 1.0, "maxRounds": COMPRESSION_ROUNDS},
        "faults": {"roundTimeoutSeconds": 30},
        "seed": 0,
    }
    return parse_spec(with_sections(base, **overrides))


def run_job(job_spec: TrainingSpec, workdir: Path, **job_args: Any) -> dict[str, Any]:
    job = LocalJob(job_spec, workdir, **job_args)
    job.start()
    try:
        job.wait(JOB_S)
    finally:
        job.stop()
    if job_spec.algorithm.mode == "gossip":
        statuses = [job.gossip_status(i) for i in range(job_spec.workers)]
        return {
            "accuracy": min(s["accuracy"] for s in statuses),
            "rounds": max(s["round"] for s in statuses),
            "trainingSeconds": max(s["trainingSeconds"] for s in statuses),
            "bytesUp": sum(s["bytesUp"] for s in statuses),
        }
    status = job.status()
    if status.get("phase") != "Succeeded":
        raise RuntimeError(f"job in {workdir} did not finish: {job.log_tail()}")
    return status


def rounds_to(status: dict[str, Any], target: float) -> int | None:
    return next((r["round"] for r in status["history"] if r["accuracy"] >= target), None)


def progress(message: str) -> None:
    print(f"[bench/training {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def loopback_jobs(work: Path) -> dict[str, Any]:
    jobs: dict[str, TrainingSpec] = {
        "dense": spec("syncSGD"),
        "topk": spec("syncSGD", compression={"kind": "topk", "ratio": 0.01, "errorFeedback": True}),
        "int8": spec("syncSGD", compression={"kind": "int8", "errorFeedback": False}),
        "qsgd": spec("syncSGD", compression={"kind": "qsgd", "errorFeedback": False}),
        "sign": spec("syncSGD", compression={"kind": "sign", "errorFeedback": True}),
        "fedavg10": spec(
            "fedavg", algorithm={"localSteps": 10}, stop={"targetAccuracy": TARGET, "maxRounds": 40}
        ),
    }
    for sigma in (0.5, 1.0):
        jobs[f"dp{sigma}"] = spec(
            "fedavg",
            algorithm={"localSteps": 10},
            privacy={"clipNorm": 1.0, "noiseMultiplier": sigma},
            stop={"maxRounds": 30},
        )
    for mode, steps, rounds in (("fedavg", 10, 30), ("easgd", 4, 60)):
        for split in ({"kind": "iid"}, {"kind": "dirichlet", "alpha": 0.1}):
            jobs[f"{mode}-{split['kind']}"] = spec(
                mode,
                algorithm={"localSteps": steps},
                data={"split": split},
                stop={"maxRounds": rounds},
            )
    results: dict[str, dict[str, Any]] = {}

    def one(name: str) -> None:
        started = time.monotonic()
        results[name] = run_job(jobs[name], work / name)
        progress(
            f"{name}: accuracy {results[name]['accuracy']} after {results[name]['round']} rounds "
            f"({time.monotonic() - started:.0f}s)"
        )

    with ThreadPoolExecutor(max_workers=2) as pool:  # two jobs at a time on a small host
        list(pool.map(one, jobs))

    dense = results["dense"]
    compression = []
    for name, label in (
        ("dense", "dense sync SGD"),
        ("topk", "top-1% + error feedback"),
        ("int8", "8-bit"),
        ("qsgd", "QSGD 4-bit"),
        ("sign", "sign + error feedback"),
    ):
        s = results[name]
        compression.append(
            {
                "name": label,
                "kind": s["compression"],
                "rounds": s["round"],
                "accuracy": s["accuracy"],
                "bytesUp": s["bytesUp"],
                "uplinkReduction": round(dense["bytesUp"] / s["bytesUp"], 2),
                "accuracyRatio": round(s["accuracy"] / dense["accuracy"], 4),
            }
        )
    sync_rounds = rounds_to(dense, TARGET)
    fed_rounds = rounds_to(results["fedavg10"], TARGET)
    privacy = [
        {
            "noiseMultiplier": sigma,
            "clipNorm": 1.0,
            "rounds": results[f"dp{sigma}"]["round"],
            "accuracy": results[f"dp{sigma}"]["accuracy"],
            "epsilon": round(results[f"dp{sigma}"]["epsilon"], 3),
            "delta": results[f"dp{sigma}"]["delta"],
        }
        for sigma in (0.5, 1.0)
    ]
    split = [
        {
            "mode": mode,
            "split": kind,
            "alpha": 0.1 if kind == "dirichlet" else None,
            "rounds": results[f"{mode}-{kind}"]["round"],
            "accuracy": results[f"{mode}-{kind}"]["accuracy"],
            "roundsTo90": rounds_to(results[f"{mode}-{kind}"], 0.9),
        }
        for mode in ("fedavg", "easgd")
        for kind in ("iid", "dirichlet")
    ]
    return {
        "compression": compression,
        "fedavgRounds": {
            "target": TARGET,
            "syncSGDRounds": sync_rounds,
            "fedavgRounds": fed_rounds,
            "localSteps": 10,
            "ratio": round(fed_rounds / sync_rounds, 3) if fed_rounds and sync_rounds else None,
        },
        "privacy": privacy,
        "split": split,
    }


# --- 8 workers behind 10 Mbit/s links ------------------------------------------------------


def _node_ns(k: int) -> str:
    return f"eait-{k}"


def _ip(k: int) -> str:
    return f"10.211.0.{k + 1}"


@contextmanager
def star(nodes: int, mbps: float, unshaped: set[int]) -> Iterator[None]:
    """`nodes` namespaces on one bridge (in a hub namespace); node k at _ip(k), its link
    shaped to `mbps` both ways unless k is in `unshaped`."""

    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, text=True)

    def teardown() -> None:
        for name in [HUB, *(_node_ns(k) for k in range(nodes))]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)

    teardown()
    try:
        run("ip", "netns", "add", HUB)
        run("ip", "netns", "exec", HUB, "ip", "link", "add", "br0", "type", "bridge")
        run("ip", "netns", "exec", HUB, "ip", "link", "set", "br0", "up")
        for k in range(nodes):
            ns = _node_ns(k)
            run("ip", "netns", "add", ns)
            run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            run(
                "ip",
                "link",
                "add",
                f"t{k}",
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                f"h{k}",
                "netns",
                HUB,
            )
            run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{_ip(k)}/24", "dev", f"t{k}")
            run("ip", "netns", "exec", ns, "ip", "link", "set", f"t{k}", "up")
            run("ip", "netns", "exec", HUB, "ip", "link", "set", f"h{k}", "master", "br0")
            run("ip", "netns", "exec", HUB, "ip", "link", "set", f"h{k}", "up")
            if k not in unshaped:
                netns.shape(f"t{k}", ns, mbps)
                netns.shape(f"h{k}", HUB, mbps)
        yield
    finally:
        teardown()


def shaped_jobs(work: Path, workers: int = 8) -> dict[str, Any]:
    """Parameter server (FedAvg, 5 local steps) vs ring gossip (5 local steps) with 8
    workers, each behind a LINK_MBPS link; the aggregator's own link is not shaped."""
    target, rounds = 0.9, 60
    out: dict[str, Any] = {"workers": workers, "linkMbps": LINK_MBPS, "target": target}
    for name, mode in (("parameterServer", "fedavg"), ("gossip", "gossip")):
        job_spec = spec(
            mode,
            algorithm={"localSteps": 5},
            workers={"count": workers},
            stop={"targetAccuracy": target, "maxRounds": rounds},
        )
        aggregator = workers  # the namespace after the workers'

        def wrap(role: str, argv: list[str], aggregator: int = aggregator) -> list[str]:
            k = aggregator if role == "aggregator" else int(role.split("-")[1])
            return ["ip", "netns", "exec", _node_ns(k), *argv]

        with star(workers + 1, LINK_MBPS, unshaped={aggregator}):
            job_args: dict[str, Any] = {"wrap": wrap}
            if mode == "gossip":
                job_args["gossip_hosts"] = [_ip(k) for k in range(workers)]
            else:
                job_args["host"] = _ip(aggregator)
            started = time.monotonic()
            status = run_job(job_spec, work / f"shaped-{name}", **job_args)
        out[name] = {
            "mode": mode,
            "rounds": status["round"] if mode != "gossip" else status["rounds"],
            "accuracy": status["accuracy"],
            "trainingSeconds": status["trainingSeconds"],
            "bytesUp": status["bytesUp"],
        }
        progress(f"shaped {name}: {out[name]} ({time.monotonic() - started:.0f}s)")
    ps, gossip = out["parameterServer"], out["gossip"]
    out["gossipSpeedup"] = round(ps["trainingSeconds"] / gossip["trainingSeconds"], 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    render_numbers.add_result_arguments(parser, "training.json")
    parser.add_argument("--no-netns", action="store_true", help="skip the shaped-link part")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        work = Path(tmp)
        result: dict[str, Any] = {
            "generated": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "host": {"cpus": os.cpu_count(), "conditions": args.conditions},
            "setup": {
                "model": "digits_cnn",
                "workers": 4,
                "batchSize": 32,
                "learningRate": 0.1,
                "compressionRounds": COMPRESSION_ROUNDS,
            },
        }
        result.update(loopback_jobs(work))
        if not args.no_netns and os.geteuid() == 0:
            result["shaped"] = shaped_jobs(work)
    result["benchSeconds"] = round(time.monotonic() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
