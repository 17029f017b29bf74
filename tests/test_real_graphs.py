"""Exported graphs through profiling, planning and serving: free dimensions whose sizes
the user gives (never guessed), tensors onnx cannot size (measured), several inputs
and outputs, a recurrent state pair, `If` and `Loop`. Each model is profiled with
`edgeai profile`, planned with `edgeai plan` over device, edge and cloud, and served
by its plan's stages as worker processes (and by a chain forced through three stages);
the answers are onnxruntime's on the whole model."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from _real_graphs import (
    BUILDERS,
    foreign_op,
    if_node,
    loop_node,
    recurrent,
    sequence_output,
    spatial,
)
from _served_plans import TOPOLOGY, forced_plan, plan_cli, profile_cli, serve_and_compare
from edgeai_operator import cli
from edgeai_worker import graph


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUILDERS))
def test_exported_graph_profiles_plans_and_serves_exactly(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    built = BUILDERS[name](tmp_path)
    saved = profile_cli(built, tmp_path, capsys)
    profile = json.loads(saved.read_text())
    model = onnx.load(built.path)
    # the profile is taken at the given shapes, a free batch at 1
    dag = graph.analyze(model, built.input_shapes)
    declared = [profile["input"], *profile.get("inputs", [])[1:]]
    assert {i["name"]: i["shape"] for i in declared} == {
        n: list(s) for n, s in dag.input_shapes.items()
    }
    # every cut's bytes are those of the tensors the model makes on the profiled input
    feeds = graph.sample_feed(model, dag.input_shapes)
    values = dict(feeds)
    for cut_a, cut_b in itertools.pairwise(profile["cuts"]):
        head = graph.extract_partition(model, cut_a["tensors"], cut_b["tensors"])
        values.update(
            dict(zip([o.name for o in head.graph.output], _run(head, values), strict=True))
        )
        assert sum(values[t].nbytes for t in cut_b["tensors"]) == cut_b["sizeBytes"], cut_b
    assert profile["cuts"][-1]["tensors"] == [o.name for o in model.graph.output]
    plan = plan_cli(saved, tmp_path, capsys)
    assert plan["feasible"] is True
    assert plan["stages"][0]["inputs"] == profile["cuts"][0]["tensors"]
    assert plan["stages"][-1]["outputs"] == profile["cuts"][-1]["tensors"]
    serve_and_compare(plan, built, feeds, tmp_path)
    # and the same through three stages, device -> edge -> cloud, at inner cuts
    counts, _ = serve_and_compare(forced_plan(plan, profile), built, feeds, tmp_path)
    assert counts == [1, 1, 1]


def _run(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [
        np.asarray(r)
        for r in session.run(None, {i.name: values[i.name] for i in session.get_inputs()})
    ]


@pytest.mark.slow
def test_free_batch_and_spatial_dims_stay_free_in_the_stages(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Profiled at 1x3x40x56, the stages still take another batch and image size."""
    built = spatial(tmp_path)
    plan = plan_cli(profile_cli(built, tmp_path, capsys), tmp_path, capsys)
    profile = json.loads((tmp_path / "spatial-profile.json").read_text())
    x = np.random.default_rng(3).standard_normal((3, 3, 24, 36)).astype(np.float32)
    serve_and_compare(forced_plan(plan, profile), built, {"x": x}, tmp_path)


