"""The aggregator's state as a pure state machine: updates are accepted, rounds are
closed, and nothing here does I/O, so a restarted aggregator rebuilds exactly the same
state by replaying its journal of accepted updates and round closes on top of its last
checkpoint."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeai_worker.training.compressors import as_vector, decode
from edgeai_worker.training.data import held_out, public_batch
from edgeai_worker.training.learner import accuracy, build_model, get_flat, set_flat
from edgeai_worker.training.spec import TrainingSpec

if TYPE_CHECKING:
    from numpy.typing import NDArray

    Vector = NDArray[np.float32]

PUBLIC_SIZE = 256  # codistillation's shared public batch


class UpdateRejected(ValueError):
    """An update the aggregator will not use (stale round, unknown worker, duplicate)."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Update:
    worker: int
    round: int  # the round (or, for asyncSGD, the model version) it was computed on
    kind: str
    payload: bytes
    loss: float
    samples: int
    wire_bytes: int
    seq: int  # the worker's own count of updates sent: a resent update is a duplicate
    incarnation: str  # which start of the worker process (a restarted worker counts anew)
    epsilon: float | None = None


def _softmax(logits: NDArray[np.float32]) -> NDArray[np.float32]:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return as_vector(e / e.sum(axis=1, keepdims=True))


@dataclass
class RoundState:
    spec: TrainingSpec
    params: Vector
    round: int = 0
    version: int = 0  # asyncSGD: updates applied so far
    pending: dict[int, Update] = field(default_factory=dict)
    last_seq: dict[int, tuple[str, int]] = field(default_factory=dict)
    alive: set[int] = field(default_factory=set)
    history: list[dict[str, Any]] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    dense_bytes_up: int = 0  # what the accepted updates would have taken uncompressed
    stragglers: int = 0
    epsilon: float | None = None
    teacher: NDArray[np.float32] | None = None  # codistillation: ensemble probabilities
    done: bool = False
    started: bool = False

    @classmethod
    def initial(cls, spec: TrainingSpec) -> RoundState:
        return cls(spec=spec, params=get_flat(build_model(spec)))

    # --- who takes part -----------------------------------------------------------------

    def selected(self, round_: int) -> set[int]:
        """The workers asked to train in `round_` (FedAvg's partial participation: a
        seeded sample per round, the same after a restart)."""
        count = self.spec.workers
        share = self.spec.algorithm.participation
        if self.spec.algorithm.mode != "fedavg" or share >= 1.0:
            return set(range(count))
        rng = np.random.default_rng([self.spec.seed, round_])
        take = max(1, math.ceil(share * count))
        return {int(i) for i in rng.choice(count, size=take, replace=False)}

    def expected(self) -> set[int]:
        return self.selected(self.round) & self.alive

    def round_complete(self) -> bool:
        expected = self.expected()
        return bool(expected) and expected <= set(self.pending)

    # --- updates ------------------------------------------------------------------------

    def accept(self, update: Update) -> None:
        """Takes an update into the open round (asyncSGD: applies it at once)."""
        if self.done:
            raise UpdateRejected("the job is done")
        if not 0 <= update.worker < self.spec.workers:
            raise UpdateRejected(
                f"worker {update.worker} is not in 0..{self.spec.workers - 1}", 400
            )
        incarnation, seq = self.last_seq.get(update.worker, ("", -1))
        if update.incarnation == incarnation and update.seq <= seq:
            raise UpdateRejected(f"worker {update.worker} already sent update {update.seq}")
        self.alive.add(update.worker)
        if self.spec.algorithm.mode == "asyncSGD":
            self.last_seq[update.worker] = (update.incarnation, update.seq)
            self._apply_async(update)
            return
        if update.round != self.round:
            raise UpdateRejected(f"update for round {update.round}, the open round is {self.round}")
        if update.worker in self.pending:
            raise UpdateRejected(f"worker {update.worker} already sent round {self.round}")
        if update.worker not in self.selected(self.round):
            raise UpdateRejected(f"worker {update.worker} is not selected in round {self.round}")
        self._count(update)
        self.last_seq[update.worker] = (update.incarnation, update.seq)
        self.pending[update.worker] = update

    def _count(self, update: Update) -> None:
        self.bytes_up += update.wire_bytes
        self.dense_bytes_up += 4 * self.update_values()
        if update.epsilon is not None:
            self.epsilon = max(self.epsilon or 0.0, update.epsilon)

    def update_values(self) -> int:
        if self.spec.algorithm.mode == "codistillation":
            return (PUBLIC_SIZE + len(held_out()[1])) * 10
        return len(self.params)

    def _apply_async(self, update: Update) -> None:
        staleness = max(0, self.version - update.round)
        delta = decode(update.kind, update.payload, len(self.params))
        self._count(update)
        self.params = (self.params + delta / (1.0 + staleness)).astype(np.float32)
        self.version += 1
        self.pending[self.version] = update  # this round's applied updates, for its record
        if len(self.pending) >= self.spec.workers:
            self.close(())

    # --- rounds -------------------------------------------------------------------------

    def close(self, stragglers: tuple[int, ...]) -> dict[str, Any]:
        """Closes the open round with the updates it has; `stragglers` (expected workers
        that did not answer in time) are dropped until they come back."""
        # in a fixed order, so that the float sums do not depend on arrival order
        updates = [self.pending[key] for key in sorted(self.pending)]
        mode = self.spec.algorithm.mode
        x_test, y_test = held_out()
        if mode == "codistillation" and updates:
            acc = self._close_codistillation(updates, y_test)
        else:
            if mode != "asyncSGD" and updates:
                total = sum(u.samples for u in updates)
                step = np.zeros_like(self.params)
                for u in updates:
                    step += decode(u.kind, u.payload, len(self.params)) * (u.samples / total)
                self.params = (self.params + step).astype(np.float32)
            model = build_model(self.spec)
            set_flat(model, self.params)
            acc = accuracy(model, x_test, y_test)
        for worker in stragglers:
            self.alive.discard(worker)
        self.stragglers += len(stragglers)
        record = {
            "round": self.round + 1,
            "accuracy": round(acc, 4),
            "loss": round(float(np.mean([u.loss for u in updates])), 4) if updates else None,
            "participants": sorted({u.worker for u in updates}),
            "stragglers": sorted(stragglers),
            "bytesUp": self.bytes_up,
        }
        self.history.append(record)
        self.pending = {}
        self.round += 1
        stop = self.spec.stop
        if acc >= stop.target_accuracy or self.round >= stop.max_rounds:
            self.done = True
        return record

    def _close_codistillation(self, updates: list[Update], y_test: NDArray[np.int64]) -> float:
        outputs = PUBLIC_SIZE + len(y_test)
        per_worker = [decode(u.kind, u.payload, outputs * 10).reshape(outputs, 10) for u in updates]
        probs = [_softmax(logits) for logits in per_worker]
        self.teacher = np.mean([p[:PUBLIC_SIZE] for p in probs], axis=0).astype(np.float32)
        # each worker's own model on the held-out set, averaged: not the ensemble's
        return float(np.mean([(p[PUBLIC_SIZE:].argmax(axis=1) == y_test).mean() for p in probs]))

    # --- what workers fetch -------------------------------------------------------------

    def public_inputs(self) -> NDArray[np.float32]:
        """Codistillation: the public batch, then the held-out inputs (labels stay here)."""
        return np.concatenate([public_batch(PUBLIC_SIZE, self.spec.seed), held_out()[0]])

    # --- checkpoints --------------------------------------------------------------------

    def to_checkpoint(self) -> tuple[dict[str, Any], bytes]:
        header = {
            "version": 1,
            "round": self.round,
            "modelVersion": self.version,
            "alive": sorted(self.alive),
            "lastSeq": {str(k): list(v) for k, v in self.last_seq.items()},
            "history": self.history,
            "bytesUp": self.bytes_up,
            "bytesDown": self.bytes_down,
            "denseBytesUp": self.dense_bytes_up,
            "stragglers": self.stragglers,
            "epsilon": self.epsilon,
            "done": self.done,
            "started": self.started,
            "teacher": self.teacher is not None,
        }
        payload = self.params.astype("<f4").tobytes()
        if self.teacher is not None:
            payload += self.teacher.astype("<f4").tobytes()
        return header, payload

    @classmethod
    def from_checkpoint(
        cls, spec: TrainingSpec, header: dict[str, Any], payload: bytes
    ) -> RoundState:
        state = cls.initial(spec)
        n = len(state.params)
        state.params = np.frombuffer(payload[: 4 * n], dtype="<f4").astype(np.float32)
        if header["teacher"]:
            state.teacher = (
                np.frombuffer(payload[4 * n :], dtype="<f4").astype(np.float32).reshape(-1, 10)
            )
        state.round = header["round"]
        state.version = header["modelVersion"]
        state.alive = set(header["alive"])
        state.last_seq = {int(k): (str(v[0]), int(v[1])) for k, v in header["lastSeq"].items()}
        state.history = header["history"]
        state.bytes_up = header["bytesUp"]
        state.bytes_down = header["bytesDown"]
        state.dense_bytes_up = header["denseBytesUp"]
        state.stragglers = header["stragglers"]
        state.epsilon = header["epsilon"]
        state.done = header["done"]
        state.started = header["started"]
        return state
