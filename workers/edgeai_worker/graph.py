"""ONNX DAG analysis: cut points, partitions, the layer DAG with sizes and FLOPs.

Terms used across the planner and the workers:

- A *compute node* is an ONNX node that depends on the model input. Nodes fed only
  by initializers and constants (`Constant`, weight `Identity`, ...) are free: every
  partition that needs them recomputes them, so they never cross a cut.
- A *cut* is a boundary in the topological order of compute nodes. The tensors that
  cross it are those produced before it (or the model input) and read after it (or
  model outputs). `cut_points` returns the single-tensor cuts (Neurosurgeon's layer
  boundaries), always including the model input (first) and the output (last).
  General DAG cuts (DADS) come from the planner's min-cut over `analyze(model)`.
- *Segment* `i` is everything between cut `i` and cut `i + 1`; a stage running
  segments `a..b` reads `cuts[a].tensors` and writes `cuts[b + 1].tensors`.

Shapes come from onnx shape inference; symbolic dimensions (the batch) count as 1.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import onnx
import onnx.shape_inference
import onnx.utils

# bytes per element of ONNX tensor element types
_ELEMENT_BYTES = {
    onnx.TensorProto.FLOAT: 4,
    onnx.TensorProto.UINT8: 1,
    onnx.TensorProto.INT8: 1,
    onnx.TensorProto.UINT16: 2,
    onnx.TensorProto.INT16: 2,
    onnx.TensorProto.INT32: 4,
    onnx.TensorProto.INT64: 8,
    onnx.TensorProto.BOOL: 1,
    onnx.TensorProto.FLOAT16: 2,
    onnx.TensorProto.DOUBLE: 8,
    onnx.TensorProto.UINT32: 4,
    onnx.TensorProto.UINT64: 8,
    onnx.TensorProto.BFLOAT16: 2,
}

# ops costing about one FLOP per output element
_ELEMENTWISE = {
    "Relu",
    "Clip",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Sigmoid",
    "Tanh",
    "LeakyRelu",
    "Erf",
    "HardSigmoid",
    "HardSwish",
    "Sqrt",
    "Pow",
    "Exp",
    "Neg",
    "Softmax",
    "BatchNormalization",
    "Gelu",
    "LayerNormalization",
    "DequantizeLinear",
    "QuantizeLinear",
    "Max",
    "Min",
}


@dataclass(frozen=True)
class Cut:
    """A single-tensor boundary: `tensors` cross it, `size_bytes` of them at batch 1.
    `index` is the cut's rank in topological order (0 = model input); `position` is the
    number of compute nodes before it."""

    index: int
    tensors: tuple[str, ...]
    size_bytes: int
    position: int = 0


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # symbolic dimensions as 1
    elem_type: int
    size_bytes: int


@dataclass(frozen=True)
class LayerNode:
    """A compute node with the activation tensors it reads and writes."""

    index: int
    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    flops: int


@dataclass(frozen=True)
class ModelGraph:
    """The compute DAG of a model: nodes in topological order and activation tensors."""

    nodes: tuple[LayerNode, ...]
    tensors: dict[str, TensorInfo]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def producer(self) -> dict[str, int]:
        """tensor name -> index of the compute node producing it (model inputs absent)."""
        return {t: node.index for node in self.nodes for t in node.outputs}

    def crossing(self, before: Iterable[int]) -> tuple[str, ...]:
        """Tensors produced by nodes in `before` (or model inputs) and read by a node
        outside it or returned as model outputs, in first-use order."""
        inside = set(before)
        produced = set(self.inputs)
        for i in inside:
            produced.update(self.nodes[i].outputs)
        crossing: list[str] = []
        for node in self.nodes:
            if node.index in inside:
                continue
            for t in node.inputs:
                if t in produced and t not in crossing:
                    crossing.append(t)
        for t in self.outputs:
            if t in produced and t not in crossing:
                crossing.append(t)
        return tuple(crossing)

    def size_bytes(self, tensors: Iterable[str]) -> int:
        return sum(self.tensors[t].size_bytes for t in tensors)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with value_info for every intermediate tensor."""
    return onnx.shape_inference.infer_shapes(model, data_prop=True)


def _tensor_infos(model: onnx.ModelProto) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    graph = model.graph
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim)
        elem = tt.elem_type
        size = math.prod(shape) * _ELEMENT_BYTES.get(elem, 4)
        infos[vi.name] = TensorInfo(vi.name, shape, elem, size)
    return infos


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _node_flops(
    node: onnx.NodeProto, infos: dict[str, TensorInfo], weights: dict[str, tuple[int, ...]]
) -> int:
    """Multiply-adds count as 2 FLOPs. Estimated from shapes; unknown ops cost 0."""

    def shape(name: str) -> tuple[int, ...] | None:
        if name in infos:
            return infos[name].shape
        return weights.get(name)

    out = shape(node.output[0]) if node.output else None
    op = node.op_type
    if out is None:
        return 0
    out_numel = math.prod(out)
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = shape(node.input[3] if op == "QLinearConv" else node.input[1])
        if w is None:
            return 0
        return 2 * out_numel * math.prod(w[1:])
    if op in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul"):
        a = shape(node.input[0])
        if a is None or not a:
            return 0
        transposed = op == "Gemm" and _attr(node, "transA", 0) == 1
        k = a[-2] if transposed and len(a) >= 2 else a[-1]
        return 2 * out_numel * k
    if op in ("LSTM", "GRU", "RNN"):
        x = shape(node.input[0])
        w = shape(node.input[1])
        r = shape(node.input[2])
        if x is None or w is None or r is None:
            return 0
        seq, batch = x[0], x[1]
        return 2 * seq * batch * (math.prod(w) + math.prod(r))
    if op in ("MaxPool", "AveragePool"):
        kernel = _attr(node, "kernel_shape", [1])
        assert isinstance(kernel, list)
        return out_numel * math.prod(kernel)
    if op in ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean"):
        x = shape(node.input[0])
        return math.prod(x) if x else out_numel
    if op in _ELEMENTWISE:
        return out_numel
    return 0


