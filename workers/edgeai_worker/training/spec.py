"""The training job's spec: the `spec` of a DNNTrainingJob, parsed once into a typed
dataclass. Every error names the field, what was wrong and what is accepted, so the
operator can pass the custom resource's spec straight through (a JSON file)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MODES = ("syncSGD", "asyncSGD", "easgd", "fedavg", "codistillation", "gossip")
COMPRESSIONS = ("none", "qsgd", "int8", "sign", "topk", "threshold")
SPLITS = ("iid", "dirichlet")
MODELS = ("digits_cnn",)


class TrainingSpecError(ValueError):
    """A spec field that cannot be used: which field, what is wrong, what is accepted."""

    def __init__(self, field: str, problem: str, accepted: str) -> None:
        super().__init__(f"spec.{field}: {problem} (accepted: {accepted})")
        self.field = field
        self.problem = problem
        self.accepted = accepted


@dataclass(frozen=True)
class DataSpec:
    split: str = "iid"
    alpha: float = 0.5  # Dirichlet concentration, for split "dirichlet"


@dataclass(frozen=True)
class AlgorithmSpec:
    mode: str
    local_steps: int = 1
    learning_rate: float = 0.05
    batch_size: int = 32
    moving_rate: float = 0.5  # EASGD's alpha: how far worker and centre move to each other
    participation: float = 1.0  # FedAvg: the fraction of workers asked each round
    gossip_peers: str = "ring"  # gossip: "ring" or "random"


@dataclass(frozen=True)
class CompressionSpec:
    kind: str = "none"
    ratio: float = 0.01  # topk: fraction kept; threshold: kept magnitude over the max
    error_feedback: bool = True


@dataclass(frozen=True)
class PrivacySpec:
    clip_norm: float
    noise_multiplier: float
    delta: float = 1e-5


@dataclass(frozen=True)
class StopSpec:
    target_accuracy: float = 1.0
    max_rounds: int = 100


@dataclass(frozen=True)
class TrainingSpec:
    algorithm: AlgorithmSpec
    model: str = "digits_cnn"
    data: DataSpec = DataSpec()
    workers: int = 4
    compression: CompressionSpec = CompressionSpec()
    privacy: PrivacySpec | None = None
    stop: StopSpec = StopSpec()
    round_timeout_s: float = 10.0  # a worker that has not answered by then is dropped
    checkpoint_every: int = 10  # rounds between the aggregator's checkpoints
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The CRD-shaped spec this was parsed from (round-trips through parse_spec)."""
        a, c = self.algorithm, self.compression
        out: dict[str, Any] = {
            "model": {"zoo": self.model},
            "data": {"builtin": "digits", "split": {"kind": self.data.split}},
            "workers": {"count": self.workers},
            "algorithm": {
                "mode": a.mode,
                "localSteps": a.local_steps,
                "learningRate": a.learning_rate,
                "batchSize": a.batch_size,
                "movingRate": a.moving_rate,
                "participation": a.participation,
                "gossipPeers": a.gossip_peers,
            },
            "compression": {"kind": c.kind, "ratio": c.ratio, "errorFeedback": c.error_feedback},
            "stop": {
                "targetAccuracy": self.stop.target_accuracy,
                "maxRounds": self.stop.max_rounds,
            },
            "faults": {"roundTimeoutSeconds": self.round_timeout_s},
            "checkpoint": {"everyRounds": self.checkpoint_every},
            "seed": self.seed,
        }
        if self.data.split == "dirichlet":
            out["data"]["split"]["alpha"] = self.data.alpha
        if self.privacy is not None:
            p = asdict(self.privacy)
            out["privacy"] = {
                "clipNorm": p["clip_norm"],
                "noiseMultiplier": p["noise_multiplier"],
                "delta": p["delta"],
            }
        return out


# --- parsing ------------------------------------------------------------------------------


def _section(spec: Mapping[str, Any], name: str, keys: tuple[str, ...]) -> Mapping[str, Any]:
    value = spec.get(name, {})
    if not isinstance(value, Mapping):
        raise TrainingSpecError(name, f"is {type(value).__name__}", "an object")
    for key in value:
        if key not in keys:
            raise TrainingSpecError(f"{name}.{key}", "is not a known field", ", ".join(keys))
    return value


