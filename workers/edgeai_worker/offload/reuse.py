"""Result reuse: a bounded cache of recent (features -> result) pairs with approximate
matching.

Users of one area send similar inputs (a camera sees the same scene, neighbours ask
about the same things), so a stage may answer a request with the result of an earlier
one whose features lie within a distance threshold of its own (nearest neighbour, RMS
distance over the flattened tensor). Entries are keyed by the model's digest: a result
of one model version is never served for another. The cache holds at most `capacity`
entries over all digests and evicts the least recently used.

`calibrate_distance` picks the largest threshold whose accuracy cost on a labelled
validation stream stays within a bound.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")


def rms_distance(keys: np.ndarray, key: np.ndarray) -> np.ndarray:
    """RMS difference of each row of `keys` to `key` (so the threshold does not depend
    on the number of elements)."""
    diff = keys - key[None, :]
    result: np.ndarray = np.sqrt(np.mean(diff * diff, axis=1))
    return result


@dataclass
class _Entry(Generic[T]):
    digest: str
    key: np.ndarray
    value: T


class ReuseCache(Generic[T]):
    """At most `capacity` entries; a lookup hits the nearest entry of the same digest
    and key size whose distance is at most `max_distance`."""

    def __init__(self, capacity: int, max_distance: float) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        if max_distance < 0:
            raise ValueError(f"max_distance must not be negative, got {max_distance}")
        self.capacity = capacity
        self.max_distance = max_distance
        self._entries: OrderedDict[int, _Entry[T]] = OrderedDict()
        self._next_id = 0
        self.lookups = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _flat(key: np.ndarray) -> np.ndarray:
        return np.asarray(key, dtype=np.float32).reshape(-1)

    def lookup(self, digest: str, key: np.ndarray) -> tuple[T, float] | None:
        """The value and distance of the nearest entry of `digest` within the
        threshold, or None (counted as a lookup either way)."""
        self.lookups += 1
        flat = self._flat(key)
        ids = [
            i for i, e in self._entries.items() if e.digest == digest and e.key.shape == flat.shape
        ]
        if not ids:
            return None
        distances = rms_distance(np.stack([self._entries[i].key for i in ids]), flat)
        best = int(np.argmin(distances))
        if float(distances[best]) > self.max_distance:
            return None
        self.hits += 1
        self._entries.move_to_end(ids[best])
        return self._entries[ids[best]].value, float(distances[best])

    def insert(self, digest: str, key: np.ndarray, value: T) -> None:
        self._entries[self._next_id] = _Entry(digest, self._flat(key).copy(), value)
        self._next_id += 1
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def digests(self) -> set[str]:
        return {e.digest for e in self._entries.values()}

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


@dataclass(frozen=True)
class ReuseCalibration:
    max_distance: float
    hit_rate: float
    accuracy_loss: float  # accuracy without reuse minus with it, on the stream
    samples: int


def simulate_reuse(
    keys: Sequence[np.ndarray],
    predictions: Sequence[int],
    labels: Sequence[int],
    capacity: int,
    max_distance: float,
) -> tuple[float, float]:
    """(hit rate, accuracy with reuse) of a stream answered by a model whose answers
    are `predictions`, through a cache of `capacity` entries at `max_distance`."""
    cache: ReuseCache[int] = ReuseCache(capacity, max_distance)
    right = 0
    for key, predicted, label in zip(keys, predictions, labels, strict=True):
        found = cache.lookup("calibration", key)
        answer = found[0] if found is not None else predicted
        if found is None:
            cache.insert("calibration", key, predicted)
        right += int(answer == label)
    n = len(labels)
    return cache.hit_rate, (right / n if n else 0.0)


def calibrate_distance(
    keys: Sequence[np.ndarray],
    predictions: Sequence[int],
    labels: Sequence[int],
    capacity: int,
    max_accuracy_loss: float,
    candidates: int = 24,
) -> ReuseCalibration:
    """The largest distance threshold (among quantiles of the stream's nearest-earlier
    distances) whose accuracy loss against no reuse is at most `max_accuracy_loss`."""
    n = len(labels)
    base = sum(int(p == y) for p, y in zip(predictions, labels, strict=True)) / n if n else 0.0
    flat = [np.asarray(k, dtype=np.float32).reshape(-1) for k in keys]
    nearest = [
        float(rms_distance(np.stack(flat[max(0, i - capacity) : i]), flat[i]).min())
        for i in range(1, n)
    ]
    grid = sorted({0.0, *np.quantile(nearest, np.linspace(0, 1, candidates)).tolist()})
    best = ReuseCalibration(0.0, *_outcome(flat, predictions, labels, capacity, 0.0, base), n)
    for threshold in grid:
        hit_rate, loss = _outcome(flat, predictions, labels, capacity, threshold, base)
        if loss <= max_accuracy_loss and threshold >= best.max_distance:
            best = ReuseCalibration(float(threshold), hit_rate, loss, n)
    return best


def _outcome(
    keys: Sequence[np.ndarray],
    predictions: Sequence[int],
    labels: Sequence[int],
    capacity: int,
    threshold: float,
    base: float,
) -> tuple[float, float]:
    hit_rate, accuracy = simulate_reuse(keys, predictions, labels, capacity, threshold)
    return hit_rate, base - accuracy
