"""Cut points and partitions: every cut of every zoo model splits it into partitions
whose chain reproduces the full model's output."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgeai_worker import graph, zoo

TOLERANCE = 1e-5
FAST_MODELS = ("digits_cnn", "vgg_like", "alexnet_like", "kws_lstm")
SLOW_MODELS = ("mobilenet_v2", "resnet18")


@functools.cache
def _model(name: str) -> onnx.ModelProto:
    return onnx.load(zoo.export_onnx(name))


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in session.get_inputs()]
    results = session.run(None, {n: feeds[n] for n in names})
    return dict(zip([o.name for o in session.get_outputs()], results, strict=True))


def _check_every_cut(name: str) -> None:
    model = _model(name)
    cuts = graph.cut_points(model)
    x = zoo.example_input(name, seed=7)
    full = _run(model, {"input": x})["output"]
    assert np.abs(full).max() > 1e-2, "outputs this small would make the comparison vacuous"
    partitioner = graph.Partitioner(model)
    for cut in cuts[1:-1]:
        head = partitioner.extract(["input"], cut.tensors)
        tail = partitioner.extract(cut.tensors, ["output"])
        middle = _run(head, {"input": x})
        (tensor,) = cut.tensors
        assert middle[tensor].nbytes == cut.size_bytes, (name, cut)
        out = _run(tail, middle)["output"]
        diff = float(np.abs(out - full).max())
        assert diff <= TOLERANCE, f"{name} cut {cut.index} ({tensor}): max abs diff {diff}"
    # and all segments chained one after the other
    feeds = {"input": x}
    for part in graph.segment_partitions(model, cuts):
        feeds.update(_run(part, feeds))
    assert float(np.abs(feeds["output"] - full).max()) <= TOLERANCE


@pytest.mark.parametrize("name", FAST_MODELS)
def test_every_cut_reproduces_the_full_model(name: str) -> None:
    _check_every_cut(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_MODELS)
def test_every_cut_reproduces_the_full_model_slow(name: str) -> None:
    _check_every_cut(name)


@pytest.mark.parametrize("name", zoo.ZOO_NAMES)
def test_single_tensor_cuts_are_exactly_the_one_tensor_boundaries(name: str) -> None:
    model = _model(name)
    dag = graph.analyze(model)
    cuts = graph.graph_cut_points(dag)
    assert cuts[0].tensors == ("input",)
    assert cuts[-1].tensors == ("output",)
    assert [c.index for c in cuts] == list(range(len(cuts)))
    assert [c.position for c in cuts] == sorted(c.position for c in cuts)
    # independent check: the crossing set of every prefix of the topological order
    singles = []
    for position in range(len(dag.nodes) + 1):
        crossing = dag.crossing(range(position))
        if len(crossing) == 1 and crossing not in singles:
            singles.append(crossing)
    assert [c.tensors for c in cuts] == singles
    for cut in cuts:
        assert cut.size_bytes == dag.size_bytes(cut.tensors) > 0


def test_residual_models_have_multi_tensor_dag_cuts_that_partition_correctly() -> None:
    model = _model("resnet18")
    dag = graph.analyze(model)
    positions = [p for p in range(1, len(dag.nodes)) if len(dag.crossing(range(p))) == 2]
    assert positions, "a residual block is cut by two tensors"
    position = positions[len(positions) // 2]
    crossing = dag.crossing(range(position))
    partitioner = graph.Partitioner(model)
    x = zoo.example_input("resnet18", seed=3)
    full = _run(model, {"input": x})["output"]
    middle = _run(partitioner.extract(["input"], crossing), {"input": x})
    out = _run(partitioner.extract(crossing, ["output"]), middle)["output"]
    assert float(np.abs(out - full).max()) <= TOLERANCE
    # one of the two tensors alone does not separate the graph
    with pytest.raises(ValueError, match="do not separate"):
        partitioner.extract(crossing[:1], ["output"])


def _diamond() -> onnx.ModelProto:
    """input -> Relu(a) -> {Sigmoid(b), Neg(c)} -> Add(d) -> Mul by a weight -> output"""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
    nodes = [
        helper.make_node("Relu", ["input"], ["a"]),
        helper.make_node("Sigmoid", ["a"], ["b"]),
        helper.make_node("Neg", ["a"], ["c"]),
        helper.make_node("Add", ["b", "c"], ["d"]),
        helper.make_node("Identity", ["w"], ["w2"]),  # constant-only: never crosses a cut
        helper.make_node("Mul", ["d", "w2"], ["output"]),
    ]
    g = helper.make_graph(nodes, "diamond", [x], [y], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_diamond_cuts_sizes_and_flops() -> None:
    model = _diamond()
    cuts = graph.cut_points(model)
    assert [c.tensors for c in cuts] == [("input",), ("a",), ("d",), ("output",)]
    assert [c.size_bytes for c in cuts] == [16, 16, 16, 16]
    dag = graph.analyze(model)
    assert [n.op_type for n in dag.nodes] == ["Relu", "Sigmoid", "Neg", "Add", "Mul"]
    assert dag.crossing([0, 1]) == ("a", "b")
    x = np.array([[-1.0, 0.5, 2.0, -3.0]], dtype=np.float32)
    full = _run(model, {"input": x})["output"]
    tail = graph.extract_partition(model, ["d"], ["output"])
    head = graph.extract_partition(model, ["input"], ["d"])
    np.testing.assert_array_equal(_run(tail, _run(head, {"input": x}))["output"], full)
    assert {i.name for i in tail.graph.initializer} == {"w"}


def test_flops_of_conv_and_gemm_follow_their_shapes() -> None:
    dag = graph.analyze(_model("digits_cnn"))
    flops = {n.op_type: [] for n in dag.nodes}  # type: dict[str, list[int]]
    for n in dag.nodes:
        flops[n.op_type].append(n.flops)
    # conv1: 16 out channels x 8x8 x (1x3x3); conv2: 32 x 8x8 x (16x3x3); gemms 512x64, 64x10
    assert flops["Conv"] == [2 * 16 * 64 * 9, 2 * 32 * 64 * 16 * 9]
    assert flops["Gemm"] == [2 * 512 * 64, 2 * 64 * 10]


def test_bad_partitions_are_refused() -> None:
    model = _diamond()
    with pytest.raises(ValueError, match="unknown tensor"):
        graph.extract_partition(model, ["nope"], ["output"])
    with pytest.raises(ValueError, match="empty partition"):
        graph.extract_partition(model, ["a"], ["a"])