def _number(
    section: Mapping[str, Any],
    where: str,
    key: str,
    default: float,
    *,
    low: float,
    high: float | None = None,
    low_open: bool = False,
) -> float:
    value = section.get(key, default)
    field = f"{where}.{key}"
    bounds = f"a number {'>' if low_open else '>='} {low:g}" + (
        f" and <= {high:g}" if high is not None else ""
    )
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TrainingSpecError(field, f"is {value!r}", bounds)
    if value < low or (low_open and value == low) or (high is not None and value > high):
        raise TrainingSpecError(field, f"is {value!r}", bounds)
    return float(value)


def _integer(
    section: Mapping[str, Any], where: str, key: str, default: int, *, low: int, high: int
) -> int:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise TrainingSpecError(f"{where}.{key}", f"is {value!r}", f"an integer {low}..{high}")
    return value


def _choice(
    section: Mapping[str, Any], where: str, key: str, default: str, options: tuple[str, ...]
) -> str:
    value = section.get(key, default)
    if value not in options:
        raise TrainingSpecError(f"{where}.{key}", f"is {value!r}", ", ".join(options))
    return str(value)


_TOP = (
    "model",
    "data",
    "workers",
    "aggregator",
    "algorithm",
    "compression",
    "privacy",
    "stop",
    "faults",
    "checkpoint",
    "seed",
)


