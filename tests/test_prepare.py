"""`edgeai prepare` with real parts: a user's ONNX model (built here with onnx.helper)
served by a real HTTP server on loopback, artefacts pushed to the real registry (CNCF
distribution, the `registry` fixture) or written to a directory, read back and run with
onnxruntime."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from _real_graphs import sequence_output, spatial
from _worker_support import run_onnx
from edgeai_operator.errors import SpecError
from edgeai_operator.localregistry import LocalRegistry
from edgeai_operator.modelspec import InputSpec
from edgeai_operator.oci import pull
from edgeai_operator.prepare import (
    PrepareRequest,
    PrepareResult,
    UnsupportedGraph,
    VariantRequest,
    prepare,
)
from edgeai_operator.sources import FetchError, fetch, parse_source
from edgeai_worker import variants, zoo

INPUT = InputSpec("x", (1, 1, 8, 8), "FP32")


def user_model(seed: int = 7) -> bytes:
    """Conv(4 filters 3x3) -> Relu -> Flatten -> Gemm(10), fixed random weights."""
    rng = np.random.default_rng(seed)
    conv_w = numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "conv_w")
    conv_b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "conv_b")
    fc_w = numpy_helper.from_array(
        (rng.standard_normal((10, 4 * 6 * 6)) * 0.2).astype(np.float32), "fc_w"
    )
    fc_b = numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "fc_b")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["conv"]),
            helper.make_node("Relu", ["conv"], ["relu"]),
            helper.make_node("Flatten", ["relu"], ["flat"]),
            helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
        ],
        "user_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [conv_w, conv_b, fc_w, fc_b],
    )
    # IR version 10: what the installed onnxruntime reads (onnx.helper writes newer)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def two_input_model() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "two_inputs",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


class FileServer:
    """A real HTTP server on loopback answering each path with its bytes (404 else)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        files = self.files

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = files.get(self.path)
                self.send_response(200 if body is not None else 404)
                payload = body if body is not None else b"not found"
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def serve(self, path: str, body: bytes) -> str:
        self.files[path] = body
        return self.base_url + path

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


@pytest.fixture
def server() -> Iterator[FileServer]:
    srv = FileServer()
    yield srv
    srv.stop()


def served_model(server: FileServer) -> tuple[bytes, str]:
    """The user model's bytes and the URL the server answers them at."""
    model = user_model()
    return model, server.serve("/user_net.onnx", model)


def repo_name(request: pytest.FixtureRequest) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in request.node.name.lower()).strip("-")
    return f"prepared/{slug[:40].strip('-')}-{os.urandom(3).hex()}"


def tags(registry: LocalRegistry, repo: str) -> list[str] | None:
    """The repository's tags as the registry lists them; None when it does not exist."""
    url = f"http://{registry.address}/v2/{repo}/tags/list"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return sorted(json.load(response).get("tags") or [])
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 404:
            return None
        raise


def examples(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 1, 8, 8)).astype(np.float32)


