"""scikit-learn's digits split across workers: IID (a seeded shuffle dealt out evenly)
or non-IID (per class, Dirichlet(alpha) proportions over the workers). The held-out
set stays with the aggregator."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edgeai_worker.training.spec import DataSpec

if TYPE_CHECKING:
    from numpy.typing import NDArray

MIN_SHARD = 8  # every worker gets at least this many examples, whatever the split


def shard_indices(
    labels: NDArray[np.int64], workers: int, data: DataSpec, seed: int
) -> list[NDArray[np.int64]]:
    """Indices into the training set, one array per worker; together a partition."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    if data.split == "iid":
        order = rng.permutation(n)
        return [np.sort(part).astype(np.int64) for part in np.array_split(order, workers)]
    shards: list[list[int]] = [[] for _ in range(workers)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(workers, data.alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for worker, part in enumerate(np.split(members, cuts)):
            shards[worker].extend(int(i) for i in part)
    # A worker left (almost) empty by a small alpha takes examples from the largest shard.
    for worker in range(workers):
        while len(shards[worker]) < MIN_SHARD:
            donor = max(range(workers), key=lambda w: len(shards[w]))
            shards[worker].append(shards[donor].pop())
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]


def worker_shard(
    data: DataSpec, workers: int, index: int, seed: int
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """The training examples of worker `index` (0-based)."""
    from edgeai_worker.zoo import digits_split

    x_train, y_train, _, _ = digits_split()
    part = shard_indices(y_train, workers, data, seed)[index]
    return x_train[part], y_train[part]


def held_out() -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """The aggregator's test set (digits' fixed 25 % split)."""
    from edgeai_worker.zoo import digits_split

    _, _, x_test, y_test = digits_split()
    return x_test, y_test


def public_batch(size: int, seed: int) -> NDArray[np.float32]:
    """Codistillation's shared public inputs: unlabelled training images every worker
    can see (a seeded sample; their labels are never used)."""
    from edgeai_worker.zoo import digits_split

    x_train, _, _, _ = digits_split()
    rng = np.random.default_rng(seed + 7919)
    return x_train[rng.choice(len(x_train), size=min(size, len(x_train)), replace=False)]
