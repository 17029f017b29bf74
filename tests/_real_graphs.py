"""Small models with what exported graphs have and the zoo's do not: free spatial
dimensions, an op whose output shape onnx cannot infer, several inputs, outputs made
at different depths, a recurrent state pair, `If` and `Loop` nodes reading outer-scope
tensors, and a torch export with `dynamic_axes`. Each builder saves the model and says
the input shapes to profile it at (`--input-shape`) where the model leaves them free."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


@dataclass(frozen=True)
class BuiltModel:
    path: Path
    input_shapes: dict[str, list[int]]  # what --input-shape gives (free dimensions)
    input_values: dict[str, float] = field(default_factory=dict)  # --input-value


def _weight(rng: np.random.Generator, name: str, *shape: int) -> onnx.TensorProto:
    scale = 1.0 / np.sqrt(shape[0])
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _save(
    path: Path,
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto],
) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _float(name: str, shape: list[int | str | None]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def spatial(tmp: Path) -> BuiltModel:
    """Conv - Relu - Conv - Relu - pool - Gemm over [N, 3, H, W]: batch, height and width
    all symbolic."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("GlobalAveragePool", ["r1"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1),
    ]
    inits = [
        _weight(rng, "w0", 8, 3, 3, 3),
        numpy_helper.from_array(np.zeros(8, np.float32) + 0.1, "b0"),
        _weight(rng, "w1", 16, 8, 3, 3),
        numpy_helper.from_array(np.zeros(16, np.float32) - 0.05, "b1"),
        _weight(rng, "w2", 10, 16),
        numpy_helper.from_array(np.zeros(10, np.float32), "b2"),
    ]
    path = _save(
        tmp / "spatial.onnx",
        nodes,
        [_float("x", ["N", 3, "H", "W"])],
        [_float("y", ["N", 10])],
        inits,
    )
    return BuiltModel(path, {"x": [1, 3, 40, 56]})


def data_dependent(tmp: Path) -> BuiltModel:
    """The positive entries of a projection, gathered with NonZero: how many there are
    is known only by running the model, so onnx (and onnxruntime's symbolic inference)
    cannot size the tensors after it."""
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"]),
        helper.make_node("Greater", ["h", "zero"], ["positive"]),
        helper.make_node("NonZero", ["positive"], ["where"]),
        helper.make_node("Transpose", ["where"], ["at"], perm=[1, 0]),
        helper.make_node("GatherND", ["h", "at"], ["picked"]),
        helper.make_node("Tanh", ["picked"], ["t"]),
        helper.make_node("Mul", ["t", "half"], ["m"]),
        helper.make_node("ReduceSum", ["m"], ["y"], keepdims=1),
    ]
    inits = [
        _weight(rng, "w0", 8, 32),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
    ]
    path = _save(
        tmp / "data_dependent.onnx", nodes, [_float("x", ["N", 8])], [_float("y", [1])], inits
    )
    return BuiltModel(path, {})