@pytest.mark.registry
def test_user_model_over_http_to_the_registry(
    registry: LocalRegistry, server: FileServer, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    model = user_model()
    url = server.serve("/models/user_net.onnx", model)
    repo = repo_name(request)
    result = prepare(
        PrepareRequest(
            source_uri=url,
            source_sha256=sha256_hex(model),
            inputs=(INPUT,),
            artifacts_uri=f"oci://{registry.address}/{repo}",
            variants=(
                VariantRequest.of_kind("int8-dynamic"),
                VariantRequest.of_kind("int8-static"),
                VariantRequest.of_kind("pruned"),
                VariantRequest.of_kind("distilled"),
            ),
        ),
        tmp_path / "work",
    )
    assert result.source_uri == url
    assert result.source_digest == "sha256:" + sha256_hex(model)
    assert result.size_bytes == len(model)
    assert [v.name for v in result.variants] == [
        "fp32",
        "int8-dynamic",
        "int8-static",
        "pruned-50",
        "distilled",
    ]
    ready = [v for v in result.variants if v.ready]
    assert [v.name for v in ready] == ["fp32", "int8-dynamic", "pruned-50"]

    static = result.variant("int8-static")
    assert static.message.startswith("spec.calibration.uri is not set")
    assert static.artifact is None
    distilled = result.variant("distilled")
    assert distilled.message.startswith("spec.variants[3].distill: distillation trains")
    assert distilled.artifact is None

    x = examples(1, seed=1)
    original = run_onnx(tmp_path / "work" / "source" / "user_net.onnx", {"x": x})[0]
    pulled_tags = []
    for variant in ready:
        assert variant.artifact is not None
        assert variant.path is not None
        # no labelled data given: no accuracy
        assert variant.accuracy is None
        assert variant.profile is not None
        assert variant.profile["variant"] == variant.name
        assert len(variant.profile["segments"]) >= 1
        built = variant.path.read_bytes()
        assert variant.artifact.digest == "sha256:" + sha256_hex(built)
        assert variant.artifact.size_bytes == len(built)
        pulled = pull(variant.artifact.uri, tmp_path / "pulled" / variant.name)
        assert pulled.path.read_bytes() == built
        assert pulled.layer_digest == variant.artifact.digest
        pulled_tags.append(variant.artifact.uri.rsplit(":", 1)[1])
        outputs = run_onnx(pulled.path, {"x": x})[0]
        assert outputs.shape == (1, 10)
        if variant.name == "fp32":
            assert built == model
            np.testing.assert_array_equal(outputs, original)
        if variant.name == "pruned-50":
            pruned = onnx.load_from_string(built)
            weights = [
                numpy_helper.to_array(t) for t in pruned.graph.initializer if t.name.endswith("_w")
            ]
            total = sum(w.size for w in weights)
            zeros = sum(int(w.size - np.count_nonzero(w)) for w in weights)
            assert zeros == total // 2
            biases = {
                t.name: numpy_helper.to_array(t)
                for t in pruned.graph.initializer
                if t.name.endswith("_b")
            }
            assert all(np.count_nonzero(b) == b.size for b in biases.values())
    assert tags(registry, repo) == sorted(pulled_tags)
    assert all(t.startswith("user_net-") for t in pulled_tags)

    # the result survives JSON and comes back equal
    as_json = json.dumps(result.to_dict())
    assert PrepareResult.from_dict(json.loads(as_json)) == result
    assert result.to_dict()["inputs"] == [{"name": "x", "shape": ["N", 1, 8, 8], "dtype": "FP32"}]


def test_calibration_and_data_over_http_to_a_directory(server: FileServer, tmp_path: Path) -> None:
    model, url = served_model(server)
    calibration = npz_bytes(x=examples(64, seed=2))
    data_x = examples(50, seed=3)
    source_file = tmp_path / "original.onnx"
    source_file.write_bytes(model)
    # labels are the fp32 model's own predictions: fp32 scores exactly 1
    labels = run_onnx(source_file, {"x": data_x})[0].argmax(axis=1).astype(np.int64)
    data = npz_bytes(x=data_x, labels=labels)
    result = prepare(
        PrepareRequest(
            source_uri=url,
            source_sha256=sha256_hex(model),
            inputs=(INPUT,),
            artifacts_uri="pvc://models/prepared",
            variants=(
                VariantRequest.of_kind("int8-static"),
                VariantRequest.of_kind("pruned", sparsity=0.3),
            ),
            calibration_uri=server.serve("/calibration.npz", calibration),
            calibration_sha256=sha256_hex(calibration),
            data_uri=server.serve("/data.npz", data),
            data_sha256=sha256_hex(data),
            model_name="Team Net",
        ),
        tmp_path / "work",
        pvc_root=tmp_path / "pvc",
    )
    assert [(v.name, v.ready) for v in result.variants] == [
        ("fp32", True),
        ("int8-static", True),
        ("pruned-30", True),
    ]
    assert result.variant("fp32").accuracy == 1.0
    for variant in result.variants:
        assert variant.accuracy is not None
        assert 0.0 <= variant.accuracy <= 1.0
        assert variant.artifact is not None
        assert variant.path is not None
        assert variant.artifact.uri.startswith("pvc://models/prepared/team-net-")
        # a stage pod fetches the artefact by its URI and digest
        fetched = fetch(
            parse_source(variant.artifact.uri, sha256=variant.artifact.digest, field="uri"),
            tmp_path / "stage" / variant.name,
            pvc_root=tmp_path / "pvc",
        )
        assert fetched.path.read_bytes() == variant.path.read_bytes()
    # the static variant is quantized: QuantizeLinear/DequantizeLinear pairs in its graph
    static = onnx.load(str(result.variant("int8-static").path))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in static.graph.node}
    # the score is the top-1 agreement with the labels, recomputed here
    predicted = run_onnx(result.variant("int8-static").path, {"x": data_x})[0].argmax(axis=1)
    assert result.variant("int8-static").accuracy == round(float((predicted == labels).mean()), 4)


