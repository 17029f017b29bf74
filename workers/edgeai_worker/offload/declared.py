"""Early exits a user's model declares (a DNNModel's `spec.exits`): extra outputs, class
scores a head computes from one tensor of the model. Without torch: the graph is
checked with onnx, the exits are calibrated with onnxruntime on labelled data.

`check_exits` holds the declaration to the graph: each output is a model output, its
head (the nodes it needs that the model's other outputs do not) reads only `after` and
weights, `after` is a tensor the model computes, and the exit scores as many classes as
the final output. `backbone` is the model without the exits (what is profiled and cut:
the stage computing `after` also computes the head, see `partitions.build_partitions`).
`validation_tables` measures, per labelled example, each exit's confidence under every
exit rule and whether each exit and the final output are right: the tables
`exits.calibrated` and the planner read, as for the digits heads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeai_worker.offload.exits import EXIT_RULES
from edgeai_worker.offload.gate import confidence

if TYPE_CHECKING:
    import onnx


@dataclass(frozen=True)
class DeclaredExit:
    output: str  # the model output holding the exit's class scores
    after: str  # the tensor its head reads


class ExitError(ValueError):
    """A declared exit the graph contradicts: `index` into the declarations, `key` the
    field (`output` or `after`), the message what is wrong and what would do."""

    def __init__(self, index: int, key: str, message: str) -> None:
        super().__init__(message)
        self.index = index
        self.key = key


def final_outputs(model: onnx.ModelProto, exits: Sequence[DeclaredExit]) -> list[str]:
    """The model's outputs that are no exit, in its order."""
    declared = {e.output for e in exits}
    return [o.name for o in model.graph.output if o.name not in declared]


def _cone(model: onnx.ModelProto, tensors: Sequence[str], stop: str | None = None) -> set[int]:
    """The nodes computing `tensors`, walking back no further than `stop`."""
    producer = {o: i for i, n in enumerate(model.graph.node) for o in n.output if o}
    chosen: set[int] = set()
    pending = [t for t in tensors if t != stop]
    while pending:
        index = producer.get(pending.pop())
        if index is None or index in chosen:
            continue
        chosen.add(index)
        pending.extend(t for t in model.graph.node[index].input if t and t != stop)
    return chosen


def check_exits(model: onnx.ModelProto, exits: Sequence[DeclaredExit]) -> list[str]:
    """The final outputs (`final_outputs`) once every exit fits the graph; ExitError
    naming the first that does not (its class count is `check_classes`' work)."""
    graph = model.graph
    outputs = [o.name for o in graph.output]
    finals = final_outputs(model, exits)
    if not finals:
        raise ExitError(
            0, "output", f"every model output ({', '.join(outputs)}) is declared an exit; "
            "the model's final output must not be one"
        )  # fmt: skip
    produced = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    weights = {t.name for t in graph.initializer}
    backbone = _cone(model, finals)
    for index, declared in enumerate(exits):
        if declared.output not in outputs:
            raise ExitError(
                index, "output", f"{declared.output!r} is not an output of the model "
                f"(its outputs: {', '.join(outputs)})"
            )  # fmt: skip
        if declared.after not in produced:
            raise ExitError(
                index, "after", f"{declared.after!r} is not a tensor the model computes"
            )
        before = _cone(model, [declared.after])
        head = _cone(model, [declared.output], stop=declared.after) - backbone
        if produced[declared.output] in backbone:
            raise ExitError(
                index, "output", f"the final output ({', '.join(finals)}) needs "
                f"{declared.output!r}: an exit is a branch off the model, not one of its layers"
            )  # fmt: skip
        own = {o for i in head for o in graph.node[i].output}
        reads_after = False
        for i in sorted(head):
            for tensor in graph.node[i].input:
                if not tensor or tensor in weights or tensor in own:
                    continue
                if tensor == declared.after:
                    reads_after = True
                    continue
                where = (
                    "computed before it"
                    if tensor not in produced or produced[tensor] in before
                    else "computed by later layers"
                )
                raise ExitError(
                    index, "output", f"the head of {declared.output!r} reads {tensor!r} "
                    f"({where}), not only {declared.after!r}: an exit is computed from "
                    "spec.exits[].after and the head's own weights"
                )  # fmt: skip
        if not reads_after:
            raise ExitError(
                index, "after", f"the head of {declared.output!r} does not read "
                f"{declared.after!r}"
            )  # fmt: skip
    return finals


def backbone(model: onnx.ModelProto, exits: Sequence[DeclaredExit]) -> onnx.ModelProto:
    """The model without its exits: the final outputs only, the heads' nodes and
    weights left out."""
    from edgeai_worker.graph import Partitioner

    inputs = [i.name for i in model.graph.input if i.name not in _weights(model)]
    return Partitioner(model).extract(inputs, final_outputs(model, exits))


def _weights(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer}


def head_flops(model: onnx.ModelProto, declared: DeclaredExit, dag: Any) -> int:
    """FLOPs of the exit's head: the nodes of `dag` (`graph.analyze` of `model`) that
    compute the exit and not the tensor it reads."""
    head = {
        o for i in _cone(model, [declared.output], stop=declared.after)
        for o in model.graph.node[i].output
    }  # fmt: skip
    return sum(int(node.flops) for node in dag.nodes if set(node.outputs) & head)


def check_classes(
    outputs: Mapping[str, np.ndarray], exits: Sequence[DeclaredExit], final: str
) -> None:
    """ExitError unless each exit's scores have the final output's shape (one row of
    class scores per example), from one run of the model."""
    want = tuple(np.asarray(outputs[final]).shape)
    for index, declared in enumerate(exits):
        got = tuple(np.asarray(outputs[declared.output]).shape)
        if got != want:
            raise ExitError(
                index, "output", f"{declared.output!r} has shape {list(got)} on the declared "
                f"input, the final output {final!r} {list(want)}: an exit scores the same "
                f"{want[-1] if want else 0} classes"
            )  # fmt: skip


def validation_tables(
    outputs: Mapping[str, np.ndarray],
    labels: np.ndarray,
    exits: Sequence[DeclaredExit],
    final: str,
) -> dict[str, np.ndarray]:
    """Per example: whether the final output and each exit are right (top-1), and each
    exit's confidence under every exit rule (`exits_<rule>`, exits by rows)."""

    def right(name: str) -> np.ndarray:
        scores = np.asarray(outputs[name])
        result: np.ndarray = scores.reshape(len(scores), -1).argmax(axis=1) == labels
        return result

    tables = {
        "final_correct": right(final),
        "exits_correct": np.stack([right(e.output) for e in exits]),
    }
    for rule in EXIT_RULES:
        tables[f"exits_{rule}"] = np.stack(
            [confidence(np.asarray(outputs[e.output]), rule) for e in exits]
        )
    return tables


def profile_section(
    exits: Sequence[DeclaredExit],
    final: str,
    logits_bytes: int,
    flops: Sequence[int],
    tables: Mapping[str, np.ndarray],
) -> dict[str, Any]:
    """The `offload` section of the model's profile, in the form the digits one has
    (`exits.profile_section`) without a cascade: the exits, the final output's name
    and the validation tables, confidences to 4 decimals."""
    return {
        "exits": [
            {"output": e.output, "after": e.after, "logitsBytes": logits_bytes, "headFlops": f}
            for e, f in zip(exits, flops, strict=True)
        ],
        "finalOutput": final,
        "validation": {
            key: np.round(value, 4).astype(float).tolist()
            if value.dtype.kind == "f"
            else value.astype(int).tolist()
            for key, value in tables.items()
        },
    }
