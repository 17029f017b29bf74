"""`edgeai run-stage`: what a stage pod runs. Cuts the plan's model into this stage's
partition(s) (`edgeai_operator.partitions.stage_settings`), then serves them with
`edgeai-worker` (OIP v2) in place of this process. A plan whose model is a prepared
artefact needs `--model-file`, the file the pod's init container fetched (`edgeai
fetch`); a file whose sha256 is not the plan's digest is refused before anything serves.

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

from edgeai_operator.partitions import load_plan, stage_settings


def _cmd(args: argparse.Namespace) -> int:
    plan_path = Path(args.plan)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="edgeai-stage-"))
    workdir.mkdir(parents=True, exist_ok=True)
    settings = stage_settings(
        load_plan(plan_path, "--plan"),
        args.stage,
        plan_path=plan_path,
        workdir=workdir,
        host=args.host,
        port=args.port,
        next_urls=args.next or (),
        grpc_port=args.grpc_port,
        model_path=None if args.model_file is None else Path(args.model_file),
        reuse_data=None if args.reuse_data is None else Path(args.reuse_data),
        cascade_models=[Path(m) for m in args.cascade_model],
    )
    settings.update(_security_settings(args))
    config = Path(tempfile.mkdtemp(prefix="edgeai-stage-")) / "worker.json"
    config.write_text(json.dumps(settings, indent=2))
    print(
        f"stage {args.stage} ({settings['tier']}): {len(settings['partitions'])} partition(s), "
        f"serving on {args.host}:{args.port}",
        file=sys.stderr,
        flush=True,
    )
    os.execv(sys.executable, [sys.executable, "-m", "edgeai_worker", "--config", str(config)])


def _security_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The worker's stage TLS and entry token settings (edgeai_worker.security)."""
    out: dict[str, Any] = {}
    if args.tls_dir:
        out["tls_dir"] = args.tls_dir
    if args.tls_port is not None:
        out["tls_port"] = args.tls_port
    if args.tls_peer:
        out["tls_peers"] = args.tls_peer
    if args.entry_token_file:
        out["entry_token_file"] = args.entry_token_file
    if args.entry_client_ca:
        out["entry_client_ca_file"] = args.entry_client_ca
    return out


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("run-stage", help="serve one stage of a plan (stage pods)")
    parser.add_argument("--plan", required=True, help="Plan YAML (from the plan ConfigMap)")
    parser.add_argument("--stage", type=int, required=True, help="stage index; -1: entry only")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--next",
        action="append",
        help="next stage URL (repeatable): http://host:port, or grpc://host:port (over "
        "gRPC); https:// and grpcs:// over mutual TLS (--tls-dir)",
    )
    parser.add_argument("--grpc-port", type=int, help="also serve the protocol over gRPC here")
    parser.add_argument("--workdir", help="where partitions are written (default: a temp dir)")
    parser.add_argument(
        "--cascade-model",
        action="append",
        default=[],
        help="a small model the plan's cascade names, fetched by the pod (repeatable, in the "
        "plan's order): a user's model's device stage answers from them when confident",
    )
    parser.add_argument(
        "--reuse-data",
        help="the labelled rows (.npz) the plan's reuse data names, fetched by the pod: the "
        "reuse distance of a user's model is calibrated on them",
    )
    parser.add_argument(
        "--model-file",
        help="the plan's artefact as fetched (edgeai fetch); its sha256 must be the plan's digest",
    )
    parser.add_argument("--tls-dir", help="the stage certificate: tls.crt, tls.key, ca.crt")
    parser.add_argument(
        "--tls-port",
        type=int,
        help="serve inference over mutual TLS here (and the gRPC port over mutual TLS only)",
    )
    parser.add_argument(
        "--tls-peer", action="append", help="identity allowed to call the TLS port (repeatable)"
    )
    parser.add_argument("--entry-token-file", help="the bearer token the entry accepts")
    parser.add_argument(
        "--entry-client-ca", help="the CA the entry's clients' certificates must chain to"
    )
    parser.set_defaults(func=_cmd)
