"""Early exits a user's model declares (DNNModel spec.exits): a perceptron on the digits
with an exit head, trained and exported here with torch (both outputs), prepared from
a file with labelled data (the exit measured on it), bad declarations refused naming
the field, and the plan's stages served by real worker processes on loopback."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from _worker_support import labelled_infer, metric_value, run_onnx
from edgeai_operator.errors import SpecError
from edgeai_operator.modelspec import ExitSpec, InputSpec, parse_model_spec
from edgeai_operator.prepare import PrepareRequest, PrepareResult, prepare

INPUT = InputSpec("input", (1, 1, 8, 8), "FP32")
HIDDEN = "hidden"  # the tensor the exit head reads
TARGET = 0.94


def _exit_mlp(path: Path) -> Path:
    """64-32-32-10 perceptron with an exit head (32 -> 10) on its first hidden layer,
    trained on the digits' train split with both losses, exported with outputs
    `output` and `exit_0`; the tensor the head reads renamed `hidden`."""
    import warnings

    import torch
    import torch.nn.functional as F
    from torch import nn

    from edgeai_worker import zoo
    from edgeai_worker.offload.build import branch_tensor, rename_tensor

    class ExitMlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
            self.rest = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 10))
            self.exit = nn.Sequential(nn.Linear(32, 3), nn.Linear(3, 10))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.first(x)
            return self.rest(h), self.exit(h)

    torch.manual_seed(0)
    model = ExitMlp()
    x_train, y_train, _, _ = zoo.digits_split()
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            out, early = model(x[idx])
            loss = F.cross_entropy(out, y[idx]) + F.cross_entropy(early, y[idx])
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros((1, 1, 8, 8)),),
            str(path),
            input_names=["input"],
            output_names=["output", "exit_0"],
            dynamic_axes={n: {0: "batch"} for n in ("input", "output", "exit_0")},
            opset_version=17,
            dynamo=False,
        )
    graph = onnx.load(str(path))
    rename_tensor(graph, branch_tensor(graph, "exit_0"), HIDDEN)
    onnx.save(graph, str(path))
    return path


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The model and its data on a claim's folder (`pvc://models/...`): the validation
    half of the digits' test split labelled in `data.npz`, the held-out half kept."""
    from edgeai_worker.offload.build import validation_split

    root = tmp_path_factory.mktemp("claims")
    folder = root / "models"
    folder.mkdir()
    _exit_mlp(folder / "mlp.onnx")
    x_val, y_val, x_ho, y_ho = validation_split()
    np.savez(folder / "data.npz", input=x_val, labels=y_val.astype(np.int64))
    # the same perceptron without its exit: the preparation trains one (spec.exits[].train)
    from edgeai_worker.offload.declared import DeclaredExit, backbone

    onnx.save(
        backbone(onnx.load(str(folder / "mlp.onnx")), [DeclaredExit("exit_0", HIDDEN)]),
        str(folder / "plain.onnx"),
    )
    return {"root": root, "x_val": x_val, "y_val": y_val, "x_ho": x_ho, "y_ho": y_ho}


def _request(
    exits: tuple[ExitSpec, ...],
    source: str = "mlp.onnx",
    data: bool = True,
    data_file: str = "data.npz",
) -> PrepareRequest:
    return PrepareRequest(
        source_uri=f"pvc://models/{source}",
        inputs=(INPUT,),
        artifacts_uri="pvc://models/prepared",
        data_uri=f"pvc://models/{data_file}" if data else None,
        model_name="mlp",
        exits=exits,
    )


def _prepare(user: dict[str, Any], request: PrepareRequest, workdir: Path) -> PrepareResult:
    return prepare(request, workdir, pvc_root=user["root"])