def test_not_an_onnx_file_is_a_clear_error(server: FileServer, tmp_path: Path) -> None:
    junk = np.random.default_rng(5).bytes(4096)
    url = server.serve("/junk.onnx", junk)
    with pytest.raises(SpecError) as caught:
        prepare(
            PrepareRequest(url, (INPUT,), "pvc://models/out", source_sha256=sha256_hex(junk)),
            tmp_path / "work",
            pvc_root=tmp_path / "pvc",
        )
    assert caught.value.field == "spec.source.uri"
    assert caught.value.problem.startswith(f"{url} is not an ONNX model onnxruntime can load")
    assert not (tmp_path / "pvc").exists()


def test_two_inputs_when_the_request_names_one(server: FileServer, tmp_path: Path) -> None:
    model = two_input_model()
    url = server.serve("/two.onnx", model)
    with pytest.raises(SpecError) as caught:
        prepare(
            PrepareRequest(
                url,
                (InputSpec("a", (1, 4), "FP32"),),
                "pvc://m/out",
                source_sha256=sha256_hex(model),
            ),
            tmp_path / "work",
            pvc_root=tmp_path / "pvc",
        )
    assert caught.value.field == "spec.input"
    assert caught.value.problem == (
        "declares 1 input(s) (a) but the model has 2: a [1, 4] FP32, b [1, 4] FP32"
    )
    # both named, one with the wrong shape: the field of that one
    with pytest.raises(SpecError) as wrong_shape:
        prepare(
            PrepareRequest(
                url,
                (InputSpec("a", (1, 4), "FP32"), InputSpec("b", (1, 5), "FP32")),
                "pvc://m/out",
                source_sha256=sha256_hex(model),
            ),
            tmp_path / "work",
            pvc_root=tmp_path / "pvc",
        )
    assert wrong_shape.value.field == "spec.input[1].shape"

    # both declared: fp32 is ready while pruning, with no weights to prune, fails alone
    result = prepare(
        PrepareRequest(
            url,
            (InputSpec("a", (1, 4), "FP32"), InputSpec("b", (1, 4), "FP32")),
            "pvc://m/out",
            source_sha256=sha256_hex(model),
            variants=(VariantRequest.of_kind("pruned"),),
        ),
        tmp_path / "work",
        pvc_root=tmp_path / "pvc",
    )
    assert [(v.name, v.ready) for v in result.variants] == [("fp32", True), ("pruned-50", False)]
    assert result.variant("pruned-50").message == (
        "building pruned failed: ValueError: the model has no float Conv/Gemm/MatMul "
        "weights to prune"
    )
    assert [t.name for t in result.inputs] == ["a", "b"]