def test_free_dimensions_are_refused_unless_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    built = spatial(tmp_path)
    path = str(built.path)
    assert cli.main(["profile", path, "--serving-requests", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert "input 'x' [N, 3, H, W]: dimension 2 ('H') is not fixed" in err
    assert "spec.input.shape" in err
    assert "--input-shape" in err
    bad = [
        ("--input-shape=1,3,40", "the shape [1, 3, 40] given for input 'x' does not fit"),
        ("--input-shape=1,4,40,56", "the shape [1, 4, 40, 56] given for input 'x' does not fit"),
        ("--input-shape=y=1,3,4,4", "--input-shape: 'y' is not a model input (x)"),
        ("--input-shape=x=1,3,a,4", "--input-shape: 'x=1,3,a,4' is not a shape"),
        ("--input-shape=1,0,4,4", "--input-shape: '1,0,4,4' has a dimension below 1"),
    ]
    for flag, message in bad:
        assert cli.main(["profile", path, flag, "--serving-requests", "0"]) == 2
        err = capsys.readouterr().err
        assert message in err, (flag, err)
        assert err.count("\n") == 1
    two = BUILDERS["two_inputs"](tmp_path)
    assert cli.main(["profile", str(two.path), "--input-shape=2,6"]) == 2
    assert "--input-shape: '2,6' names no input, and the model has 2: x, side" in (
        capsys.readouterr().err
    )
    # a bare shape names the single input; a free batch is profiled at 1 whatever is given
    saved = tmp_path / "p.json"
    args = ["profile", path, "--input-shape=2,3,8,8", "--repeats", "1", "--idle-ms", "0",
            "--serving-requests", "0", "-o", "json", "--save", str(saved)]  # fmt: skip
    assert cli.main(args) == 0
    capsys.readouterr()
    assert json.loads(saved.read_text())["input"] == {
        "name": "x",
        "shape": [1, 3, 8, 8],
        "dtype": "FP32",
    }
    # an input that declares no shape at all is never taken for a scalar
    unshaped = onnx.load(path)
    unshaped.graph.input[0].type.tensor_type.ClearField("shape")
    with pytest.raises(graph.GraphError, match="input 'x' declares no shape, not even its rank"):
        graph.concrete_input_shapes(unshaped)
    dag = graph.analyze(unshaped, {"x": [1, 3, 8, 8]})
    assert dag.input_shapes == {"x": (1, 3, 8, 8)}
    assert dag.tensors["c0"].shape == (1, 8, 8, 8)


def test_control_flow_nodes_are_atomic_and_read_outer_scope_tensors(tmp_path: Path) -> None:
    for built, op in ((if_node(tmp_path), "If"), (loop_node(tmp_path), "Loop")):
        model = onnx.load(built.path)
        dag = graph.analyze(model)
        (node,) = [n for n in dag.nodes if n.op_type == op]
        assert "feature" in node.inputs, "the subgraphs read it from the outer scope"
        cuts = graph.graph_cut_points(dag)
        inner = {
            t
            for n in model.graph.node
            for g in graph._subgraphs(n)
            for o in g.node
            for t in o.output
        }
        assert inner, "the subgraphs make tensors of their own"
        assert not inner & {t for c in cuts for t in c.tensors}, "no cut enters a subgraph"
        # a partition from the feature to the node's output holds the node, and what
        # its subgraphs read from outside: the feature as an input, weights as its own
        part = graph.extract_partition(model, ["feature"], [node.outputs[0]])
        assert [i.name for i in part.graph.input] == ["feature"]
        assert [n.op_type for n in part.graph.node if n.op_type in ("If", "Loop", "Scan")] == [op]
        subgraph_weights = {"If": "scale", "Loop": "decay"}[op]
        assert subgraph_weights in {i.name for i in part.graph.initializer}
        feeds = graph.sample_feed(model, {"x": [2, 6]})
        (feature,) = _run(graph.extract_partition(model, ["x"], ["feature"]), feeds)
        (whole,) = _run(graph.extract_partition(model, ["x"], [node.outputs[0]]), feeds)
        np.testing.assert_array_equal(_run(part, {"feature": feature})[0], whole)


def test_a_recurrent_state_pair_stays_in_one_stage_and_the_profile_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    built = recurrent(tmp_path)
    profile = json.loads(profile_cli(built, tmp_path, capsys).read_text())
    assert profile["held"] == [
        {
            "positions": "0-4",
            "tensors": ["state", "stateN"],
            "reason": "recurrent state state -> stateN stays in one stage",
        }
    ]
    positions = [c["position"] for c in profile["cuts"]]
    assert positions == [0, 5, 6, 7], "no cut between reading state and making stateN"
    # the planner places whole segments: the first one reads state and makes stateN
    assert profile["segments"][0]["positions"] == "0-4"
    plan = plan_cli(tmp_path / "recurrent-profile.json", tmp_path, capsys)
    assert plan["held"] == [
        "nodes 0-4 (state, stateN): recurrent state state -> stateN stays in one stage"
    ]
    manifest = tmp_path / "deployment.yaml"
    args = ["plan", "-f", str(manifest), "--topology", str(TOPOLOGY), "--profile",
            str(tmp_path / "recurrent-profile.json")]  # fmt: skip
    assert cli.main(args) == 0
    assert (
        "kept in one stage: nodes 0-4 (state, stateN): recurrent state state -> stateN "
        "stays in one stage" in capsys.readouterr().out
    )


def test_a_tensor_onnx_cannot_size_is_measured(tmp_path: Path) -> None:
    built = BUILDERS["data_dependent"](tmp_path)
    model = onnx.load(built.path)
    fixed = graph.infer_shapes(graph._with_input_shapes(model, {"x": [1, 8]}))
    assert "picked" not in graph._static(fixed, {"picked"}), "onnx cannot count the gathered"
    assert graph._symbolic_inference(fixed) is None or "picked" not in graph._static(
        graph._symbolic_inference(fixed) or fixed, {"picked"}
    )
    for seed in (0, 1):
        feeds = graph.sample_feed(model, {"x": [1, 8]}, seed)
        dag = graph.analyze(model, feeds=feeds)
        expected = _run(graph.extract_partition(model, ["x"], ["picked"]), feeds)[0]
        assert dag.tensors["picked"].size_bytes == expected.nbytes
        assert dag.tensors["picked"].shape == expected.shape


def test_a_graph_the_planner_cannot_handle_exits_2_naming_the_construct(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = sequence_output(tmp_path).path
    assert cli.main(["profile", str(path), "--serving-requests", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert "model output 'pieces' is a sequence_type, not a tensor" in err


@pytest.mark.slow
def test_an_op_onnx_does_not_know_is_sized_by_symbolic_inference_and_never_cut_after(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    built = foreign_op(tmp_path)
    model = onnx.load(built.path)
    fixed = graph.infer_shapes(graph._with_input_shapes(model, {"x": [1, 8]}))
    assert "g" not in graph._static(fixed, {"g"}), "onnx does not know com.microsoft.Gelu"
    symbolic = graph._symbolic_inference(fixed)
    assert symbolic is not None
    assert graph._static(symbolic, {"g"}) == {"g": (1, (1, 16))}
    dag = graph.analyze(model)
    assert dag.tensors["g"].size_bytes == 64
    # onnx infers no type after the op: no partition could declare those tensors
    assert dag.unsendable == {"g", "b", "r"}
    profile = json.loads(profile_cli(built, tmp_path, capsys).read_text())
    assert [c["tensors"] for c in profile["cuts"]] == [["x"], ["a"], ["y"]]
    plan = plan_cli(tmp_path / "foreign_op-profile.json", tmp_path, capsys)
    feeds = graph.sample_feed(model, dag.input_shapes)
    serve_and_compare(plan, built, feeds, tmp_path)
    forced = {
        **plan,
        "stages": [
            {"index": 0, "tier": "device", "layers": "0-0", "inputs": ["x"], "outputs": ["a"]},
            {"index": 1, "tier": "edge", "layers": "1-1", "inputs": ["a"], "outputs": ["y"]},
        ],
        "transfers": [],
        "alternatives": [],
    }
    counts, _ = serve_and_compare(forced, built, feeds, tmp_path)
    assert counts == [1, 1]
