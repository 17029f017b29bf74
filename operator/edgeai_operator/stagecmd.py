"""`edgeai run-stage`: what a stage pod runs. Cuts the plan's model into this stage's
partition(s), then serves them with `edgeai-worker` (OIP v2) in place of this process.

Stage `-1` is the device entry of a plan that runs nothing on the device: it serves
the model name and forwards the raw input to the next stage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from edgeai_operator.errors import SpecError
from edgeai_operator.runlocal import build_partitions, load_plan, model_file


def stage_settings(plan: dict[str, Any], stage: int, args: argparse.Namespace) -> dict[str, Any]:
    """The worker config of one stage (see edgeai_worker.config.WorkerConfig)."""
    model = plan.get("model") or {}
    name = str(model.get("zoo") or model.get("name") or "model")
    stages = plan["stages"]
    if not -1 <= stage < len(stages):
        raise SpecError("--stage", f"{stage} is out of range", f"-1 to {len(stages) - 1}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="edgeai-stage-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tier = "device" if stage == -1 else str(stages[stage]["tier"])
    settings: dict[str, Any] = {
        "model_name": name,
        "host": args.host,
        "port": args.port,
        "tier": tier,
        "stage_index": max(stage, 0),
        "next_urls": list(args.next or []),
        "partitions": [],
    }
    if stage >= 0:
        specs = build_partitions(plan, model_file(plan, Path(args.plan)), workdir)
        settings["partitions"] = [str(p) for p in specs[stage].partitions]
        settings["splits"] = specs[stage].splits
    if tier == "device":
        privacy = plan.get("privacy") or {}
        settings["raw_input_stays_on_device"] = bool(privacy.get("rawInputStaysOnDevice"))
        settings["feature_noise_std"] = float(privacy.get("featureNoiseStd") or 0.0)
    return settings


def _cmd(args: argparse.Namespace) -> int:
    plan = load_plan(Path(args.plan))
    settings = stage_settings(plan, args.stage, args)
    config = Path(tempfile.mkdtemp(prefix="edgeai-stage-")) / "worker.json"
    config.write_text(json.dumps(settings, indent=2))
    print(
        f"stage {args.stage} ({settings['tier']}): {len(settings['partitions'])} partition(s), "
        f"serving on {args.host}:{args.port}",
        file=sys.stderr,
        flush=True,
    )
    os.execv(sys.executable, [sys.executable, "-m", "edgeai_worker", "--config", str(config)])


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("run-stage", help="serve one stage of a plan (stage pods)")
    parser.add_argument("--plan", required=True, help="Plan YAML (from the plan ConfigMap)")
    parser.add_argument("--stage", type=int, required=True, help="stage index; -1: entry only")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--next", action="append", help="next stage URL (repeatable)")
    parser.add_argument("--workdir", help="where partitions are written (default: a temp dir)")
    parser.set_defaults(func=_cmd)