def analyze(model: onnx.ModelProto) -> ModelGraph:
    """The compute DAG with tensor sizes (batch 1) and per-node FLOPs."""
    model = infer_shapes(model)
    graph = model.graph
    infos = _tensor_infos(model)
    weights = {init.name: tuple(init.dims) for init in graph.initializer}
    const = set(weights)
    inputs = tuple(i.name for i in graph.input if i.name not in const)
    nodes: list[LayerNode] = []
    for node in graph.node:
        activation_inputs = tuple(t for t in node.input if t and t not in const)
        if not activation_inputs:
            # fed by weights and constants only: free, recomputed where needed
            const.update(o for o in node.output if o)
            continue
        nodes.append(
            LayerNode(
                index=len(nodes),
                name=node.name or f"{node.op_type}_{len(nodes)}",
                op_type=node.op_type,
                inputs=activation_inputs,
                outputs=tuple(o for o in node.output if o),
                flops=_node_flops(node, infos, weights),
            )
        )
    for t in (*inputs, *(t for n in nodes for t in (*n.inputs, *n.outputs))):
        if t not in infos:
            raise ValueError(f"tensor {t!r} has no inferred shape; cannot size cuts")
    outputs = tuple(o.name for o in graph.output)
    return ModelGraph(tuple(nodes), infos, inputs, outputs)


def graph_cut_points(graph: ModelGraph) -> list[Cut]:
    """Single-tensor cuts of an analysed graph (see `cut_points`)."""
    last_use: dict[str, int] = {}
    for node in graph.nodes:
        for t in node.inputs:
            last_use[t] = node.index
    end = len(graph.nodes)
    for t in graph.outputs:
        last_use[t] = end
    live = [t for t in graph.inputs if t in last_use]
    cuts: list[Cut] = []
    seen: set[tuple[str, ...]] = set()

    def add(position: int) -> None:
        if len(live) == 1 and (live[0],) not in seen:
            seen.add((live[0],))
            cuts.append(Cut(len(cuts), (live[0],), graph.size_bytes(live), position))

    add(0)
    for node in graph.nodes:
        live = [t for t in live if last_use[t] > node.index]
        live += [t for t in node.outputs if last_use.get(t, -1) > node.index]
        add(node.index + 1)
    if cuts[-1].tensors != graph.outputs:
        if len(graph.outputs) != 1:
            raise ValueError(f"models with one output are supported, got {graph.outputs}")
        cuts.append(Cut(len(cuts), graph.outputs, graph.size_bytes(graph.outputs), end))
    return cuts


def cut_points(model: onnx.ModelProto) -> list[Cut]:
    """Single-tensor cuts in topological order, from the model input (index 0) to the
    model output (last). A model has `len(cuts) - 1` segments."""
    return graph_cut_points(analyze(model))


class Partitioner:
    """Extracts standalone sub-models; shape inference runs once per model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = infer_shapes(model)
        self._extractor = onnx.utils.Extractor(self.model)

    def extract(self, inputs: Sequence[str], outputs: Sequence[str]) -> onnx.ModelProto:
        if not inputs or not outputs:
            raise ValueError("a partition needs at least one input and one output tensor")
        if set(outputs) <= set(inputs):
            raise ValueError(f"empty partition: outputs {list(outputs)} are its inputs")
        known = {
            vi.name
            for vi in [
                *self.model.graph.input,
                *self.model.graph.value_info,
                *self.model.graph.output,
            ]
        }
        unknown = [t for t in [*inputs, *outputs] if t not in known]
        if unknown:
            raise ValueError(f"unknown tensor name(s) {unknown}")
        sub = self._extractor.extract_model(list(inputs), list(outputs))
        # Every tensor a node reads must now come from the partition's inputs, its own
        # nodes or its initializers; otherwise the cut was not a valid boundary.
        available = {*inputs, *(i.name for i in sub.graph.initializer), ""}
        for node in sub.graph.node:
            missing = [t for t in node.input if t not in available]
            if missing:
                raise ValueError(
                    f"inputs {list(inputs)} do not separate outputs {list(outputs)}: "
                    f"node {node.name or node.op_type} also reads {missing}"
                )
            available.update(node.output)
        sub.ir_version = self.model.ir_version
        del sub.opset_import[:]
        sub.opset_import.extend(self.model.opset_import)
        return sub


def extract_partition(
    model: onnx.ModelProto, inputs: Sequence[str], outputs: Sequence[str]
) -> onnx.ModelProto:
    """A standalone model computing `outputs` from `inputs`, with the initializers it
    needs. Raises ValueError if `inputs` do not separate `outputs` from the rest."""
    return Partitioner(model).extract(inputs, outputs)


def segment_partitions(
    model: onnx.ModelProto, cuts: Sequence[Cut] | None = None
) -> list[onnx.ModelProto]:
    """One standalone model per segment between consecutive cuts."""
    cuts = list(cuts) if cuts is not None else cut_points(model)
    partitioner = Partitioner(model)
    return [partitioner.extract(a.tensors, b.tensors) for a, b in itertools.pairwise(cuts)]
