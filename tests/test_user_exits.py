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
from edgeai_operator.modelspec import ExitSpec, InputSpec, SourceRef, parse_model_spec
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
    from edgeai_worker import zoo
    from edgeai_worker.offload.declared import DeclaredExit, backbone
    from edgeai_worker.offload.trained import train_head

    onnx.save(
        backbone(onnx.load(str(folder / "mlp.onnx")), [DeclaredExit("exit_0", HIDDEN)]),
        str(folder / "plain.onnx"),
    )
    # two small models for a cascade: softmax regressions on the digits averaged to 4x4
    x_train, y_train, _, _ = zoo.digits_split()
    pooled = x_train.reshape(len(x_train), 1, 4, 2, 4, 2).mean(axis=(3, 5))
    for name, steps in (("small", 400), ("small2", 60)):
        head = train_head("output", "flat", pooled, y_train, 10, steps=steps)
        (folder / f"{name}.onnx").write_bytes(_linear_model(head.weight, head.bias, pool=True))
    return {"root": root, "x_val": x_val, "y_val": y_val, "x_ho": x_ho, "y_ho": y_ho}


def _linear_model(
    weight: np.ndarray,
    bias: np.ndarray,
    input_shape: list[Any] | None = None,
    pool: bool = False,
) -> bytes:
    """input [-> AveragePool 2x2] -> Flatten -> Gemm(weight, bias) -> output, for
    [N, 1, 8, 8] digits."""
    pooling = [helper.make_node("AveragePool", ["input"], ["small"], kernel_shape=[2, 2],
                                strides=[2, 2])] if pool else []  # fmt: skip
    return _graph(
        [*pooling, helper.make_node("Flatten", ["small" if pool else "input"], ["flat"]),
         helper.make_node("Gemm", ["flat", "w", "b"], ["output"], transB=1)],
        [("output", len(bias))], {"w": weight, "b": bias}, input_shape,
    )  # fmt: skip


