"""The model zoo: export conventions, the cache, torch/ONNX agreement, digits training."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeai_worker import zoo


@pytest.mark.parametrize("name", zoo.ZOO_NAMES)
def test_export_follows_the_zoo_conventions(name: str) -> None:
    model = onnx.load(zoo.export_onnx(name))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["output"]
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    input_name, shape, dtype = zoo.input_spec(name)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert input_name == "input"
    assert dtype == "FP32"
    assert dims[0].dim_param == "batch"
    assert tuple(d.dim_value for d in dims[1:]) == shape[1:]


@pytest.mark.parametrize("name", ["digits_cnn", "alexnet_like", "kws_lstm", "mobilenet_v2"])
def test_onnx_matches_torch(name: str) -> None:
    import torch

    x = zoo.example_input(name, batch=2, seed=5)
    with torch.no_grad():
        expected = zoo.build_torch(name)(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(zoo.export_onnx(name)), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": x})
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_export_is_cached_and_copied(tmp_path: Path) -> None:
    first = zoo.export_onnx("digits_cnn")
    mtime = first.stat().st_mtime_ns
    assert zoo.export_onnx("digits_cnn") == first
    assert first.stat().st_mtime_ns == mtime
    assert first.parent == zoo.cache_dir()
    assert zoo.code_hash() in first.name
    copy = zoo.export_onnx("digits_cnn", tmp_path / "sub" / "m.onnx")
    assert copy.read_bytes() == first.read_bytes()


def test_trained_digits_cnn_is_accurate_on_held_out_digits() -> None:
    model = onnx.load(zoo.export_onnx("digits_cnn", trained=True))
    _, _, x_test, y_test = zoo.digits_split()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": x_test})
    accuracy = float((logits.argmax(axis=1) == y_test).mean())
    assert accuracy >= 0.95
    assert len(y_test) == 450


@pytest.mark.slow
def test_training_from_scratch_takes_under_a_minute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    monkeypatch.setenv("EDGEAI_CACHE_DIR", str(tmp_path))
    started = time.monotonic()
    model = zoo.trained_digits_cnn(progress=False)
    elapsed = time.monotonic() - started
    assert elapsed < 60
    assert zoo.accuracy_torch(model) >= 0.95
    assert list((tmp_path / "zoo").glob("digits_cnn-trained-*.pt"))


def test_unknown_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown zoo model 'lenet'"):
        zoo.input_spec("lenet")
    with pytest.raises(ValueError, match="digits_cnn only"):
        zoo.export_onnx("resnet18", trained=True)


def test_serving_modules_do_not_import_torch() -> None:
    code = (
        "import sys, edgeai_worker.zoo, edgeai_worker.graph, edgeai_worker.profiler;"
        "assert 'torch' not in sys.modules, 'torch imported';"
        "assert 'sklearn' not in sys.modules, 'sklearn imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cache_falls_back_to_the_temp_dir_when_home_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The images' user has HOME=/nonexistent; a pod can still write its temp dir.
    monkeypatch.delenv("EDGEAI_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", "/proc/edgeai-no-home")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert zoo.cache_dir() == tmp_path / "edgeai-zoo"
    assert (tmp_path / "edgeai-zoo").is_dir()


def test_an_explicit_cache_dir_that_cannot_be_written_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EDGEAI_CACHE_DIR", "/proc/edgeai-no-cache")
    with pytest.raises(OSError, match="edgeai-no-cache"):
        zoo.cache_dir()