@pytest.mark.registry
def test_wrong_digest_pushes_nothing(
    registry: LocalRegistry, server: FileServer, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    _, url = served_model(server)
    repo = repo_name(request)
    wrong = sha256_hex(b"another model")
    with pytest.raises(FetchError) as caught:
        prepare(
            PrepareRequest(
                url,
                (INPUT,),
                f"oci://{registry.address}/{repo}",
                source_sha256=wrong,
                variants=(VariantRequest.of_kind("int8-dynamic"),),
            ),
            tmp_path / "work",
        )
    assert f"sha256 mismatch: expected {wrong}" in str(caught.value)
    assert tags(registry, repo) is None


def test_bad_requests_name_their_fields(server: FileServer, tmp_path: Path) -> None:
    model, url = served_model(server)

    def refused(**changes: Any) -> SpecError:
        fields: dict[str, Any] = {
            "source_uri": url,
            "source_sha256": sha256_hex(model),
            "inputs": (INPUT,),
            "artifacts_uri": "pvc://m/out",
            **changes,
        }
        with pytest.raises(SpecError) as caught:
            prepare(PrepareRequest(**fields), tmp_path / "work", pvc_root=tmp_path / "pvc")
        return caught.value

    assert refused(artifacts_uri="s3://bucket/x").field == "spec.artifacts.uri"
    assert refused(artifacts_uri="oci://127.0.0.1:5000/repo:v1").field == "spec.artifacts.uri"
    assert refused(inputs=(InputSpec("x", (1, 1, 8, 9), "FP32"),)).field == "spec.input.shape"
    assert refused(inputs=(InputSpec("x", (1, 1, 8, 8), "INT64"),)).field == "spec.input.dtype"
    labels_missing = npz_bytes(x=examples(4, seed=1))
    no_labels = refused(
        data_uri=server.serve("/nolabels.npz", labels_missing),
        data_sha256=sha256_hex(labels_missing),
    )
    assert no_labels.field == "spec.data.uri"
    assert "has no 1-D integer 'labels'" in no_labels.problem
    wrong_key = npz_bytes(image=examples(4, seed=1))
    calibration = refused(
        variants=(VariantRequest.of_kind("int8-static"),),
        calibration_uri=server.serve("/wrongkey.npz", wrong_key),
        calibration_sha256=sha256_hex(wrong_key),
    )
    assert calibration.field == "spec.calibration.uri"
    assert "has no array for the input 'x' (it has image)" in calibration.problem
    assert not (tmp_path / "pvc").exists()


def _edgeai(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeai_operator.cli", "prepare", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_edgeai_prepare_prints_and_writes_the_result(server: FileServer, tmp_path: Path) -> None:
    model, url = served_model(server)
    out = tmp_path / "result.json"
    done = _edgeai(
        "--source", url, "--sha256", sha256_hex(model), "--input", "x=1,1,8,8:FP32",
        "--variant", "int8-dynamic", "--variant", "pruned:0.25",
        "--artifacts", "pvc://models/out", "--pvc-root", str(tmp_path / "pvc"),
        "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert json.loads(out.read_text()) == printed
    assert [(v["name"], v["ready"]) for v in printed["variants"]] == [
        ("fp32", True),
        ("int8-dynamic", True),
        ("pruned-25", True),
    ]
    assert "[edgeai prepare] [3/3] building pruned-25 (pruned)" in done.stderr
    assert "3/3 variants ready" in done.stderr

    wrong = _edgeai(
        "--source", url, "--sha256", sha256_hex(b"x"), "--input", "x=1,1,8,8:FP32",
        "--artifacts", "pvc://models/out", "--pvc-root", str(tmp_path / "pvc"),
    )  # fmt: skip
    assert (wrong.returncode, wrong.stdout) == (1, "")
    assert wrong.stderr.strip().endswith("nothing was kept")
    assert "error: cannot fetch" in wrong.stderr

    bad_input = _edgeai(
        "--source", url, "--sha256", sha256_hex(model), "--input", "x=1,1,8:FP99",
        "--artifacts", "pvc://models/out",
    )  # fmt: skip
    assert bad_input.returncode == 2
    assert "--input" in bad_input.stderr
    assert "FP99" in bad_input.stderr


@pytest.mark.slow
@pytest.mark.registry
@pytest.mark.timeout(1800)
def test_zoo_digits_all_variants(
    registry: LocalRegistry, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    started = time.monotonic()
    result = prepare(
        PrepareRequest(
            source_uri="zoo://digits_cnn",
            inputs=(InputSpec("input", (1, 1, 8, 8), "FP32"),),
            artifacts_uri=f"oci://{registry.address}/{repo_name(request)}",
            variants=tuple(
                VariantRequest.of_kind(k)
                for k in ("int8-dynamic", "int8-static", "pruned", "distilled")
            ),
        ),
        tmp_path / "work",
    )
    elapsed_s = time.monotonic() - started
    size_bytes = len(json.dumps(result.to_dict(), separators=(",", ":")))
    print(f"\nzoo://digits_cnn: 5 variants ready in {elapsed_s:.1f}s, result {size_bytes} bytes")
    assert all(v.ready for v in result.variants), [v.message for v in result.variants]
    zoo_files = {
        "fp32": zoo.export_onnx("digits_cnn", trained=True),
        **{k: variants.variant_path("digits_cnn", k) for k in variants.VARIANT_NAMES[1:]},
    }
    for variant in result.variants:
        # the zoo's own variant files and its held-out accuracy
        expected = variants.onnx_accuracy(zoo_files[variant.name])
        assert variant.accuracy is not None
        assert abs(variant.accuracy - expected) <= 0.005, variant.name
        assert variant.artifact is not None
        pulled = pull(variant.artifact.uri, tmp_path / "pulled" / variant.name)
        assert pulled.layer_digest == variant.artifact.digest
    assert result.variant("fp32").accuracy is not None
    assert result.variant("fp32").accuracy >= 0.95  # type: ignore[operator]
    # the model's own profile carries the offload calibration the planner reads
    offload = result.variant("fp32").profile["offload"]  # type: ignore[index]
    assert [e["output"] for e in offload["exits"]] == ["exit_0", "exit_1"]
    assert len(offload["validation"]["final_correct"]) == 225  # the validation half
    assert all("offload" not in (v.profile or {}) for v in result.variants if v.name != "fp32")


def test_edgeai_prepare_takes_calibration_data_name_and_workdir(
    server: FileServer, tmp_path: Path
) -> None:
    model, url = served_model(server)
    calibration = npz_bytes(x=examples(16, seed=2))
    data_x = examples(20, seed=3)
    source_file = tmp_path / "original.onnx"
    source_file.write_bytes(model)
    labels = run_onnx(source_file, {"x": data_x})[0].argmax(axis=1).astype(np.int64)
    data = npz_bytes(x=data_x, labels=labels)
    workdir = tmp_path / "scratch"
    done = _edgeai(
        "--source", url, "--sha256", sha256_hex(model), "--input", "x=1,1,8,8:FP32",
        "--variant", "int8-static",
        "--calibration", server.serve("/cli-calibration.npz", calibration),
        "--calibration-sha256", sha256_hex(calibration),
        "--data", server.serve("/cli-data.npz", data), "--data-sha256", sha256_hex(data),
        "--model-name", "cli-net", "--workdir", str(workdir),
        "--artifacts", "pvc://models/cli", "--pvc-root", str(tmp_path / "pvc"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    by_name = {v["name"]: v for v in result["variants"]}
    assert by_name["int8-static"]["ready"]  # built from --calibration
    assert by_name["fp32"]["accuracy"] == 1.0  # scored on --data
    assert all(
        v["artifact"]["uri"].startswith("pvc://models/cli/cli-net-") for v in by_name.values()
    )
    assert any(workdir.rglob("*.onnx"))  # built in --workdir


def test_a_graph_the_planner_cannot_handle_is_refused_naming_the_construct(
    server: FileServer, tmp_path: Path
) -> None:
    """onnxruntime loads and runs it, but its output is a sequence: `prepare` raises
    UnsupportedGraph (nothing stored) and `edgeai prepare` says why in one line."""
    model = sequence_output(tmp_path).path.read_bytes()
    url = server.serve("/sequence.onnx", model)
    request = PrepareRequest(
        url, (InputSpec("x", (1, 4), "FP32"),), "pvc://m/out", source_sha256=sha256_hex(model)
    )
    with pytest.raises(UnsupportedGraph) as caught:
        prepare(request, tmp_path / "work", pvc_root=tmp_path / "pvc")
    assert "model output 'pieces' is a sequence_type, not a tensor" in str(caught.value)
    assert not (tmp_path / "pvc").exists()
    done = _edgeai(
        "--source", url, "--sha256", sha256_hex(model), "--input", "x=1,4:FP32",
        "--artifacts", "pvc://m/out", "--pvc-root", str(tmp_path / "pvc"),
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (1, "")
    assert "Traceback" not in done.stderr
    assert "error: model output 'pieces' is a sequence_type, not a tensor" in done.stderr


def test_free_dimensions_are_profiled_at_the_declared_input_shapes(
    server: FileServer, tmp_path: Path
) -> None:
    """spec.input gives the sizes the model leaves free: the profile's cut bytes are
    those of the declared shapes (never 1 for a free spatial dimension)."""
    built = spatial(tmp_path)
    model = built.path.read_bytes()
    url = server.serve("/spatial.onnx", model)
    declared = InputSpec("x", (1, 3, 40, 56), "FP32")
    result = prepare(
        PrepareRequest(url, (declared,), "pvc://m/out", source_sha256=sha256_hex(model)),
        tmp_path / "work",
        pvc_root=tmp_path / "pvc",
    )
    profile = result.variant("fp32").profile
    assert profile is not None
    assert profile["cuts"][0] == {
        "index": 0,
        "tensors": ["x"],
        "sizeBytes": 4 * 3 * 40 * 56,
        "position": 0,
    }