def _request(
    exits: tuple[ExitSpec, ...],
    source: str = "mlp.onnx",
    data: bool = True,
    data_file: str = "data.npz",
    small: tuple[str, ...] = (),
) -> PrepareRequest:
    return PrepareRequest(
        small_models=tuple(SourceRef(f"pvc://models/{m}") for m in small),
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


def test_small_models_are_parsed_and_passed_to_the_preparation() -> None:
    from edgeai_operator.cli import build_parser
    from edgeai_operator.preparation import prepare_args

    base = {"source": {"uri": "pvc://models/plain.onnx"}, "input": {
        "name": "input", "shape": [1, 1, 8, 8], "dtype": "FP32"},
        "data": {"uri": "pvc://models/data.npz"}}  # fmt: skip
    pinned = "a" * 64
    small = [{"uri": "pvc://models/small.onnx"},
             {"uri": "https://models.example/s2.onnx", "sha256": pinned}]  # fmt: skip
    spec = parse_model_spec({**base, "smallModels": small})
    assert spec.small_models == (
        SourceRef("pvc://models/small.onnx"),
        SourceRef("https://models.example/s2.onnx", pinned),
    )
    args = prepare_args(spec, model_name="m", artifacts_uri="pvc://a", result="ns/r")
    assert [a for a in args if a.startswith("--small-model")] == [
        "--small-model=pvc://models/small.onnx",
        f"--small-model=https://models.example/s2.onnx,sha256={pinned}",
    ]
    assert build_parser().parse_args(args).small_model == list(spec.small_models)
    refused = [
        ({**base, "smallModels": small * 2}, r"^spec.smallModels: must be a list of at most 2"),
        ({**base, "smallModels": [{"uri": "zoo://digits_cnn"}]}, r"^spec.smallModels\[0\].uri"),
        ({**base, "smallModels": [{"uri": "https://m.example/s.onnx"}]},
         r"^spec.smallModels\[0\].sha256"),
        ({k: v for k, v in base.items() if k != "data"} | {"smallModels": small[:1]},
         r"^spec.data: is not set, and spec.smallModels"),
    ]  # fmt: skip
    for doc, message in refused:
        with pytest.raises(SpecError, match=message):
            parse_model_spec(doc)


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
    # the rows the stages calibrate reuse on: the odd ones, stored beside the model
    stored = profile["reuseData"]
    assert stored["examples"] == count // 2
    assert stored["finalOutput"] == "output"
    rows = user["root"] / "models" / "prepared" / Path(stored["uri"]).name
    assert stored["uri"].startswith("pvc://models/prepared/mlp-data-")
    from edgeai_operator.files import file_sha256

    assert file_sha256(rows) == stored["digest"]
    with np.load(rows) as npz:
        np.testing.assert_array_equal(npz["input"], user["x_val"][1::2])
        np.testing.assert_array_equal(npz["labels"], user["y_val"][1::2])
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
    # the profile (in the DNNModel's status) carries at most 2048 rows, 1024 are stored
    many = user["root"] / "models" / "many.npz"
    np.savez(many, input=np.tile(user["x_val"], (10, 1, 1, 1)), labels=np.tile(user["y_val"], 10))
    capped = _prepare(
        user, _request((ExitSpec("exit_0", HIDDEN),), data_file="many.npz"), tmp_path / "many"
    ).variant("fp32")
    assert capped.profile is not None
    assert len(capped.profile["offload"]["validation"]["final_correct"]) == 2048
    assert capped.profile["reuseData"]["examples"] == 1024
    # without data the exit is checked but not measured: no offload section
    plain = _prepare(user, _request((ExitSpec("exit_0", HIDDEN),), data=False), tmp_path / "b")
    assert plain.variant("fp32").ready
    assert "offload" not in (plain.variant("fp32").profile or {})


def _graph(
    nodes: list[Any],
    outputs: list[tuple[str, int]],
    weights: dict[str, Any],
    input_shape: list[Any] | None = None,
) -> bytes:
    graph = helper.make_graph(
        nodes,
        "declared",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape or ["N", 1, 8, 8])],
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


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_reuse_on_a_users_model_is_calibrated_on_its_stored_rows_and_served(
    user: dict[str, Any], tmp_path: Path
) -> None:
    """spec.offload.reuse on the perceptron without exits: the reusing stage calibrates
    its distance on the rows the preparation stored (checked against the plan's digest)
    and, on a locality stream of held-out digits, answers repeats from its cache: every
    reused answer is an earlier answer of the model, the others are the model's own,
    and accuracy stays within maxAccuracyLoss of the model's on the same stream."""
    from edgeai_operator.files import file_sha256
    from edgeai_operator.partitions import build_partitions, exit_heads, offload_settings
    from edgeai_operator.planning import plan_zones
    from edgeai_worker.offload.build import locality_stream

    result = _prepare(user, _request((), "plain.onnx"), tmp_path / "prepare")
    profiles = _profiles(result)
    stored = profiles[0]["reuseData"]
    rows = user["root"] / "models" / "prepared" / Path(stored["uri"]).name
    assert stored["examples"] == len(user["y_val"])  # no head trained: every row
    loss = 0.01
    nodes = [_node("phone", "device", 0.002, 0.8), _node("gateway", "edge", 50.0, None)]
    spec = _deployment({"reuse": {"maxEntries": 64, "maxAccuracyLoss": loss}})
    plan = plan_zones(spec, profiles, nodes).plans["zone-a"]
    assert [s.tier for s in plan.stages] == ["edge"]
    assert plan.offload is not None
    assert plan.offload.reuse_data is not None
    assert plan.offload.reuse_data.digest == file_sha256(rows) == stored["digest"]
    model = user["root"] / "models" / "prepared" / Path(plan.model.uri or "").name
    work = tmp_path / "serve"
    work.mkdir()
    specs = build_partitions(
        plan.stages, plan.alternatives, model, work, adaptive=False, exits=exit_heads(plan)
    )
    settings = offload_settings(plan, 0, work, model, rows)["offload"]
    assert settings["reuseEntries"] == 64
    assert settings["reuseMaxDistance"] > 0
    with pytest.raises(
        SpecError,
        match=r"^--reuse-data: the labelled rows stage 0 calibrates its reuse on: no such file",
    ):
        offload_settings(plan, 0, work, model)
    other = tmp_path / "other.npz"
    np.savez(other, input=user["x_val"][:3], labels=user["y_val"][:3])
    with pytest.raises(SpecError, match=r"^--reuse-data: .* has digest .* refusing it"):
        offload_settings(plan, 0, work, model, other)
    xs, ys = locality_stream(user["x_ho"], user["y_ho"], 300, seed=2)
    full = run_onnx(model, {"input": xs})[0]
    answers, (hits, accuracy) = _served_locally(
        plan, specs, work, model, xs, ys,
        ("edgeai_reuse_hits_total", "edgeai_labelled_accuracy"), reuse_data=rows,
    )  # fmt: skip
    reused = [bool(a["parameters"].get("edgeai_reused")) for a in answers]
    outputs = [np.asarray(a["outputs"][0]["data"], dtype=np.float32) for a in answers]
    print(f"reuse: {sum(reused)} of {len(answers)} answered from the cache, accuracy "
          f"{accuracy:.4f}, the model alone {np.mean(full.argmax(1) == ys):.4f}")  # fmt: skip
    assert sum(reused) == hits > 0
    for i, (was_reused, out) in enumerate(zip(reused, outputs, strict=True)):
        if was_reused:
            assert any(np.array_equal(out, outputs[j]) for j in range(i) if not reused[j]), (
                f"answer {i} reused no earlier answer"
            )
        else:
            np.testing.assert_allclose(out, full[i], rtol=1e-4, atol=1e-4)
    assert accuracy >= float(np.mean(full.argmax(1) == ys)) - loss


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_cascade_from_a_users_small_models_is_measured_planned_and_served(
    user: dict[str, Any], tmp_path: Path
) -> None:
    """spec.smallModels on the perceptron: the preparation measures them on the data
    and stores them; a DNNDeployment's spec.offload.cascade (disagreement of the two)
    is planned with the measured escalation share, the device stage fetches them (the
    files checked against the plan's digests) and answers confident inputs with the
    first small model's scores, the rest with the model's own; accuracy holds the
    target on the held-out digits. What cannot be a cascade is refused naming the field."""
    from edgeai_operator.files import file_sha256
    from edgeai_operator.partitions import build_partitions, exit_heads, offload_settings
    from edgeai_operator.plandoc import PlanDocument
    from edgeai_operator.planning import plan_zones
    from edgeai_worker.offload.gate import confidence

    folder = user["root"] / "models"
    result = _prepare(
        user, _request((), "plain.onnx", small=("small.onnx", "small2.onnx")), tmp_path / "p"
    )
    profiles = _profiles(result)
    section = profiles[0]["offload"]
    assert section["exits"] == []
    assert section["finalOutput"] == "output"
    assert section["cascade"]["flops"][0] >= 2 * 16 * 10  # a Gemm of 16 features, pooling
    stored = section["cascade"]["models"]
    files = [folder / "prepared" / Path(m["uri"]).name for m in stored]
    for m, f, source in zip(stored, files, ("small.onnx", "small2.onnx"), strict=True):
        assert f.read_bytes() == (folder / source).read_bytes()
        assert m["digest"] == file_sha256(f)
    (small_val,) = run_onnx(folder / "small.onnx", {"input": user["x_val"]})
    (small2_val,) = run_onnx(folder / "small2.onnx", {"input": user["x_val"]})
    tables = section["validation"]
    assert tables["cascade_correct"] == (small_val.argmax(1) == user["y_val"]).astype(int).tolist()
    np.testing.assert_allclose(
        tables["cascade_disagreement"],
        confidence(small_val, "disagreement", small2_val),
        atol=5e-5,
    )
    nodes = [_node("phone", "device", 0.002, 0.8), _node("gateway", "edge", 50.0, None)]
    spec = _deployment({"cascade": {"rule": "disagreement", "targetAccuracy": TARGET}})
    plan = plan_zones(spec, profiles, nodes).plans["zone-a"]
    offload = plan.offload
    assert offload is not None
    assert [m.to_dict() for m in offload.cascade_models] == [
        {"uri": m["uri"], "digest": m["digest"]} for m in stored
    ]
    assert offload.cascade_threshold is not None
    assert 0 < offload.cascade_threshold <= 1
    assert offload.final_output == "output"
    assert offload.exit_shares["cascade"] > 0.5
    assert PlanDocument.from_dict(plan.to_dict()) == plan
    # the device runs no layer of the model, only the cascade: its entry (stage -1)
    assert [s.tier for s in plan.stages] == ["edge"]
    model = folder / "prepared" / Path(plan.model.uri or "").name
    work = tmp_path / "serve"
    work.mkdir()
    specs = build_partitions(
        plan.stages, plan.alternatives, model, work, adaptive=False, exits=exit_heads(plan)
    )
    device = offload_settings(plan, -1, work, cascade_models=files)["offload"]
    assert device == {
        "rule": "disagreement",
        "cascadeModels": [str(f) for f in files],
        "cascadeThreshold": offload.cascade_threshold,
        "finalOutput": "output",
    }
    with pytest.raises(SpecError, match=r"^--cascade-model: 1 given, the plan's cascade runs 2"):
        offload_settings(plan, -1, work, cascade_models=files[:1])
    with pytest.raises(SpecError, match=r"^--cascade-model: .* has digest .* refusing it"):
        offload_settings(plan, -1, work, cascade_models=files[::-1])
    x_ho, y_ho = user["x_ho"], user["y_ho"]
    (full_out,) = run_onnx(model, {"input": x_ho})
    (small_out,) = run_onnx(files[0], {"input": x_ho})
    answers, (accuracy,) = _served_locally(
        plan, specs, work, model, x_ho, y_ho, ("edgeai_labelled_accuracy",), cascade_models=files
    )
    _cascaded("cascade", answers, small_out, full_out, accuracy)
    # one small model cannot disagree; a small model of other classes or input is refused
    one = _prepare(user, _request((), "plain.onnx", small=("small.onnx",)), tmp_path / "one")
    with pytest.raises(SpecError, match=r"^spec.offload.cascade.rule: disagreement compares two"):
        plan_zones(spec, _profiles(one), nodes)
    maxprob = _deployment({"cascade": {"rule": "maxProb", "targetAccuracy": TARGET}})
    assert plan_zones(maxprob, _profiles(one), nodes).plans["zone-a"].offload is not None
    rng = np.random.default_rng(1)
    (folder / "five.onnx").write_bytes(_linear_model(rng.standard_normal((5, 64)), np.zeros(5)))
    (folder / "wide.onnx").write_bytes(
        _linear_model(rng.standard_normal((10, 128)), np.zeros(10), ["N", 2, 8, 8])
    )
    for i, (name, message) in enumerate(
        [("five.onnx", r"spec.smallModels\[0\].uri: scores 5 classes"),
         ("wide.onnx", r"spec.smallModels\[0\].uri: pvc://models/wide.onnx does not take")]
    ):  # fmt: skip
        with pytest.raises(SpecError, match=message):
            _prepare(user, _request((), "plain.onnx", small=(name,)), tmp_path / f"bad{i}")
    with pytest.raises(SpecError, match=r"^spec.data: is not set, and spec.smallModels"):
        _prepare(
            user, _request((), "plain.onnx", data=False, small=("small.onnx",)), tmp_path / "n"
        )
    zoo = PrepareRequest(
        source_uri="zoo://digits_cnn", inputs=(INPUT,), artifacts_uri="pvc://models/prepared",
        small_models=(SourceRef("pvc://models/small.onnx"),),
    )  # fmt: skip
    with pytest.raises(SpecError, match=r"^spec.smallModels: zoo://digits_cnn brings its own"):
        prepare(zoo, tmp_path / "zoo", pvc_root=user["root"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_prepared_copy_of_digits_cnn_runs_the_zoo_cascade_from_its_device_entry(
    tmp_path: Path,
) -> None:
    """A DNNModel of zoo://digits_cnn is a prepared artefact, not the zoo model: its
    plan says the calibration is the zoo's (`offload.calibration`), so its stages read
    the prebuilt small models; with the device too slow to run a layer, the device
    entry (stage -1) runs the cascade in front of the edge stage."""
    from edgeai_operator.partitions import build_partitions, stage_settings
    from edgeai_operator.plandoc import PlanDocument
    from edgeai_operator.planning import plan_zones
    from edgeai_worker.offload.build import validation_split

    root = tmp_path / "claims"
    (root / "models").mkdir(parents=True)
    request = PrepareRequest(
        source_uri="zoo://digits_cnn", inputs=(INPUT,), artifacts_uri="pvc://models/prepared",
        model_name="mlp",
    )  # fmt: skip
    profiles = _profiles(prepare(request, tmp_path / "prepare", pvc_root=root))
    nodes = [_node("phone", "device", 0.002, 0.8), _node("gateway", "edge", 50.0, None)]
    spec = _deployment({"cascade": {"rule": "maxProb", "targetAccuracy": 0.95}})
    plan = plan_zones(spec, profiles, nodes).plans["zone-a"]
    assert plan.model.zoo is None  # the prepared artefact
    assert plan.offload is not None
    assert plan.offload.calibration == "digits_cnn"
    assert PlanDocument.from_dict(plan.to_dict()) == plan
    assert [s.tier for s in plan.stages] == ["edge"]
    entry = stage_settings(
        plan, -1, plan_path=tmp_path / "plan.yaml", workdir=tmp_path, host="127.0.0.1",
        port=0, next_urls=["http://127.0.0.1:1"],
    )  # fmt: skip
    assert entry["partitions"] == []
    assert entry["offload"]["cascadeModels"]
    model = root / "models" / "prepared" / Path(plan.model.uri or "").name
    work = tmp_path / "serve"
    work.mkdir()
    specs = build_partitions(plan.stages, plan.alternatives, model, work, adaptive=False)
    _, _, x_ho, y_ho = validation_split()
    answers, (accuracy,) = _served_locally(
        plan, specs, work, model, x_ho, y_ho, ("edgeai_labelled_accuracy",)
    )
    which = {a["parameters"]["edgeai_exit"] for a in answers}
    assert which == {"cascade", "final"}
    assert accuracy >= 0.95


def _served_locally(
    plan: Any,
    specs: Any,
    work: Path,
    model: Path,
    xs: np.ndarray,
    ys: np.ndarray,
    metrics: tuple[str, ...],
    **files: Any,
) -> tuple[list[dict[str, Any]], list[float]]:
    """The plan's stages as worker processes (`files`: start_local's reuse data or
    cascade models): the answers to `xs` sent one by one with their labels, and the
    entry's `metrics` after them."""
    from edgeai_operator.localworkers import start_local

    run = start_local(plan, specs, work, model_path=model, **files)
    try:
        answers = [
            labelled_infer(run.entry_url, x[None], int(y), "mlp")
            for x, y in zip(xs, ys, strict=True)
        ]
        return answers, [metric_value(run.entry_url, m) for m in metrics]
    finally:
        run.stop()


def test_exits_on_a_prepared_model_without_calibration_are_refused() -> None:
    from edgeai_operator.plandoc import PlanDocument
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
    # reuse on it needs the labelled rows a preparation with spec.data stores
    reuse = _deployment({"reuse": {"maxEntries": 8}})
    with pytest.raises(SpecError, match=r"^spec.offload.reuse: the model's profile carries no "):
        plan_zones(reuse, [profile], nodes)
    stored = {"uri": "pvc://models/prepared/mlp-data-0.npz", "digest": "sha256:" + "1" * 64,
              "sizeBytes": 1, "examples": 1, "finalOutput": "output"}  # fmt: skip
    (planned,) = plan_zones(reuse, [{**profile, "reuseData": stored}], nodes).plans.values()
    assert planned.offload is not None
    assert planned.offload.reuse_data is not None
    assert planned.offload.reuse_data.to_dict() == {
        "uri": stored["uri"], "digest": stored["digest"], "finalOutput": "output"}  # fmt: skip
    assert PlanDocument.from_dict(planned.to_dict()) == planned


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
    from edgeai_worker.offload.build import locality_stream

    folder = user["root"] / "models"
    ns.kubectl(
        "create", "configmap", "mlp-files", f"--from-file=model.onnx={folder / 'mlp.onnx'}",
        f"--from-file=data.npz={folder / 'data.npz'}",
        f"--from-file=plain.onnx={folder / 'plain.onnx'}",
        f"--from-file=small.onnx={folder / 'small.onnx'}",
        f"--from-file=small2.onnx={folder / 'small2.onnx'}",
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
        {**model("mlp-small", [], source="plain.onnx"), "spec": {
            **model("mlp-small", [], source="plain.onnx")["spec"],
            "smallModels": [{"uri": "configmap://mlp-files/small.onnx"},
                            {"uri": "configmap://mlp-files/small2.onnx"}]}},
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
    # the trained exit and reuse on the same model: the edge calibrates on stored rows
    loss = 0.01
    both = deployment("reader-reuse", "mlp-trained")
    both["spec"]["placement"]["adaptiveSplit"] = False
    both["spec"]["privacy"] = {}
    both["spec"]["offload"] = {**offload, "reuse": {"maxEntries": 64, "maxAccuracyLoss": loss}}
    # a cascade of the two small models in front of the model, all of it on the edge
    cascade = deployment("reader-cascade", "mlp-small")
    cascade["spec"]["placement"]["adaptiveSplit"] = False
    cascade["spec"]["privacy"] = {}
    cascade["spec"]["offload"] = {"cascade": {"rule": "disagreement", "targetAccuracy": TARGET}}
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
        ns.kubectl("delete", "dnnd", "reader", "--wait=true")
        apply(ns, both)
        stream, labels = locality_stream(x_ho, y_ho, 300, seed=2)
        (stream_full,) = run_onnx(folder / "plain.onnx", {"input": stream})
        reuse_plan, edge_pods, streamed, stream_accuracy = _labelled_stream(
            ns, "reader-reuse", "mlp-trained", "edge", stream, labels, tmp_path
        )
        ns.kubectl("delete", "dnnd", "reader-reuse", "--wait=true")
        model_condition("mlp-small", "True")
        apply(ns, cascade)
        _, device_pods, cascaded, cascade_accuracy = _labelled_stream(
            ns, "reader-cascade", "mlp-small", "device", x_ho, y_ho, tmp_path, device_layers=False
        )
    _cascade_served(device_pods, cascaded, folder, x_ho, cascade_accuracy)
    _reuse_served(reuse_plan, edge_pods, streamed, stream_full, labels, stream_accuracy, loss)
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


def _labelled_stream(
    ns: Any,
    name: str,
    model: str,
    tier: str,
    xs: np.ndarray,
    ys: np.ndarray,
    tmp_path: Path,
    device_layers: bool = True,
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]], float]:
    """The deployment `name` served by its pods' processes: its status.plan, its pods
    of `tier`, the answers to `xs` sent one by one with their labels, and the entry's
    accuracy on them."""
    from _cluster_support import get
    from _serving import serving_chain

    with serving_chain(ns, name, tmp_path / f"pods-{name}", device_layers) as url:
        plan = get(ns, "dnnd", name)["status"]["plan"]
        pods = get(ns, "pods", "-l", f"edgeai.dev/deployment={name},edgeai.dev/tier={tier}")
        answers = [labelled_infer(url, x[None], int(y), model) for x, y in zip(xs, ys, strict=True)]
        accuracy = metric_value(url, "edgeai_labelled_accuracy")
    return plan, pods, answers, accuracy


def _reuse_served(
    plan: dict[str, Any],
    edge_pods: dict[str, Any],
    answers: list[dict[str, Any]],
    full: np.ndarray,
    labels: np.ndarray,
    accuracy: float,
    loss: float,
) -> None:
    """What the control-plane test asserts of exits and reuse on the trained model: the
    edge pods fetched the stored rows and served with them; the device answers at the
    exit, the edge from its cache for some escalations (each an earlier escalation's
    answer) and with the model for the rest."""
    assert set(plan["exitShares"]) == {"exit_0", "final"}
    assert edge_pods["items"]
    for pod in edge_pods["items"]:
        spec = pod["spec"]
        assert [c["name"] for c in spec["initContainers"]] == ["fetch", "fetch-reuse-data"]
        assert "mlp-trained-data-" in spec["initContainers"][1]["args"][1]
        assert any(a.startswith("--reuse-data=") for a in spec["containers"][0]["args"])
    which = [a["parameters"]["edgeai_exit"] for a in answers]
    reused = [bool(a["parameters"].get("edgeai_reused")) for a in answers]
    outputs = [np.asarray(a["outputs"][0]["data"], dtype=np.float32) for a in answers]
    print(f"reader-reuse: answered {({w: which.count(w) for w in sorted(set(which))})}, "
          f"{sum(reused)} from the edge's cache, accuracy {accuracy:.4f}")  # fmt: skip
    assert "exit_0" in which
    assert sum(reused) > 0
    for i, out in enumerate(outputs):
        if reused[i]:
            assert which[i] == "final"
            assert any(np.array_equal(out, outputs[j]) for j in range(i) if which[j] == "final")
        elif which[i] == "final":
            np.testing.assert_allclose(out, full[i], rtol=1e-4, atol=1e-4)
    assert accuracy >= TARGET - loss


def _cascade_served(
    device_pods: dict[str, Any],
    answers: list[dict[str, Any]],
    folder: Path,
    x_ho: np.ndarray,
    accuracy: float,
) -> None:
    """What the control-plane test asserts of the cascade: the device entry fetched the
    two small models and ran them; confident answers are the first small model's
    scores, the others the model's own, and accuracy holds the target."""
    assert device_pods["items"]
    for pod in device_pods["items"]:
        names = [c["name"] for c in pod["spec"]["initContainers"]]
        assert names == ["fetch-cascade-0", "fetch-cascade-1"]
    (small_out,) = run_onnx(folder / "small.onnx", {"input": x_ho})
    (full_out,) = run_onnx(folder / "plain.onnx", {"input": x_ho})
    _cascaded("reader-cascade", answers, small_out, full_out, accuracy)


def _cascaded(
    label: str,
    answers: list[dict[str, Any]],
    small_out: np.ndarray,
    full_out: np.ndarray,
    accuracy: float,
) -> None:
    """Some answers from the cascade, each the first small model's scores under the
    model's output name, the others the model's own, and accuracy at the target."""
    which = [a["parameters"]["edgeai_exit"] for a in answers]
    print(f"{label}: answered {({w: which.count(w) for w in sorted(set(which))})}, "
          f"accuracy {accuracy:.4f}")  # fmt: skip
    assert set(which) == {"cascade", "final"}
    assert accuracy >= TARGET
    for i, w in enumerate(which):
        (out,) = answers[i]["outputs"]
        assert out["name"] == "output"
        expected = small_out[i] if w == "cascade" else full_out[i]
        np.testing.assert_allclose(out["data"], expected, rtol=1e-4, atol=1e-4)
