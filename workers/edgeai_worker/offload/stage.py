"""Per-input offloading inside one stage: early exits, the cascade's small model(s),
result reuse, and accuracy on labelled traffic.

The app calls, in order: `reused` (a near-identical earlier input's result), the
cascade (`cascade_partitions` run on the input, then `cascade_answer`), the stage's own
layers, then `exit_answer` on their outputs. A confident exit (or cascade) answers with
its logits in place of the model's output and the response parameter `edgeai_exit`
names it; otherwise the stage forwards: the input (cascade) or its features with the
exit heads' outputs left out. A batch answers early only when every row is confident.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeai_worker.metrics import WorkerMetrics
from edgeai_worker.offload.gate import confidence
from edgeai_worker.offload.reuse import ReuseCache
from edgeai_worker.offload.settings import OffloadSettings
from edgeai_worker.protocol import Array, InferRequest, InferResponse, ProtocolError, Tensor
from edgeai_worker.runtime import Partition

LABEL_PARAMETER = "edgeai_label"
EXIT_PARAMETER = "edgeai_exit"
REUSED_PARAMETER = "edgeai_reused"
FINAL_EXIT = "final"


def files_digest(paths: Sequence[Path]) -> str:
    """sha256 over the files a stage serves: the reuse key when no artefact digest is
    known (a stage started from files instead of a plan's artefact)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return "sha256:" + digest.hexdigest()


def _key(tensors: Sequence[Tensor]) -> np.ndarray:
    return np.concatenate([np.asarray(t.array, dtype=np.float32).reshape(-1) for t in tensors])


class OffloadStage:
    def __init__(
        self,
        settings: OffloadSettings,
        digest: str,
        metrics: WorkerMetrics,
        stage: str,
        intra_op_threads: int = 1,
    ) -> None:
        self.settings = settings
        self.digest = digest
        self.metrics = metrics
        self.stage = stage
        self.cascade_partitions = [Partition(p, intra_op_threads) for p in settings.cascade_models]
        self.cache: ReuseCache[InferResponse] | None = None
        if settings.reuse_entries:
            self.cache = ReuseCache(settings.reuse_entries, settings.reuse_max_distance)
        self._decisions = 0
        self._answers: dict[str, int] = {}

    def load(self) -> None:
        for partition in self.cascade_partitions:
            partition.load()

    # ------------------------------------------------------------------ reuse

    def reused(self, inputs: Sequence[Tensor]) -> InferResponse | None:
        """The stored result of a near-identical input of this model, if any."""
        if self.cache is None:
            return None
        found = self.cache.lookup(self.digest, _key(inputs))
        self.metrics.reuse_lookups.inc(stage=self.stage)
        if found is not None:
            self.metrics.reuse_hits.inc(stage=self.stage)
        self.metrics.reuse_hit_rate.set(self.cache.hit_rate, stage=self.stage)
        return None if found is None else found[0]

    def remember(self, inputs: Sequence[Tensor], response: InferResponse) -> None:
        if self.cache is None:
            return
        self.cache.insert(self.digest, _key(inputs), response)
        self.metrics.reuse_entries.set(len(self.cache), stage=self.stage)

    # ------------------------------------------------------------------ exits

    def _decided(self, exit_name: str | None) -> None:
        self._decisions += 1
        if exit_name is None:
            self.metrics.escalations.inc(stage=self.stage)
        else:
            self._answers[exit_name] = self._answers.get(exit_name, 0) + 1
            self.metrics.exit_answers.inc(stage=self.stage, exit=exit_name)
        for name, count in self._answers.items():
            self.metrics.exit_rate.set(count / self._decisions, stage=self.stage, exit=name)
        escalated = self._decisions - sum(self._answers.values())
        self.metrics.escalation_rate.set(escalated / self._decisions, stage=self.stage)

    def cascade_answer(self, logits: Sequence[Array]) -> list[Tensor] | None:
        """The cascade's answer from its small model(s)' logits when confident; None
        (an escalation) otherwise."""
        second = logits[1] if len(logits) > 1 else None
        sure = confidence(logits[0], self.settings.rule, second)
        if bool(np.all(sure >= self.settings.cascade_threshold)):
            self._decided("cascade")
            return [Tensor.from_numpy(self.settings.final_output, np.asarray(logits[0]))]
        self._decided(None)
        return None

    def exit_answer(
        self, outputs: Mapping[str, Array]
    ) -> tuple[list[Tensor] | None, str | None, dict[str, Array]]:
        """(the answer and the exit's name, when an exit is confident; the outputs to
        forward without the exit heads' tensors)."""
        exits = self.settings.exits
        rest = {k: v for k, v in outputs.items() if k not in {e.output for e in exits}}
        if not exits:
            return None, None, rest
        for setting in exits:
            logits = outputs.get(setting.output)
            if logits is None:
                raise ProtocolError(
                    f"offload.exits: output '{setting.output}' is not an output of this "
                    f"stage (accepted: {', '.join(outputs)})",
                    status=500,
                )
            if bool(np.all(confidence(logits, self.settings.rule) >= setting.threshold)):
                self._decided(setting.output)
                answer = Tensor.from_numpy(self.settings.final_output, np.asarray(logits))
                return [answer], setting.output, rest
        self._decided(None)
        return None, None, rest


def record_label(metrics: WorkerMetrics, stage: str, request: InferRequest, response: Any) -> None:
    """With `parameters.edgeai_label` (a class index, or one per batch row), counts the
    answer's top-1 against it: accuracy on labelled traffic."""
    label = request.parameters.get(LABEL_PARAMETER)
    if label is None or not isinstance(response, InferResponse) or not response.outputs:
        return
    labels = label if isinstance(label, list) else [label]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        raise ProtocolError(
            f"parameters.{LABEL_PARAMETER} must be a class index or a list of them, "
            f"got {label!r:.40}"
        )
    logits = np.asarray(response.outputs[0].array)
    predicted = logits.reshape(len(logits), -1).argmax(axis=1)
    if len(predicted) != len(labels):
        raise ProtocolError(
            f"parameters.{LABEL_PARAMETER}: {len(labels)} label(s) for a batch of "
            f"{len(predicted)} (accepted: one per row)"
        )
    right = int(np.sum(predicted == np.asarray(labels)))
    metrics.labelled.inc(len(labels), stage=stage)
    metrics.labelled_correct.inc(right, stage=stage)
    total = metrics.labelled.get(stage=stage)
    metrics.labelled_accuracy.set(metrics.labelled_correct.get(stage=stage) / total, stage=stage)
