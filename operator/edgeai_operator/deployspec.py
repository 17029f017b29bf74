"""A DNNDeployment, validated field by field into one typed `DeploymentSpec`.

    apiVersion: edgeai.dev/v1alpha1
    kind: DNNDeployment
    metadata: {name: camera-detector}
    spec:
      modelRef: {name: mobilenet-v2}       # or model: {zoo: mobilenet_v2, variant: int8}
      slo: {latencyP95Ms: 80, throughputRps: 20, minAccuracy: 0.95}
      objective: latency                   # latency | deviceEnergy | cloudCost
      devices: {nodeSelector: {app: camera}}
      placement: {tiers: [device, edge, cloud], partitioning: auto, adaptiveSplit: true}
      privacy: {rawInputStaysOnDevice: true, featureNoiseStd: 0.05}
      preprocessing: {skipUnchangedThreshold: 0.02}
      autoscaling: {minReplicas: 1, maxReplicas: 8, stableWindowSeconds: 60}
      priority: 100
      sharing: none                        # none | backbone
      power: {computeWatts: 4, txWatts: 1.5, rxWatts: 1.0, idleWatts: 0.3}
      cost: {edgePerMs: 0.1, cloudPerMs: 1.0}
      offload: {cascade: {rule: disagreement, targetAccuracy: 0.97}, reuse: {maxEntries: 256},
                exits: {rule: maxProb, targetAccuracy: 0.97}}

`spec.model` (a zoo model without a DNNModel) is for `edgeai plan` and `run-local`;
the CRD offers `modelRef` only. Every problem raises `SpecError` naming the field
(`spec.slo.latencyP95Ms`), what was wrong and what is accepted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeai_operator import API_GROUP, TIERS
from edgeai_operator.errors import SpecError, read_yaml_documents
from edgeai_operator.securityspec import SecuritySpec, parse_security

OBJECTIVES = ("latency", "deviceEnergy", "cloudCost")
# none: no partitioning, the whole model on the one best tier
PARTITIONING = ("auto", "none")
TRANSPORTS = ("http", "grpc")
FALLBACKS = ("none", "device")
SHARING = ("none", "backbone")
MAX_PRIORITY = 1_000_000_000
MAX_REPLICAS = 1000
_SPEC_FIELDS = (
    "modelRef",
    "model",
    "slo",
    "objective",
    "devices",
    "placement",
    "privacy",
    "preprocessing",
    "autoscaling",
    "priority",
    "sharing",
    "power",
    "cost",
    "security",
    "offload",
)
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_ZOO = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Autoscaling:
    """`spec.autoscaling`, the bounds and windows of `autoscaler.ScalePolicy`."""

    min_replicas: int = 1
    max_replicas: int = 8
    stable_window_s: int = 60
    panic_window_s: int = 6
    scale_down_delay_s: int = 30


# --- spec.offload: per-input offloading (edgeai_worker.offload) ---------------------
CASCADE_RULES = ("maxProb", "entropy", "disagreement")
EXIT_RULES = ("maxProb", "entropy")  # disagreement needs two models: cascades only
MAX_REUSE_ENTRIES = 100_000


@dataclass(frozen=True)
class OffloadSpec:
    """`spec.offload`: a device-side cascade (small model(s) first, escalating the
    input the rule is not confident about) calibrated for `target_accuracy` on
    held-out data, and result reuse at the first stage after the device, its distance
    threshold calibrated for at most `reuse_max_accuracy_loss`."""

    cascade_rule: str | None = None
    target_accuracy: float | None = None
    reuse_entries: int = 0  # 0: no reuse
    reuse_max_accuracy_loss: float = 0.005
    # early exits: the stages are cut from the model with its exit heads; the stage
    # computing an exit answers when confident (thresholds for exits_target_accuracy)
    exits_rule: str | None = None
    exits_target_accuracy: float | None = None


def _judged(
    data: Mapping[str, Any], key: str, rules: tuple[str, ...]
) -> tuple[str | None, float | None]:
    """`spec.offload.<key>`'s rule and target accuracy (both None when it is absent)."""
    if key not in data:
        return None, None
    field = f"spec.offload.{key}"
    section = spec_mapping(data[key], field)
    reject_unknown(section, field, ("rule", "targetAccuracy"))
    rule = spec_choice(section.get("rule", "maxProb"), f"{field}.rule", rules)
    target = _number(
        section.get("targetAccuracy"), f"{field}.targetAccuracy", positive=False, at_most=1.0
    )
    if target is None:
        raise SpecError(f"{field}.targetAccuracy", "is required", "a number in [0, 1]")
    return rule, target


