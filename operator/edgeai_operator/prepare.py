"""Preparing a DNNModel: the program its preparation Job runs (`edgeai prepare`).

`prepare(request, workdir)` fetches the model source (digest-verified), checks that it
is an ONNX model onnxruntime loads and that the declared inputs fit it, records its
sha256, builds the requested variants, profiles each variant's graph (cuts, bytes,
FLOPs per segment), writes or pushes each artefact and measures accuracy where labelled
data exists. The outcome is one `PrepareResult`, small enough for the operator to copy
into `DNNModel.status`.

Variants (fp32 is always built):
- `int8-dynamic`: onnxruntime dynamic quantization, any ONNX model, no data;
- `int8-static`: onnxruntime static QDQ quantization, activation ranges from the
  calibration `.npz` (`spec.calibration.uri`, arrays keyed by input name);
- `pruned`: magnitude pruning of the float weights of Conv/Gemm/MatMul to a sparsity
  (one global threshold), no fine-tuning;
- `distilled`: a student trained on the teacher's outputs, zoo://digits_cnn only.

For zoo://digits_cnn the variants are the zoo's own (`edgeai_worker.variants`: static
ranges from the training digits, pruning at 0.5 fine-tuned with the mask held) and
accuracy is measured on its held-out split, so the numbers match the zoo's reports.
Elsewhere accuracy needs `spec.data.uri`: an `.npz` of inputs keyed by input name and
integer class labels under `labels`, scored as top-1 of the first output (of the first
output that is no declared exit).

Declared early exits (`spec.exits`, `edgeai_worker.offload.declared`) are checked
against the graph before anything is built (SpecError naming `spec.exits[i]`); each
variant is then profiled without them (the exits are not planned as outputs that travel
to the last stage), and with `spec.data` the fp32 profile carries the exits' validation
tables (`offload`), measured on that data, for planning and serving `spec.offload.exits`.
An exit with `train: true` gets its head first: trained on the even rows of `spec.data`
(`edgeai_worker.offload.trained`) and grafted onto the model, whose artefacts then
carry it; every exit is then calibrated on the odd rows only.

A variant that cannot be built (missing data, a builder failure) is reported with
`ready: false` and the reason; the others are still built.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from edgeai_operator.errors import SpecError
from edgeai_operator.files import file_sha256, replaced_when_done
from edgeai_operator.modelspec import (
    DEFAULT_SPARSITY,
    VARIANT_KINDS,
    ExitSpec,
    InputSpec,
    SourceRef,
    VariantKind,
    VariantRequest,
    check_artifacts_uri,
)
from edgeai_operator.problem import graph_profile
from edgeai_operator.profiling import check_input
from edgeai_operator.sources import Fetched, Source, fetch, parse_source

if TYPE_CHECKING:
    import onnx

RESULT_VERSION = 1
LABELS_KEY = "labels"
# Batch used for calibration and accuracy when the model's batch dimension is free.
_FREE_BATCH = 32
# The zoo model whose variants and held-out data ship with the zoo.
_DIGITS = "digits_cnn"
# Longest failure message kept in a variant's result (status stays small).
_MESSAGE_CHARS = 500
# Operators whose float initializers pruning zeroes: the layers that hold the weights.
_PRUNED_OPS = ("Conv", "Gemm", "MatMul")
_TAG_UNSAFE = re.compile(r"[^a-z0-9_.-]+")
# ONNX element type -> the dtype names spec.input uses (see profiling.check_input)
_DTYPE_NAMES = {1: "FP32", 10: "FP16", 3: "INT8", 2: "UINT8", 6: "INT32", 7: "INT64", 9: "BOOL"}

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    """No progress output (the library default; `edgeai prepare` prints to stderr)."""


@dataclass(frozen=True)
class PrepareRequest:
    """What a preparation Job is asked to do. Each URI is a `sources` URI (http(s)
    ones need their sha256); `artifacts_uri` is `oci://REGISTRY/REPO` (each artefact
    tagged `<model>-<variant>-<12 digest hex>`) or `pvc://CLAIM/DIR`. `model_name`
    names the artefacts (default: the zoo name or the source's file name)."""

    source_uri: str
    inputs: tuple[InputSpec, ...]
    artifacts_uri: str
    source_sha256: str | None = None
    variants: tuple[VariantRequest, ...] = ()
    calibration_uri: str | None = None
    calibration_sha256: str | None = None
    data_uri: str | None = None
    data_sha256: str | None = None
    model_name: str | None = None
    exits: tuple[ExitSpec, ...] = ()  # spec.exits: early exits the model declares
    small_models: tuple[SourceRef, ...] = ()  # spec.smallModels: the cascade's


@dataclass(frozen=True)
class TensorInfo:
    """A model input or output as the graph declares it (a named dimension is a str)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> TensorInfo:
        return TensorInfo(str(data["name"]), tuple(data["shape"]), str(data["dtype"]))


@dataclass(frozen=True)
class ArtifactRef:
    """A written artefact: fetch it with `sources.fetch(parse_source(uri, sha256=digest))`."""

    uri: str
    digest: str  # sha256:<hex> of the ONNX file
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.uri, "digest": self.digest, "sizeBytes": self.size_bytes}

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> ArtifactRef:
        return ArtifactRef(str(data["uri"]), str(data["digest"]), int(data["sizeBytes"]))


@dataclass(frozen=True)
class VariantResult:
    """One variant's outcome. `path` is the built file in the work directory (not part
    of the serialised result: it means nothing outside the Job's pod)."""

    name: str
    kind: VariantKind
    ready: bool
    message: str
    artifact: ArtifactRef | None = None
    accuracy: float | None = None
    profile: dict[str, Any] | None = None
    path: Path | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "ready": self.ready,
            "message": self.message,
        }
        if self.artifact is not None:
            out["artifact"] = self.artifact.to_dict()
        if self.accuracy is not None:
            out["accuracy"] = self.accuracy
        if self.profile is not None:
            out["profile"] = self.profile
        return out

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> VariantResult:
        kind = str(data["kind"])
        if kind not in VARIANT_KINDS:
            raise SpecError(
                "variants[].kind", f"{kind!r} is no variant kind", ", ".join(VARIANT_KINDS)
            )
        artifact = data.get("artifact")
        accuracy = data.get("accuracy")
        return VariantResult(
            name=str(data["name"]),
            kind=kind,
            ready=bool(data["ready"]),
            message=str(data.get("message", "")),
            artifact=ArtifactRef.from_dict(artifact) if artifact is not None else None,
            accuracy=float(accuracy) if accuracy is not None else None,
            profile=dict(data["profile"]) if data.get("profile") is not None else None,
        )


