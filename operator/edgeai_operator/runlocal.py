"""`edgeai run-local -f plan.yaml`: run a plan's stages as local worker processes.

For laptops, tests and demos: every stage of a `kind: Plan` becomes an `edgeai-worker`
process on loopback, chained in the plan's order (see `edgeai_operator.localworkers`).
With a device stage first and `alternatives` in the plan, the device holds every
prefix its adaptive split may choose and the next stage the matching suffixes. The
plan's privacy, preprocessing and priority reach the workers; the flags override
them. Prints the entry URL, serves until interrupted, then stops every worker.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgeai_operator.errors import SpecError
from edgeai_operator.localworkers import start_local
from edgeai_operator.partitions import build_partitions, exit_heads, load_plan, model_file


def _cmd_run_local(args: argparse.Namespace) -> int:
    plan_path = Path(args.file)
    plan = load_plan(plan_path)
    if plan.noise_training:
        raise SpecError(
            "plan.privacy.noiseTraining",
            "run-local cuts the plain model; noise-trained stages are served by run-stage",
            "edgeai run-stage for each stage, or a plan without noiseTraining",
        )
    model_path = model_file(plan, plan_path)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="edgeai-run-"))
    workdir.mkdir(parents=True, exist_ok=True)
    specs = build_partitions(
        plan.stages,
        plan.alternatives,
        model_path,
        workdir,
        adaptive=not args.no_adaptive,
        exits=exit_heads(plan),
    )
    settings = {
        key: value
        for key, value in {
            "max_batch": args.max_batch,
            "max_wait_ms": args.max_wait_ms,
            "uplink_mbps": args.uplink_mbps,
            "skip_unchanged_threshold": args.skip_unchanged_threshold,
            "feature_noise_std": args.feature_noise_std,
            "raw_input_stays_on_device": args.raw_input_stays_on_device or None,
        }.items()
        if value is not None
    }
    run = start_local(
        plan,
        specs,
        workdir,
        replicas=args.replicas,
        settings=settings,
        log=sys.stdout,
        model_path=model_path,
    )
    stop = False

    def _stop(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"entry: {run.entry_url}/v2/models/{run.model_name}/infer", flush=True)
    try:
        while not stop and all(p.poll() is None for p in run.processes):
            time.sleep(0.1)
    finally:
        run.stop()
    failed = [p.args for p in run.processes if p.returncode not in (0, -signal.SIGTERM)]
    if failed:
        print(f"error: worker(s) exited abnormally; logs in {workdir}", file=sys.stderr)
        return 1
    print("stopped", flush=True)
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run-local", help="run a plan's stages as local worker processes and print the entry URL"
    )
    parser.add_argument("-f", "--file", required=True, help="Plan YAML (kind: Plan)")
    parser.add_argument("--workdir", help="where partitions, configs and logs go (default: temp)")
    parser.add_argument("--replicas", type=int, default=1, help="replicas of edge/cloud stages")
    parser.add_argument("--max-batch", type=int, help="micro-batch size of edge/cloud stages")
    parser.add_argument("--max-wait-ms", type=float, help="micro-batch window")
    parser.add_argument("--uplink-mbps", type=float, help="fix the device's uplink estimate")
    parser.add_argument(
        "--skip-unchanged-threshold",
        type=float,
        help="device change detection (default: the plan's preprocessing)",
    )
    parser.add_argument(
        "--feature-noise-std",
        type=float,
        help="noise on features sent upstream (default: the plan's privacy)",
    )
    parser.add_argument(
        "--raw-input-stays-on-device",
        action="store_true",
        help="never forward the raw input (also when the plan's privacy says so)",
    )
    parser.add_argument(
        "--no-adaptive", action="store_true", help="ignore the plan's alternatives (fixed split)"
    )
    parser.set_defaults(func=_cmd_run_local)