def _offload(spec: Mapping[str, Any]) -> OffloadSpec | None:
    if "offload" not in spec:
        return None
    data = spec_mapping(spec["offload"], "spec.offload")
    reject_unknown(data, "spec.offload", ("cascade", "exits", "reuse"))
    if not data:
        raise SpecError("spec.offload", "is empty", "cascade, exits, reuse or a mix")
    rule, target = _judged(data, "cascade", CASCADE_RULES)
    exits_rule, exits_target = _judged(data, "exits", EXIT_RULES)
    if exits_rule is not None and rule is not None and rule != exits_rule:
        raise SpecError(
            "spec.offload.exits.rule",
            f"{exits_rule} differs from spec.offload.cascade.rule {rule} (the device "
            "stage judges both with one rule)",
            f"rule: {rule} here too (maxProb or entropy in both)",
        )
    entries, loss = 0, 0.005
    if "reuse" in data:
        reuse = spec_mapping(data["reuse"], "spec.offload.reuse")
        reject_unknown(reuse, "spec.offload.reuse", ("maxEntries", "maxAccuracyLoss"))
        entries = spec_integer(
            reuse.get("maxEntries"), "spec.offload.reuse.maxEntries", 1, MAX_REUSE_ENTRIES, 256
        )
        found = _number(
            reuse.get("maxAccuracyLoss"),
            "spec.offload.reuse.maxAccuracyLoss",
            positive=False,
            at_most=0.2,
            default=0.005,
        )
        loss = 0.005 if found is None else found
    return OffloadSpec(rule, target, entries, loss, exits_rule, exits_target)


@dataclass(frozen=True)
class DeploymentSpec:
    name: str
    model_ref: str | None
    zoo: str | None
    variant: str | None
    slo_latency_ms: float | None
    slo_throughput_rps: float | None
    min_accuracy: float | None
    objective: str
    tiers: tuple[str, ...]
    partitioning: str
    adaptive_split: bool
    # how stages forward to the next one: http (REST, binary tensors) or grpc
    transport: str
    # device: the device stage answers with the whole model when the next stage fails
    # or is later than fallback_after_ms
    fallback: str
    fallback_after_ms: int
    raw_input_stays_on_device: bool
    feature_noise_std: float
    # the stages after the device serve layers fine-tuned on the noisy features
    noise_training: bool
    # the noise std is the largest that keeps this accuracy (noise_training.std_for_floor)
    noise_accuracy_floor: float | None
    # the stage after the device evaluates the model's last dense layer on the device's
    # CKKS ciphertexts (edgeai_worker.he)
    homomorphic_head: bool
    compute_watts: float | None
    tx_watts: float
    rx_watts: float
    idle_watts: float
    edge_cost_per_ms: float
    cloud_cost_per_ms: float
    device_selector: Mapping[str, str]
    autoscaling: Autoscaling
    sharing: str | None  # backbone, or None: this deployment's own workloads
    priority: int
    skip_unchanged_threshold: float
    # spec.security (securityspec.py)
    security: SecuritySpec = field(default_factory=SecuritySpec)
    offload: OffloadSpec | None = None

    def slo_dict(self) -> dict[str, Any]:
        slo: dict[str, Any] = {}
        if self.slo_latency_ms is not None:
            slo["latencyP95Ms"] = self.slo_latency_ms
        if self.slo_throughput_rps is not None:
            slo["throughputRps"] = self.slo_throughput_rps
        if self.min_accuracy is not None:
            slo["minAccuracy"] = self.min_accuracy
        return slo


def spec_mapping(value: Any, path: str, *, required: bool = False) -> dict[str, Any]:
    """`value` as a dict; SpecError naming `path` when it is missing (and required)
    or not a mapping."""
    if value is None:
        if required:
            raise SpecError(path, "is required", "a mapping")
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(path, f"must be a mapping, got {type(value).__name__}", "a mapping")
    return dict(value)


