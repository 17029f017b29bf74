"""ONNX DAG analysis: cut points, partitions, the layer DAG with sizes and FLOPs.

Terms used across the planner and the workers:

- A *compute node* is an ONNX node that depends on a model input. Nodes fed only
  by initializers and constants (`Constant`, weight `Identity`, ...) are free: every
  partition that needs them recomputes them, so they never cross a cut. A node with
  subgraphs (`If`, `Loop`, `Scan`) is atomic: no cut enters a subgraph, and the
  outer-scope tensors its subgraphs read count as inputs of the node.
- A *cut* is a boundary in the topological order of compute nodes. The tensors that
  cross it are those produced before it (or model inputs) and read after it (or
  model outputs). `cut_points` returns the cuts that carry at most one intermediate
  tensor (Neurosurgeon's layer boundaries) besides the model inputs still to be read
  and the model outputs already made, which travel with the chain; the first cut is
  the model inputs, the last the model outputs in the model's order. A cut between
  the first reader of a recurrent state input and the node making its state output
  is never offered (the pair stays in one stage: `ModelGraph.held`). General DAG cuts
  (DADS) come from the planner's min-cut over `analyze(model)`.
- *Segment* `i` is everything between cut `i` and cut `i + 1`; a stage running
  segments `a..b` reads `cuts[a].tensors` and writes `cuts[b + 1].tensors`.

Sizes are those of the tensors at the model's concrete input shapes
(`concrete_input_shapes`: given by the user, a free batch dimension at 1, any other
free dimension refused). They come from onnx shape inference, then onnxruntime's
symbolic shape inference, and for tensors still unsized from one run of the model on
a sample input with those tensors exposed as outputs (`sized_tensors`). Partitions
are cut from the model as it declares itself, so a free batch dimension stays free.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.shape_inference

_T = TypeVar("_T")

# bytes per element of ONNX tensor element types
_ELEMENT_BYTES: dict[int, int] = {
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


# what a batch dimension the model leaves free is profiled at
FREE_BATCH = 1
SHAPE_FIELDS = "spec.input.shape (DNNModel) or --input-shape NAME=D0,D1,... (edgeai profile)"


class GraphError(ValueError):
    """A model the planner cannot profile or partition as given; the message names the
    construct, the node or input dimension, and what would make it work."""


@dataclass(frozen=True)
class Cut:
    """A boundary: `tensors` cross it, `size_bytes` of them at the profiled input shapes.
    `index` is the cut's rank in topological order (0 = model inputs); `position` is the
    number of compute nodes before it."""

    index: int
    tensors: tuple[str, ...]
    size_bytes: int
    position: int = 0


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # at the profiled input shapes
    elem_type: int
    size_bytes: int


@dataclass(frozen=True)
class LayerNode:
    """A compute node with the activation tensors it reads (its subgraphs' outer-scope
    reads included) and writes."""

    index: int
    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    flops: int


@dataclass(frozen=True)
class Held:
    """Nodes `first..last` that stay in one stage, and why (`reason`)."""

    first: int
    last: int
    tensors: tuple[str, ...]
    reason: str

    def to_dict(self) -> dict[str, object]:
        return {
            "positions": f"{self.first}-{self.last}",
            "tensors": list(self.tensors),
            "reason": self.reason,
        }


@dataclass(frozen=True)
class ModelGraph:
    """The compute DAG of a model: nodes in topological order and activation tensors."""

    nodes: tuple[LayerNode, ...]
    tensors: dict[str, TensorInfo]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    held: tuple[Held, ...] = ()
    # sequences, maps, optionals and tensors of no inferred type: never cross a cut
    unsendable: frozenset[str] = frozenset()

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


def _info(name: str, elem_type: int, shape: tuple[int, ...]) -> TensorInfo:
    return TensorInfo(name, shape, elem_type, math.prod(shape) * _ELEMENT_BYTES.get(elem_type, 4))


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with value_info from onnx shape inference (the model unchanged where
    inference fails: later steps size what it leaves out)."""
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except onnx.shape_inference.InferenceError:
        return model


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    graphs: list[onnx.GraphProto] = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            graphs.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(a.graphs)
    return graphs


