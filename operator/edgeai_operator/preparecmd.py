"""`edgeai prepare`: the program a DNNModel's preparation Job runs. It fetches the model,
checks it, builds and profiles the variants, writes the artefacts and prints the
result as JSON (progress goes to stderr)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgeai_operator.errors import SpecError
from edgeai_operator.modelspec import ExitSpec, InputSpec, SourceRef
from edgeai_operator.preparation import ERROR_KEY, RESULT_KEY
from edgeai_operator.prepare import (
    VARIANT_KINDS,
    PrepareRequest,
    UnsupportedGraph,
    VariantRequest,
    prepare,
)
from edgeai_operator.sources import ACCEPTED_FORMS, FetchError

_FIELD_MANAGER = "edgeai-prepare"

_INPUT_FORM = "NAME=DIM,DIM,...:DTYPE, e.g. input=1,3,224,224:FP32"
_DTYPES = ("FP32", "FP16", "INT8", "UINT8", "INT32", "INT64", "BOOL")
_VARIANT_FORM = (
    f"[NAME=]KIND, KIND one of {', '.join(k for k in VARIANT_KINDS if k != 'fp32')}; "
    "pruned:SPARSITY"
)
_VARIANT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def parse_input(text: str) -> InputSpec:
    """`NAME=1,3,224,224:FP32` as an InputSpec; SpecError naming --input otherwise."""
    name, eq, rest = text.partition("=")
    dims, colon, dtype = rest.rpartition(":")
    if not eq or not name or not colon:
        raise SpecError("--input", f"{text!r} is not an input", _INPUT_FORM)
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError as exc:
        raise SpecError(
            "--input", f"{text!r} has a dimension that is no integer", _INPUT_FORM
        ) from exc
    if any(d < 1 for d in shape):
        raise SpecError("--input", f"{text!r} has a dimension below 1", _INPUT_FORM)
    if dtype.upper() not in _DTYPES:
        raise SpecError("--input", f"{text!r} names the dtype {dtype!r}", ", ".join(_DTYPES))
    return InputSpec(name, shape, dtype.upper())


def parse_exit(text: str, *, train: bool = False) -> ExitSpec:
    """`OUTPUT=AFTER` as an ExitSpec; SpecError naming --exit (--train-exit)
    otherwise."""
    output, eq, after = text.partition("=")
    if not eq or not output or not after:
        raise SpecError(
            "--train-exit" if train else "--exit",
            f"{text!r} is not an exit",
            "OUTPUT=AFTER: the output "
            + ("the trained head adds to the model" if train else "of the model holding the "
               "exit's class scores")
            + ", the tensor its head reads",
        )  # fmt: skip
    return ExitSpec(output, after, train)


def parse_train_exit(text: str) -> ExitSpec:
    """`OUTPUT=AFTER` as an ExitSpec whose head is trained from --data."""
    return parse_exit(text, train=True)


def parse_small_model(text: str) -> SourceRef:
    """`URI` or `URI,sha256=HEX` as a SourceRef; SpecError naming --small-model."""
    uri, comma, pinned = text.rpartition(",sha256=")
    if not comma:
        uri, pinned = text, ""
    if not uri or (comma and not pinned):
        raise SpecError(
            "--small-model",
            f"{text!r} is not a small model",
            "URI or URI,sha256=HEX: a small ONNX model of the same input and classes",
        )
    return SourceRef(uri, pinned or None)


def parse_variant(text: str) -> VariantRequest:
    """`int8-dynamic`, `int8-static`, `distilled`, `pruned` (sparsity 0.5) or
    `pruned:0.75`, optionally named (`small=int8-static`; by default the variant is
    named after its kind); SpecError naming --variant otherwise."""
    name, eq, rest = text.rpartition("=")
    if eq and not _VARIANT_NAME.fullmatch(name):
        raise SpecError("--variant", f"{text!r}: {name!r} is no variant name", "a DNS label")
    variant = _parse_kind(rest, text)
    return VariantRequest(name, variant.kind, variant.sparsity) if eq else variant


def _parse_kind(spec: str, text: str) -> VariantRequest:
    kind, colon, sparsity = spec.partition(":")
    if kind not in VARIANT_KINDS or (colon and kind != "pruned"):
        raise SpecError("--variant", f"{text!r} is no variant", _VARIANT_FORM)
    if not colon:
        return VariantRequest.of_kind(kind)
    try:
        fraction = float(sparsity)
    except ValueError as exc:
        raise SpecError("--variant", f"{text!r} has no number after ':'", "pruned:0.5") from exc
    if not 0 < fraction < 1:
        raise SpecError("--variant", f"{text!r}: the sparsity is out of range", "0 < SPARSITY < 1")
    return VariantRequest.of_kind(kind, sparsity=fraction)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="fetch a model, check it, build, profile and store its variants",
        description=(
            "Prepares a DNNModel: fetches --source (digest-verified), checks it loads in "
            "onnxruntime and that --input fits it, builds fp32 and each --variant, profiles "
            "them, writes them to --artifacts and prints the result as JSON. Errors name "
            "the DNNModel field the option fills (--source: spec.source.uri, "
            "--calibration: spec.calibration.uri, --data: spec.data.uri, --input: "
            f"spec.input). Source forms: {ACCEPTED_FORMS}."
        ),
    )
    parser.add_argument("--source", required=True, help="the model source URI")
    parser.add_argument("--sha256", help="expected sha256 of the model (required for http(s))")
    parser.add_argument(
        "--input",
        action="append",
        required=True,
        type=parse_input,
        help=f"a model input, repeated for each ({_INPUT_FORM})",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        type=parse_variant,
        help=f"a variant beside fp32, repeatable ({_VARIANT_FORM})",
    )
    parser.add_argument(
        "--exit",
        action="append",
        default=[],
        type=parse_exit,
        help="an early exit the model declares, repeatable (OUTPUT=AFTER, spec.exits)",
    )
    parser.add_argument(
        "--train-exit",
        action="append",
        dest="exit",
        type=parse_train_exit,
        help="an early exit whose head is trained from --data and added to the model as "
        "OUTPUT, reading AFTER; repeatable (OUTPUT=AFTER, spec.exits[] with train: true)",
    )
    parser.add_argument(
        "--small-model",
        action="append",
        default=[],
        type=parse_small_model,
        help="a small model for a cascade (URI or URI,sha256=HEX), repeatable up to twice "
        "(spec.smallModels); measured on --data and stored beside the artefacts",
    )
    parser.add_argument("--calibration", help="an .npz of example inputs (int8-static)")
    parser.add_argument("--calibration-sha256", help="its sha256 (required for http(s))")
    parser.add_argument("--data", help="an .npz of inputs and 'labels' (accuracy)")
    parser.add_argument("--data-sha256", help="its sha256 (required for http(s))")
    parser.add_argument(
        "--artifacts", required=True, help="oci://REGISTRY/REPO or pvc://CLAIM/DIR for the variants"
    )
    parser.add_argument("--model-name", help="names the artefacts (default: from the source)")
    parser.add_argument("--out", help="also write the result JSON to this file")
    parser.add_argument(
        "--result-configmap",
        help="NAMESPACE/NAME: also write the result (data.result) or the error (data.error) "
        "as JSON into this ConfigMap; its namespace is where configmap:// sources are read",
    )
    parser.add_argument("--workdir", help="scratch directory (default: a temporary one)")
    parser.add_argument(
        "--pvc-root", default="/mnt/pvc", help="where claims are mounted (pvc:// URIs)"
    )
    parser.add_argument(
        "--ca-bundle",
        help="a PEM file, or a directory of *.crt/*.pem files, of CAs trusted for https "
        "sources besides the system's",
    )
    parser.set_defaults(func=_cmd)


def _progress(message: str) -> None:
    print(f"[edgeai prepare] {message}", file=sys.stderr, flush=True)


def _result_ref(text: str) -> tuple[str, str]:
    namespace, slash, name = text.partition("/")
    if not slash or not namespace or not name or "/" in name:
        raise SpecError("--result-configmap", f"{text!r} names no ConfigMap", "NAMESPACE/NAME")
    return namespace, name


def _write_result(ref: tuple[str, str] | None, key: str, value: dict[str, Any]) -> None:
    """Writes `value` as JSON under `key` of the ConfigMap `ref` (server-side apply, so
    the labels and owner the operator gave it stay)."""
    if ref is None:
        return
    from edgeai_operator import k8s

    namespace, name = ref
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace},
        "data": {key: json.dumps(value, separators=(",", ":"))},
    }
    k8s.apply(configmap, field_manager=_FIELD_MANAGER)


def _failed(
    ref: tuple[str, str] | None, kind: str, field: str, message: str, request: PrepareRequest
) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    error = {"kind": kind, "field": field, "message": message, "uri": request.source_uri}
    _write_result(ref, ERROR_KEY, error)
    return 1


def _fetch_field(request: PrepareRequest, uri: str) -> str:
    """The DNNModel field of the URI a FetchError names."""
    if uri == request.calibration_uri:
        return "spec.calibration.uri"
    if uri == request.data_uri:
        return "spec.data.uri"
    for i, small in enumerate(request.small_models):
        if uri == small.uri:
            return f"spec.smallModels[{i}].uri"
    return "spec.source.uri"


def _cmd(args: argparse.Namespace) -> int:
    ref = _result_ref(args.result_configmap) if args.result_configmap else None
    request = PrepareRequest(
        source_uri=args.source,
        source_sha256=args.sha256,
        inputs=tuple(args.input),
        artifacts_uri=args.artifacts,
        variants=tuple(args.variant),
        calibration_uri=args.calibration,
        calibration_sha256=args.calibration_sha256,
        data_uri=args.data,
        data_sha256=args.data_sha256,
        model_name=args.model_name,
        exits=tuple(args.exit),
        small_models=tuple(args.small_model),
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgeai-prepare-") as scratch:
        workdir = Path(args.workdir) if args.workdir else Path(scratch)
        try:
            result = prepare(
                request,
                workdir,
                pvc_root=Path(args.pvc_root),
                namespace=ref[0] if ref else None,
                ca_bundle=Path(args.ca_bundle) if args.ca_bundle else None,
                progress=_progress,
            )
        except FetchError as exc:
            return _failed(ref, "fetch", _fetch_field(request, exc.uri), str(exc), request)
        except UnsupportedGraph as exc:
            return _failed(ref, "graph", "spec.source.uri", str(exc), request)
        except SpecError as exc:
            return _failed(ref, "spec", exc.field, str(exc), request)
    ready = sum(v.ready for v in result.variants)
    _progress(f"{ready}/{len(result.variants)} variants ready in {time.monotonic() - started:.1f}s")
    data = result.to_dict()
    text = json.dumps(data, separators=(",", ":"))
    if args.out:
        Path(args.out).write_text(text + "\n")
    _write_result(ref, RESULT_KEY, data)
    print(text, flush=True)
    return 0 if ready else 1