def reject_unknown(data: Mapping[str, Any], path: str, known: tuple[str, ...]) -> None:
    """SpecError naming `path` when `data` holds keys outside `known`."""
    extra = sorted(set(data) - set(known))
    if extra:
        raise SpecError(path, f"unknown field(s) {extra}", ", ".join(known))


def _number(
    value: Any,
    field: str,
    *,
    positive: bool = True,
    at_most: float | None = None,
    below: float | None = None,
    default: float | None = None,
) -> float | None:
    if value is None:
        return default
    low = "> 0" if positive else ">= 0"
    accepted = f"a number {low}" + (f" and <= {at_most:g}" if at_most is not None else "")
    accepted += f" and < {below:g}" if below is not None else ""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(field, f"must be a number, got {value!r}", accepted)
    number = float(value)
    if number != number or (number <= 0 if positive else number < 0):
        raise SpecError(
            field,
            f"must be {'a positive' if positive else 'a non-negative'} number, got {value!r}",
            accepted,
        )
    if at_most is not None and number > at_most:
        raise SpecError(field, f"must be at most {at_most:g}, got {value!r}", accepted)
    if below is not None and number >= below:
        raise SpecError(field, f"must be below {below:g}, got {value!r}", accepted)
    return number


def spec_integer(value: Any, path: str, low: int, high: int, default: int) -> int:
    """An integer field in [low, high], `default` when absent; SpecError naming `path`."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpecError(
            path, f"must be an integer in [{low}, {high}], got {value!r}", f"{low} to {high}"
        )
    return value


def spec_choice(value: Any, path: str, accepted: tuple[Any, ...]) -> Any:
    """`value` if it is one of `accepted`; SpecError naming `path` otherwise."""
    if isinstance(value, bool) or value not in accepted:
        raise SpecError(path, f"unknown value {value!r}", ", ".join(str(a) for a in accepted))
    return value


def _bool(value: Any, field: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise SpecError(field, f"must be true or false, got {value!r}", "true, false")
    return value


def parse_deployment(doc: Any) -> DeploymentSpec:
    """Validates a DNNDeployment document (as loaded from YAML)."""
    if not isinstance(doc, Mapping):
        raise SpecError("DNNDeployment", "must be a mapping", "a DNNDeployment manifest")
    kind = doc.get("kind")
    if kind != "DNNDeployment":
        raise SpecError("kind", f"must be DNNDeployment, got {kind!r}", "DNNDeployment")
    api = doc.get("apiVersion")
    if api is not None and (not isinstance(api, str) or api.split("/")[0] != API_GROUP):
        raise SpecError("apiVersion", f"unexpected {api!r}", f"{API_GROUP}/v1alpha1")
    meta = spec_mapping(doc.get("metadata"), "metadata", required=True)
    name = meta.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise SpecError(
            "metadata.name",
            f"invalid name {name!r}",
            "a DNS subdomain: lower-case letters, digits, '-' and '.'",
        )
    spec = spec_mapping(doc.get("spec"), "spec", required=True)
    reject_unknown(spec, "spec", _SPEC_FIELDS)

    model_ref: str | None = None
    zoo: str | None = None
    variant: str | None = None
    if "modelRef" in spec and "model" in spec:
        raise SpecError(
            "spec.model", "set either spec.modelRef or spec.model, not both", "one of them"
        )
    if "modelRef" in spec:
        ref = spec_mapping(spec["modelRef"], "spec.modelRef")
        reject_unknown(ref, "spec.modelRef", ("name",))
        model_ref = ref.get("name")
        if not isinstance(model_ref, str) or not _NAME.match(model_ref):
            raise SpecError(
                "spec.modelRef.name", f"invalid name {model_ref!r}", "the name of a DNNModel"
            )
    elif "model" in spec:
        model = spec_mapping(spec["model"], "spec.model")
        reject_unknown(model, "spec.model", ("zoo", "variant"))
        zoo = model.get("zoo")
        if not isinstance(zoo, str) or not _ZOO.match(zoo):
            raise SpecError(
                "spec.model.zoo",
                f"invalid zoo model name {zoo!r}",
                "a zoo model name such as mobilenet_v2",
            )
        raw_variant = model.get("variant")
        if raw_variant is not None and not isinstance(raw_variant, str):
            raise SpecError(
                "spec.model.variant",
                f"must be a string, got {raw_variant!r}",
                "a variant name such as fp32, int8",
            )
        variant = raw_variant
    else:
        raise SpecError(
            "spec.modelRef",
            "is required (or spec.model)",
            "modelRef: {name: <DNNModel>} or model: {zoo: <name>}",
        )

    slo = spec_mapping(spec.get("slo"), "spec.slo")
    reject_unknown(slo, "spec.slo", ("latencyP95Ms", "throughputRps", "minAccuracy"))
    latency = _number(slo.get("latencyP95Ms"), "spec.slo.latencyP95Ms")
    throughput = _number(slo.get("throughputRps"), "spec.slo.throughputRps")
    accuracy = _number(slo.get("minAccuracy"), "spec.slo.minAccuracy", positive=False, at_most=1.0)

    objective = spec_choice(spec.get("objective", "latency"), "spec.objective", OBJECTIVES)

    placement = spec_mapping(spec.get("placement"), "spec.placement")
    reject_unknown(
        placement,
        "spec.placement",
        ("tiers", "partitioning", "adaptiveSplit", "transport", "fallback", "fallbackAfterMs"),
    )
    tiers_raw = placement.get("tiers", list(TIERS))
    if not isinstance(tiers_raw, list) or not tiers_raw:
        raise SpecError(
            "spec.placement.tiers", f"must be a non-empty list, got {tiers_raw!r}", ", ".join(TIERS)
        )
    for i, tier in enumerate(tiers_raw):
        if tier not in TIERS:
            raise SpecError(
                f"spec.placement.tiers[{i}]", f"unknown tier {tier!r}", ", ".join(TIERS)
            )
    if len(set(tiers_raw)) != len(tiers_raw):
        raise SpecError("spec.placement.tiers", f"tiers repeat in {tiers_raw}", "distinct tiers")
    partitioning = spec_choice(
        placement.get("partitioning", "auto"), "spec.placement.partitioning", PARTITIONING
    )
    adaptive = _bool(placement.get("adaptiveSplit"), "spec.placement.adaptiveSplit", False)
    transport = spec_choice(
        placement.get("transport", "http"), "spec.placement.transport", TRANSPORTS
    )
    fallback = spec_choice(placement.get("fallback", "none"), "spec.placement.fallback", FALLBACKS)
    fallback_after_ms = spec_integer(
        placement.get("fallbackAfterMs"), "spec.placement.fallbackAfterMs", 10, 60000, 1000
    )

    privacy = spec_mapping(spec.get("privacy"), "spec.privacy")
    reject_unknown(
        privacy,
        "spec.privacy",
        (
            "rawInputStaysOnDevice",
            "featureNoiseStd",
            "noiseTraining",
            "noiseAccuracyFloor",
            "homomorphicHead",
        ),
    )
    raw = _bool(privacy.get("rawInputStaysOnDevice"), "spec.privacy.rawInputStaysOnDevice", False)
    noise = _number(
        privacy.get("featureNoiseStd"),
        "spec.privacy.featureNoiseStd",
        positive=False,
        at_most=10.0,
        default=0.0,
    )
    noise_training = _bool(privacy.get("noiseTraining"), "spec.privacy.noiseTraining", False)
    floor = _number(
        privacy.get("noiseAccuracyFloor"), "spec.privacy.noiseAccuracyFloor", at_most=1.0
    )
    if floor is not None and (not noise_training or noise):
        raise SpecError(
            "spec.privacy.noiseAccuracyFloor",
            "chooses the noise std for noiseTraining: it needs noiseTraining: true and "
            "no featureNoiseStd",
            "noiseTraining: true without featureNoiseStd, or no noiseAccuracyFloor",
        )
    if noise_training and not noise and floor is None:
        raise SpecError(
            "spec.privacy.noiseTraining",
            "needs spec.privacy.featureNoiseStd above 0 (the noise to train on) or "
            "spec.privacy.noiseAccuracyFloor (to choose it)",
            "a featureNoiseStd above 0, a noiseAccuracyFloor, or noiseTraining: false",
        )
    if raw and "device" not in tiers_raw:
        raise SpecError(
            "spec.privacy.rawInputStaysOnDevice",
            "needs the device tier, which spec.placement.tiers leaves out",
            "add device to spec.placement.tiers or set this to false",
        )

    preprocessing = spec_mapping(spec.get("preprocessing"), "spec.preprocessing")
    reject_unknown(preprocessing, "spec.preprocessing", ("skipUnchangedThreshold",))
    # the device stage compares frames with a fraction of the value range below 1
    skip = _number(
        preprocessing.get("skipUnchangedThreshold"),
        "spec.preprocessing.skipUnchangedThreshold",
        positive=False,
        below=1.0,
        default=0.0,
    )
    sharing = spec_choice(spec.get("sharing", "none"), "spec.sharing", SHARING)
    if transport == "grpc" and sharing == "backbone":
        raise SpecError(
            "spec.placement.transport",
            "grpc forwarding is not available for a shared backbone stage",
            "http with spec.sharing: backbone",
        )

    power = spec_mapping(spec.get("power"), "spec.power")
    reject_unknown(power, "spec.power", ("computeWatts", "txWatts", "rxWatts", "idleWatts"))
    cost = spec_mapping(spec.get("cost"), "spec.cost")
    reject_unknown(cost, "spec.cost", ("edgePerMs", "cloudPerMs"))

    def watts(key: str, default: float) -> float:
        value = _number(power.get(key), f"spec.power.{key}", positive=False, default=default)
        assert value is not None
        return value

    def per_ms(key: str, default: float) -> float:
        value = _number(cost.get(key), f"spec.cost.{key}", positive=False, default=default)
        assert value is not None
        return value

    offload = _offload(spec)
    homomorphic_head = _homomorphic_head(
        privacy, tiers_raw, partitioning, adaptive, noise_training, sharing, offload is not None
    )
    if offload is not None and offload.cascade_rule is not None and "device" not in tiers_raw:
        raise SpecError(
            "spec.offload.cascade",
            "needs the device tier, which spec.placement.tiers leaves out",
            "add device to spec.placement.tiers (the small model runs on the device)",
        )
    if offload is not None and offload.exits_rule is not None and adaptive:
        raise SpecError(
            "spec.offload.exits",
            "exit heads are cut into the planned stages only, not into the adaptive "
            "split's alternative partitions",
            "spec.placement.adaptiveSplit: false with exits",
        )
    if offload is not None and offload.reuse_entries and set(tiers_raw) == {"device"}:
        raise SpecError(
            "spec.offload.reuse",
            "needs an edge or cloud tier, which spec.placement.tiers leaves out",
            "add edge or cloud to spec.placement.tiers (results are reused after the device)",
        )

    return DeploymentSpec(
        name=name,
        model_ref=model_ref,
        zoo=zoo,
        variant=variant,
        slo_latency_ms=latency,
        slo_throughput_rps=throughput,
        min_accuracy=accuracy,
        objective=objective,
        tiers=tuple(tiers_raw),
        partitioning=partitioning,
        adaptive_split=adaptive,
        transport=transport,
        fallback=fallback,
        fallback_after_ms=fallback_after_ms,
        raw_input_stays_on_device=raw,
        feature_noise_std=noise or 0.0,
        noise_training=noise_training,
        noise_accuracy_floor=floor,
        homomorphic_head=homomorphic_head,
        compute_watts=_number(power.get("computeWatts"), "spec.power.computeWatts"),
        tx_watts=watts("txWatts", 1.5),
        rx_watts=watts("rxWatts", 1.0),
        idle_watts=watts("idleWatts", 0.3),
        edge_cost_per_ms=per_ms("edgePerMs", 0.0),
        cloud_cost_per_ms=per_ms("cloudPerMs", 1.0),
        device_selector=_device_selector(spec),
        autoscaling=_autoscaling(spec),
        sharing=sharing if sharing != "none" else None,
        priority=spec_integer(spec.get("priority"), "spec.priority", 0, MAX_PRIORITY, 0),
        skip_unchanged_threshold=skip or 0.0,
        security=parse_security(spec, transport, sharing),
        offload=offload,
    )


def _homomorphic_head(
    privacy: Mapping[str, Any],
    tiers: Sequence[str],
    partitioning: str,
    adaptive: bool,
    noise_training: bool,
    sharing: str,
    offload: bool,
) -> bool:
    """spec.privacy.homomorphicHead.enabled, refused next to what it cannot serve with."""
    field = "spec.privacy.homomorphicHead"
    head = spec_mapping(privacy.get("homomorphicHead"), field)
    reject_unknown(head, field, ("enabled",))
    if not _bool(head.get("enabled"), f"{field}.enabled", False):
        return False
    conflicts = (
        (
            "device" not in tiers or len(tiers) < 2,
            "needs the device (which holds the key) and a tier above it in "
            f"spec.placement.tiers, got {list(tiers)}",
            "device and edge and/or cloud",
        ),
        (
            partitioning == "none",
            "splits the model before its last layer, which spec.placement.partitioning: "
            "none forbids",
            "partitioning: auto",
        ),
        (
            adaptive,
            "fixes the split before the last layer; spec.placement.adaptiveSplit would move it",
            "adaptiveSplit: false",
        ),
        (
            noise_training,
            "and spec.privacy.noiseTraining both change the stage after the device",
            "one of the two",
        ),
        (
            sharing == "backbone",
            "serves a stage of this deployment's own; spec.sharing: backbone shares it",
            "sharing: none",
        ),
        (
            offload,
            "answers with ciphertexts, which spec.offload's exits and reuse cannot read",
            "no spec.offload",
        ),
    )
    for conflict, problem, accepted in conflicts:
        if conflict:
            raise SpecError(field, problem, accepted)
    return True


def _device_selector(spec: Mapping[str, Any]) -> dict[str, str]:
    devices = spec_mapping(spec.get("devices"), "spec.devices")
    reject_unknown(devices, "spec.devices", ("nodeSelector",))
    selector = spec_mapping(devices.get("nodeSelector"), "spec.devices.nodeSelector")
    for key, value in selector.items():
        if not isinstance(value, str):
            raise SpecError(
                f"spec.devices.nodeSelector.{key}",
                f"must be a string, got {value!r}",
                "a label value",
            )
    return {str(k): v for k, v in selector.items()}


def _autoscaling(spec: Mapping[str, Any]) -> Autoscaling:
    data = spec_mapping(spec.get("autoscaling"), "spec.autoscaling")
    reject_unknown(
        data,
        "spec.autoscaling",
        (
            "minReplicas",
            "maxReplicas",
            "stableWindowSeconds",
            "panicWindowSeconds",
            "scaleDownDelaySeconds",
        ),
    )

    def seconds(key: str, low: int, high: int, default: int) -> int:
        return spec_integer(data.get(key), f"spec.autoscaling.{key}", low, high, default)

    policy = Autoscaling(
        min_replicas=seconds("minReplicas", 0, MAX_REPLICAS, 1),
        max_replicas=seconds("maxReplicas", 1, MAX_REPLICAS, 8),
        stable_window_s=seconds("stableWindowSeconds", 2, 3600, 60),
        panic_window_s=seconds("panicWindowSeconds", 1, 600, 6),
        scale_down_delay_s=seconds("scaleDownDelaySeconds", 0, 3600, 30),
    )
    if policy.min_replicas > policy.max_replicas:
        raise SpecError(
            "spec.autoscaling.minReplicas",
            f"{policy.min_replicas} exceeds maxReplicas {policy.max_replicas}",
            "at most maxReplicas",
        )
    return policy


def load_deployment(path: str | Path) -> DeploymentSpec:
    """Reads the first DNNDeployment of a YAML file (other documents are skipped)."""
    docs = read_yaml_documents(path, "-f")
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == "DNNDeployment":
            return parse_deployment(doc)
    if len(docs) == 1:
        return parse_deployment(docs[0])
    raise SpecError("-f", f"{path} holds no DNNDeployment", "a file with kind: DNNDeployment")