def _outer_reads(graph: onnx.GraphProto) -> list[str]:
    """Tensors a subgraph reads from the scopes around it."""
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    local.update(t.values.name for t in graph.sparse_initializer)
    reads: list[str] = []
    for node in graph.node:
        for t in node_reads(node):
            if t and t not in local and t not in reads:
                reads.append(t)
        local.update(node.output)
    return reads


def node_reads(node: onnx.NodeProto) -> list[str]:
    """The tensors a node reads: its inputs, then what its subgraphs read from outside."""
    reads = [t for t in node.input if t]
    for sub in _subgraphs(node):
        reads += [t for t in _outer_reads(sub) if t not in reads]
    return reads


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _fixed(dim: onnx.TensorShapeProto.Dimension) -> int | None:
    return int(dim.dim_value) if dim.HasField("dim_value") and dim.dim_value > 0 else None


def _describe(dims: Sequence[onnx.TensorShapeProto.Dimension]) -> str:
    return "[" + ", ".join(str(_fixed(d) or d.dim_param or "?") for d in dims) + "]"


def concrete_input_shapes(
    model: onnx.ModelProto, given: Mapping[str, Sequence[int]] | None = None
) -> dict[str, tuple[int, ...]]:
    """Each model input's shape to profile at: `given[name]` where the user gave one (it
    must fit the model's fixed dimensions), else the model's own; a free first (batch)
    dimension at FREE_BATCH either way (whatever size is given for it: the planner
    plans one request, and the batch stays free in the partitions). Any other free
    dimension without a given size is a GraphError naming it."""
    given = dict(given or {})
    inputs = _graph_inputs(model)
    names = [i.name for i in inputs]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise GraphError(
            f"input shape given for {unknown[0]!r}, which is not a model input "
            f"(the model's inputs: {', '.join(names)})"
        )
    shapes: dict[str, tuple[int, ...]] = {}
    for value in inputs:
        tensor = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise GraphError(
                f"model input {value.name!r} is a {value.type.WhichOneof('value')}, not a "
                "tensor: stages exchange tensors only"
            )
        dims = list(tensor.shape.dim)
        if value.name in given:
            shape = tuple(int(d) for d in given[value.name])
            fits = not tensor.HasField("shape") or (  # no shape declared: any fits
                len(shape) == len(dims)
                and all(_fixed(d) in (None, s) for d, s in zip(dims, shape, strict=True))
            )
            if not fits or min(shape, default=1) < 1:
                raise GraphError(
                    f"the shape {list(shape)} given for input {value.name!r} does not fit "
                    f"the model's {_describe(dims)}: set {SHAPE_FIELDS} with its rank, "
                    "its fixed dimensions and every other dimension >= 1"
                )
            if dims and _fixed(dims[0]) is None:
                shape = (FREE_BATCH, *shape[1:])  # the planner plans one request
            shapes[value.name] = shape
            continue
        if not tensor.HasField("shape"):
            raise GraphError(
                f"input {value.name!r} declares no shape, not even its rank, and no shape "
                f"was given: set {SHAPE_FIELDS}"
            )
        shape_list: list[int] = []
        for axis, dim in enumerate(dims):
            size = _fixed(dim)
            if size is None and axis == 0:
                size = FREE_BATCH  # a free batch stays free in the partitions
            if size is None:
                label = f"{dim.dim_param!r}" if dim.dim_param else "unnamed"
                raise GraphError(
                    f"input {value.name!r} {_describe(dims)}: dimension {axis} ({label}) is "
                    f"not fixed by the model and no size was given: set {SHAPE_FIELDS} "
                    "(it is never guessed)"
                )
            shape_list.append(size)
        shapes[value.name] = tuple(shape_list)
    return shapes


