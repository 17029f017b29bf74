"""DNNTrainingJob specs the API server (CRD schema and CEL rules) and the training
processes' parser must both refuse, each with the field the refusal names; and the
held-out accuracy of an exported model."""

from __future__ import annotations

from typing import Any

import numpy as np


def held_out_accuracy(path: str) -> float:
    """Top-1 accuracy of the ONNX model at `path` on the training engine's held-out set."""
    import onnxruntime as ort

    from edgeai_worker.training.data import held_out

    x, y = held_out()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x})
    return float((np.asarray(logits).argmax(axis=1) == y).mean())


GOOD: dict[str, Any] = {
    "model": {"zoo": "digits_cnn"},
    "data": {"builtin": "digits", "split": {"kind": "dirichlet", "alpha": 0.5}},
    "workers": {"nodeSelector": {"app": "camera"}, "count": 4},
    "aggregator": {"tier": "edge"},
    "algorithm": {
        "mode": "easgd",
        "localSteps": 2,
        "learningRate": 0.1,
        "batchSize": 16,
        "movingRate": 0.4,
        "participation": 0.5,
        "gossipPeers": "ring",
    },
    "compression": {"kind": "topk", "ratio": 0.01, "errorFeedback": True},
    "privacy": {"clipNorm": 1.0, "noiseMultiplier": 0.5, "delta": 1e-5},
    "stop": {"targetAccuracy": 0.95, "maxRounds": 200},
    "faults": {"roundTimeoutSeconds": 5},
    "checkpoint": {"everyRounds": 10},
    "seed": 3,
}


def _with(section: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (base or GOOD).items()}
    if isinstance(value, dict) and isinstance(spec.get(section), dict):
        spec[section] = {**spec[section], **value}
    else:
        spec[section] = value
    return spec


_GOSSIP = {k: v for k, v in GOOD.items() if k not in ("aggregator", "compression")}
_GOSSIP["algorithm"] = {"mode": "gossip"}

# (case, spec, the field both refusals name)
BAD: list[tuple[str, dict[str, Any], str]] = [
    ("gossip compressed", _with("compression", {"kind": "sign"}, _GOSSIP), "compression.kind"),
    (
        "codistillation compressed",
        _with("algorithm", {"mode": "codistillation"}),
        "compression.kind",
    ),
    ("gossip aggregator", _with("aggregator", {"tier": "edge"}, _GOSSIP), "aggregator"),
    (
        "dirichlet without alpha",
        _with("data", {"split": {"kind": "dirichlet"}}),
        "data.split.alpha",
    ),
    ("iid with alpha", _with("data", {"split": {"kind": "iid", "alpha": 1}}), "data.split.alpha"),
    ("moving rate", _with("algorithm", {"movingRate": 2}), "algorithm.movingRate"),
    ("participation", _with("algorithm", {"participation": 0}), "algorithm.participation"),
    ("gossip peers", _with("algorithm", {"gossipPeers": "star"}), "algorithm.gossipPeers"),
    ("local steps", _with("algorithm", {"localSteps": 0}), "algorithm.localSteps"),
    ("privacy delta", _with("privacy", {"delta": 0.5}), "privacy.delta"),
    ("privacy clip", {**GOOD, "privacy": {"noiseMultiplier": 1}}, "privacy.clipNorm"),
    ("round timeout", _with("faults", {"roundTimeoutSeconds": 0}), "faults.roundTimeoutSeconds"),
    ("checkpoint", _with("checkpoint", {"everyRounds": 0}), "checkpoint.everyRounds"),
    ("seed", _with("seed", "three"), "seed"),
    ("aggregator tier", _with("aggregator", {"tier": "device"}), "aggregator.tier"),
    ("workers count", _with("workers", {"count": 0}), "workers.count"),
    ("unknown field", _with("algorithm", {"momentum": 0.9}), "algorithm.momentum"),
]
