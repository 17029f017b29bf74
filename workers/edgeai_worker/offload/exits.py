"""Early exits of a served model, without torch: exit heads (small ONNX graphs reading
one backbone tensor) grafted onto the model a plan serves, and thresholds and exit
rates for a target accuracy from the tables the prebuilt calibration holds.

A head file's input is named after the backbone tensor it reads (`after`), its one
output is the exit's name (`exit_0`, ...). `graft_exits` adds its nodes and weights to
the model (their names prefixed with the exit's, so two heads never collide) and its
output to the model's outputs: the backbone's names are untouched, so a plan's cuts
apply to the grafted model as they do to the model itself, and the stage whose layers
produce `after` computes the exit.

`calibrated` reads `validation.npz` (per validation input: each exit's and the
cascade's confidence under every rule and whether each is right): a threshold per exit
for any target accuracy is numpy work there, the same `gate.calibrate_thresholds` the
build runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from edgeai_worker.offload.gate import NEVER, calibrate_thresholds

if TYPE_CHECKING:
    import onnx

HEADS_FILE = "heads.json"
TABLES_FILE = "validation.npz"
EXIT_RULES = ("maxProb", "entropy")  # disagreement needs two models: cascades only


class ExitPoint(Protocol):
    """Where an exit leaves: its output and the tensor its head reads."""

    @property
    def output(self) -> str: ...

    @property
    def after(self) -> str: ...


@dataclass(frozen=True)
class ExitHead:
    output: str  # the exit's logits, an output of the grafted model
    after: str  # the backbone tensor the head reads
    path: Path  # the head's ONNX file (input `after`, output `output`)
    logits_bytes: int  # one row of logits (FP32)


def read_heads(folder: Path) -> tuple[ExitHead, ...]:
    """The heads listed in `folder/heads.json`, in exit order."""
    data = json.loads((folder / HEADS_FILE).read_text())
    return tuple(
        ExitHead(str(e["output"]), str(e["after"]), folder / str(e["file"]), int(e["logitsBytes"]))
        for e in data["exits"]
    )


def write_heads(folder: Path, heads: Sequence[ExitHead]) -> None:
    exits = [
        {"output": h.output, "after": h.after, "file": h.path.name, "logitsBytes": h.logits_bytes}
        for h in heads
    ]
    (folder / HEADS_FILE).write_text(json.dumps({"exits": exits}, indent=2))


def graft_exits(model: onnx.ModelProto, heads: Sequence[ExitHead]) -> onnx.ModelProto:
    """`model` with each head's nodes and weights added and its exit among the outputs.
    Raises ValueError naming the head when its tensor is not one the model computes or
    its output name is taken."""
    import onnx

    grafted = onnx.ModelProto()
    grafted.CopyFrom(model)
    graph = grafted.graph
    produced = {o for n in graph.node for o in n.output}
    taken = produced | {i.name for i in graph.input} | {i.name for i in graph.initializer}
    for head in heads:
        if head.after not in produced:
            raise ValueError(
                f"exit '{head.output}': the model computes no tensor '{head.after}' "
                "(the head was built for another backbone)"
            )
        if head.output in taken:
            raise ValueError(f"exit '{head.output}': the model already has a tensor of that name")
        part = onnx.load(str(head.path))
        keep = {head.after, head.output}

        def renamed(name: str, keep: set[str] = keep, prefix: str = head.output) -> str:
            return name if not name or name in keep else f"{prefix}/{name}"

        for init in part.graph.initializer:
            init.name = renamed(init.name)
            graph.initializer.append(init)
        for node in part.graph.node:
            node.name = renamed(node.name or node.output[0])
            node.input[:] = [renamed(i) for i in node.input]
            node.output[:] = [renamed(o) for o in node.output]
            graph.node.append(node)
        graph.output.extend(o for o in part.graph.output if o.name == head.output)
        taken.add(head.output)
    return grafted


def produced_exits(partition: onnx.ModelProto, heads: Iterable[ExitPoint]) -> list[str]:
    """The exits whose tensor `partition`'s own nodes compute: those its stage runs."""
    produced = {o for n in partition.graph.node for o in n.output}
    return [h.output for h in heads if h.after in produced]


