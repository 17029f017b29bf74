"""Confidence of a classifier's answer and the thresholds that decide who answers.

A stage (an early exit inside the model, or the small model of a cascade) answers a
request itself when its confidence reaches the threshold, and escalates it otherwise.
Confidence is in [0, 1], higher is surer, under one of the rules:

- `maxProb`: the largest softmax probability;
- `entropy`: 1 - H(p) / log(K), the softmax's entropy scaled to [0, 1] and flipped;
- `disagreement` (a cascade with two small models): the first model's max probability
  when both agree on the class, 0 when they disagree, so any disagreement escalates.

`calibrate_thresholds` picks, on labelled validation data, the lowest threshold per exit
(in order) that keeps the accuracy of the whole mix at or above a target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RULES = ("maxProb", "entropy", "disagreement")
NEVER = 1.01  # a threshold no confidence reaches: the exit never answers


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (batch, classes) logits (any leading shape, classes last)."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    result: np.ndarray = exp / exp.sum(axis=-1, keepdims=True)
    return result


def confidence(logits: np.ndarray, rule: str, second: np.ndarray | None = None) -> np.ndarray:
    """Confidence per row of `logits` under `rule` (`second`: the other small model's
    logits, for `disagreement`)."""
    flat = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1)
    p = softmax(flat)
    if rule == "maxProb":
        result: np.ndarray = p.max(axis=1)
        return result
    if rule == "entropy":
        classes = p.shape[1]
        h = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=1)
        result = 1.0 - h / np.log(classes)
        return result
    if rule == "disagreement":
        if second is None:
            raise ValueError("the disagreement rule needs the second small model's logits")
        other = np.asarray(second, dtype=np.float64).reshape(len(second), -1)
        agree = p.argmax(axis=1) == other.argmax(axis=1)
        result = np.where(agree, p.max(axis=1), 0.0)
        return result
    raise ValueError(f"unknown confidence rule {rule!r} (accepted: {', '.join(RULES)})")


@dataclass(frozen=True)
class Calibration:
    """Thresholds per exit (in order) and what they gave on the validation data."""

    thresholds: tuple[float, ...]
    exit_rates: tuple[float, ...]  # fraction of inputs each exit answered
    accuracy: float  # of the mix
    final_accuracy: float  # of the final classifier alone
    samples: int


def mix_outcome(
    confidences: Sequence[np.ndarray],
    correct: Sequence[np.ndarray],
    final_correct: np.ndarray,
    thresholds: Sequence[float],
) -> tuple[np.ndarray, float]:
    """(answering exit per sample, len(thresholds) for the final classifier; accuracy)."""
    n = len(final_correct)
    answered_by = np.full(n, len(thresholds), dtype=np.int64)
    for k in reversed(range(len(thresholds))):
        answered_by[confidences[k] >= thresholds[k]] = k
    right = np.asarray(final_correct, dtype=bool).copy()
    for k in range(len(thresholds)):
        mask = answered_by == k
        right[mask] = np.asarray(correct[k], dtype=bool)[mask]
    return answered_by, (float(np.mean(right)) if n else 0.0)


def calibrate_thresholds(
    confidences: Sequence[np.ndarray],
    correct: Sequence[np.ndarray],
    final_correct: np.ndarray,
    target_accuracy: float,
) -> Calibration:
    """Per exit in order, the lowest threshold (among the observed confidences) that
    keeps the mix at or above `target_accuracy`, the later exits still closed; an exit
    no threshold allows is closed (`NEVER`). With the target above the final
    classifier's own accuracy every exit stays closed."""
    if not 0.0 <= target_accuracy <= 1.0:
        raise ValueError(f"target accuracy {target_accuracy} is not in [0, 1]")
    if len(confidences) != len(correct):
        raise ValueError("one correctness vector per exit is needed")
    chosen: list[float] = []
    for k in range(len(confidences)):
        candidates = np.unique(confidences[k])
        best = NEVER
        for t in candidates:  # ascending: the first that holds exits most
            trial = [*chosen, float(t), *[NEVER] * (len(confidences) - k - 1)]
            _, accuracy = mix_outcome(confidences, correct, final_correct, trial)
            if accuracy >= target_accuracy:
                best = float(t)
                break
        chosen.append(best)
    answered_by, accuracy = mix_outcome(confidences, correct, final_correct, chosen)
    n = len(final_correct)
    rates = tuple(float(np.mean(answered_by == k)) if n else 0.0 for k in range(len(chosen)))
    return Calibration(
        thresholds=tuple(chosen),
        exit_rates=rates,
        accuracy=accuracy,
        final_accuracy=float(np.mean(final_correct)) if n else 0.0,
        samples=n,
    )
