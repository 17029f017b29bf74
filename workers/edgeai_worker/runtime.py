"""onnxruntime sessions for the partitions a stage serves, with KServe's model contract:
`load()`, `ready`, and a run per partition (`validate()` picks it, `Partition.run()`).

A stage usually serves one partition. A stage below an adaptive device stage serves one
partition per split the device may choose; the request's input tensor names say which.
A stage that holds no layers has no runtime at all (the worker only forwards).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeai_worker.protocol import Array, ProtocolError

# onnxruntime's type strings -> OIP datatypes.
_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output; -1 marks a dynamic dimension. A partition cut at a
    tensor whose shape onnx cannot infer declares no shape at all (`ranked` False):
    any shape is taken there, as onnxruntime takes it."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    ranked: bool = True

    def as_metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def check(self, array: Array, datatype: str, model: str) -> None:
        """Raise a ProtocolError naming what differs between `array` and this spec."""
        if datatype != self.datatype:
            raise ProtocolError(
                f"input '{self.name}' of model '{model}': datatype {datatype} does not match "
                f"the model's {self.datatype}"
            )
        shape = array.shape
        if not self.ranked:
            return
        if len(shape) != len(self.shape) or any(
            want not in (-1, got) for want, got in zip(self.shape, shape, strict=False)
        ):
            raise ProtocolError(
                f"input '{self.name}' of model '{model}': shape {list(shape)} does not match "
                f"the model's {list(self.shape)} (-1 = any size)"
            )


def _dims(shape: Sequence[Any]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)


def _unranked_inputs(path: Path) -> set[str]:
    """The inputs the ONNX file declares without a shape (onnxruntime reports them
    like scalars)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return {i.name for i in graph.input if not i.type.tensor_type.HasField("shape")}


class Partition:
    """One ONNX partition in an onnxruntime session."""

    def __init__(self, path: Path, intra_op_threads: int = 1) -> None:
        self.path = path
        self.intra_op_threads = intra_op_threads
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self._session: Any = None
        # One run at a time per session keeps the thread count bounded on small nodes.
        self._lock = threading.Lock()
        # CPU seconds of the calling threads in runs (all of a run's CPU with one
        # intra-op thread, which runs it in the caller): compute without waits
        self.cpu_s = 0.0

    def load(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._session = ort.InferenceSession(
            str(self.path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        inputs = self._session.get_inputs()
        unranked = _unranked_inputs(self.path) if any(not i.shape for i in inputs) else set()
        self.inputs = [
            TensorSpec(
                i.name, _ORT_TYPES.get(i.type, i.type), _dims(i.shape), i.name not in unranked
            )
            for i in inputs
        ]
        self.outputs = [
            TensorSpec(o.name, _ORT_TYPES.get(o.type, o.type), _dims(o.shape))
            for o in self._session.get_outputs()
        ]

    @property
    def batchable(self) -> bool:
        """Whether every input and output has a dynamic leading (batch) dimension."""
        return all(s.ranked and s.shape and s.shape[0] == -1 for s in [*self.inputs, *self.outputs])

    def run(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        with self._lock:
            started = time.thread_time()
            results = self._session.run(None, dict(feeds))
            self.cpu_s += time.thread_time() - started
        return {spec.name: np.asarray(r) for spec, r in zip(self.outputs, results, strict=True)}


class StageRuntime:
    """The partitions of one stage, chosen per request by the input tensor names."""

    def __init__(self, model_name: str, partitions: Sequence[Partition]) -> None:
        if not partitions:
            raise ValueError("a stage needs at least one partition")
        self.model_name = model_name
        self.partitions = list(partitions)
        self.ready = False

    def load(self) -> None:
        for partition in self.partitions:
            partition.load()
        self.ready = True

    @property
    def inputs(self) -> list[TensorSpec]:
        """The inputs a client sends: those of the first (primary) partition."""
        return self.partitions[0].inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.partitions[0].outputs

    def select(self, names: Sequence[str]) -> Partition:
        """The partition whose inputs are exactly `names`, or a ProtocolError saying why."""
        wanted = set(names)
        for partition in self.partitions:
            if {s.name for s in partition.inputs} == wanted:
                return partition
        accepted = " | ".join(", ".join(s.name for s in p.inputs) for p in self.partitions)
        primary = {s.name for s in self.inputs}
        unknown = sorted(wanted - primary)
        missing = sorted(primary - wanted)
        if len(self.partitions) == 1 and unknown:
            raise ProtocolError(
                f"input '{unknown[0]}' is not an input of model '{self.model_name}' "
                f"(accepted: {accepted})"
            )
        if len(self.partitions) == 1:
            raise ProtocolError(
                f"model '{self.model_name}' needs input '{missing[0]}' (accepted: {accepted})"
            )
        raise ProtocolError(
            f"inputs {sorted(wanted)} match no partition of model '{self.model_name}' "
            f"(accepted sets: {accepted})"
        )

    def validate(self, tensors: Mapping[str, tuple[Array, str]]) -> Partition:
        partition = self.select(list(tensors))
        for spec in partition.inputs:
            array, datatype = tensors[spec.name]
            spec.check(array, datatype, self.model_name)
        return partition