def sample_feed(
    model: onnx.ModelProto,
    shapes: Mapping[str, Sequence[int]],
    seed: int = 0,
    values: Mapping[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """Inputs of `shapes`: `values[name]` everywhere for an input given one (a sample
    rate, a mode switch: what the model's control flow branches on), else random:
    standard normal floats, small non-negative integers (they often index or count),
    booleans."""
    rng = np.random.default_rng(seed)
    given = dict(values or {})
    names = [i.name for i in _graph_inputs(model)]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise GraphError(
            f"an input value is given for {unknown[0]!r}, which is not a model input "
            f"(the model's inputs: {', '.join(names)})"
        )
    feeds: dict[str, np.ndarray] = {}
    for value in _graph_inputs(model):
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        shape = list(shapes[value.name])
        if value.name in given:
            feeds[value.name] = np.full(shape, given[value.name], dtype)
        elif np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = rng.integers(0, 2, shape).astype(dtype)
        else:
            feeds[value.name] = rng.integers(0, 4, shape).astype(dtype)
    return feeds


def _with_input_shapes(
    model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]
) -> onnx.ModelProto:
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    del fixed.graph.value_info[:]
    for value in fixed.graph.input:
        if value.name in shapes:
            shape = value.type.tensor_type.shape
            shape.ClearField("dim")
            for size in shapes[value.name]:
                shape.dim.add().dim_value = int(size)
    return fixed


def _static(model: onnx.ModelProto, names: set[str]) -> dict[str, tuple[int, tuple[int, ...]]]:
    """name -> (elem type, shape) of the `names` whose shape the model fully states."""
    found: dict[str, tuple[int, tuple[int, ...]]] = {}
    graph = model.graph
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        if vi.name not in names or not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        if not tt.HasField("shape") or not tt.elem_type:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if all(d >= 0 for d in dims):
            found[vi.name] = (tt.elem_type, tuple(dims))
    return found


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    return {
        vi.name: vi.type.tensor_type.elem_type
        for vi in [*graph.input, *graph.value_info, *graph.output]
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type
    }


def _symbolic_inference(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """onnxruntime's symbolic shape inference, or None where it gives up on the graph."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:
        return None
    try:
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # it raises many types on graphs it cannot follow
        return None
    return inferred if isinstance(inferred, onnx.ModelProto) else None


def _measured(
    model: onnx.ModelProto,
    names: Sequence[str],
    elem_types: Mapping[str, int],
    feeds: Mapping[str, np.ndarray],
) -> dict[str, tuple[int, tuple[int, ...]]]:
    """The shapes of `names` from one onnxruntime run with them exposed as outputs."""
    import onnxruntime as ort

    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    declared = {o.name for o in exposed.graph.output}
    for name in names:
        if name not in declared:
            value = exposed.graph.output.add()
            value.name = name
            if name in elem_types:  # else left untyped: onnxruntime finds the type itself
                value.type.tensor_type.elem_type = elem_types[name]
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the GraphError below says what failed
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(
            exposed.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        results = session.run(list(names), dict(feeds))
    except Exception as exc:  # onnxruntime raises its own types; say what it said
        text = str(exc).strip().splitlines()
        raise GraphError(
            "running the model once to measure the tensor shapes onnx cannot infer failed "
            f"at the profiled input shapes {dict((k, list(v.shape)) for k, v in feeds.items())}: "
            f"{text[0][:300] if text else type(exc).__name__}; check the input shapes "
            f"({SHAPE_FIELDS}) and, for an input the model branches on, its value "
            "(--input-value NAME=NUMBER)"
        ) from exc
    out: dict[str, tuple[int, tuple[int, ...]]] = {}
    for name, value in zip(names, results, strict=True):
        if not isinstance(value, np.ndarray):
            continue  # a sequence or map: unsized, so it crosses no cut
        elem = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        out[name] = (elem, tuple(int(d) for d in value.shape))
    return out


def sized_tensors(
    model: onnx.ModelProto,
    shapes: Mapping[str, Sequence[int]],
    names: Iterable[str],
    feeds: Mapping[str, np.ndarray] | None = None,
) -> tuple[onnx.ModelProto, dict[str, TensorInfo]]:
    """(the model with inferred value_info at `shapes`, the size of each of `names`):
    onnx shape inference, then onnxruntime's symbolic shape inference, then one run on
    `feeds` (default: `sample_feed`) for whatever is still unsized."""
    wanted = set(names)
    inferred = infer_shapes(_with_input_shapes(model, shapes))
    found = _static(inferred, wanted)
    if wanted - found.keys():
        symbolic = _symbolic_inference(inferred)
        if symbolic is not None:
            found.update(_static(symbolic, wanted - found.keys()))
    missing = [n for n in sorted(wanted) if n not in found]
    if missing:
        run_feeds = feeds if feeds is not None else sample_feed(model, shapes)
        found.update(_measured(inferred, missing, _elem_types(inferred), run_feeds))
    infos = {name: _info(name, elem, shape) for name, (elem, shape) in found.items()}
    return inferred, infos


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


def _state_pairs(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(input, output) pairs of a recurrent state: an output named after an input
    (`state` -> `stateN`, `h` -> `hn`) of the same element type and rank."""
    outputs = list(model.graph.output)
    pairs: list[tuple[str, str]] = []
    for value in _graph_inputs(model):
        tt = value.type.tensor_type
        for out in outputs:
            ot = out.type.tensor_type
            if (
                out.name != value.name
                and out.name.startswith(value.name)
                and ot.elem_type == tt.elem_type
                and len(ot.shape.dim) == len(tt.shape.dim)
            ):
                pairs.append((value.name, out.name))
                break
    return pairs


def _held(nodes: Sequence[LayerNode], pairs: Sequence[tuple[str, str]]) -> tuple[Held, ...]:
    """For each state pair, the nodes from the first that reads the state to the one
    that makes the next state: the stage that reads it also answers it."""
    held: list[Held] = []
    for state_in, state_out in pairs:
        readers = [n.index for n in nodes if state_in in n.inputs]
        makers = [n.index for n in nodes if state_out in n.outputs]
        if readers and makers and min(readers) < makers[0]:
            held.append(
                Held(
                    min(readers),
                    makers[0],
                    (state_in, state_out),
                    f"recurrent state {state_in} -> {state_out} stays in one stage",
                )
            )
    return tuple(held)


def analyze(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    feeds: Mapping[str, np.ndarray] | None = None,
    *,
    sized: bool = True,
) -> ModelGraph:
    """The compute DAG with tensor sizes at the concrete input shapes
    (`concrete_input_shapes` of `input_shapes`) and per-node FLOPs. `feeds`: the sample
    the shapes onnx cannot infer are measured on (default: `sample_feed`). With
    `sized` False, the structure alone (no sizes, no FLOPs, no input shapes needed):
    the cuts' tensors are the same."""
    graph = model.graph
    weights = {init.name: tuple(init.dims) for init in graph.initializer}
    const = set(weights)
    inputs = tuple(i.name for i in _graph_inputs(model))
    compute: list[tuple[onnx.NodeProto, tuple[str, ...]]] = []
    for node in graph.node:
        activation_inputs = tuple(t for t in node_reads(node) if t not in const)
        if not activation_inputs:
            # fed by weights and constants only: free, recomputed where needed
            const.update(o for o in node.output if o)
            continue
        compute.append((node, activation_inputs))
    outputs = tuple(o.name for o in graph.output)
    for value in [*_graph_inputs(model), *graph.output]:
        if not value.type.HasField("tensor_type"):
            raise GraphError(
                f"model {'output' if value.name in outputs else 'input'} {value.name!r} is a "
                f"{value.type.WhichOneof('value')}, not a tensor: stages exchange tensors only"
            )
        if value.name in const and value.name in outputs:
            raise GraphError(
                f"model output {value.name!r} does not depend on any input: a stage cannot serve it"
            )
    activations = {*inputs, *(t for node, _ in compute for t in node.output if t)}
    shapes: dict[str, tuple[int, ...]] = {}
    infos: dict[str, TensorInfo] = {}
    flops_infos: dict[str, TensorInfo] = {}
    if sized:
        shapes = concrete_input_shapes(model, input_shapes)
        inferred, infos = sized_tensors(model, shapes, activations, feeds)
        flops_infos = {**_all_static(inferred), **infos}
    nodes = tuple(
        LayerNode(
            index=i,
            name=node.name or f"{node.op_type}_{i}",
            op_type=node.op_type,
            inputs=reads,
            outputs=tuple(o for o in node.output if o),
            flops=_node_flops(node, flops_infos, weights) if sized else 0,
        )
        for i, (node, reads) in enumerate(compute)
    )
    # what `Partitioner` can declare at a cut: a tensor whose element type onnx infers
    # on the model as it declares itself (an op of a domain onnx does not know, such
    # as com.microsoft's, leaves its outputs untyped: those cross no cut)
    typed = infer_shapes(model).graph
    declarable = {
        vi.name
        for vi in [*typed.input, *typed.value_info, *typed.output]
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type
    }
    unsendable = activations - declarable
    if sized:
        unsendable |= activations - infos.keys()
    return ModelGraph(
        nodes,
        infos,
        inputs,
        outputs,
        shapes,
        _held(nodes, _state_pairs(model)),
        frozenset(unsendable),
    )


def _all_static(model: onnx.ModelProto) -> dict[str, TensorInfo]:
    graph = model.graph
    names = {vi.name for vi in [*graph.input, *graph.value_info, *graph.output]}
    return {name: _info(name, elem, shape) for name, (elem, shape) in _static(model, names).items()}


def graph_cut_points(graph: ModelGraph) -> list[Cut]:
    """The cuts of an analysed graph (see `cut_points`)."""
    last_use: dict[str, int] = {}
    for node in graph.nodes:
        for t in node.inputs:
            last_use[t] = node.index
    end = len(graph.nodes)
    for t in graph.outputs:
        last_use[t] = end
    travelling = {*graph.inputs, *graph.outputs}
    blocked = {p for h in graph.held for p in range(h.first + 1, h.last + 1)}

    def size(tensors: Sequence[str]) -> int:
        return graph.size_bytes(tensors) if graph.tensors else 0

    live = [t for t in graph.inputs if t in last_use]
    cuts = [Cut(0, tuple(live), size(live), 0)]
    seen = {frozenset(live)}
    for node in graph.nodes[:-1]:
        live = [t for t in live if last_use[t] > node.index]
        live += [t for t in node.outputs if last_use.get(t, -1) > node.index]
        inner = [t for t in live if t not in travelling]
        position = node.index + 1
        if (
            len(inner) <= 1
            and position not in blocked
            and frozenset(live) not in seen
            and not graph.unsendable.intersection(live)
        ):
            seen.add(frozenset(live))
            cuts.append(Cut(len(cuts), tuple(live), size(live), position))
    if frozenset(graph.outputs) in seen:
        cuts = [c for c in cuts if frozenset(c.tensors) != frozenset(graph.outputs)]
    cuts.append(Cut(len(cuts), graph.outputs, size(graph.outputs), end))
    return cuts


def cut_points(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    sized: bool = True,
) -> list[Cut]:
    """Cuts in topological order, from the model inputs (index 0) to the model outputs
    (last), each carrying at most one intermediate tensor besides model inputs still to
    be read and model outputs already made. A model has `len(cuts) - 1` segments. With
    `sized` False every `size_bytes` is 0 and no input shape is needed."""
    return graph_cut_points(analyze(model, input_shapes, sized=sized))


class Partitioner:
    """Extracts standalone sub-models from the model as it declares itself (free
    dimensions stay free); shape inference runs once per model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = infer_shapes(model)
        graph = self.model.graph
        self._values = {vi.name: vi for vi in [*graph.input, *graph.value_info, *graph.output]}
        self._initializers = {t.name: t for t in graph.initializer}
        self._producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
        self._reads = [node_reads(n) for n in graph.node]

    def _value(self, name: str) -> onnx.ValueInfoProto:
        known = self._values.get(name)
        value = onnx.ValueInfoProto()
        value.name = name
        if known is not None and known.type.HasField("tensor_type"):
            value.type.CopyFrom(known.type)
        else:
            raise GraphError(f"tensor {name!r} has no known element type; it cannot cross a cut")
        return value

    def extract(self, inputs: Sequence[str], outputs: Sequence[str]) -> onnx.ModelProto:
        if not inputs or not outputs:
            raise ValueError("a partition needs at least one input and one output tensor")
        if set(outputs) <= set(inputs):
            raise ValueError(f"empty partition: outputs {list(outputs)} are its inputs")
        unknown = [
            t for t in [*inputs, *outputs] if t not in self._values and t not in self._producer
        ]
        if unknown:
            raise ValueError(f"unknown tensor name(s) {unknown}")
        given = set(inputs)
        chosen: set[int] = set()
        pending = [t for t in outputs if t not in given]
        while pending:
            tensor = pending.pop()
            if tensor in given or tensor in self._initializers:
                continue
            index = self._producer.get(tensor)
            if index is None:
                raise ValueError(
                    f"inputs {list(inputs)} do not separate outputs {list(outputs)}: "
                    f"they also need the model input {tensor!r}"
                )
            if index not in chosen:
                chosen.add(index)
                pending.extend(self._reads[index])
        nodes = [self.model.graph.node[i] for i in sorted(chosen)]
        needed = {t for i in chosen for t in self._reads[i]}
        sub = onnx.helper.make_model(
            onnx.helper.make_graph(
                nodes,
                f"{self.model.graph.name or 'model'}_part",
                [self._value(t) for t in inputs],
                [self._value(t) for t in outputs],
                [self._initializers[t] for t in sorted(needed) if t in self._initializers],
            ),
            opset_imports=list(self.model.opset_import),
        )
        sub.ir_version = self.model.ir_version
        sub.functions.extend(self.model.functions)
        return sub


def segment_models(
    model: onnx.ModelProto,
    graph: ModelGraph,
    cuts: Sequence[Cut],
    load: Callable[[onnx.ModelProto], _T],
) -> list[_T]:
    """`load` (an onnxruntime session, say) of each segment between consecutive cuts,
    cut from `model`; a segment that cannot be cut or loaded on its own is a
    GraphError naming its first node and its input tensors."""
    partitioner = Partitioner(model)
    loaded: list[_T] = []
    for a, b in itertools.pairwise(cuts):
        try:
            loaded.append(load(partitioner.extract(a.tensors, b.tensors)))
        except Exception as exc:  # onnx and onnxruntime raise many types
            first = graph.nodes[a.position] if a.position < len(graph.nodes) else None
            where = f"node {first.name} ({first.op_type})" if first else "the model's end"
            text = str(exc).strip().splitlines()
            raise GraphError(
                f"the segment from {where}, fed {list(a.tensors)}, does not run on its own: "
                f"{text[0][:300] if text else type(exc).__name__}"
            ) from exc
    return loaded


def prefix_digests(model: onnx.ModelProto, cuts: Sequence[Sequence[str]]) -> list[str]:
    """For each cut (its tensors), a sha256 of everything that computes those tensors
    from the model inputs: each op (type, domain, attributes), which computed tensor or
    input it reads, and the bytes of each initializer it reads. Tensor and node names
    do not count, so two models share a digest exactly when their graphs up to the cut
    are the same computation on the same weights (a model fine-tuned above a frozen
    trunk shares the trunk's digests)."""
    graph = model.graph
    producer: dict[str, tuple[onnx.NodeProto, int]] = {}
    for node in graph.node:
        for j, out in enumerate(node.output):
            if out:
                producer[out] = (node, j)
    inputs = {i.name: (k, i.type.tensor_type.elem_type) for k, i in enumerate(graph.input)}
    initializers = {t.name: t for t in graph.initializer}
    memo: dict[str, bytes] = {}

    def tensor(name: str) -> bytes:
        # iterative post-order: deep chains would exceed Python's recursion limit
        stack = [name]
        while stack:
            top = stack[-1]
            if top in memo:
                stack.pop()
                continue
            h = hashlib.sha256()
            if top in initializers:
                init = initializers[top]
                array = onnx.numpy_helper.to_array(init)
                h.update(f"init:{init.data_type}:{list(init.dims)}:".encode())
                h.update(np.ascontiguousarray(array).tobytes())
            elif top in inputs:
                h.update(f"input:{inputs[top][0]}:{inputs[top][1]}".encode())
            elif top in producer:
                node, j = producer[top]
                missing = [t for t in node_reads(node) if t not in memo]
                if missing:
                    stack += missing
                    continue
                h.update(f"node:{node.domain}:{node.op_type}:{j}:".encode())
                for a in sorted(node.attribute, key=lambda a: a.name):
                    h.update(a.SerializeToString())
                for t in node_reads(node):
                    h.update(memo[t])
            else:
                raise GraphError(f"tensor {top!r} is neither computed nor an input")
            memo[top] = h.digest()
            stack.pop()
        return memo[name]

    digests = []
    for tensors in cuts:
        h = hashlib.sha256()
        for t in tensors:
            h.update(tensor(t))
        digests.append("sha256:" + h.hexdigest())
    return digests


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