def test_spec_exits_are_parsed_and_their_errors_name_the_field() -> None:
    base = {"source": {"uri": "pvc://models/mlp.onnx"}, "input": {
        "name": "input", "shape": [1, 1, 8, 8], "dtype": "FP32"}}  # fmt: skip
    spec = parse_model_spec({**base, "exits": [{"output": "exit_0", "after": "hidden"}]})
    assert spec.exits == (ExitSpec("exit_0", "hidden"),)
    assert parse_model_spec(base).exits == ()
    refused = [
        ({"output": "exit_0"}, "spec.exits[0].after"),
        ({"output": "", "after": "h"}, "spec.exits[0].output"),
        ({"output": "exit_0", "after": "input"}, "spec.exits[0].after"),
        ({"output": "input", "after": "h"}, "spec.exits[0].output"),
        ({"output": "exit_0", "after": "exit_0"}, "spec.exits[0].after"),
        ({"output": "exit_0", "after": "h", "head": "x"}, "spec.exits[0]"),
    ]
    for entry, field in refused:
        with pytest.raises(SpecError) as info:
            parse_model_spec({**base, "exits": [entry]})
        assert str(info.value).startswith(field + ":"), (entry, str(info.value))
    twice = [{"output": "exit_0", "after": "h"}, {"output": "exit_0", "after": "g"}]
    with pytest.raises(SpecError, match=r"^spec.exits\[1\].output: 'exit_0' repeats"):
        parse_model_spec({**base, "exits": twice})
    with pytest.raises(SpecError, match=r"^spec.exits: must be a list"):
        parse_model_spec({**base, "exits": {"output": "exit_0"}})


def test_trained_exits_are_parsed_and_passed_to_the_preparation() -> None:
    from edgeai_operator.cli import build_parser
    from edgeai_operator.preparation import prepare_args

    base = {"source": {"uri": "pvc://models/plain.onnx"}, "input": {
        "name": "input", "shape": [1, 1, 8, 8], "dtype": "FP32"},
        "data": {"uri": "pvc://models/data.npz"}}  # fmt: skip
    exits = [{"output": "exit_0", "after": "hidden", "train": True}, {"output": "e", "after": "f"}]
    spec = parse_model_spec({**base, "exits": exits})
    assert spec.exits == (ExitSpec("exit_0", "hidden", True), ExitSpec("e", "f"))
    args = prepare_args(spec, model_name="m", artifacts_uri="pvc://a", result="ns/r")
    assert [a for a in args if "exit" in a] == ["--train-exit=exit_0=hidden", "--exit=e=f"]
    parsed = build_parser().parse_args(args)
    assert parsed.exit == [ExitSpec("exit_0", "hidden", True), ExitSpec("e", "f", False)]
    with pytest.raises(SpecError, match=r"^spec.exits\[0\].train: must be true or false"):
        parse_model_spec({**base, "exits": [{**exits[0], "train": "yes"}]})
    no_data = {k: v for k, v in base.items() if k != "data"}
    with pytest.raises(SpecError, match=r"^spec.data: is not set, and spec.exits\[0\].train"):
        parse_model_spec({**no_data, "exits": exits})


