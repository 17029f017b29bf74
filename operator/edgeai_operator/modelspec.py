"""A DNNModel's spec, validated field by field into one typed `ModelSpec`.

    apiVersion: edgeai.dev/v1alpha1
    kind: DNNModel
    metadata: {name: digits}
    spec:
      source: {uri: https://models.example/net.onnx, sha256: <64 lowercase hex>}
      artifacts: {uri: oci://registry.example:5000/models}
      calibration: {uri: pvc://datasets/calibration.npz}
      data: {uri: configmap://digits-data/heldout.npz}
      input: {name: input, shape: [1, 1, 8, 8], dtype: FP32}
      variants:
        - {name: int8, quantize: {mode: static}}
        - {name: pruned-30, prune: {sparsity: 0.3}}
        - {name: small, distill: {}}
      profile: {tiers: [device, edge, cloud], repeats: 20, idleMs: 100, timeoutSeconds: 300}
      base: {modelRef: {name: digits}, sharedUpTo: features_out}
      exits: [{output: exit_0, after: features_0}, {output: exit_1, after: pooled, train: true}]
      smallModels: [{uri: configmap://digits-small/small.onnx}]

`spec.source` is `{uri, sha256}` with a URI as `sources.parse_source` accepts it (the
check the preparation Job and `edgeai fetch` make), or `{zoo: NAME}`, short for
`uri: zoo://NAME`. `spec.calibration` and `spec.data` take the same URI forms except
zoo:// (they are `.npz` files, not models); `spec.artifacts.uri` is where derived
artefacts go. Each variant maps to the `VariantRequest` the preparation builds. Every
problem raises `SpecError` naming the field (`spec.variants[1].prune.sparsity`), what
was wrong and what is accepted; the CRD's CEL rules refuse the same values server-side.
`spec.base` declares that the model was fine-tuned above a trunk of another DNNModel of
the namespace: its graph up to the cut tensor `sharedUpTo` computes what the base's
graph computes up to one of its cuts, on the same weights (the preparation checks it).
`spec.exits` declares early exits the model already has: extra outputs (class scores)
a head computes from the tensor `after` (the preparation checks the graph agrees); an
entry with `train: true` names an output the model does not have yet, whose head the
preparation trains from `spec.data` and adds to the model. `spec.smallModels` are the
small models (same input, same classes; one, or two for the disagreement rule) a
DNNDeployment's `spec.offload.cascade` runs on the device first, measured on
`spec.data` by the preparation and stored beside the model's artefacts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from edgeai_operator import TIERS
from edgeai_operator.deployspec import reject_unknown, spec_choice, spec_integer, spec_mapping
from edgeai_operator.errors import SpecError
from edgeai_operator.sources import ACCEPTED_FORMS, parse_source

# The built-in zoo (edgeai_worker.zoo.ZOO_NAMES); a test holds the two equal.
ZOO_MODELS = ("digits_cnn", "mobilenet_v2", "resnet18", "vgg_like", "alexnet_like", "kws_lstm")
DTYPES = ("FP32", "FP16", "INT8", "UINT8", "INT32", "INT64")
QUANTIZE_MODES = ("dynamic", "static")
VariantKind = Literal["fp32", "int8-dynamic", "int8-static", "pruned", "distilled"]
VARIANT_KINDS: tuple[VariantKind, ...] = (
    "fp32",
    "int8-dynamic",
    "int8-static",
    "pruned",
    "distilled",
)
DEFAULT_SPARSITY = 0.5
# The CRD's maxLength of a URI (CEL needs a bound to price its regular expressions).
MAX_URI_CHARS = 2048
ARTIFACTS_FORMS = "oci://REGISTRY[:PORT]/REPOSITORY (no tag) or pvc://CLAIM/DIRECTORY"
DATA_FORMS = (
    "https://HOST/PATH or http://HOST/PATH (with a sha256), pvc://CLAIM/PATH, "
    "configmap://NAME/KEY, oci://REGISTRY/REPO:TAG or oci://REGISTRY/REPO@sha256:HEX"
)
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
MAX_INPUT_RANK = 8
MAX_ADDITIONAL_INPUTS = 15
MAX_VARIANTS = 16
MAX_VARIANT_NAME = 40
DEFAULT_REPEATS = 20
DEFAULT_IDLE_MS = 100
DEFAULT_TIMEOUT_S = 300
_VARIANT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# A DNNModel name (the CRD holds names to 40 characters).
_MODEL_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_MODEL_NAME = 40
MAX_TENSOR_NAME = 256
MAX_EXITS = 8
# spec.smallModels: the cascade's small model, and the second opinion of disagreement.
MAX_SMALL_MODELS = 2


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class SourceRef:
    """A file to fetch: a URI as `sources.parse_source` accepts it and the sha256 its
    bytes must have (64 lowercase hex digits, no prefix; None: not pinned)."""

    uri: str
    sha256: str | None = None


@dataclass(frozen=True)
class VariantRequest:
    """One wanted variant: `name` is what status and the artefact tag call it, `kind`
    the builder, `sparsity` the fraction of weights a `pruned` variant zeroes."""

    name: str
    kind: VariantKind
    sparsity: float = DEFAULT_SPARSITY

    @staticmethod
    def of_kind(kind: str, *, sparsity: float = DEFAULT_SPARSITY) -> VariantRequest:
        """The variant named after its kind (`pruned-50` for pruning at 0.5)."""
        if kind not in VARIANT_KINDS:
            raise SpecError(
                "spec.variants", f"{kind!r} is no variant kind", ", ".join(VARIANT_KINDS)
            )
        name = f"pruned-{round(sparsity * 100)}" if kind == "pruned" else kind
        return VariantRequest(name, kind, sparsity)


@dataclass(frozen=True)
class VariantSpec:
    """One entry of `spec.variants`; `kind` is fp32 (as is), quantize, prune or distill."""

    name: str
    kind: str = "fp32"
    quantize_mode: str | None = None
    sparsity: float | None = None

    @property
    def builder(self) -> str:
        """The name `edgeai_worker.variants.variant_path` builds this variant under."""
        if self.kind == "quantize":
            return f"int8-{self.quantize_mode}"
        if self.kind == "prune":
            return "pruned-50"
        if self.kind == "distill":
            return "distilled"
        return "fp32"

    def request(self) -> VariantRequest:
        """What the preparation builds for this variant, under the user's name:
        quantize dynamic/static -> int8-dynamic/int8-static, prune -> pruned at its
        sparsity, distill -> distilled, no parameters -> fp32."""
        kind: VariantKind = "fp32"
        if self.kind == "quantize":
            kind = "int8-static" if self.quantize_mode == "static" else "int8-dynamic"
        elif self.kind == "prune":
            kind = "pruned"
        elif self.kind == "distill":
            kind = "distilled"
        sparsity = self.sparsity if self.sparsity is not None else DEFAULT_SPARSITY
        return VariantRequest(self.name, kind, sparsity)


@dataclass(frozen=True)
class ProfileSettings:
    tiers: tuple[str, ...] | None  # None: every tier that has nodes
    repeats: int = DEFAULT_REPEATS
    idle_ms: int = DEFAULT_IDLE_MS
    timeout_s: int = DEFAULT_TIMEOUT_S


@dataclass(frozen=True)
class BaseRef:
    """`spec.base`: the DNNModel whose trunk this model shares, and the cut tensor (of
    this model's graph) the shared trunk ends at."""

    model: str
    shared_up_to: str


@dataclass(frozen=True)
class ExitSpec:
    """One of `spec.exits`: the model output holding an early exit's class scores and
    the tensor its head reads; `train`: the preparation trains the head from
    `spec.data` and adds `output` to the model (`edgeai_worker.offload.trained`)."""

    output: str
    after: str
    train: bool = False


@dataclass(frozen=True)
class ModelSpec:
    source: SourceRef
    input: InputSpec
    # fp32 first (always present), then the declared variants in order
    variants: tuple[VariantSpec, ...]
    profile: ProfileSettings
    artifacts_uri: str | None = None  # None: the operator's default destination
    calibration: SourceRef | None = None
    data: SourceRef | None = None
    # the model's inputs after `input`, for a model with several (spec.additionalInputs)
    additional_inputs: tuple[InputSpec, ...] = ()
    base: BaseRef | None = None
    exits: tuple[ExitSpec, ...] = ()
    # spec.smallModels: what a DNNDeployment's spec.offload.cascade runs on the device
    small_models: tuple[SourceRef, ...] = ()

    @property
    def inputs(self) -> tuple[InputSpec, ...]:
        """Every declared input, `input` first: the shapes the model is profiled at."""
        return (self.input, *self.additional_inputs)

    @property
    def zoo(self) -> str | None:
        """The zoo model's name when the source is zoo://NAME, else None."""
        scheme, _, name = self.source.uri.partition("://")
        return name if scheme == "zoo" else None


def _sha256(value: Any, field: str) -> str | None:
    # Stricter than parse_source (which also takes a sha256: prefix and upper case):
    # the CRD's CEL rule accepts exactly this form, and the two must agree.
    if value is None:
        return None
    if not isinstance(value, str) or not _SHA256_HEX.fullmatch(value):
        raise SpecError(
            field, f"{value!r} is not a sha256 digest", "64 lowercase hexadecimal digits"
        )
    return value


def _uri(value: Any, field: str, accepted: str) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(field, f"must be a URI, got {value!r}", accepted)
    if len(value) > MAX_URI_CHARS:
        raise SpecError(field, f"is longer than {MAX_URI_CHARS} characters", accepted)
    return value


def _source(value: Any) -> SourceRef:
    data = spec_mapping(value, "spec.source", required=True)
    reject_unknown(data, "spec.source", ("zoo", "uri", "sha256"))
    if ("zoo" in data) == ("uri" in data):
        raise SpecError(
            "spec.source",
            "sets both zoo and uri" if "zoo" in data else "sets neither zoo nor uri",
            f"exactly one: zoo: NAME (short for uri: zoo://NAME) or uri: {ACCEPTED_FORMS}",
        )
    if "zoo" in data:
        uri = "zoo://" + spec_choice(data["zoo"], "spec.source.zoo", ZOO_MODELS)
    else:
        uri = _uri(data["uri"], "spec.source.uri", ACCEPTED_FORMS)
    sha256 = _sha256(data.get("sha256"), "spec.source.sha256")
    parse_source(uri, sha256=sha256, field="spec.source.uri", sha256_field="spec.source.sha256")
    return SourceRef(uri, sha256)


def _data_file(value: Any, field: str) -> SourceRef | None:
    """`spec.calibration` or `spec.data`: an `.npz` file, so any source but zoo://."""
    if value is None:
        return None
    data = spec_mapping(value, field)
    reject_unknown(data, field, ("uri", "sha256"))
    uri = _uri(data.get("uri"), f"{field}.uri", DATA_FORMS)
    if uri.startswith("zoo://"):
        raise SpecError(f"{field}.uri", f"{uri!r} names a zoo model, not a data file", DATA_FORMS)
    sha256 = _sha256(data.get("sha256"), f"{field}.sha256")
    parse_source(uri, sha256=sha256, field=f"{field}.uri", sha256_field=f"{field}.sha256")
    return SourceRef(uri, sha256)


def check_artifacts_uri(uri: str, field: str = "spec.artifacts.uri") -> str:
    """`uri` without trailing slashes when it is an artefact destination:
    `oci://REGISTRY[:PORT]/REPOSITORY` (no tag or digest: each artefact gets its own
    tag) or `pvc://CLAIM[/DIRECTORY]`; SpecError naming `field` otherwise."""
    base = uri.rstrip("/")
    if base.startswith("oci://"):
        from edgeai_operator import oci  # the OCI client loads only for oci destinations

        if "@" in base or ":" in base.removeprefix("oci://").split("/", 1)[-1]:
            raise SpecError(field, f"{uri!r} names a tag or digest", ARTIFACTS_FORMS)
        try:
            oci.parse_reference(f"{base}:probe", field=field)
        except SpecError:
            raise SpecError(
                field,
                f"{uri!r} is no OCI repository (a host[:port], then lowercase components "
                "separated by '/')",
                ARTIFACTS_FORMS,
            ) from None
        return base
    if base.startswith("pvc://"):
        try:
            # the same checks as a pvc:// source, on a file inside the directory
            parse_source(f"{base}/x.onnx", sha256=None, field=field)
        except SpecError:
            raise SpecError(
                field,
                f"{uri!r} is no claim directory (the claim a DNS subdomain, the directory "
                "a relative path without empty, '.' or '..' parts)",
                ARTIFACTS_FORMS,
            ) from None
        return base
    raise SpecError(field, f"{uri!r} is not an artefact destination", ARTIFACTS_FORMS)


def _artifacts_uri(value: Any) -> str | None:
    if value is None:
        return None
    data = spec_mapping(value, "spec.artifacts")
    reject_unknown(data, "spec.artifacts", ("uri",))
    uri = _uri(data.get("uri"), "spec.artifacts.uri", ARTIFACTS_FORMS)
    return check_artifacts_uri(uri)


def _input(data: Mapping[str, Any], field: str = "spec.input") -> InputSpec:
    reject_unknown(data, field, ("name", "shape", "dtype"))
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise SpecError(
            f"{field}.name", f"must be a non-empty string, got {name!r}", "a tensor name"
        )
    shape = data.get("shape")
    if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_INPUT_RANK:
        raise SpecError(
            f"{field}.shape",
            f"must be a list of 1 to {MAX_INPUT_RANK} dimensions, got {shape!r}",
            "dimensions >= 1, batch first",
        )
    for i, dim in enumerate(shape):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise SpecError(f"{field}.shape[{i}]", f"must be an integer >= 1, got {dim!r}")
    dtype = spec_choice(data.get("dtype"), f"{field}.dtype", DTYPES)
    return InputSpec(name=name, shape=tuple(shape), dtype=dtype)


def _short_list(value: Any, field: str, most: int, accepted: str) -> list[Any]:
    """`value` when it is a list of at most `most` entries (absent: empty)."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > most:
        raise SpecError(field, f"must be a list of at most {most}, got {value!r:.60}", accepted)
    return value


def _additional_inputs(value: Any, first: InputSpec) -> tuple[InputSpec, ...]:
    """spec.additionalInputs: the model's inputs after spec.input, each named once."""
    value = _short_list(
        value,
        "spec.additionalInputs",
        MAX_ADDITIONAL_INPUTS,
        "the model's inputs after spec.input: name, shape and dtype each",
    )
    inputs = [first]
    for i, item in enumerate(value):
        field = f"spec.additionalInputs[{i}]"
        spec = _input(spec_mapping(item, field, required=True), field)
        if any(spec.name == other.name for other in inputs):
            raise SpecError(f"{field}.name", f"{spec.name!r} repeats", "distinct input names")
        inputs.append(spec)
    return tuple(inputs[1:])


def _variant(data: Any, field: str) -> VariantSpec:
    data = spec_mapping(data, field)
    reject_unknown(data, field, ("name", "quantize", "prune", "distill"))
    name = data.get("name")
    if not isinstance(name, str) or len(name) > MAX_VARIANT_NAME or not _VARIANT_NAME.match(name):
        raise SpecError(
            f"{field}.name",
            f"invalid variant name {name!r}",
            f"a DNS label of at most {MAX_VARIANT_NAME} characters",
        )
    kinds = [k for k in ("quantize", "prune", "distill") if k in data]
    if len(kinds) > 1:
        raise SpecError(
            field, f"sets {' and '.join(kinds)}", "at most one of quantize, prune or distill"
        )
    if name == "fp32" and kinds:
        raise SpecError(f"{field}.name", "fp32 names the uncompressed model", "another name")
    if not kinds:
        return VariantSpec(name=name)
    kind = kinds[0]
    params = spec_mapping(data[kind], f"{field}.{kind}")
    if kind == "quantize":
        reject_unknown(params, f"{field}.quantize", ("mode",))
        mode = spec_choice(params.get("mode"), f"{field}.quantize.mode", QUANTIZE_MODES)
        return VariantSpec(name=name, kind=kind, quantize_mode=mode)
    if kind == "prune":
        reject_unknown(params, f"{field}.prune", ("sparsity",))
        sparsity = params.get("sparsity")
        if isinstance(sparsity, bool) or not isinstance(sparsity, int | float):
            raise SpecError(f"{field}.prune.sparsity", f"must be a number, got {sparsity!r}")
        if not 0 < sparsity < 1:
            raise SpecError(
                f"{field}.prune.sparsity",
                f"{sparsity} is out of range",
                "a fraction of the weights to zero, 0 < sparsity < 1",
            )
        return VariantSpec(name=name, kind=kind, sparsity=float(sparsity))
    reject_unknown(params, f"{field}.distill", ())
    return VariantSpec(name=name, kind=kind)


def _profile(data: Mapping[str, Any]) -> ProfileSettings:
    reject_unknown(data, "spec.profile", ("tiers", "repeats", "idleMs", "timeoutSeconds"))
    tiers = data.get("tiers")
    if tiers is not None:
        if not isinstance(tiers, list):
            raise SpecError(
                "spec.profile.tiers", f"must be a list, got {tiers!r}", ", ".join(TIERS)
            )
        for i, tier in enumerate(tiers):
            spec_choice(tier, f"spec.profile.tiers[{i}]", TIERS)
        if len(set(tiers)) != len(tiers):
            raise SpecError("spec.profile.tiers", f"tiers repeat in {tiers}", "distinct tiers")
    return ProfileSettings(
        # an empty list, like an absent one, profiles every tier that has nodes
        tiers=tuple(t for t in TIERS if t in tiers) if tiers else None,
        repeats=spec_integer(data.get("repeats"), "spec.profile.repeats", 1, 1000, DEFAULT_REPEATS),
        idle_ms=spec_integer(data.get("idleMs"), "spec.profile.idleMs", 0, 10000, DEFAULT_IDLE_MS),
        timeout_s=spec_integer(
            data.get("timeoutSeconds"), "spec.profile.timeoutSeconds", 10, 86400, DEFAULT_TIMEOUT_S
        ),
    )


def _base(value: Any) -> BaseRef | None:
    if value is None:
        return None
    data = spec_mapping(value, "spec.base")
    reject_unknown(data, "spec.base", ("modelRef", "sharedUpTo"))
    ref = spec_mapping(data.get("modelRef"), "spec.base.modelRef", required=True)
    reject_unknown(ref, "spec.base.modelRef", ("name",))
    name = ref.get("name")
    if not isinstance(name, str) or len(name) > MAX_MODEL_NAME or not _MODEL_NAME.match(name):
        raise SpecError(
            "spec.base.modelRef.name",
            f"invalid DNNModel name {name!r}",
            f"the name of a DNNModel of this namespace (a DNS label of at most "
            f"{MAX_MODEL_NAME} characters)",
        )
    tensor = data.get("sharedUpTo")
    if not isinstance(tensor, str) or not tensor or len(tensor) > MAX_TENSOR_NAME:
        raise SpecError(
            "spec.base.sharedUpTo",
            f"must be a tensor name, got {tensor!r}",
            f"the name (1 to {MAX_TENSOR_NAME} characters) of a single-tensor cut of this "
            "model's graph where the shared trunk ends",
        )
    return BaseRef(model=name, shared_up_to=tensor)


def _tensor_name(value: Any, field: str, accepted: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_TENSOR_NAME:
        raise SpecError(field, f"must be a tensor name, got {value!r}", accepted)
    return value


def _exits(value: Any, inputs: tuple[InputSpec, ...]) -> tuple[ExitSpec, ...]:
    """spec.exits: distinct outputs, each read from a tensor the model computes."""
    value = _short_list(
        value, "spec.exits", MAX_EXITS, "entries {output: MODEL_OUTPUT, after: TENSOR}"
    )
    input_names = {i.name for i in inputs}
    exits: list[ExitSpec] = []
    for i, item in enumerate(value):
        field = f"spec.exits[{i}]"
        data = spec_mapping(item, field, required=True)
        reject_unknown(data, field, ("output", "after", "train"))
        output = _tensor_name(
            data.get("output"),
            f"{field}.output",
            f"the name (1 to {MAX_TENSOR_NAME} characters) of the model output holding "
            "the exit's class scores",
        )
        after = _tensor_name(
            data.get("after"),
            f"{field}.after",
            f"the name (1 to {MAX_TENSOR_NAME} characters) of the tensor the exit's head reads",
        )
        for key, name in (("output", output), ("after", after)):
            if name in input_names:
                raise SpecError(
                    f"{field}.{key}", f"{name!r} is a model input", "a tensor the model computes"
                )
        if output == after:
            raise SpecError(
                f"{field}.after",
                f"names the exit's own output {output!r}",
                "the tensor the exit's head reads",
            )
        if any(e.output == output for e in exits):
            raise SpecError(f"{field}.output", f"{output!r} repeats", "distinct outputs")
        train = data.get("train", False)
        if not isinstance(train, bool):
            raise SpecError(
                f"{field}.train",
                f"must be true or false, got {train!r}",
                "true: the preparation trains the head from spec.data and adds output to the model",
            )
        exits.append(ExitSpec(output, after, train))
    return tuple(exits)


def _small_models(value: Any) -> tuple[SourceRef, ...]:
    """spec.smallModels: files to fetch, as spec.data's (any source but zoo://)."""
    items = _short_list(
        value,
        "spec.smallModels",
        MAX_SMALL_MODELS,
        "entries {uri, sha256}: a small ONNX model of the same input and classes",
    )
    refs = []
    for i, item in enumerate(items):
        field = f"spec.smallModels[{i}]"
        ref = _data_file(spec_mapping(item, field, required=True), field)
        assert ref is not None
        refs.append(ref)
    return tuple(refs)


def parse_model_spec(spec: Any) -> ModelSpec:
    """Validates a DNNModel's `spec` (the mapping under `spec:`)."""
    spec = spec_mapping(spec, "spec", required=True)
    reject_unknown(
        spec,
        "spec",
        (
            "source",
            "artifacts",
            "calibration",
            "data",
            "input",
            "additionalInputs",
            "variants",
            "profile",
            "base",
            "exits",
            "smallModels",
        ),
    )
    source = _source(spec.get("source"))
    model_input = _input(spec_mapping(spec.get("input"), "spec.input", required=True))
    additional = _additional_inputs(spec.get("additionalInputs"), model_input)
    declared = spec.get("variants") or []
    if not isinstance(declared, list) or len(declared) > MAX_VARIANTS:
        raise SpecError(
            "spec.variants", f"must be a list of at most {MAX_VARIANTS}, got {declared!r:.60}"
        )
    variants = [VariantSpec(name="fp32")]
    for i, item in enumerate(declared):
        variant = _variant(item, f"spec.variants[{i}]")
        if variant.name == "fp32":
            continue  # listing the uncompressed model is allowed; it is always there
        if any(v.name == variant.name for v in variants):
            raise SpecError(
                f"spec.variants[{i}].name", f"{variant.name!r} repeats", "distinct names"
            )
        variants.append(variant)
    data = _data_file(spec.get("data"), "spec.data")
    exits = _exits(spec.get("exits"), (model_input, *additional))
    trained = [i for i, e in enumerate(exits) if e.train]
    if trained and data is None:
        raise SpecError(
            "spec.data",
            f"is not set, and spec.exits[{trained[0]}].train is true",
            "labelled data (an .npz of inputs and integer labels) the exit's head is "
            "trained on, or train: false with a model that has the exit as an output",
        )
    small_models = _small_models(spec.get("smallModels"))
    if small_models and data is None:
        raise SpecError(
            "spec.data",
            "is not set, and spec.smallModels needs labelled data to measure them on",
            "an .npz of inputs and integer labels",
        )
    return ModelSpec(
        source=source,
        input=model_input,
        additional_inputs=additional,
        variants=tuple(variants),
        profile=_profile(spec_mapping(spec.get("profile"), "spec.profile")),
        artifacts_uri=_artifacts_uri(spec.get("artifacts")),
        calibration=_data_file(spec.get("calibration"), "spec.calibration"),
        data=data,
        base=_base(spec.get("base")),
        exits=exits,
        small_models=small_models,
    )
