"""A DNNModel's spec, validated field by field into one typed `ModelSpec`.

    apiVersion: edgeai.dev/v1alpha1
    kind: DNNModel
    metadata: {name: digits}
    spec:
      source: {zoo: digits_cnn}
      input: {name: input, shape: [1, 1, 8, 8], dtype: FP32}
      variants:
        - {name: int8, quantize: {mode: static}}
        - {name: pruned-50, prune: {sparsity: 0.5}}
        - {name: small, distill: {}}
      profile: {tiers: [device, edge, cloud], repeats: 20, idleMs: 100, timeoutSeconds: 300}

Only what is built can be written: a variant's parameters are the ones
`edgeai_worker.variants` builds (int8 quantization, dynamic or static with activation
ranges calibrated on the digits training images; magnitude pruning at sparsity 0.5;
the one distilled student). Every problem
raises `SpecError` naming the field (`spec.variants[1].prune.sparsity`), what was
wrong and what is accepted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgeai_operator import TIERS
from edgeai_operator.deployspec import reject_unknown, spec_choice, spec_integer, spec_mapping
from edgeai_operator.errors import SpecError

# The built-in zoo (edgeai_worker.zoo.ZOO_NAMES); a test holds the two equal.
ZOO_MODELS = ("digits_cnn", "mobilenet_v2", "resnet18", "vgg_like", "alexnet_like", "kws_lstm")
DTYPES = ("FP32", "FP16", "INT8", "UINT8", "INT32", "INT64")
QUANTIZE_MODES = ("dynamic", "static")
PRUNE_SPARSITIES = (0.5,)
MAX_INPUT_RANK = 8
MAX_VARIANTS = 16
MAX_VARIANT_NAME = 40
DEFAULT_REPEATS = 20
DEFAULT_IDLE_MS = 100
DEFAULT_TIMEOUT_S = 300
_VARIANT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


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


@dataclass(frozen=True)
class ProfileSettings:
    tiers: tuple[str, ...] | None  # None: every tier that has nodes
    repeats: int = DEFAULT_REPEATS
    idle_ms: int = DEFAULT_IDLE_MS
    timeout_s: int = DEFAULT_TIMEOUT_S


@dataclass(frozen=True)
class ModelSpec:
    zoo: str
    input: InputSpec
    # fp32 first (always present), then the declared variants in order
    variants: tuple[VariantSpec, ...]
    profile: ProfileSettings


def _input(data: Mapping[str, Any]) -> InputSpec:
    reject_unknown(data, "spec.input", ("name", "shape", "dtype"))
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise SpecError(
            "spec.input.name", f"must be a non-empty string, got {name!r}", "a tensor name"
        )
    shape = data.get("shape")
    if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_INPUT_RANK:
        raise SpecError(
            "spec.input.shape",
            f"must be a list of 1 to {MAX_INPUT_RANK} dimensions, got {shape!r}",
            "dimensions >= 1, batch first",
        )
    for i, dim in enumerate(shape):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise SpecError(f"spec.input.shape[{i}]", f"must be an integer >= 1, got {dim!r}")
    dtype = spec_choice(data.get("dtype"), "spec.input.dtype", DTYPES)
    return InputSpec(name=name, shape=tuple(shape), dtype=dtype)


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
        sparsity = spec_choice(params.get("sparsity"), f"{field}.prune.sparsity", PRUNE_SPARSITIES)
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


def parse_model_spec(spec: Any) -> ModelSpec:
    """Validates a DNNModel's `spec` (the mapping under `spec:`)."""
    spec = spec_mapping(spec, "spec", required=True)
    reject_unknown(spec, "spec", ("source", "input", "variants", "profile"))
    source = spec_mapping(spec.get("source"), "spec.source", required=True)
    reject_unknown(source, "spec.source", ("zoo",))
    zoo = spec_choice(source.get("zoo"), "spec.source.zoo", ZOO_MODELS)
    model_input = _input(spec_mapping(spec.get("input"), "spec.input", required=True))
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
    return ModelSpec(
        zoo=zoo,
        input=model_input,
        variants=tuple(variants),
        profile=_profile(spec_mapping(spec.get("profile"), "spec.profile")),
    )
