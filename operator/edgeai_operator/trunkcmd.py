"""`edgeai run-trunk`: what a trunk stage pod runs. Checks the base model's artefact
(the file the pod's init container fetched) against its digest, cuts the trunk (the
model's inputs up to `--upto`) and serves it with `edgeai_worker.trunkstage` in place
of this process: one route per application, to that application's head stage."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from edgeai_operator.errors import SpecError
from edgeai_operator.files import file_sha256


def cut_trunk(model_file: Path, digest: str, upto: str, workdir: Path) -> Path:
    """The trunk partition of `model_file` (checked against `digest`) in `workdir`."""
    import onnx

    from edgeai_worker.graph import Partitioner

    if not model_file.is_file():
        raise SpecError("--model-file", f"{model_file} is not a file")
    actual = file_sha256(model_file)
    if actual != digest:
        raise SpecError(
            "--model-file",
            f"{model_file} has digest {actual}, not the base artefact's {digest}; "
            "refusing to serve it",
        )
    model = onnx.load(str(model_file))
    weights = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in weights]
    try:
        trunk = Partitioner(model).extract(inputs, [upto])
    except ValueError as exc:
        raise SpecError("--upto", str(exc), "a single-tensor cut of the model") from None
    path = workdir / "trunk.onnx"
    onnx.save(trunk, str(path))
    return path


def _cmd(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="edgeai-trunk-"))
    workdir.mkdir(parents=True, exist_ok=True)
    trunk = cut_trunk(Path(args.model_file), args.digest, args.upto, workdir)
    routes = [f"--route={r}" for r in args.route]
    print(
        f"trunk up to {args.upto}: {len(routes)} application(s), serving on "
        f"{args.host}:{args.port}",
        file=sys.stderr,
        flush=True,
    )
    module = "edgeai_worker.trunkstage"
    argv = [f"--trunk={trunk}", f"--host={args.host}", f"--port={args.port}", *routes]
    os.execv(sys.executable, [sys.executable, "-m", module, *argv])


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run-trunk", help="serve a shared trunk for several applications (trunk stage pods)"
    )
    parser.add_argument("--model-file", required=True, help="the base model's artefact as fetched")
    parser.add_argument("--digest", required=True, help="its sha256:HEX digest")
    parser.add_argument("--upto", required=True, help="the tensor where the trunk ends")
    parser.add_argument(
        "--route", action="append", default=[], help="MODEL=HEAD_URL per application"
    )
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--workdir", help="where the trunk partition is written")
    parser.set_defaults(func=_cmd)