@dataclass(frozen=True)
class PrepareResult:
    """What a preparation Job reports: the source as fetched and each variant."""

    source_uri: str
    source_digest: str  # sha256:<hex>
    size_bytes: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    variants: tuple[VariantResult, ...]

    def variant(self, name: str) -> VariantResult:
        return next(v for v in self.variants if v.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "PrepareResult",
            "version": RESULT_VERSION,
            "source": {"uri": self.source_uri, "digest": self.source_digest},
            "sizeBytes": self.size_bytes,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "variants": [v.to_dict() for v in self.variants],
        }

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> PrepareResult:
        if data.get("kind") != "PrepareResult" or data.get("version") != RESULT_VERSION:
            raise SpecError(
                "kind/version",
                f"{data.get('kind')!r} version {data.get('version')!r} is not a prepare result",
                f"PrepareResult version {RESULT_VERSION}",
            )
        return PrepareResult(
            source_uri=str(data["source"]["uri"]),
            source_digest=str(data["source"]["digest"]),
            size_bytes=int(data["sizeBytes"]),
            inputs=tuple(TensorInfo.from_dict(t) for t in data["inputs"]),
            outputs=tuple(TensorInfo.from_dict(t) for t in data["outputs"]),
            variants=tuple(VariantResult.from_dict(v) for v in data["variants"]),
        )


# ---------------------------------------------------------------------------
# Where artefacts go


@dataclass(frozen=True)
class _Destination:
    scheme: Literal["oci", "pvc"]
    uri: str  # without a trailing slash
    directory: Path | None = None  # pvc: where the claim's directory is mounted here


def _destination(uri: str, pvc_root: Path) -> _Destination:
    base = check_artifacts_uri(uri)
    if base.startswith("oci://"):
        return _Destination("oci", base)
    claim, slash, directory = base.removeprefix("pvc://").partition("/")
    return _Destination("pvc", base, pvc_root / claim / directory if slash else pvc_root / claim)


def _store(
    path: Path, digest: str, dest: _Destination, tag: str, media_type: str | None = None
) -> ArtifactRef:
    """Pushes or writes the artefact whose sha256 is `digest` (`sha256:<hex>`): a model,
    or with `media_type` another file (a claim's copy keeps the file's suffix)."""
    size_bytes = path.stat().st_size
    if dest.scheme == "oci":
        from edgeai_operator import oci

        pushed = (
            oci.push(path, f"{dest.uri}:{tag}")
            if media_type is None
            else oci.push(path, f"{dest.uri}:{tag}", media_type=media_type)
        )
        return ArtifactRef(f"{dest.uri}:{tag}", pushed, size_bytes)
    assert dest.directory is not None
    dest.directory.mkdir(parents=True, exist_ok=True)
    target = dest.directory / f"{tag}{path.suffix if media_type else '.onnx'}"
    with replaced_when_done(target) as out, path.open("rb") as src:
        shutil.copyfileobj(src, out)
    return ArtifactRef(f"{dest.uri}/{target.name}", digest, size_bytes)


def _oci_error() -> type[Exception]:
    from edgeai_operator import oci

    return oci.OciError


# ---------------------------------------------------------------------------
# The model and its inputs


def _session(model: str | bytes | Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    data = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _load_checked(fetched: Fetched) -> onnx.ModelProto:
    """The fetched file as an ONNX model, or SpecError naming the source URI."""
    import onnx

    try:
        model = onnx.load(str(fetched.path))
        _session(fetched.path)
    except Exception as exc:  # onnx and onnxruntime raise many types for a bad file
        first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise SpecError(
            "spec.source.uri",
            f"{fetched.uri} is not an ONNX model onnxruntime can load "
            f"({fetched.size_bytes} bytes, sha256 {fetched.sha256[:12]}...: "
            f"{type(exc).__name__} {first_line})",
            "an ONNX model file",
        ) from exc
    return model


def _tensors(values: Sequence[Any]) -> tuple[TensorInfo, ...]:
    out = []
    for value in values:
        tensor = value.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in tensor.shape.dim
        )
        dtype = _DTYPE_NAMES.get(tensor.elem_type, f"ONNX type {tensor.elem_type}")
        out.append(TensorInfo(value.name, dims, dtype))
    return tuple(out)


def _graph_inputs(model: onnx.ModelProto) -> list[Any]:
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def check_inputs(declared: Sequence[InputSpec], model: onnx.ModelProto) -> None:
    """SpecError naming `spec.input` unless `declared` lists the model's inputs, each
    fitting as `profiling.check_input` requires (one input: `spec.input.<field>`;
    several: `spec.input[i].<field>`)."""
    import onnx

    actual = _graph_inputs(model)
    described = ", ".join(f"{t.name} {list(t.shape)} {t.dtype}" for t in _tensors(actual))
    if len(declared) != len(actual):
        names = ", ".join(d.name for d in declared) or "none"
        raise SpecError(
            "spec.input",
            f"declares {len(declared)} input(s) ({names}) but the model has "
            f"{len(actual)}: {described}",
            "one entry per model input",
        )
    if len(declared) == 1:
        check_input(declared[0], model)
        return
    by_name = {i.name: i for i in actual}
    for index, spec in enumerate(declared):
        if spec.name not in by_name:
            raise SpecError(
                f"spec.input[{index}].name", f"{spec.name!r} is not a model input", described
            )
        # check_input reads the first graph input: hand it a graph of this one input
        view = onnx.ModelProto()
        view.graph.input.append(by_name[spec.name])
        try:
            check_input(spec, view)
        except SpecError as exc:
            raise SpecError(
                exc.field.replace("spec.input.", f"spec.input[{index}]."), exc.problem, exc.accepted
            ) from exc


