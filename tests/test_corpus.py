"""Published models shipped inside pip packages (the `dev` extra): every `.onnx` of
rapidocr-onnxruntime and silero-vad, and onnx's light real-model set, each profiled
with `edgeai profile` at the input shapes the corpus gives for its free dimensions,
planned with `edgeai plan` over device, edge and cloud, and served by the plan's
stages, and by a chain forced through three stages, as worker processes: the answer
is onnxruntime's on the whole model. The models and their input shapes are those of
bench/corpus/run.py, which measures the same path for the docs' table."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from _bench_modules import load_script
from _real_graphs import BuiltModel
from _served_plans import TOLERANCE, forced_plan, plan_cli, profile_cli, serve_and_compare
from edgeai_operator import cli
from edgeai_worker import graph

BENCH = Path(__file__).resolve().parents[1] / "bench" / "corpus" / "run.py"


corpus = load_script(BENCH, "corpus_bench")
MODELS = {f"{m.package}/{m.name}": m for m in corpus.corpus_models()}


def test_the_corpus_holds_every_model_of_its_packages() -> None:
    packages = {m.package for m in MODELS.values()}
    assert packages == set(corpus.PACKAGES)
    assert len([m for m in MODELS.values() if m.package == "rapidocr_onnxruntime"]) == 3
    assert len([m for m in MODELS.values() if m.package == "silero_vad"]) == 6
    # every free dimension the corpus sizes belongs to a model it holds
    assert set(corpus.INPUTS) <= {m.name for m in MODELS.values()}


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("key", list(MODELS))
def test_a_published_model_profiles_plans_and_serves_exactly(
    key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = MODELS[key]
    built = BuiltModel(entry.path, entry.input_shapes, entry.input_values)
    saved = profile_cli(built, tmp_path, capsys, repeats=1)
    profile = json.loads(saved.read_text())
    model = onnx.load(entry.path)
    assert profile["cuts"][-1]["tensors"] == [o.name for o in model.graph.output]
    assert all(c["sizeBytes"] > 0 for c in profile["cuts"])
    plan = plan_cli(saved, tmp_path, capsys)
    assert plan["feasible"] is True
    feeds = corpus.sample(model, entry)
    # every cut tensor of the chained segments is the whole model's (what the final
    # outputs alone cannot show where they are constant, as in onnx's light models)
    cuts = graph.graph_cut_points(graph.analyze(model, entry.input_shapes, feeds))
    assert [list(c.tensors) for c in cuts] == [c["tensors"] for c in profile["cuts"]]
    diff, spread = corpus.cut_diff(model, cuts, feeds)
    assert diff <= TOLERANCE, f"{key}: a cut tensor differs by {diff}"
    assert spread > 0, "the compared tensors are not all constants"
    serve_and_compare(plan, built, feeds, tmp_path)
    if len(profile["cuts"]) >= 4:
        counts, _ = serve_and_compare(forced_plan(plan, profile), built, feeds, tmp_path)
        assert counts == [1, 1, 1]


def test_a_model_that_branches_on_an_input_value_needs_it_given(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """silero_vad.onnx runs its 16 kHz branch for sr=16000 only: with random values in
    `sr`, the measured run fails inside the If node, which the one-line error names;
    with --input-value sr=16000 it profiles."""
    entry = MODELS["silero_vad/silero_vad"]
    shapes = [f"--input-shape={n}={','.join(map(str, s))}" for n, s in entry.input_shapes.items()]
    args = ["profile", str(entry.path), *shapes, "--repeats", "1", "--idle-ms", "0",
            "--serving-requests", "0", "-o", "json"]  # fmt: skip
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert "running the model once to measure" in err
    assert "If node" in err
    saved = tmp_path / "vad.json"
    assert cli.main([*args, "--input-value=sr=16000", "--save", str(saved)]) == 0
    capsys.readouterr()
    profiled = json.loads(saved.read_text())
    assert profiled["inputs"][2] == {"name": "sr", "shape": [], "dtype": "INT64"}
    assert profiled["cuts"][-1]["tensors"] == ["output", "stateN"]
    assert cli.main([*args, "--input-value=rate=16000"]) == 2
    assert (
        "--input-value: 'rate' is not a model input (input, state, sr)" in capsys.readouterr().err
    )