def test_a_trained_head_is_the_graph_it_is_grafted_as() -> None:
    """Softmax regression on the digits' pixels learns them; grafted onto a model,
    onnxruntime computes what numpy does, pooled over H and W for a large 4-D tensor;
    a name the model has is refused."""
    from edgeai_worker import zoo
    from edgeai_worker.offload.trained import graft_heads, head_logits, train_head

    x_train, y_train, x_test, y_test = zoo.digits_split()
    head = train_head("exit_0", "flat", x_train, y_train, 10)
    assert not head.pooled
    assert head.train_accuracy > 0.95
    assert head.trained_on == len(y_train)
    model = onnx.load_from_string(_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["output"])],
        [("output", 10)], {"w": np.zeros((64, 10))},
    ))  # fmt: skip
    grafted = graft_heads(model, [head])
    assert [o.name for o in grafted.graph.output] == ["output", "exit_0"]
    path = Path(tempfile.mkdtemp()) / "grafted.onnx"
    onnx.save(grafted, str(path))
    _, early = run_onnx(path, {"input": x_test})
    np.testing.assert_allclose(early, head_logits(head, x_test), rtol=1e-4, atol=1e-4)
    assert np.mean(early.argmax(1) == y_test) > 0.9  # held out: it generalises
    with pytest.raises(ValueError, match="'output' already names a tensor of the model"):
        graft_heads(model, [train_head("output", "flat", x_train, y_train, 10)])
    # a convolution-sized tensor (8x32x32 = 8192 values) is averaged over H, W first
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 8, 64)
    values = rng.standard_normal((64, 8, 32, 32)).astype(np.float32)
    values[np.arange(64), labels] += 1.0  # the channel of its class is brighter
    wide = train_head("exit_w", "r", values, labels, 8)
    assert wide.pooled
    assert wide.weight.shape == (8, 8)
    assert wide.train_accuracy == 1.0
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("GlobalAveragePool", ["r"], ["g"]),
         helper.make_node("Flatten", ["g"], ["y"])],
        "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
    )  # fmt: skip
    conv = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    path = path.with_name("wide.onnx")
    onnx.save(graft_heads(conv, [wide]), str(path))
    _, early = run_onnx(path, {"x": values})
    relu = np.maximum(values, 0)
    np.testing.assert_allclose(early, head_logits(wide, relu), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_trained_exit_is_added_measured_and_refused_naming_the_field(
    user: dict[str, Any], tmp_path: Path
) -> None:
    """spec.exits[0] with train: true on the perceptron without its exit: the head is
    trained on the even rows of spec.data, the artefact carries it, the exit is
    calibrated on the odd rows; what cannot be trained is refused naming the field."""
    trained = ExitSpec("exit_0", HIDDEN, train=True)
    result = _prepare(user, _request((trained,), "plain.onnx"), tmp_path)
    fp32 = result.variant("fp32")
    assert fp32.ready, fp32.message
    count = len(user["y_val"])
    assert f"exit heads trained from spec.data: exit_0 on {(count + 1) // 2} examples" in (
        fp32.message
    )
    assert [o.name for o in result.outputs] == ["output", "exit_0"]
    profile = fp32.profile
    assert profile is not None
    assert all("exit_0" not in c["tensors"] for c in profile["cuts"])
    (entry,) = profile["offload"]["exits"]
    assert (entry["output"], entry["after"]) == ("exit_0", HIDDEN)
    assert entry["trained"]["examples"] == (count + 1) // 2
    assert entry["headFlops"] == 2 * 32 * 10  # one Gemm, 32 features to 10 classes
    tables = profile["offload"]["validation"]
    assert len(tables["final_correct"]) == count // 2  # the odd rows only
    artefact = user["root"] / "models" / "prepared" / Path(fp32.artifact.uri).name
    _, early = run_onnx(artefact, {"input": user["x_val"][1::2]})
    assert tables["exits_correct"] == [
        (early.argmax(1) == user["y_val"][1::2]).astype(int).tolist()
    ]
    # the final output is the model's own; the exit is right on most held-out digits
    plain_final = run_onnx(user["root"] / "models" / "plain.onnx", {"input": user["x_ho"]})[0]
    final_ho, early_ho = run_onnx(artefact, {"input": user["x_ho"]})
    np.testing.assert_allclose(final_ho, plain_final, rtol=1e-5, atol=1e-5)
    exit_accuracy = float(np.mean(early_ho.argmax(1) == user["y_ho"]))
    print(f"trained exit_0: held-out accuracy {exit_accuracy:.4f}")
    assert exit_accuracy >= 0.85
    folder = user["root"] / "models"
    np.savez(folder / "few.npz", input=user["x_val"][:19], labels=user["y_val"][:19])
    np.savez(folder / "ten.npz", input=user["x_val"][:40], labels=user["y_val"][:40] + 5)
    cases = [
        ((ExitSpec("output", HIDDEN, True),), "data.npz",
         r"spec.exits\[0\].output: 'output' already names a tensor of the model"),
        ((ExitSpec("exit_0", "nowhere", True),), "data.npz",
         r"spec.exits\[0\].after: 'nowhere' is not a tensor the model computes"),
        ((trained,), "few.npz", r"spec.data.uri: holds 19 labelled examples, too few"),
        ((trained,), "ten.npz", r"spec.data.uri: its labels lie in \[5, 14\], the final output "
         r"'output' scores 10 classes"),
    ]  # fmt: skip
    for i, (exits, data_file, message) in enumerate(cases):
        with pytest.raises(SpecError, match=message):
            _prepare(user, _request(exits, "plain.onnx", data_file=data_file), tmp_path / str(i))
    with pytest.raises(SpecError, match=r"^spec.data: is not set, and spec.exits\[0\].train"):
        _prepare(user, _request((trained,), "plain.onnx", data=False), tmp_path / "nodata")


@pytest.mark.slow
def test_declared_exits_are_measured_on_the_data_into_the_profile(
    user: dict[str, Any], tmp_path: Path
) -> None:
    result = _prepare(user, _request((ExitSpec("exit_0", HIDDEN),)), tmp_path)
    fp32 = result.variant("fp32")
    assert fp32.ready, fp32.message
    assert [o.name for o in result.outputs] == ["output", "exit_0"]
    profile = fp32.profile
    assert profile is not None
    # profiled without the exit: it does not travel to the last stage as an output
    cut_tensors = [c["tensors"] for c in profile["cuts"]]
    assert [HIDDEN] in cut_tensors
    assert cut_tensors[-1] == ["output"]
    assert all("exit_0" not in t for t in cut_tensors)
    section = profile["offload"]
    assert section["finalOutput"] == "output"
    assert "cascade" not in section
    (entry,) = section["exits"]
    assert entry["output"] == "exit_0"
    assert entry["after"] == HIDDEN
    assert entry["logitsBytes"] == 10 * 4
    assert entry["headFlops"] == 2 * 32 * 3 + 2 * 3 * 10  # its two Gemms, as profiles count
    # the tables are the model's own answers on the data, row by row
    model = user["root"] / "models" / "mlp.onnx"
    final, early = run_onnx(model, {"input": user["x_val"]})
    tables = section["validation"]
    assert tables["final_correct"] == (final.argmax(1) == user["y_val"]).astype(int).tolist()
    assert tables["exits_correct"] == [(early.argmax(1) == user["y_val"]).astype(int).tolist()]
    from edgeai_worker.offload.gate import confidence

    np.testing.assert_allclose(tables["exits_maxProb"][0], confidence(early, "maxProb"), atol=5e-5)
    assert fp32.accuracy == pytest.approx(np.mean(final.argmax(1) == user["y_val"]), abs=1e-4)
    # the artefact is the model as it is, exit included
    artefact = user["root"] / "models" / "prepared" / Path(fp32.artifact.uri).name
    assert [o.name for o in onnx.load(str(artefact)).graph.output] == ["output", "exit_0"]
    # without data the exit is checked but not measured: no offload section
    plain = _prepare(user, _request((ExitSpec("exit_0", HIDDEN),), data=False), tmp_path / "b")
    assert plain.variant("fp32").ready
    assert "offload" not in (plain.variant("fp32").profile or {})


def _graph(nodes: list[Any], outputs: list[tuple[str, int]], weights: dict[str, Any]) -> bytes:
    graph = helper.make_graph(
        nodes,
        "declared",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", k]) for n, k in outputs],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _bad_models() -> dict[str, bytes]:
    """Models whose declared exit `exit_0` (after `h1`) the graph contradicts."""
    rng = np.random.default_rng(3)
    w = {
        "w1": rng.standard_normal((64, 16)), "w2": rng.standard_normal((16, 16)),
        "w3": rng.standard_normal((16, 10)), "we": rng.standard_normal((16, 10)),
        "w5": rng.standard_normal((16, 5)), "wf": rng.standard_normal((64, 10)),
    }  # fmt: skip
    trunk = [
        helper.make_node("Flatten", ["input"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w1"], ["m1"]),
        helper.make_node("Relu", ["m1"], ["h1"]),
        helper.make_node("MatMul", ["h1", "w2"], ["m2"]),
        helper.make_node("Relu", ["m2"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w3"], ["output"]),
    ]
    two = [("output", 10), ("exit_0", 10)]
    return {
        # the head reads h2, a layer after h1
        "later": _graph([*trunk, helper.make_node("MatMul", ["h2", "we"], ["exit_0"])], two, w),
        # the head also reads the flattened input, computed before h1
        "earlier": _graph(
            [
                *trunk,
                helper.make_node("MatMul", ["h1", "we"], ["e1"]),
                helper.make_node("MatMul", ["flat", "wf"], ["e2"]),
                helper.make_node("Add", ["e1", "e2"], ["exit_0"]),
            ],
            two,
            w,
        ),
        # 5 classes where the model scores 10
        "classes": _graph(
            [*trunk, helper.make_node("MatMul", ["h1", "w5"], ["exit_0"])],
            [("output", 10), ("exit_0", 5)],
            w,
        ),
        # h1 is no single-tensor cut: the layer after m2 also reads h1 (a skip)
        "skip": _graph(
            [
                *trunk[:4],
                helper.make_node("Add", ["m2", "h1"], ["s2"]),
                helper.make_node("Relu", ["s2"], ["h2"]),
                trunk[5],
                helper.make_node("MatMul", ["m2", "we"], ["exit_0"]),
            ],
            two,
            w,
        ),
    }


@pytest.mark.slow
def test_declarations_the_graph_contradicts_are_refused_naming_the_field(
    user: dict[str, Any], tmp_path: Path
) -> None:
    folder = user["root"] / "models"
    for name, data in _bad_models().items():
        (folder / f"{name}.onnx").write_bytes(data)
    cases = [
        ("mlp.onnx", ExitSpec("exit_9", HIDDEN), r"spec.exits\[0\].output: 'exit_9' is not an "
         r"output of the model \(its outputs: output, exit_0\)"),
        ("mlp.onnx", ExitSpec("exit_0", "nowhere"), r"spec.exits\[0\].after: 'nowhere' is not a "
         "tensor the model computes"),
        ("mlp.onnx", (ExitSpec("exit_0", HIDDEN), ExitSpec("output", HIDDEN)),
         r"spec.exits\[0\].output: every model output \(output, exit_0\) is declared an exit"),
        ("later.onnx", ExitSpec("exit_0", "h1"), r"spec.exits\[0\].output: the head of 'exit_0' "
         r"reads 'h2' \(computed by later layers\)"),
        ("earlier.onnx", ExitSpec("exit_0", "h1"), r"spec.exits\[0\].output: the head of "
         r"'exit_0' reads 'flat' \(computed before it\)"),
        ("classes.onnx", ExitSpec("exit_0", "h1"), r"spec.exits\[0\].output: 'exit_0' has shape "
         r"\[1, 5\] .* an exit scores the same 10 classes"),
        ("skip.onnx", ExitSpec("exit_0", "m2"), r"spec.exits\[0\].after: 'm2' is not a "
         "single-tensor cut"),
    ]  # fmt: skip
    for i, (source, declared, message) in enumerate(cases):
        exits = declared if isinstance(declared, tuple) else (declared,)
        with pytest.raises(SpecError, match=message):
            _prepare(user, _request(exits, source), tmp_path / str(i))
    # nothing was built or stored for a refused declaration
    assert not (folder / "prepared").exists() or not any(
        p.name.startswith(("later", "earlier", "classes", "skip"))
        for p in (folder / "prepared").iterdir()
    )


# ------------------------------------------------------- planned and served, exits on


def _node(name: str, tier: str, gflops: float, mbps: float | None) -> Any:
    from edgeai_operator.planning import NodeState
    from edgeai_operator.topology import NodeSpec

    labels = {"edgeai.dev/tier": tier, "topology.kubernetes.io/zone": "zone-a"}
    return NodeState(
        NodeSpec(name, tier, "zone-a", {}, gflops, mbps, 1.0, None, labels), True, True
    )


def _deployment(offload: dict[str, Any] | None) -> Any:
    from edgeai_operator.deployspec import parse_deployment

    body = {k: v for k, v in [("offload", offload)] if v is not None}
    return parse_deployment(
        {
            "apiVersion": "edgeai.dev/v1alpha1",
            "kind": "DNNDeployment",
            "metadata": {"name": "reader"},
            "spec": {
                "modelRef": {"name": "mlp"},
                "slo": {"latencyP95Ms": 100},
                "placement": {"tiers": ["device", "edge"], "adaptiveSplit": False},
                **body,
            },
        }
    )


def _profiles(result: PrepareResult) -> list[dict[str, Any]]:
    """The profiles as the DNNModel's status holds them (variant, build, artefact)."""
    fp32 = result.variant("fp32")
    assert fp32.profile is not None
    assert fp32.artifact is not None
    return [{**fp32.profile, "build": "fp32", "artifact": fp32.artifact.to_dict()}]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("trained", [False, True], ids=["declared", "trained"])
def test_declared_exits_are_planned_and_served_by_worker_processes(
    user: dict[str, Any], tmp_path: Path, trained: bool
) -> None:
    """The planner costs the split with the exit's measured share and the plan carries
    its threshold; the stage computing `hidden` answers when confident; escalations
    reach the model's own output, the same as the full model's. The same for the
    perceptron without its exit whose head the preparation trains."""
    from edgeai_operator.localworkers import start_local
    from edgeai_operator.partitions import build_partitions, exit_heads, offload_settings
    from edgeai_operator.plandoc import PlanDocument
    from edgeai_operator.planning import plan_zones

    request = (
        _request((ExitSpec("exit_0", HIDDEN, True),), "plain.onnx")
        if trained
        else _request((ExitSpec("exit_0", HIDDEN),))
    )
    result = _prepare(user, request, tmp_path / "prepare")
    profiles = _profiles(result)
    # a slow device on a slow link: without exits the edge runs everything; with the
    # exit answering most inputs, the device runs the first layer and the exit
    nodes = [_node("phone", "device", 0.002, 0.8), _node("gateway", "edge", 50.0, None)]
    plain = plan_zones(_deployment(None), profiles, nodes).plans["zone-a"]
    assert [s.tier for s in plain.stages] == ["edge"]
    spec = _deployment({"exits": {"rule": "maxProb", "targetAccuracy": TARGET}})
    plan = plan_zones(spec, profiles, nodes).plans["zone-a"]
    assert plan.offload is not None
    (declared,) = plan.offload.declared_exits
    assert (declared.output, declared.after) == ("exit_0", HIDDEN)
    assert 0 < declared.threshold <= 1
    assert plan.offload.final_output == "output"
    shares = plan.offload.exit_shares
    assert set(shares) == {"exit_0", "final"}
    assert shares["exit_0"] > 0.5
    assert PlanDocument.from_dict(plan.to_dict()) == plan
    assert [s.tier for s in plan.stages] == ["device", "edge"]
    assert plan.stages[0].outputs == (HIDDEN,)
    model = user["root"] / "models" / "prepared" / Path(plan.model.uri or "").name
    assert model.is_file()
    work = tmp_path / "serve"
    work.mkdir()
    specs = build_partitions(
        plan.stages, plan.alternatives, model, work, adaptive=False, exits=exit_heads(plan)
    )
    device_outputs = [o.name for o in onnx.load(str(specs[0].partitions[0])).graph.output]
    edge_outputs = [o.name for o in onnx.load(str(specs[1].partitions[0])).graph.output]
    assert device_outputs == [HIDDEN, "exit_0"]
    assert edge_outputs == ["output"]
    device = offload_settings(plan, 0, work, model)["offload"]
    assert device == {
        "rule": "maxProb",
        "exits": [{"output": "exit_0", "threshold": declared.threshold}],
        "finalOutput": "output",
    }
    assert offload_settings(plan, 1, work, model) == {}
    x_ho, y_ho = user["x_ho"], user["y_ho"]
    full_out, _ = run_onnx(model, {"input": x_ho})
    run = start_local(plan, specs, work, model_path=model)
    try:
        answers = [
            labelled_infer(run.entry_url, x[None], int(y), "mlp")
            for x, y in zip(x_ho, y_ho, strict=True)
        ]
        accuracy = metric_value(run.entry_url, "edgeai_labelled_accuracy")
        escalations = metric_value(run.entry_url, "edgeai_escalations_total")
        edge_requests = metric_value(run.urls[1][0], "edgeai_requests_total")
    finally:
        run.stop()
    which = [a["parameters"]["edgeai_exit"] for a in answers]
    assert set(which) == {"exit_0", "final"}
    assert accuracy >= TARGET
    finals = [i for i, w in enumerate(which) if w == "final"]
    assert escalations == len(finals) == edge_requests
    for i in finals:
        (out,) = answers[i]["outputs"]
        assert out["name"] == "output"
        np.testing.assert_allclose(out["data"], full_out[i], rtol=1e-4, atol=1e-4)


def test_exits_on_a_prepared_model_without_calibration_are_refused() -> None:
    from edgeai_operator.planning import plan_zones

    profile = {
        "kind": "Profile", "model": "mlp", "variant": "fp32", "build": "fp32", "host": {},
        "input": {"name": "input", "shape": [1, 1, 8, 8], "dtype": "FP32"},
        "artifact": {"uri": "pvc://models/prepared/mlp.onnx", "digest": "sha256:" + "0" * 64,
                     "sizeBytes": 1},
        "cuts": [{"index": 0, "tensors": ["input"], "sizeBytes": 256, "position": 0},
                 {"index": 1, "tensors": ["output"], "sizeBytes": 40, "position": 1}],
        "segments": [{"index": 0, "positions": "0-0", "flops": 1000}],
    }  # fmt: skip
    nodes = [_node("phone", "device", 1.0, 10.0), _node("gateway", "edge", 50.0, None)]
    spec = _deployment({"exits": {"rule": "maxProb", "targetAccuracy": TARGET}})
    with pytest.raises(SpecError, match=r"^spec.offload.exits: the model's profile carries no "):
        plan_zones(spec, [profile], nodes)
    # with its own exits calibrated, a cascade is still refused: it has no small models
    section = {"exits": [], "finalOutput": "output", "validation": {"final_correct": [1]}}
    cascade = _deployment({"cascade": {"rule": "maxProb", "targetAccuracy": TARGET}})
    with pytest.raises(SpecError, match=r"^spec.offload.cascade: the model has no small models"):
        plan_zones(cascade, [{**profile, "offload": section}], nodes)
    # without spec.offload.exits the same profile plans
    assert plan_zones(_deployment({"reuse": {"maxEntries": 8}}), [profile], nodes).plans


# ------------------------------------------------------------ the real control plane


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_declared_exits_on_the_control_plane(
    user: dict[str, Any], ns: Any, operator: Any, tmp_path: Path
) -> None:
    """DNNModels from ConfigMaps: with spec.exits and spec.data Prepared with the
    offload section, a DNNDeployment with spec.offload.exits served by its stage pods'
    own commands (the device answers at the exit, escalations the full model's answer);
    a declaration the graph contradicts is not Prepared, naming spec.exits[0]; exits
    on a model whose exits have no data are refused naming spec.offload.exits."""
    from _cluster_support import annotated_nodes, apply, condition, get, wait_for
    from _serving import DEVICE, deployment, serving_chain

    folder = user["root"] / "models"
    ns.kubectl(
        "create", "configmap", "mlp-files", f"--from-file=model.onnx={folder / 'mlp.onnx'}",
        f"--from-file=data.npz={folder / 'data.npz'}",
        f"--from-file=plain.onnx={folder / 'plain.onnx'}",
    )  # fmt: skip

    def model(
        name: str, exits: list[dict[str, Any]], data: bool = True, source: str = "model.onnx"
    ) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "source": {"uri": f"configmap://mlp-files/{source}"},
            "input": {"name": "input", "shape": [1, 1, 8, 8], "dtype": "FP32"},
            "exits": exits,
        }
        if data:
            spec["data"] = {"uri": "configmap://mlp-files/data.npz"}
        return {"apiVersion": "edgeai.dev/v1alpha1", "kind": "DNNModel",
                "metadata": {"name": name}, "spec": spec}  # fmt: skip

    def model_condition(name: str, status: str, reason: str = "Prepared") -> dict[str, Any]:
        def holds() -> Any:
            obj = get(ns, "dnnm", name)
            cond = condition(obj, "Prepared")
            return (cond.get("status"), cond.get("reason")) == (status, reason) and obj

        found: dict[str, Any] = wait_for(f"DNNModel {name} Prepared={status}", holds, 240)
        return found

    apply(
        ns,
        model("mlp", [{"output": "exit_0", "after": HIDDEN}]),
        model("mlp-bad", [{"output": "exit_9", "after": HIDDEN}]),
        model("mlp-nodata", [{"output": "exit_0", "after": HIDDEN}], data=False),
        model("mlp-trained", [{"output": "exit_0", "after": HIDDEN, "train": True}],
              source="plain.onnx"),
    )  # fmt: skip
    bad = condition(model_condition("mlp-bad", "False", "InvalidModel"), "Prepared")
    assert "spec.exits[0].output: 'exit_9' is not an output of the model" in bad["message"]
    status = model_condition("mlp", "True")["status"]
    (fp32,) = [p for p in status["profiles"] if p["variant"] == "fp32"]
    assert fp32["offload"]["finalOutput"] == "output"
    assert [e["output"] for e in fp32["offload"]["exits"]] == ["exit_0"]
    assert len(fp32["offload"]["validation"]["final_correct"]) == len(user["y_val"])
    model_condition("mlp-nodata", "True")
    # the head trained by the preparation Job: the artefact has it, calibrated on odd rows
    trained = model_condition("mlp-trained", "True")["status"]
    (fp32,) = [p for p in trained["profiles"] if p["variant"] == "fp32"]
    (entry,) = fp32["offload"]["exits"]
    assert entry["output"] == "exit_0"
    assert entry["trained"]["examples"] == (len(user["y_val"]) + 1) // 2
    assert len(fp32["offload"]["validation"]["final_correct"]) == len(user["y_val"]) // 2

    offload = {"exits": {"rule": "maxProb", "targetAccuracy": TARGET}}
    app = deployment("reader", "mlp")
    app["spec"]["placement"]["adaptiveSplit"] = False
    app["spec"]["privacy"] = {}
    app["spec"]["offload"] = offload
    refused = deployment("reader-nodata", "mlp-nodata")
    refused["spec"]["placement"]["adaptiveSplit"] = False
    refused["spec"]["offload"] = offload
    x_ho, y_ho = user["x_ho"], user["y_ho"]
    full_out, _ = run_onnx(folder / "mlp.onnx", {"input": x_ho})
    # the unit test's slow device on a slow link, so the exit runs on the device
    with (
        annotated_nodes(ns.cluster, [DEVICE], "edgeai.dev/gflops", "0.002"),
        annotated_nodes(ns.cluster, [DEVICE], "edgeai.dev/uplink-mbps", "0.8"),
        annotated_nodes(ns.cluster, [DEVICE], "edgeai.dev/uplink-rtt-ms", "1"),
    ):
        apply(ns, app, refused)

        def invalid() -> Any:
            cond = condition(get(ns, "dnnd", "reader-nodata"), "Planned")
            return cond.get("reason") == "InvalidSpec" and cond

        message = wait_for("reader-nodata refused", invalid, 120)["message"]
        assert message.startswith("spec.offload.exits: the model's profile carries no "), message
        with serving_chain(ns, "reader", tmp_path / "pods") as url:
            plan = get(ns, "dnnd", "reader")["status"]["plan"]
            answers = [
                labelled_infer(url, x[None], int(y), "mlp") for x, y in zip(x_ho, y_ho, strict=True)
            ]
            accuracy = metric_value(url, "edgeai_labelled_accuracy")
            escalations = metric_value(url, "edgeai_escalations_total")
    assert set(plan["exitShares"]) == {"exit_0", "final"}
    which = [a["parameters"]["edgeai_exit"] for a in answers]
    counts = {w: which.count(w) for w in sorted(set(which))}
    print(f"reader: split {plan['stages']}, answered {counts}, accuracy {accuracy:.4f}")
    assert set(which) == {"exit_0", "final"}
    assert accuracy >= TARGET
    finals = [i for i, w in enumerate(which) if w == "final"]
    assert escalations == len(finals)
    for i in finals:
        (out,) = answers[i]["outputs"]
        np.testing.assert_allclose(out["data"], full_out[i], rtol=1e-4, atol=1e-4)