def foreign_op(tmp: Path) -> BuiltModel:
    """onnxruntime's com.microsoft `Gelu` between two projections: onnx knows neither
    the op's type nor its shape (onnxruntime's symbolic inference sizes it), so no
    cut can declare the tensors after it until a known op's output."""
    rng = np.random.default_rng(10)
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["a"]),
        helper.make_node("Gelu", ["a"], ["g"], domain="com.microsoft"),
        helper.make_node("MatMul", ["g", "w1"], ["b"]),
        helper.make_node("Relu", ["b"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "foreign_op",
        [_float("x", ["N", 8])],
        [_float("y", ["N", 4])],
        [_weight(rng, "w0", 8, 16), _weight(rng, "w1", 16, 16), _weight(rng, "w2", 16, 4)],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
        ir_version=8,
    )
    path = tmp / "foreign_op.onnx"
    onnx.save(model, str(path))
    return BuiltModel(path, {})


def two_inputs(tmp: Path) -> BuiltModel:
    """An image-like input and a side input read only deep in the graph."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["a"]),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("MatMul", ["ra", "w1"], ["b"]),
        helper.make_node("Tanh", ["b"], ["tb"]),
        helper.make_node("Add", ["tb", "side"], ["s"]),
        helper.make_node("MatMul", ["s", "w2"], ["y"]),
    ]
    inits = [_weight(rng, "w0", 6, 12), _weight(rng, "w1", 12, 4), _weight(rng, "w2", 4, 3)]
    path = _save(
        tmp / "two_inputs.onnx",
        nodes,
        [_float("x", ["N", 6]), _float("side", ["N", 4])],
        [_float("y", ["N", 3])],
        inits,
    )
    return BuiltModel(path, {})


def two_outputs(tmp: Path) -> BuiltModel:
    """A detector's shape: scores come out early, boxes after more layers; the model
    lists boxes first."""
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["a"]),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("MatMul", ["ra", "ws"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["scores"]),
        helper.make_node("MatMul", ["ra", "w1"], ["b"]),
        helper.make_node("Relu", ["b"], ["rb"]),
        helper.make_node("MatMul", ["rb", "w2"], ["c"]),
        helper.make_node("Tanh", ["c"], ["boxes"]),
    ]
    inits = [
        _weight(rng, "w0", 8, 16),
        _weight(rng, "ws", 16, 5),
        _weight(rng, "w1", 16, 16),
        _weight(rng, "w2", 16, 4),
    ]
    path = _save(
        tmp / "two_outputs.onnx",
        nodes,
        [_float("x", ["N", 8])],
        [_float("boxes", ["N", 4]), _float("scores", ["N", 5])],
        inits,
    )
    return BuiltModel(path, {})


def recurrent(tmp: Path) -> BuiltModel:
    """One recurrent step: `state` in, `stateN` out (a voice-activity detector's
    shape), the state read several nodes before the next one is made."""
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("MatMul", ["state", "u"], ["su"]),
        helper.make_node("Tanh", ["su"], ["ts"]),
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["ts", "xw"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["stateN"]),
        helper.make_node("MatMul", ["stateN", "v"], ["o"]),
        helper.make_node("Sigmoid", ["o"], ["output"]),
    ]
    inits = [_weight(rng, "u", 16, 16), _weight(rng, "w", 10, 16), _weight(rng, "v", 16, 1)]
    path = _save(
        tmp / "recurrent.onnx",
        nodes,
        [_float("x", ["N", 10]), _float("state", ["N", 16])],
        [_float("output", ["N", 1]), _float("stateN", ["N", 16])],
        inits,
    )
    return BuiltModel(path, {})


def _branch(name: str, op: str, factor: str) -> onnx.GraphProto:
    """A subgraph with no inputs that reads `feature` and `factor` from the outer scope."""
    return helper.make_graph(
        [helper.make_node(op, ["feature", factor], [f"{name}_out"])],
        name,
        [],
        [_float(f"{name}_out", None)],
    )


def if_node(tmp: Path) -> BuiltModel:
    """An `If` on the sign of a feature's sum, both branches reading the feature (and
    a weight) from the outer scope."""
    rng = np.random.default_rng(6)
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["a"]),
        helper.make_node("Relu", ["a"], ["feature"]),
        helper.make_node("ReduceSum", ["feature"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "threshold"], ["big"]),
        helper.make_node(
            "If",
            ["big"],
            ["chosen"],
            then_branch=_branch("then", "Mul", "scale"),
            else_branch=_branch("else", "Add", "scale"),
        ),
        helper.make_node("MatMul", ["chosen", "w1"], ["b"]),
        helper.make_node("Tanh", ["b"], ["y"]),
    ]
    inits = [
        _weight(rng, "w0", 6, 12),
        _weight(rng, "w1", 12, 3),
        numpy_helper.from_array(np.array(1.0, np.float32), "threshold"),
        numpy_helper.from_array(np.full(12, 0.5, np.float32), "scale"),
    ]
    path = _save(
        tmp / "if_node.onnx", nodes, [_float("x", ["N", 6])], [_float("y", ["N", 3])], inits
    )
    return BuiltModel(path, {})


def loop_node(tmp: Path) -> BuiltModel:
    """A `Loop` of three steps whose body reads a feature from the outer scope."""
    rng = np.random.default_rng(7)
    body = helper.make_graph(
        [
            helper.make_node("Mul", ["v_in", "decay"], ["decayed"]),
            helper.make_node("Add", ["decayed", "feature"], ["v_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            _float("v_in", None),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _float("v_out", None)],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["a"]),
        helper.make_node("Relu", ["a"], ["feature"]),
        helper.make_node("Loop", ["steps", "keep_going", "feature"], ["looped"], body=body),
        helper.make_node("MatMul", ["looped", "w1"], ["b"]),
        helper.make_node("Tanh", ["b"], ["y"]),
    ]
    inits = [
        _weight(rng, "w0", 6, 12),
        _weight(rng, "w1", 12, 3),
        numpy_helper.from_array(np.array(3, np.int64), "steps"),
        numpy_helper.from_array(np.array(True), "keep_going"),
        numpy_helper.from_array(np.array(0.5, np.float32), "decay"),
    ]
    path = _save(
        tmp / "loop_node.onnx", nodes, [_float("x", ["N", 6])], [_float("y", ["N", 3])], inits
    )
    return BuiltModel(path, {})


def torch_detector(tmp: Path) -> BuiltModel:
    """A torch module exported with `dynamic_axes` (batch, height, width free) that
    returns a heat map early and a pooled score after more layers."""
    import torch
    from torch import nn

    class Detector(nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
            self.heat = nn.Conv2d(8, 1, 1)
            self.body = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
            self.head = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            feature = self.stem(x)
            heat = torch.sigmoid(self.heat(feature))
            pooled = self.body(feature).mean(dim=(2, 3))
            return self.head(pooled), heat

    torch.manual_seed(8)
    path = tmp / "torch_detector.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Detector().eval(),
            (torch.zeros(1, 3, 32, 32),),
            str(path),
            input_names=["image"],
            output_names=["boxes", "heat"],
            dynamic_axes={
                "image": {0: "batch", 2: "height", 3: "width"},
                "boxes": {0: "batch"},
                "heat": {0: "batch", 2: "height", 3: "width"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
    return BuiltModel(path, {"image": [1, 3, 48, 64]})


def sequence_output(tmp: Path) -> BuiltModel:
    """A model onnxruntime loads and runs whose output is a sequence of tensors: no
    stage can answer it over the inference protocol."""
    nodes = [
        helper.make_node("Mul", ["x", "w"], ["m"]),
        helper.make_node("Relu", ["m"], ["r"]),
        helper.make_node("SequenceConstruct", ["r", "x"], ["pieces"]),
    ]
    # a weight makes the file binary (a ConfigMap holds it as binaryData)
    weight = _weight(np.random.default_rng(9), "w", 4)
    graph = helper.make_graph(
        nodes,
        "sequence_out",
        [_float("x", ["N", 4])],
        [helper.make_tensor_sequence_value_info("pieces", TensorProto.FLOAT, None)],
        [weight],
    )
    path = tmp / "sequence_out.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.save(model, str(path))
    return BuiltModel(path, {})


BUILDERS: dict[str, Callable[[Path], BuiltModel]] = {
    "spatial": spatial,
    "data_dependent": data_dependent,
    "two_inputs": two_inputs,
    "two_outputs": two_outputs,
    "recurrent": recurrent,
    "if_node": if_node,
    "loop_node": loop_node,
    "torch_detector": torch_detector,
}
