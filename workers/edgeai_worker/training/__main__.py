"""`python -m edgeai_worker.training aggregator|worker|gossip ...`: one process of a
training job. Each takes the job's spec as a JSON file (a DNNTrainingJob's `spec`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from edgeai_worker.training.spec import TrainingSpec, TrainingSpecError, load_spec


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m edgeai_worker.training")
    sub = parser.add_subparsers(dest="command", required=True)
    agg = sub.add_parser("aggregator", help="the parameter server")
    agg.add_argument("--spec", required=True, help="the job's spec (JSON)")
    agg.add_argument("--host", default="127.0.0.1")
    agg.add_argument("--port", type=int, required=True)
    agg.add_argument("--workdir", required=True, help="checkpoint, journal, status, model")
    agg.add_argument(
        "--keep-serving",
        action="store_true",
        help="once training is done, keep answering /status and /model.onnx until stopped",
    )
    wrk = sub.add_parser("worker", help="a worker of a job with an aggregator")
    wrk.add_argument("--spec", required=True)
    wrk.add_argument("--index", type=int, required=True, help="this worker's shard, 0-based")
    wrk.add_argument("--aggregator", required=True, help="the aggregator's URL")
    wrk.add_argument("--delay-s", type=float, default=0.0, help="wait this long before each update")
    wrk.add_argument(
        "--delay-updates", type=int, help="only the first N updates wait --delay-s (default: all)"
    )
    wrk.add_argument("--stats", help="write the worker's counters here (JSON) at the end")
    gos = sub.add_parser("gossip", help="a gossip worker (no aggregator)")
    gos.add_argument("--spec", required=True)
    gos.add_argument("--index", type=int, required=True)
    gos.add_argument("--host", default="127.0.0.1")
    gos.add_argument("--port", type=int, required=True)
    gos.add_argument(
        "--peers", required=True, help="every worker's URL, comma-separated, in index order"
    )
    gos.add_argument("--workdir", required=True, help="status.json and model.onnx")
    gos.add_argument(
        "--result-file",
        help="write the final status (JSON, no history) here too, e.g. a pod's termination log",
    )
    return parser


def _check_index(spec: TrainingSpec, index: int) -> None:
    if not 0 <= index < spec.workers:
        raise TrainingSpecError(
            "workers.count",
            f"is {spec.workers}, too few for --index {index}",
            f"--index 0..{spec.workers - 1}",
        )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        spec = load_spec(args.spec)
        if args.command != "aggregator":
            _check_index(spec, args.index)
    except (TrainingSpecError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "aggregator":
        from edgeai_worker.training.aggregator import serve

        status = asyncio.run(
            serve(spec, args.host, args.port, Path(args.workdir), keep_serving=args.keep_serving)
        )
        print(json.dumps({k: v for k, v in status.items() if k != "history"}))
        return 0
    if args.command == "worker":
        from edgeai_worker.training.worker import Worker

        stats = asyncio.run(
            Worker(spec, args.index, args.aggregator, args.delay_s, args.delay_updates).run()
        )
        if args.stats:
            Path(args.stats).write_text(json.dumps(stats.to_dict()))
        print(json.dumps(stats.to_dict()))
        return 0
    from edgeai_worker.training.gossip import serve_gossip

    peers = [p for p in args.peers.split(",") if p]
    status = asyncio.run(
        serve_gossip(spec, args.index, args.host, args.port, peers, Path(args.workdir))
    )
    result = json.dumps({k: v for k, v in status.items() if k != "history"})
    if args.result_file:
        Path(args.result_file).write_text(result)
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