# ---------------------------------------------------------------------------
# Data files: calibration inputs and labelled examples


@dataclass(frozen=True)
class _Examples:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None


@dataclass(frozen=True)
class _Where:
    """Where sources are read from: claims under `pvc_root`, ConfigMaps in `namespace`
    (None: the pod's own); `ca_bundle` adds CAs https servers may be signed by."""

    pvc_root: Path
    namespace: str | None
    ca_bundle: Path | None = None


def _fetch_source(
    uri: str, sha256: str | None, where: str, dest: Path, at: _Where, progress: Progress
) -> Fetched:
    source: Source = parse_source(uri, sha256=sha256, field=where)
    progress(f"fetching {uri}")
    fetched = fetch(
        source, dest, pvc_root=at.pvc_root, namespace=at.namespace, ca_bundle=at.ca_bundle
    )
    progress(f"fetched {uri}: {fetched.size_bytes} bytes, sha256 {fetched.sha256[:12]}")
    return fetched


def _load_examples(
    fetched: Fetched, where: str, declared: Sequence[InputSpec], *, labelled: bool
) -> _Examples:
    accepted = "an .npz with one array per input name" + (
        f" and integer class labels under {LABELS_KEY!r}" if labelled else ""
    )
    try:
        with np.load(fetched.path, allow_pickle=False) as npz:
            arrays = {key: np.asarray(npz[key]) for key in npz.files}
    except (OSError, ValueError) as exc:
        raise SpecError(where, f"{fetched.uri} is not an .npz file: {exc}", accepted) from exc
    inputs: dict[str, np.ndarray] = {}
    for spec in declared:
        if spec.name not in arrays:
            raise SpecError(
                where,
                f"{fetched.uri} has no array for the input {spec.name!r} "
                f"(it has {', '.join(sorted(arrays)) or 'none'})",
                accepted,
            )
        values = arrays[spec.name]
        if values.ndim != len(spec.shape) or tuple(values.shape[1:]) != tuple(spec.shape[1:]):
            raise SpecError(
                where,
                f"{fetched.uri}: {spec.name!r} has shape {list(values.shape)}, "
                f"examples of the input's shape {list(spec.shape)} are stacked on axis 0",
                accepted,
            )
        inputs[spec.name] = values
    counts = {len(v) for v in inputs.values()}
    labels = arrays.get(LABELS_KEY)
    if labelled:
        if labels is None or labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise SpecError(where, f"{fetched.uri} has no 1-D integer {LABELS_KEY!r}", accepted)
        counts.add(len(labels))
    if len(counts) != 1 or 0 in counts:
        raise SpecError(
            where,
            f"{fetched.uri}: the arrays hold different or zero example counts {sorted(counts)}",
            accepted,
        )
    return _Examples(inputs, labels if labelled else None)


def _batch_size(model: onnx.ModelProto, input_name: str) -> int | None:
    """The model's fixed batch size for the input; None for a named (free) one."""
    for value in _graph_inputs(model):
        if value.name == input_name:
            dims = value.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
                return int(dims[0].dim_value)
    return None


def _batches(examples: _Examples, fixed_batch: int | None) -> list[dict[str, np.ndarray]]:
    """The examples in batches: of the model's fixed batch size, leaving out a last
    partial batch the model would refuse, or of _FREE_BATCH with the rest at the end."""
    count = len(next(iter(examples.inputs.values())))
    batch = fixed_batch or _FREE_BATCH
    stop = count - count % batch if fixed_batch else count
    return [
        {name: values[start : start + batch] for name, values in examples.inputs.items()}
        for start in range(0, stop, batch)
    ]


def _accuracy(
    path: Path, examples: _Examples, fixed_batch: int | None, output: str | None = None
) -> float:
    """Top-1 accuracy of `output` (default: the first) against the labels, over the
    batches."""
    assert examples.labels is not None
    session = _session(path)
    correct = seen = 0
    for feed in _batches(examples, fixed_batch):
        first_output = np.asarray(session.run(None if output is None else [output], feed)[0])
        predicted = first_output.reshape(len(first_output), -1).argmax(axis=1)
        labels = examples.labels[seen : seen + len(predicted)]
        correct += int((predicted == labels).sum())
        seen += len(labels)
    if not seen:
        raise ValueError(f"the data holds fewer examples than the model's batch of {fixed_batch}")
    return round(correct / seen, 4)


def _outputs_on(
    model: Path | bytes, names: Sequence[str] | None, examples: _Examples, fixed_batch: int | None
) -> list[np.ndarray]:
    """The model's outputs `names` (None: all, in its order) on the examples, run batch
    by batch (`_batches`) and concatenated; empty when the examples fill no batch."""
    session = _session(model)
    runs = [
        session.run(None if names is None else list(names), feed)
        for feed in _batches(examples, fixed_batch)
    ]
    if not runs:
        return []
    return [np.concatenate([np.asarray(r[k]) for r in runs]) for k in range(len(runs[0]))]