@dataclass(frozen=True)
class ExitCalibration:
    rule: str
    target_accuracy: float
    exit_thresholds: tuple[float, ...]
    exit_rates: tuple[float, ...]  # share of validation inputs each exit answers
    cascade_threshold: float
    escalation_rate: float  # share the cascade's small model(s) send on
    accuracy: float  # of the exits' mix on the validation half
    samples: int


def _calibrate(
    tables: Mapping[str, Any], n_exits: int, rule: str, target_accuracy: float
) -> ExitCalibration:
    final = np.asarray(tables["final_correct"], dtype=bool)
    # a model's declared exits come without a cascade: nothing answers before the model
    cascade = (
        calibrate_thresholds(
            [np.asarray(tables[f"cascade_{rule}"], dtype=np.float64)],
            [np.asarray(tables["cascade_correct"], dtype=bool)],
            final,
            target_accuracy,
        )
        if "cascade_correct" in tables
        else None
    )
    exits = None
    if rule in EXIT_RULES and n_exits:
        exits = calibrate_thresholds(
            list(np.asarray(tables[f"exits_{rule}"], dtype=np.float64)),
            list(np.asarray(tables["exits_correct"], dtype=bool)),
            final,
            target_accuracy,
        )
    return ExitCalibration(
        rule=rule,
        target_accuracy=target_accuracy,
        exit_thresholds=exits.thresholds if exits else (NEVER,) * n_exits,
        exit_rates=exits.exit_rates if exits else (0.0,) * n_exits,
        cascade_threshold=cascade.thresholds[0] if cascade else NEVER,
        escalation_rate=1.0 - cascade.exit_rates[0] if cascade else 1.0,
        accuracy=exits.accuracy if exits else cascade.final_accuracy if cascade else 0.0,
        samples=len(final),
    )


def calibrated(folder: Path, rule: str, target_accuracy: float) -> ExitCalibration:
    """Thresholds and rates for `rule` and `target_accuracy` from `folder`'s tables
    (the exits' only for rules they support; closed otherwise)."""
    with np.load(folder / TABLES_FILE) as tables:
        return _calibrate(dict(tables), len(read_heads(folder)), rule, target_accuracy)


# The calibration as a model's profile carries it (`offload`), for the planner: the
# exits (which tensor each reads, its logits' and compute's size) and the validation
# tables, confidences rounded to 4 decimals.
def _flops(path: Path) -> int:
    import onnx

    from edgeai_worker.graph import analyze

    return sum(node.flops for node in analyze(onnx.load(str(path))).nodes)


def profile_section(folder: Path) -> dict[str, Any]:
    exits = [
        {
            "output": head.output,
            "after": head.after,
            "logitsBytes": head.logits_bytes,
            "headFlops": _flops(head.path),
        }
        for head in read_heads(folder)
    ]
    # the cascade's small model(s): the first, and the second opinion of disagreement
    cascade = {"flops": [_flops(folder / m) for m in ("small.onnx", "small2.onnx")]}
    with np.load(folder / TABLES_FILE) as tables:
        validation = {
            key: np.round(tables[key], 4).astype(float).tolist()
            if tables[key].dtype.kind == "f"
            else tables[key].astype(int).tolist()
            for key in tables.files
        }
    return {"exits": exits, "cascade": cascade, "validation": validation}


def section_calibration(
    section: Mapping[str, Any], rule: str, target_accuracy: float
) -> ExitCalibration:
    """`calibrated` from a profile's `offload` section."""
    return _calibrate(section["validation"], len(section["exits"]), rule, target_accuracy)
