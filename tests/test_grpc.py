"""The worker's gRPC endpoint (OIP v2 `GRPCInferenceService`): the stock Triton gRPC
client against a real worker process, every bad input answered with its status code
while the worker keeps serving, the drain on SIGTERM, and the committed generated code
equal to what the Makefile's command generates from the .proto."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError

from _worker_support import (
    ChainModel,
    Worker,
    build_conv_chain,
    build_mlp,
    extract,
    free_port,
    run_onnx,
    start_worker,
    wait_until,
)
from edgeai_worker import grpc_predict_v2_pb2 as pb
from edgeai_worker.grpc_codec import (
    WIRE_PATH_MIN_BYTES,
    encode_infer_request,
    encode_infer_response,
    parameters_of,
    parse_infer_request,
    parse_infer_response,
    serialize_infer_request,
    serialize_infer_response,
)
from edgeai_worker.protocol import InferRequest, InferResponse, Tensor

ROOT = Path(__file__).resolve().parents[1]
MAX_BODY = 256 * 1024


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ChainModel:
    return build_conv_chain(tmp_path_factory.mktemp("model") / "chain.onnx")


@pytest.fixture
def x(model: ChainModel) -> np.ndarray:
    return np.random.default_rng(3).standard_normal(model.input_shape).astype(np.float32)


@pytest.fixture(scope="module")
def worker(model: ChainModel, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("worker")
    grpc_port = free_port()
    w = start_worker(
        tmp,
        {
            "model_name": "chain",
            "partitions": [str(model.path)],
            "tier": "edge",
            "max_body_bytes": MAX_BODY,
        },
        args=["--grpc-port", str(grpc_port)],  # the flag, not the file, turns gRPC on
    )
    w.grpc_target = f"127.0.0.1:{grpc_port}"  # type: ignore[attr-defined]
    yield w
    w.stop()


def _call(target: str, method: str, request: Any, reply: type[Any], **kwargs: Any) -> Any:
    with grpc.insecure_channel(target) as channel:
        stub = channel.unary_unary(
            f"/inference.GRPCInferenceService/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=reply.FromString,
        )
        return stub(request, timeout=30, **kwargs)


def _infer(target: str, request: pb.ModelInferRequest, **kwargs: Any) -> pb.ModelInferResponse:
    return _call(target, "ModelInfer", request, pb.ModelInferResponse, **kwargs)


def _raw_request(x: np.ndarray, name: str = "input", **fields: Any) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="chain", **fields)
    request.inputs.add(name=name, datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype(np.float32).tobytes())
    return request


def _output(reply: pb.ModelInferResponse, index: int = 0) -> np.ndarray:
    tensor = reply.outputs[index]
    return np.frombuffer(reply.raw_output_contents[index], np.float32).reshape(tensor.shape)


def test_a_worker_without_the_flag_has_no_grpc_endpoint(model: ChainModel, tmp_path: Path) -> None:
    w = start_worker(tmp_path, {"model_name": "chain", "partitions": [str(model.path)]})
    try:
        grpc_port = free_port()
        with pytest.raises(grpc.RpcError) as failed:
            _call(
                f"127.0.0.1:{grpc_port}",
                "ServerLive",
                pb.ServerLiveRequest(),
                pb.ServerLiveResponse,
            )
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "grpc" not in w.log.read_text().lower()
    finally:
        w.stop()


TRITON_GRPC_SCRIPT = textwrap.dedent(
    """
    import sys, json
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException
    target, name, path = sys.argv[1], sys.argv[2], sys.argv[3]
    x = np.load(path)
    client = grpcclient.InferenceServerClient(url=target)
    report = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(name),
        "server": client.get_server_metadata(as_json=True),
        "meta": client.get_model_metadata(name, as_json=True),
    }
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    out = grpcclient.InferRequestedOutput("output")
    r = client.infer(name, [inp], outputs=[out], request_id="tg-1", priority=2, timeout=10**7)
    report["output"] = r.as_numpy("output").tolist()
    report["id"] = r.get_response().id
    errors = {}
    try:
        client.infer("nope", [inp])
    except InferenceServerException as exc:
        errors["model"] = [exc.status(), exc.message()]
    wrong = grpcclient.InferInput("pixels", list(x.shape), "FP32")
    wrong.set_data_from_numpy(x)
    try:
        client.infer(name, [wrong])
    except InferenceServerException as exc:
        errors["input"] = [exc.status(), exc.message()]
    report["errors"] = errors
    r = client.infer(name, [inp])
    report["after_errors"] = r.as_numpy("output").tolist()
    print(json.dumps(report))
    """
)


def _triton_grpc(target: str, name: str, x: np.ndarray, tmp: Path) -> dict[str, Any]:
    np.save(tmp / "x.npy", x)
    # In a process of its own: tritonclient registers the same proto package
    # (`inference`) in protobuf's default pool as the worker's generated code does.
    run = subprocess.run(
        [sys.executable, "-c", TRITON_GRPC_SCRIPT, target, name, str(tmp / "x.npy")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    report: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return report


def test_stock_triton_grpc_client_on_conv_and_mlp_models(
    worker: Worker, model: ChainModel, x: np.ndarray, tmp_path: Path
) -> None:
    # tritonclient[grpc] is a dev dependency (pyproject.toml): the stock client always runs.
    report = _triton_grpc(worker.grpc_target, "chain", x, tmp_path)  # type: ignore[attr-defined]
    assert report["live"] is True
    assert report["ready"] is True
    assert report["model_ready"] is True
    assert report["server"]["name"] == "edgeai-worker"
    assert report["server"]["extensions"] == ["binary_tensor_data"]
    meta = report["meta"]
    assert meta["name"] == "chain"
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [
        {"name": "input", "datatype": "FP32", "shape": ["-1", "3", "32", "32"]}
    ]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": ["-1", "10"]}]
    expected = run_onnx(model.path, {"input": x})[0]
    np.testing.assert_allclose(np.array(report["output"], np.float32), expected, rtol=1e-6)
    np.testing.assert_allclose(np.array(report["after_errors"], np.float32), expected, rtol=1e-6)
    assert report["id"] == "tg-1"
    status, message = report["errors"]["model"]
    assert status == "StatusCode.NOT_FOUND"
    assert message == "stage 0 (edge): model 'nope' is not served here (accepted: chain)"
    status, message = report["errors"]["input"]
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert message == (
        "stage 0 (edge): input 'pixels' is not an input of model 'chain' (accepted: input)"
    )

    mlp = build_mlp(tmp_path / "mlp.onnx")
    grpc_port = free_port()
    w = start_worker(
        tmp_path,
        {"model_name": "mlp", "partitions": [str(mlp)], "grpc_port": grpc_port},
    )
    try:
        features = np.random.default_rng(5).standard_normal((8, 64)).astype(np.float32)
        report = _triton_grpc(f"127.0.0.1:{grpc_port}", "mlp", features, tmp_path)
    finally:
        w.stop()
    np.testing.assert_allclose(
        np.array(report["output"], np.float32),
        run_onnx(mlp, {"input": features})[0],
        rtol=1e-5,
    )
    assert report["meta"]["inputs"][0]["shape"] == ["-1", "64"]


def _bad_requests(x: np.ndarray) -> list[tuple[str, pb.ModelInferRequest, grpc.StatusCode, str]]:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    wrong_version = _raw_request(x, model_version="9")
    unknown_model = _raw_request(x)
    unknown_model.model_name = "nope"
    as_fp64 = pb.ModelInferRequest(model_name="chain")
    as_fp64.inputs.add(name="input", datatype="FP64", shape=list(x.shape))
    as_fp64.raw_input_contents.append(x.astype(np.float64).tobytes())
    truncated = _raw_request(x)
    truncated.raw_input_contents[0] = truncated.raw_input_contents[0][:-100]
    extra_raw = _raw_request(x)
    extra_raw.raw_input_contents.append(b"\x00" * 4)
    unknown_type = pb.ModelInferRequest(model_name="chain")
    unknown_type.inputs.add(name="input", datatype="FLOAT", shape=[1])
    unknown_type.raw_input_contents.append(b"\x00" * 4)
    too_few = pb.ModelInferRequest(model_name="chain")
    too_few.inputs.add(name="input", datatype="FP32", shape=[1, 3, 32, 32])
    too_few.inputs[0].contents.fp32_contents.append(1.0)
    unknown_output = _raw_request(x)
    unknown_output.outputs.add(name="logits")
    bad_priority = _raw_request(x)
    bad_priority.parameters["priority"].string_param = "high"
    oversized = _raw_request(np.zeros(MAX_BODY // 4 + 16, np.float32), name="input")
    return [
        (
            "unknown model",
            unknown_model,
            grpc.StatusCode.NOT_FOUND,
            "model 'nope' is not served here (accepted: chain)",
        ),
        (
            "unknown version",
            wrong_version,
            grpc.StatusCode.NOT_FOUND,
            "version '9' of model 'chain' is not served here",
        ),
        (
            "wrong input name",
            _raw_request(x, name="pixels"),
            invalid,
            "input 'pixels' is not an input of model 'chain' (accepted: input)",
        ),
        (
            "wrong shape",
            _raw_request(np.zeros((1, 3, 16, 16), np.float32)),
            invalid,
            "shape [1, 3, 16, 16] does not match the model's [-1, 3, 32, 32]",
        ),
        ("wrong dtype", as_fp64, invalid, "datatype FP64 does not match the model's FP32"),
        (
            "raw contents truncated",
            truncated,
            invalid,
            "raw_input_contents[0] is 12188 bytes but shape [1, 3, 32, 32] of FP32 needs 12288",
        ),
        (
            "raw contents per input",
            extra_raw,
            invalid,
            "raw_input_contents has 2 entries but the message has 1 inputs",
        ),
        # grpc's own limit answers before the worker sees the message
        ("oversized message", oversized, grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
        ("unknown datatype", unknown_type, invalid, "datatype 'FLOAT' is not one of BOOL"),
        (
            "element count",
            too_few,
            invalid,
            "data has 1 elements but shape [1, 3, 32, 32] needs 3072",
        ),
        (
            "unknown output",
            unknown_output,
            invalid,
            "output 'logits' is not an output of model 'chain' (accepted: output)",
        ),
        ("bad priority", bad_priority, invalid, "parameters.priority must be an integer"),
        ("no inputs", pb.ModelInferRequest(model_name="chain"), invalid, "'inputs' is empty"),
    ]


def test_bad_inputs_get_their_status_code_and_the_worker_keeps_serving(
    worker: Worker, model: ChainModel, x: np.ndarray
) -> None:
    target = worker.grpc_target  # type: ignore[attr-defined]
    expected = run_onnx(model.path, {"input": x})[0]
    cases = _bad_requests(x)
    for what, request, code, message in cases:
        with pytest.raises(grpc.RpcError) as failed:
            _infer(target, request)
        assert failed.value.code() == code, f"{what}: {failed.value}"
        details = failed.value.details() or ""
        assert message in details, f"{what}: {details}"
        if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert details.startswith("stage 0 (edge): "), details
        reply = _infer(target, _raw_request(x, id=f"after {what}"))
        assert reply.id == f"after {what}"
        np.testing.assert_allclose(_output(reply), expected, rtol=1e-6)
    assert worker.process.poll() is None
    # the metadata calls check the model too
    with pytest.raises(grpc.RpcError) as failed:
        _call(
            target, "ModelMetadata", pb.ModelMetadataRequest(name="nope"), pb.ModelMetadataResponse
        )
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND


def test_typed_contents_and_parameters_round_trip(
    worker: Worker, model: ChainModel, x: np.ndarray
) -> None:
    request = pb.ModelInferRequest(model_name="chain", model_version="1", id="typed")
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.inputs[0].contents.fp32_contents.extend(x.ravel().tolist())
    request.parameters["priority"].int64_param = 3
    reply = _infer(worker.grpc_target, request)  # type: ignore[attr-defined]
    assert reply.model_name == "chain"
    assert reply.model_version == "1"
    assert reply.outputs[0].datatype == "FP32"
    assert list(reply.outputs[0].shape) == [1, 10]
    np.testing.assert_allclose(_output(reply), run_onnx(model.path, {"input": x})[0], rtol=1e-6)
    assert parameters_of(reply.parameters) == {}


def test_protobuf_runs_on_its_upb_backend() -> None:
    # the pure-Python backend would parse and build every message many times slower
    from google.protobuf.internal import api_implementation

    assert api_implementation.Type() == "upb"


@pytest.mark.parametrize("shape", [(2, 3), (1, 3, 64, 64)], ids=["small", "large"])
def test_the_wire_codec_writes_and_reads_what_protobuf_does(shape: tuple[int, ...]) -> None:
    """Below and above the size where ModelInfer reads and writes the raw contents on
    the wire itself: the same bytes as protobuf's, read back whatever the field order,
    and a damaged message refused as protobuf refuses it."""
    rng = np.random.default_rng(7)
    a = rng.standard_normal(shape).astype(np.float32)
    b = rng.integers(-5, 5, shape).astype(np.int64)
    assert (a.nbytes < WIRE_PATH_MIN_BYTES) == (shape == (2, 3))
    request = InferRequest(
        [Tensor.from_numpy("a", a), Tensor.from_numpy("b", b)], "r1", None, {"priority": 3}
    )
    wire = serialize_infer_request(request, "m", "2")
    assert wire == encode_infer_request(request, "m", "2").SerializeToString()
    header = pb.ModelInferRequest.FromString(wire)
    contents = pb.ModelInferRequest(raw_input_contents=list(header.raw_input_contents))
    del header.raw_input_contents[:]
    # the raw contents first, then the rest: one message to protobuf, and to the codec
    for data in (wire, contents.SerializeToString() + header.SerializeToString()):
        parsed = parse_infer_request(data)
        assert parsed.size_bytes == len(data)
        assert parsed.message.model_name == "m"
        decoded = parsed.decode()
        assert (decoded.id, decoded.parameters) == ("r1", {"priority": 3})
        np.testing.assert_array_equal(decoded.inputs[0].array, a)
        np.testing.assert_array_equal(decoded.inputs[1].array, b)
    with pytest.raises(DecodeError):
        parse_infer_request(wire[:-3])
    response = InferResponse("m", [Tensor.from_numpy("out", a)], "2", "r1", {})
    reply = serialize_infer_response(response)
    assert reply == encode_infer_response(response).SerializeToString()
    back = parse_infer_response(reply)
    assert (back.model_name, back.model_version, back.id) == ("m", "2", "r1")
    np.testing.assert_array_equal(back.outputs[0].array, a)


def test_sigterm_drains_grpc_calls_in_flight(
    model: ChainModel, x: np.ndarray, tmp_path: Path
) -> None:
    # A long batching window keeps the call in flight while SIGTERM arrives.
    grpc_port = free_port()
    w = start_worker(
        tmp_path,
        {
            "model_name": "chain",
            "partitions": [str(model.path)],
            "max_batch": 8,
            "max_wait_ms": 1500,
            "shutdown_grace_s": 10,
            "grpc_port": grpc_port,
        },
    )
    target = f"127.0.0.1:{grpc_port}"
    # a call whose `timeout` parameter (microseconds) passed while it was queued gets
    # the batcher's 504 as DEADLINE_EXCEEDED, from the worker (the client's deadline is
    # far off)
    late = _raw_request(x, id="late")
    late.parameters["timeout"].int64_param = 0
    with pytest.raises(grpc.RpcError) as failed:
        _infer(target, late)
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline passed" in (failed.value.details() or "")
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["reply"] = _infer(target, _raw_request(x, id="draining"))
        except grpc.RpcError as exc:
            result["error"] = exc

    def in_flight() -> bool:
        metrics = _call_metrics(w)
        return "edgeai_in_flight_requests 1" in metrics

    thread = threading.Thread(target=call)
    thread.start()
    wait_until(in_flight, "the call to arrive")
    w.process.send_signal(signal.SIGTERM)
    thread.join(30)
    assert w.process.wait(30) == 0
    assert "error" not in result, result.get("error")
    reply = result["reply"]
    assert reply.id == "draining"
    np.testing.assert_allclose(_output(reply), run_onnx(model.path, {"input": x})[0], rtol=1e-6)


def _call_metrics(w: Worker) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{w.url}/metrics", timeout=5) as resp:
        text: str = resp.read().decode()
        return text


def test_committed_generated_code_matches_the_proto(tmp_path: Path) -> None:
    """`make grpc-codegen`'s command, run again, gives the committed files."""
    make = subprocess.run(
        ["make", "-s", "-n", "grpc-codegen"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    line = next(line for line in make.stdout.splitlines() if "grpc_tools.protoc" in line)
    words = shlex.split(line)
    arguments = words[words.index("grpc_tools.protoc") + 1 :]
    assert "--python_out=workers/edgeai_worker" in arguments
    arguments = [a.replace("_out=workers/edgeai_worker", f"_out={tmp_path}") for a in arguments]
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", *arguments], cwd=ROOT, check=True)
    for name in ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi"):
        committed = (ROOT / "workers" / "edgeai_worker" / name).read_text()
        assert (tmp_path / name).read_text() == committed, f"{name} differs: run make grpc-codegen"


def test_a_chain_forwarding_over_grpc_answers_as_the_full_model(
    model: ChainModel, x: np.ndarray, tmp_path: Path
) -> None:
    cut = model.cuts[1]
    head = extract(model.path, ["input"], [cut], tmp_path / "head.onnx")
    tail = extract(model.path, [cut], ["output"], tmp_path / "tail.onnx")
    grpc_port = free_port()
    dead_port = free_port()  # a replica that is down: the forward goes to the other one
    second = start_worker(
        tmp_path,
        {
            "model_name": "chain",
            "stage_index": 1,
            "partitions": [str(tail)],
            "grpc_port": grpc_port,
        },
    )
    first_grpc = free_port()
    try:
        first = start_worker(
            tmp_path,
            {
                "model_name": "chain",
                "partitions": [str(head)],
                "next_urls": [f"grpc://127.0.0.1:{dead_port}", f"grpc://127.0.0.1:{grpc_port}"],
                "grpc_port": first_grpc,
            },
        )
        try:
            expected = run_onnx(model.path, {"input": x})[0]
            for i in range(4):  # the rotation reaches the dead replica on the way
                reply = _infer(f"127.0.0.1:{first_grpc}", _raw_request(x, id=f"c{i}"))
                assert reply.id == f"c{i}"
                np.testing.assert_allclose(_output(reply), expected, rtol=1e-5, atol=1e-6)
            metrics = _call_metrics(first)
            assert 'edgeai_forward_retries_total{stage="0"}' in metrics
            # the chain's metadata is asked of the next stage over gRPC
            meta = _call(
                f"127.0.0.1:{first_grpc}",
                "ModelMetadata",
                pb.ModelMetadataRequest(name="chain"),
                pb.ModelMetadataResponse,
            )
            assert [(o.name, list(o.shape)) for o in meta.outputs] == [("output", [-1, 10])]
            # a downstream error comes back with the downstream stage's message and code
            with pytest.raises(grpc.RpcError) as failed:
                _infer(
                    f"127.0.0.1:{first_grpc}",
                    _raw_request(
                        x, outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="logits")]
                    ),
                )
            assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (failed.value.details() or "").startswith("stage 1 (edge): output 'logits'")
        finally:
            first.stop()
    finally:
        second.stop()


def test_a_retried_call_with_its_idempotency_key_runs_once(worker: Worker, x: np.ndarray) -> None:
    target = worker.grpc_target  # type: ignore[attr-defined]
    before = _call_metrics(worker)
    key = (("idempotency-key", "grpc-test-key"),)
    first = _infer(target, _raw_request(x, id="once"), metadata=key)
    again = _infer(target, _raw_request(x, id="once"), metadata=key)
    assert first == again
    after = _call_metrics(worker)

    def deduplicated(text: str) -> float:
        for line in text.splitlines():
            if line.startswith("edgeai_deduplicated_requests_total"):
                return float(line.split()[-1])
        return 0.0

    assert deduplicated(after) == deduplicated(before) + 1