# ---------------------------------------------------------------------------
# Builders for any ONNX model


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """The quantizer logs advice at WARNING through the root logger: hold it to ERROR."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _quantize_dynamic(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_quantizer():
        quantize_dynamic(source, target, weight_type=QuantType.QInt8)


def _quantize_static(source: Path, target: Path, batches: list[dict[str, np.ndarray]]) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class BatchReader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.pending = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.pending, None)

        def rewind(self) -> None:
            self.pending = iter(batches)

    with _quiet_quantizer():
        quantize_static(
            source,
            target,
            BatchReader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
        )


def prune_weights(model: onnx.ModelProto, sparsity: float) -> tuple[onnx.ModelProto, int]:
    """A copy of `model` with the smallest-magnitude float weights of its Conv, Gemm and
    MatMul nodes zeroed (one threshold over all of them, `sparsity` of them zero; biases
    kept), and how many weights are zero afterwards."""
    import onnx
    from onnx import numpy_helper

    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    # a node's weight: its second input (Conv W, Gemm B, MatMul B) when an initializer
    weight_names = {
        node.input[1]
        for node in pruned.graph.node
        if node.op_type in _PRUNED_OPS and len(node.input) > 1
    }
    weights = [
        t
        for t in pruned.graph.initializer
        if t.name in weight_names and numpy_helper.to_array(t).dtype.kind == "f"
    ]
    if not weights:
        raise ValueError("the model has no float Conv/Gemm/MatMul weights to prune")
    arrays = [numpy_helper.to_array(t) for t in weights]
    magnitudes = np.concatenate([np.abs(a).ravel() for a in arrays])
    k = int(sparsity * magnitudes.size)
    threshold = np.partition(magnitudes, k - 1)[k - 1] if k > 0 else -1.0
    zeros = 0
    for tensor, values in zip(weights, arrays, strict=True):
        kept = np.where(np.abs(values) > threshold, values, 0).astype(values.dtype)
        zeros += int(kept.size - np.count_nonzero(kept))
        tensor.CopyFrom(numpy_helper.from_array(kept, tensor.name))
    return pruned, zeros


# ---------------------------------------------------------------------------
# The preparation


def _model_name(request: PrepareRequest, source: Source) -> str:
    if request.model_name:
        raw = request.model_name
    elif source.scheme == "zoo":
        raw = source.location
    else:
        tail = source.uri.rstrip("/").rsplit("/", 1)[-1]
        raw = tail.split("@", 1)[0].split(":", 1)[0].removesuffix(".onnx")
    return _TAG_UNSAFE.sub("-", raw.lower()).strip("-._")[:60] or "model"


def _wanted(request: PrepareRequest) -> list[tuple[int | None, VariantRequest]]:
    """fp32 first (the request's own entry if it has one), then the others in order,
    each with its index in the request (None for the fp32 added here)."""
    indexed = list(enumerate(request.variants))
    fp32 = [(i, v) for i, v in indexed if v.kind == "fp32"]
    head: list[tuple[int | None, VariantRequest]] = (
        [fp32[0]] if fp32 else [(None, VariantRequest("fp32", "fp32"))]
    )
    names = [v.name for _, v in indexed]
    for i, variant in indexed:
        if names.count(variant.name) > 1:
            raise SpecError(
                f"spec.variants[{i}].name", f"{variant.name!r} repeats", "distinct names"
            )
        if variant.kind == "pruned" and not 0 < variant.sparsity < 1:
            raise SpecError(
                f"spec.variants[{i}].prune.sparsity",
                f"{variant.sparsity} is out of range",
                "0 < sparsity < 1",
            )
    return head + [(i, v) for i, v in indexed if v.kind != "fp32"]


class UnsupportedGraph(Exception):
    """The model loads, but its graph cannot be profiled or partitioned; the message
    names the construct and the node (or the input dimension) and what would do."""


def _input_dict(spec: InputSpec) -> dict[str, Any]:
    return {"name": spec.name, "shape": list(spec.shape), "dtype": spec.dtype}


class _Refused(Exception):
    """A variant that cannot be built as asked; the message says why and what to set."""


@dataclass
class _Context:
    request: PrepareRequest
    model_file: Path
    model: Any  # onnx.ModelProto
    zoo_digits: bool
    calibration: _Examples | None
    data: _Examples | None
    built_dir: Path
    model_name: str
    final_output: str | None = None  # with declared exits: the output that is no exit
    # with trained exits: the rows of spec.data the heads were not trained on (their
    # calibration), and what each head was trained on
    exit_data: _Examples | None = None
    trained: dict[str, dict[str, Any]] = field(default_factory=dict)
    # spec.smallModels, fetched and checked: (file, its sha256)
    small: list[tuple[Path, str]] = field(default_factory=list)


def _build(ctx: _Context, index: int | None, variant: VariantRequest) -> Path:
    """The variant's ONNX file, or _Refused."""
    target = ctx.built_dir / f"{variant.name}.onnx"
    field_prefix = f"spec.variants[{index}]"
    if variant.kind == "fp32":
        shutil.copyfile(ctx.model_file, target)
        return target
    if ctx.zoo_digits and (variant.kind != "pruned" or variant.sparsity == DEFAULT_SPARSITY):
        from edgeai_worker import variants

        built = "pruned-50" if variant.kind == "pruned" else variant.kind
        shutil.copyfile(variants.variant_path(_DIGITS, built), target)
        return target
    if variant.kind == "distilled":
        raise _Refused(
            f"{field_prefix}.distill: distillation trains a student on the teacher's outputs "
            f"over labelled training data, which exists for zoo://{_DIGITS} only; "
            "use int8-dynamic, int8-static or pruned for this model"
        )
    if variant.kind == "int8-dynamic":
        _quantize_dynamic(ctx.model_file, target)
        return target
    if variant.kind == "int8-static":
        if ctx.calibration is None:
            raise _Refused(
                "spec.calibration.uri is not set: int8-static quantization calibrates "
                "activation ranges on example inputs (an .npz with one array per input name)"
            )
        first = ctx.request.inputs[0].name
        _quantize_static(
            ctx.model_file, target, _batches(ctx.calibration, _batch_size(ctx.model, first))
        )
        return target
    import onnx

    pruned, _ = prune_weights(ctx.model, variant.sparsity)
    onnx.save(pruned, str(target))
    return target


def _measure(ctx: _Context, path: Path) -> float | None:
    if ctx.data is not None:
        batch = _batch_size(ctx.model, ctx.request.inputs[0].name)
        return _accuracy(path, ctx.data, batch, ctx.final_output)
    if ctx.zoo_digits:
        from edgeai_worker import variants

        return round(variants.onnx_accuracy(path), 4)
    return None


def _add_offload_calibration(profile: dict[str, Any], path: Path, progress: Progress) -> None:
    """digits_cnn's exit heads, small models and validation tables (prebuilt, see
    `edgeai_worker.offload`) as the profile's `offload` section, for planning with
    exit shares; left out, and said, where they are not prebuilt or the heads do not
    fit this model."""
    import onnx

    from edgeai_worker.offload.build import prebuild_offload
    from edgeai_worker.offload.exits import profile_section, read_heads

    try:
        folder = prebuild_offload(progress=False)
    except RuntimeError as exc:
        progress(f"no offload calibration: {exc}")
        return
    produced = {o for n in onnx.load(str(path)).graph.node for o in n.output}
    missing = [h.after for h in read_heads(folder) if h.after not in produced]
    if missing:
        progress(f"no offload calibration: the exit heads read {missing}, not in this model")
        return
    profile["offload"] = profile_section(folder)


# What a declared exit must be (every spec.exits error says it).
_EXIT_FORM = (
    "an output of the model holding class scores (as many as the final output's), "
    "computed by a head of its own from the tensor after, a single-tensor cut of the model"
)


def _declared(request: PrepareRequest) -> list[Any]:
    from edgeai_worker.offload.declared import DeclaredExit

    return [DeclaredExit(e.output, e.after) for e in request.exits]


def _shapes(request: PrepareRequest) -> dict[str, list[int]]:
    return {i.name: list(i.shape) for i in request.inputs}


def check_declared_exits(request: PrepareRequest, model: onnx.ModelProto) -> str:
    """The model's final output once `request.exits` fit its graph; SpecError naming
    `spec.exits[i].output` or `.after` otherwise (see `offload.declared`)."""
    from edgeai_worker import graph
    from edgeai_worker.offload.declared import (
        ExitError,
        backbone,
        check_classes,
        check_exits,
    )

    exits = _declared(request)
    try:
        final = check_exits(model, exits)[0]
        feed = graph.sample_feed(model, _shapes(request))
        names = [final, *(e.output for e in exits)]
        ran = _session(model.SerializeToString()).run(names, feed)
        check_classes(dict(zip(names, ran, strict=True)), exits, final)
        cuts = graph.graph_cut_points(graph.analyze(backbone(model, exits), _shapes(request)))
        single = {c.tensors[0] for c in cuts if len(c.tensors) == 1}
        for index, declared in enumerate(exits):
            if declared.after not in single:
                raise ExitError(
                    index,
                    "after",
                    f"{declared.after!r} is not a single-tensor cut of the model without its "
                    "exits (every layer after it would need another tensor from before it)",
                )
    except ExitError as exc:
        raise SpecError(f"spec.exits[{exc.index}].{exc.key}", str(exc), _EXIT_FORM) from exc
    return final


def _check_trainable(request: PrepareRequest, model: onnx.ModelProto) -> None:
    """SpecError naming `spec.exits[i]` for a trained exit whose output the model
    already has or whose `after` it does not compute (before any data is fetched)."""
    graph = model.graph
    produced = {t for n in graph.node for t in n.output}
    tensors = produced | {o.name for o in graph.output}
    for index, declared in enumerate(request.exits):
        if not declared.train:
            continue
        if declared.output in tensors:
            raise SpecError(
                f"spec.exits[{index}].output",
                f"{declared.output!r} already names a tensor of the model",
                "with train: true, a new output name the trained head adds to the model",
            )
        if declared.after not in produced:
            raise SpecError(
                f"spec.exits[{index}].after",
                f"{declared.after!r} is not a tensor the model computes",
                _EXIT_FORM,
            )


def _rows(examples: _Examples, rows: slice) -> _Examples:
    labels = examples.labels
    return _Examples(
        {k: v[rows] for k, v in examples.inputs.items()},
        None if labels is None else labels[rows],
    )


def _train_exits(
    request: PrepareRequest,
    model: onnx.ModelProto,
    data: _Examples | None,
    workdir: Path,
    progress: Progress,
) -> tuple[onnx.ModelProto, Path, _Examples, dict[str, dict[str, Any]]]:
    """Trains the heads of the exits with `train: true` on the even rows of `spec.data`
    and grafts them onto the model: (the model with them, its file, the odd rows that
    calibrate every exit, what each head was trained on)."""
    import onnx

    from edgeai_worker.graph import Partitioner
    from edgeai_worker.offload.trained import MIN_EXAMPLES, graft_heads, train_head

    first = next(i for i, e in enumerate(request.exits) if e.train)
    if data is None or data.labels is None:
        raise SpecError(
            "spec.data",
            f"is not set, and spec.exits[{first}].train is true",
            "labelled data (an .npz of inputs and integer labels) the head is trained on",
        )
    count = len(data.labels)
    if count < MIN_EXAMPLES:
        raise SpecError(
            "spec.data.uri",
            f"holds {count} labelled examples, too few to train spec.exits[{first}]",
            f"at least {MIN_EXAMPLES}: the even rows train the heads, the odd rows "
            "calibrate every exit",
        )
    train = _rows(data, slice(0, None, 2))
    declared = {e.output for e in request.exits}
    final = next(o.name for o in model.graph.output if o.name not in declared)
    wanted = [e for e in request.exits if e.train]
    afters = list(dict.fromkeys(e.after for e in wanted))
    names = [i.name for i in request.inputs]
    probe = Partitioner(model).extract(names, [final, *afters])
    outputs = _outputs_on(
        probe.SerializeToString(), [final, *afters], train, _batch_size(model, names[0])
    )
    if not outputs:
        raise SpecError(
            "spec.data.uri",
            f"its {len(train.inputs[names[0]])} training rows fill no batch of the model",
            "more labelled examples",
        )
    classes = int(outputs[0].reshape(len(outputs[0]), -1).shape[1])
    assert train.labels is not None
    labels = train.labels[: len(outputs[0])]
    low, high = int(data.labels.min()), int(data.labels.max())
    if low < 0 or high >= classes:
        raise SpecError(
            "spec.data.uri",
            f"its labels lie in [{low}, {high}], the final output "
            f"{final!r} scores {classes} classes",
            f"integer labels in [0, {classes})",
        )
    values = dict(zip(afters, outputs[1:], strict=True))
    heads = []
    for index, declared_exit in enumerate(request.exits):
        if not declared_exit.train:
            continue
        found = values[declared_exit.after]
        if found.dtype != np.float32:
            raise SpecError(
                f"spec.exits[{index}].after",
                f"{declared_exit.after!r} holds {found.dtype}, a trained head reads float32",
                "a float32 tensor of the model",
            )
        progress(f"training the head of {declared_exit.output} on {declared_exit.after} "
                 f"{list(found.shape[1:])} over {len(labels)} examples")  # fmt: skip
        heads.append(train_head(declared_exit.output, declared_exit.after, found, labels, classes))
    grafted = graft_heads(model, heads)
    path = workdir / "source-with-exits.onnx"
    onnx.save(grafted, str(path))
    trained = {
        h.output: {"examples": h.trained_on, "trainAccuracy": round(h.train_accuracy, 4),
                   "pooled": h.pooled}
        for h in heads
    }  # fmt: skip
    return grafted, path, _rows(data, slice(1, None, 2)), trained


def _profiled_graph(ctx: _Context, path: Path) -> Path:
    """What is profiled of the built `path`: itself, or without its declared exits."""
    if not ctx.request.exits:
        return path
    import onnx

    from edgeai_worker.offload.declared import backbone

    plain = path.with_name(f"{path.stem}-without-exits.onnx")
    onnx.save(backbone(onnx.load(str(path)), _declared(ctx.request)), str(plain))
    return plain


def _add_declared_calibration(ctx: _Context, profile: dict[str, Any], path: Path) -> None:
    """The declared exits' validation tables on `spec.data` as the profile's `offload`
    section (`offload.declared.profile_section`)."""
    import onnx

    from edgeai_worker import graph
    from edgeai_worker.offload.declared import head_flops, profile_section, validation_tables

    data = _calibration_rows(ctx)
    assert data is not None
    assert data.labels is not None
    assert ctx.final_output
    exits = _declared(ctx.request)
    names = [ctx.final_output, *(e.output for e in exits)]
    batch = _batch_size(ctx.model, ctx.request.inputs[0].name)
    outputs = dict(zip(names, _outputs_on(path, names, data, batch), strict=True))
    labels = data.labels[: len(outputs[ctx.final_output])]
    model = onnx.load(str(path))
    dag = graph.analyze(model, _shapes(ctx.request))
    row = outputs[ctx.final_output]
    profile["offload"] = profile_section(
        exits,
        ctx.final_output,
        int(row[0].nbytes) if len(row) else 0,
        [head_flops(model, e, dag) for e in exits],
        validation_tables(outputs, labels, exits, ctx.final_output),
    )
    for entry in profile["offload"]["exits"]:
        if entry["output"] in ctx.trained:
            entry["trained"] = ctx.trained[entry["output"]]


def _fetch_small_models(
    request: PrepareRequest,
    data: _Examples | None,
    workdir: Path,
    at: _Where,
    progress: Progress,
) -> list[tuple[Path, str]]:
    """spec.smallModels fetched (digest-checked) and loaded, their inputs the model's;
    SpecError naming `spec.smallModels[i].uri` (or `spec.data`) otherwise."""
    if not request.small_models:
        return []
    if data is None or data.labels is None:
        raise SpecError(
            "spec.data",
            "is not set, and spec.smallModels needs labelled data to measure them on",
            "an .npz of inputs and integer labels",
        )
    fetched = []
    for i, ref in enumerate(request.small_models):
        field_name = f"spec.smallModels[{i}].uri"
        got = _fetch_source(ref.uri, ref.sha256, field_name, workdir / f"small{i}", at, progress)
        try:
            check_inputs(request.inputs, _load_checked(got))
        except SpecError as exc:
            raise SpecError(
                field_name,
                f"{ref.uri} does not take the model's input: {exc}",
                "a small model of the same input (spec.input) and classes",
            ) from exc
        fetched.append((got.path, "sha256:" + got.sha256))
    return fetched


def _logits(
    path: Path, examples: _Examples, fixed_batch: int | None, output: str | None
) -> np.ndarray:
    """`output` (default: the first) on the examples, in batches, one row each."""
    found = _outputs_on(path, None if output is None else [output], examples, fixed_batch)
    logits = found[0] if found else np.zeros((0, 0))
    return logits.reshape(len(logits), -1)


def _add_cascade_calibration(ctx: _Context, profile: dict[str, Any], path: Path) -> None:
    """The small models' tables on the rows the exits are calibrated on (all of
    `spec.data` without trained heads): the profile's `offload.cascade` (their FLOPs;
    the stored artefacts are added once stored) and `cascade_correct`,
    `cascade_<rule>` in its validation tables, in the form the digits profile has.
    SpecError naming `spec.smallModels[i].uri` for one that scores other classes."""
    import onnx

    from edgeai_worker import graph
    from edgeai_worker.offload.gate import RULES, confidence

    data = _calibration_rows(ctx)
    assert data is not None
    assert data.labels is not None
    final = ctx.final_output
    batch = _batch_size(ctx.model, ctx.request.inputs[0].name)
    model_logits = _logits(path, data, batch, final)
    labels = data.labels[: len(model_logits)]
    shapes = _shapes(ctx.request)
    small = []
    flops = []
    for i, (small_path, _) in enumerate(ctx.small):
        small_model = onnx.load(str(small_path))
        flops.append(int(sum(n.flops for n in graph.analyze(small_model, shapes).nodes)))
        batch = _batch_size(small_model, ctx.request.inputs[0].name)
        logits = _logits(small_path, data, batch, None)
        if logits.shape[1:] != model_logits.shape[1:] or len(logits) != len(model_logits):
            raise SpecError(
                f"spec.smallModels[{i}].uri",
                f"scores {logits.shape[1]} classes on {len(logits)} rows of spec.data, the "
                f"model {model_logits.shape[1]} on {len(model_logits)}",
                "a small model of the same input and classes (and batch size)",
            )
        small.append(logits)
    section = profile.setdefault(
        "offload",
        {
            "exits": [],
            "finalOutput": final or ctx.model.graph.output[0].name,
            "validation": {
                "final_correct": (model_logits.argmax(1) == labels).astype(int).tolist()
            },
        },
    )
    tables: dict[str, Any] = {
        "cascade_correct": (small[0].argmax(1) == labels).astype(int).tolist()
    }
    second = small[1] if len(small) > 1 else None
    for rule in RULES:
        if rule == "disagreement" and second is None:
            continue
        tables[f"cascade_{rule}"] = (
            np.round(confidence(small[0], rule, second), 4).astype(float).tolist()
        )
    section["validation"].update(tables)
    section["cascade"] = {"flops": flops}


# The profile carries a row per example its exits and small models are measured on (it
# goes into the DNNModel's status): at most this many.
CALIBRATION_ROWS = 2048


def _calibration_rows(ctx: _Context) -> _Examples | None:
    """The rows of `spec.data` the exits, the small models and reuse are calibrated
    on: those no head was trained on (all without trained heads), the first
    `CALIBRATION_ROWS`."""
    data = ctx.exit_data or ctx.data
    return None if data is None else _rows(data, slice(0, CALIBRATION_ROWS))


# At most this many labelled examples are stored for the stages' reuse calibration.
REUSE_DATA_ROWS = 1024
NPZ_MEDIA_TYPE = "application/vnd.edgeai.labelled-data.npz"


def _store_reuse_data(
    ctx: _Context, destination: _Destination, progress: Progress
) -> dict[str, Any] | None:
    """The labelled rows a stage calibrates its result reuse on (`spec.offload.reuse`
    of a DNNDeployment), stored beside the model's artefacts: the rows the exits are
    calibrated on (all of `spec.data` without trained heads), at most
    `REUSE_DATA_ROWS`, with the model's final output named; None without data."""
    data = _calibration_rows(ctx)
    if data is None or data.labels is None:
        return None
    rows = slice(0, REUSE_DATA_ROWS)
    kept = _rows(data, rows)
    assert kept.labels is not None
    path = ctx.built_dir / "reuse-data.npz"
    arrays: dict[str, Any] = {**kept.inputs, LABELS_KEY: kept.labels}
    np.savez(path, **arrays)
    digest = file_sha256(path)
    tag = f"{ctx.model_name}-data-{digest[7:19]}"
    progress(f"reuse calibration data: storing {len(kept.labels)} examples as {tag}")
    artifact = _store(path, digest, destination, tag, NPZ_MEDIA_TYPE)
    final = ctx.final_output or (ctx.model.graph.output[0].name)
    return {**artifact.to_dict(), "examples": len(kept.labels), "finalOutput": final}


def _prepare_variant(
    ctx: _Context,
    index: int | None,
    variant: VariantRequest,
    destination: _Destination,
    input_spec: Mapping[str, Any],
    progress: Progress,
) -> VariantResult:
    """Builds, profiles, measures and stores one variant; any failure costs this
    variant only and its result says why."""

    def failed(message: str, path: Path | None = None) -> VariantResult:
        # a builder's exception text can be long: the result goes into status
        return VariantResult(variant.name, variant.kind, False, message[:_MESSAGE_CHARS], path=path)

    try:
        path = _build(ctx, index, variant)
    except _Refused as exc:
        return failed(str(exc))
    except Exception as exc:
        return failed(f"building {variant.kind} failed: {type(exc).__name__}: {exc}")
    from edgeai_worker.graph import GraphError

    try:
        profile = graph_profile(
            _profiled_graph(ctx, path),
            model=ctx.model_name,
            variant=variant.name,
            input_spec=input_spec,
            inputs=[_input_dict(i) for i in ctx.request.inputs],
            # the model's own segments must run where its stages will (variants are
            # cut from the same graph, transformed)
            check_segments=variant.kind == "fp32",
        )
        if variant.kind == "fp32":
            # what a DNNModel derived from this one (spec.base) is checked against
            import onnx

            from edgeai_worker.graph import prefix_digests

            cuts = [c["tensors"] for c in profile["cuts"]]
            profile["prefixDigests"] = prefix_digests(onnx.load(path), cuts)
        accuracy = _measure(ctx, path)
        if ctx.zoo_digits and variant.kind == "fp32":
            _add_offload_calibration(profile, path, progress)
        if ctx.request.exits and ctx.data is not None and variant.kind == "fp32":
            _add_declared_calibration(ctx, profile, path)
        if ctx.small and variant.kind == "fp32":
            _add_cascade_calibration(ctx, profile, path)
    except SpecError:
        raise
    except GraphError as exc:
        if variant.kind == "fp32":  # the model itself: no variant of it can be planned
            raise UnsupportedGraph(str(exc)) from exc
        return failed(f"the planner cannot profile the built graph: {exc}", path)
    except Exception as exc:
        return failed(f"the built model does not run: {type(exc).__name__}: {exc}", path)
    digest = file_sha256(path)
    tag = f"{ctx.model_name}-{_TAG_UNSAFE.sub('-', variant.name.lower())}-{digest[7:19]}"
    progress(f"{variant.name}: storing {path.stat().st_size} bytes as {tag}")
    try:
        artifact = _store(path, digest, destination, tag)
    except (OSError, _oci_error()) as exc:
        return failed(f"storing the artefact failed: {exc}", path)
    if variant.kind == "fp32" and not ctx.zoo_digits:
        try:
            reuse_data = _store_reuse_data(ctx, destination, progress)
        except (OSError, _oci_error()) as exc:
            return failed(f"storing the reuse calibration data failed: {exc}", path)
        if reuse_data is not None:
            profile["reuseData"] = reuse_data
        try:
            stored = [
                _store(p, d, destination, f"{ctx.model_name}-small{i}-{d[7:19]}").to_dict()
                for i, (p, d) in enumerate(ctx.small)
            ]
        except (OSError, _oci_error()) as exc:
            return failed(f"storing the small models failed: {exc}", path)
        if stored:
            profile["offload"]["cascade"]["models"] = stored
    measured = "" if accuracy is None else f", accuracy {accuracy:.4f}"
    if ctx.trained and variant.kind == "fp32":
        measured += "; exit heads trained from spec.data: " + ", ".join(
            f"{name} on {t['examples']} examples" for name, t in ctx.trained.items()
        )
    return VariantResult(
        variant.name,
        variant.kind,
        True,
        f"built, {len(profile['cuts'])} cuts{measured}",
        artifact,
        accuracy,
        profile,
        path,
    )


def prepare(
    request: PrepareRequest,
    workdir: Path,
    *,
    pvc_root: Path = Path("/mnt/pvc"),
    namespace: str | None = None,
    ca_bundle: Path | None = None,
    progress: Progress = _quiet,
) -> PrepareResult:
    """Prepares the model `request` names in `workdir` (created if missing) and writes
    its artefacts where `request.artifacts_uri` says (`pvc_root`: where claims are
    mounted; `namespace`: of configmap:// sources, by default the pod's own;
    `ca_bundle`: CAs trusted for https sources besides the system's). Raises
    SpecError for a request that does not fit the model (naming the field) and
    sources.FetchError for a source that cannot be fetched or whose digest differs, and
    UnsupportedGraph for a model whose graph cannot be profiled; in all three cases
    nothing has been written to the destination."""
    destination = _destination(request.artifacts_uri, pvc_root)
    at = _Where(pvc_root, namespace, ca_bundle)
    if not request.inputs:
        raise SpecError("spec.input", "is empty", "the model's inputs: name, shape and dtype")
    wanted = _wanted(request)
    source = parse_source(request.source_uri, sha256=request.source_sha256, field="spec.source.uri")
    model_name = _model_name(request, source)

    fetched = _fetch_source(
        request.source_uri,
        request.source_sha256,
        "spec.source.uri",
        workdir / "source",
        at,
        progress,
    )
    model = _load_checked(fetched)
    check_inputs(request.inputs, model)
    inputs = _tensors(_graph_inputs(model))
    outputs = _tensors(model.graph.output)
    zoo_digits = source.scheme == "zoo" and source.location == _DIGITS
    if zoo_digits and request.small_models:
        raise SpecError(
            "spec.smallModels",
            f"zoo://{_DIGITS} brings its own small models and calibration",
            f"no spec.smallModels for zoo://{_DIGITS} (a cascade on it uses the zoo's)",
        )
    trains = any(e.train for e in request.exits)
    if trains:
        _check_trainable(request, model)
    # exits to train are checked once their heads exist, after the data is read
    final_output = check_declared_exits(request, model) if request.exits and not trains else None

    calibration = None
    if request.calibration_uri and any(v.kind == "int8-static" for _, v in wanted):
        got = _fetch_source(
            request.calibration_uri,
            request.calibration_sha256,
            "spec.calibration.uri",
            workdir / "calibration",
            at,
            progress,
        )
        calibration = _load_examples(got, "spec.calibration.uri", request.inputs, labelled=False)
    data = None
    if request.data_uri:
        got = _fetch_source(
            request.data_uri,
            request.data_sha256,
            "spec.data.uri",
            workdir / "data",
            at,
            progress,
        )
        data = _load_examples(got, "spec.data.uri", request.inputs, labelled=True)

    small = _fetch_small_models(request, data, workdir, at, progress)
    model_file = fetched.path
    exit_data = None
    trained: dict[str, dict[str, Any]] = {}
    if trains:
        model, model_file, exit_data, trained = _train_exits(
            request, model, data, workdir, progress
        )
        final_output = check_declared_exits(request, model)
        outputs = _tensors(model.graph.output)  # the artefact's: the trained exits too
    built_dir = workdir / "built"
    built_dir.mkdir(parents=True, exist_ok=True)
    ctx = _Context(
        request,
        model_file,
        model,
        zoo_digits,
        calibration,
        data,
        built_dir,
        model_name,
        final_output,
        exit_data,
        trained,
        small,
    )
    input_spec = _input_dict(request.inputs[0])
    results = []
    for position, (index, variant) in enumerate(wanted, start=1):
        progress(f"[{position}/{len(wanted)}] building {variant.name} ({variant.kind})")
        outcome = _prepare_variant(ctx, index, variant, destination, input_spec, progress)
        if not outcome.ready:
            progress(f"{variant.name}: not ready: {outcome.message}")
        results.append(outcome)
    return PrepareResult(
        source_uri=request.source_uri,
        source_digest="sha256:" + fetched.sha256,
        size_bytes=fetched.size_bytes,
        inputs=inputs,
        outputs=outputs,
        variants=tuple(results),
    )


__all__ = [
    "DEFAULT_SPARSITY",
    "LABELS_KEY",
    "RESULT_VERSION",
    "VARIANT_KINDS",
    "ArtifactRef",
    "PrepareRequest",
    "PrepareResult",
    "TensorInfo",
    "UnsupportedGraph",
    "VariantKind",
    "VariantRequest",
    "VariantResult",
    "check_declared_exits",
    "check_inputs",
    "prepare",
    "prune_weights",
]