def parse_spec(spec: Mapping[str, Any]) -> TrainingSpec:
    """A DNNTrainingJob `spec` (a mapping as in the CRD) as a TrainingSpec. Raises
    TrainingSpecError naming the first field that cannot be used."""
    if not isinstance(spec, Mapping):
        raise TrainingSpecError("", f"is {type(spec).__name__}", "an object")
    for key in spec:
        if key not in _TOP:
            raise TrainingSpecError(str(key), "is not a known field", ", ".join(_TOP))
    if "algorithm" not in spec:
        raise TrainingSpecError("algorithm", "is missing", "an object with mode")
    model = _section(spec, "model", ("zoo",))
    zoo = _choice(model, "model", "zoo", "digits_cnn", MODELS)

    data = _section(spec, "data", ("builtin", "split"))
    _choice(data, "data", "builtin", "digits", ("digits",))
    split = data.get("split", {})
    if not isinstance(split, Mapping):
        raise TrainingSpecError("data.split", f"is {type(split).__name__}", "an object")
    for key in split:
        if key not in ("kind", "alpha"):
            raise TrainingSpecError(f"data.split.{key}", "is not a known field", "kind, alpha")
    kind = _choice(split, "data.split", "kind", "iid", SPLITS)
    if kind == "dirichlet" and "alpha" not in split:
        raise TrainingSpecError("data.split.alpha", "is missing for kind dirichlet", "a number > 0")
    if kind != "dirichlet" and "alpha" in split:
        raise TrainingSpecError(
            "data.split.alpha", f"is set but kind is {kind!r}", "alpha only with kind dirichlet"
        )
    alpha = _number(split, "data.split", "alpha", 0.5, low=0.0, low_open=True)

    workers = _section(spec, "workers", ("nodeSelector", "count"))
    count = _integer(workers, "workers", "count", 4, low=1, high=1000)

    algo = _section(
        spec,
        "algorithm",
        (
            "mode",
            "localSteps",
            "learningRate",
            "batchSize",
            "movingRate",
            "participation",
            "gossipPeers",
        ),
    )
    if "mode" not in algo:
        raise TrainingSpecError("algorithm.mode", "is missing", ", ".join(MODES))
    algorithm = AlgorithmSpec(
        mode=_choice(algo, "algorithm", "mode", "", MODES),
        local_steps=_integer(algo, "algorithm", "localSteps", 1, low=1, high=10_000),
        learning_rate=_number(algo, "algorithm", "learningRate", 0.05, low=0.0, low_open=True),
        batch_size=_integer(algo, "algorithm", "batchSize", 32, low=1, high=100_000),
        moving_rate=_number(algo, "algorithm", "movingRate", 0.5, low=0.0, high=1.0, low_open=True),
        participation=_number(
            algo, "algorithm", "participation", 1.0, low=0.0, high=1.0, low_open=True
        ),
        gossip_peers=_choice(algo, "algorithm", "gossipPeers", "ring", ("ring", "random")),
    )

    aggregator = _section(spec, "aggregator", ("tier",))
    _choice(aggregator, "aggregator", "tier", "edge", ("edge", "cloud"))
    if algorithm.mode == "gossip" and "aggregator" in spec:
        raise TrainingSpecError(
            "aggregator", "is set but gossip has no aggregator", "no aggregator section for gossip"
        )

    comp = _section(spec, "compression", ("kind", "ratio", "errorFeedback"))
    ef = comp.get("errorFeedback", True)
    if not isinstance(ef, bool):
        raise TrainingSpecError("compression.errorFeedback", f"is {ef!r}", "true or false")
    compression = CompressionSpec(
        kind=_choice(comp, "compression", "kind", "none", COMPRESSIONS),
        ratio=_number(comp, "compression", "ratio", 0.01, low=0.0, high=1.0, low_open=True),
        error_feedback=ef,
    )
    if algorithm.mode in ("codistillation", "gossip") and compression.kind != "none":
        what = "predictions" if algorithm.mode == "codistillation" else "whole weights"
        raise TrainingSpecError(
            "compression.kind",
            f"is {compression.kind!r} but {algorithm.mode} exchanges {what}, not updates",
            "none (or leave compression out)",
        )

    privacy: PrivacySpec | None = None
    if "privacy" in spec:
        priv = _section(spec, "privacy", ("clipNorm", "noiseMultiplier", "delta"))
        if "clipNorm" not in priv:
            raise TrainingSpecError("privacy.clipNorm", "is missing", "a number > 0")
        privacy = PrivacySpec(
            clip_norm=_number(priv, "privacy", "clipNorm", 1.0, low=0.0, low_open=True),
            noise_multiplier=_number(priv, "privacy", "noiseMultiplier", 1.0, low=0.0),
            delta=_number(priv, "privacy", "delta", 1e-5, low=0.0, high=0.1, low_open=True),
        )

    stop = _section(spec, "stop", ("targetAccuracy", "maxRounds"))
    faults = _section(spec, "faults", ("roundTimeoutSeconds",))
    checkpoint = _section(spec, "checkpoint", ("everyRounds",))
    seed = spec.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TrainingSpecError("seed", f"is {seed!r}", "an integer")
    return TrainingSpec(
        algorithm=algorithm,
        model=zoo,
        data=DataSpec(split=kind, alpha=alpha),
        workers=count,
        compression=compression,
        privacy=privacy,
        stop=StopSpec(
            target_accuracy=_number(stop, "stop", "targetAccuracy", 1.0, low=0.0, high=1.0),
            max_rounds=_integer(stop, "stop", "maxRounds", 100, low=1, high=1_000_000),
        ),
        round_timeout_s=_number(
            faults, "faults", "roundTimeoutSeconds", 10.0, low=0.0, high=3600.0, low_open=True
        ),
        checkpoint_every=_integer(
            checkpoint, "checkpoint", "everyRounds", 10, low=1, high=1_000_000
        ),
        seed=seed,
    )


def with_sections(raw: Mapping[str, Any], **sections: Any) -> dict[str, Any]:
    """`raw` with each section's fields replaced (a dict value) or the field set."""
    out: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for key, value in sections.items():
        if isinstance(value, Mapping):
            out.setdefault(key, {}).update(value)
        else:
            out[key] = value
    return out


def load_spec(path: str | Path) -> TrainingSpec:
    """The spec from a JSON file (a DNNTrainingJob's `spec`, or the whole object)."""
    try:
        raw = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise TrainingSpecError("", f"{path} is not JSON: {err}", "a JSON object") from err
    if isinstance(raw, Mapping) and "spec" in raw and "apiVersion" in raw:
        raw = raw["spec"]
    return parse_spec(raw)
