"""`edgeai fetch`: the storage initializer a stage pod's init container runs. It fetches
a model source into a directory, verifies its digest and prints one JSON line. With
`--file-name` the file gets that name, so the pod's main container can be told where it
is before it exists."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from edgeai_operator.errors import SpecError
from edgeai_operator.sources import ACCEPTED_FORMS, FetchError, fetch, parse_source


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "fetch",
        help="fetch a model source into a directory and verify its digest",
        description=f"Fetches a model source. URI forms: {ACCEPTED_FORMS}.",
    )
    parser.add_argument("uri", help="the model source URI")
    parser.add_argument("--out", required=True, help="directory the model file is written to")
    parser.add_argument(
        "--sha256", help="expected sha256 of the file (required for http and https)"
    )
    parser.add_argument(
        "--namespace", help="namespace of a configmap:// source (default: the pod's own)"
    )
    parser.add_argument(
        "--pvc-root", default="/mnt/pvc", help="where claims are mounted (pvc://CLAIM/PATH)"
    )
    parser.add_argument(
        "--timeout-seconds", type=float, default=60.0, help="limit on each network wait"
    )
    parser.add_argument(
        "--ca-bundle",
        help="a PEM file, or a directory of *.crt/*.pem files, of CAs trusted for https "
        "besides the system's",
    )
    parser.add_argument(
        "--file-name",
        help="name the fetched file gets in --out (default: the source's own file name)",
    )
    parser.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    source = parse_source(args.uri, sha256=args.sha256, field="URI", sha256_field="--sha256")
    name = args.file_name
    if name is not None and (name in ("", ".", "..") or "/" in name or "\\" in name):
        raise SpecError("--file-name", f"{name!r} is not a file name", "a name such as model.onnx")
    try:
        fetched = fetch(
            source,
            Path(args.out),
            namespace=args.namespace,
            pvc_root=Path(args.pvc_root),
            timeout_s=args.timeout_seconds,
            ca_bundle=Path(args.ca_bundle) if args.ca_bundle else None,
        )
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if name is not None and fetched.path.name != name:
        # the file is complete and verified: renaming it within --out keeps that so
        target = fetched.path.with_name(name)
        fetched.path.replace(target)
        fetched = dataclasses.replace(fetched, path=target)
    print(json.dumps(fetched.to_dict()), flush=True)
    return 0
