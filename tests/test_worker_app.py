"""The worker app: OIP v2 endpoints in-process, and a real worker process that answers
bad input with clear 4xx errors, keeps serving, works with a stock OIP client and drains
in-flight requests on shutdown."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _worker_support import (
    ChainModel,
    Worker,
    build_conv_chain,
    run_onnx,
    start_worker,
    until,
    wait_until,
)
from edgeai_worker.app import STATE, create_app
from edgeai_worker.config import WorkerConfig, load_config
from edgeai_worker.protocol import HEADER_LENGTH

MAX_BODY = 256 * 1024


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ChainModel:
    return build_conv_chain(tmp_path_factory.mktemp("model") / "chain.onnx")


@pytest.fixture
def x(model: ChainModel) -> np.ndarray:
    return np.random.default_rng(3).standard_normal(model.input_shape).astype(np.float32)


def _json_request(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ],
        **extra,
    }


def _binary_request(x: np.ndarray, **extra: Any) -> tuple[bytes, dict[str, str]]:
    raw = x.astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            **extra,
        }
    ).encode()
    return header + raw, {
        HEADER_LENGTH: str(len(header)),
        "Content-Type": "application/octet-stream",
    }


# --------------------------------------------------------------------- in-process


@pytest.mark.parametrize(("default_priority", "served"), [(5, [0, 2, 1]), (0, [0, 1, 2])])
async def test_a_saturated_stage_queues_a_request_without_priority_at_its_default(
    aiohttp_client: Any,
    monkeypatch: pytest.MonkeyPatch,
    model: ChainModel,
    x: np.ndarray,
    default_priority: int,
    served: list[int],
) -> None:
    """Request 1 carries priority 1, request 2 none: at a stage whose default priority
    is 5 request 2 runs first; at default 0 it runs after request 1."""
    from edgeai_worker.runtime import Partition

    gate = threading.Event()
    order: list[int] = []
    run = Partition.run

    def gated(self: Partition, feeds: Any) -> Any:
        order.append(int(feeds["input"][0, 0, 0, 0]))
        if len(order) == 1:
            gate.wait(10)  # the first request holds the stage busy while the others queue
        return run(self, feeds)

    monkeypatch.setattr(Partition, "run", gated)
    config = WorkerConfig(
        model_name="chain", partitions=(model.path,), default_priority=default_priority
    )
    app = create_app(config)
    client = await aiohttp_client(app)

    def post(tag: int, **parameters: int) -> Any:
        tagged = x.copy()
        tagged[0, 0, 0, 0] = tag
        body = _json_request(tagged, parameters=parameters) if parameters else _json_request(tagged)
        return asyncio.create_task(client.post("/v2/models/chain/infer", json=body))

    busy = post(0)
    await until(lambda: order == [0], "the first request to run")
    batcher = app[STATE].batcher
    queued = [post(1, priority=1)]
    await until(lambda: batcher.depth == 1, "request 1 to queue")
    queued.append(post(2))
    await until(lambda: batcher.depth == 2, "request 2 to queue")
    gate.set()
    responses = await asyncio.gather(busy, *queued)
    assert [r.status for r in responses] == [200, 200, 200]
    assert order == served


def test_default_priority_is_read_from_a_stage_config_file(tmp_path: Path) -> None:
    path = tmp_path / "stage.yaml"
    path.write_text("defaultPriority: 7\n")
    assert load_config(path, environ={}).default_priority == 7
    assert load_config(None, environ={"EDGEAI_DEFAULT_PRIORITY": "3"}).default_priority == 3


async def test_metadata_health_and_json_inference(
    aiohttp_client: Any, model: ChainModel, x: np.ndarray
) -> None:
    app = create_app(WorkerConfig(model_name="chain", partitions=(model.path,), tier="cloud"))
    client = await aiohttp_client(app)
    server = await (await client.get("/v2")).json()
    assert server["name"] == "edgeai-worker"
    assert "binary_tensor_data" in server["extensions"]
    assert (await client.get("/v2/health/live")).status == 200
    assert (await client.get("/v2/health/ready")).status == 200
    assert (await client.get("/v2/models/chain/ready")).status == 200
    assert (await client.get("/v2/models/chain/versions/1/ready")).status == 200
    meta = await (await client.get("/v2/models/chain")).json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]
    resp = await client.post("/v2/models/chain/infer", json=_json_request(x, id="abc"))
    assert resp.status == 200
    body = await resp.json()
    assert body["id"] == "abc"
    assert body["model_name"] == "chain"
    (out,) = body["outputs"]
    expected = run_onnx(model.path, {"input": x})[0]
    np.testing.assert_allclose(
        np.array(out["data"], np.float32).reshape(out["shape"]), expected, rtol=1e-6
    )
    # no artefact identity configured: the metadata names only the stage
    assert meta["parameters"] == {"stage": 0, "tier": "cloud"}


async def test_model_metadata_reports_the_served_artefact(
    aiohttp_client: Any, model: ChainModel, tmp_path: Path
) -> None:
    digest = "sha256:" + "ab" * 32
    path = tmp_path / "worker.yaml"
    # the camelCase names a config file may use, and an empty URI read as unset
    path.write_text(f"modelDigest: '{digest}'\nmodelVariant: int8\nmodelUri: ''\n")
    config = load_config(path, {}, model_name="chain", partitions=str(model.path))
    assert (config.model_digest, config.model_variant, config.model_uri) == (digest, "int8", None)
    client = await aiohttp_client(create_app(config))
    meta = await (await client.get("/v2/models/chain")).json()
    assert meta["parameters"] == {"stage": 0, "tier": "edge", "digest": digest, "variant": "int8"}
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["versions"] == ["1"]
    uri = "oci://127.0.0.1:5000/edgeai-models:chain-int8-abababababab"
    config = load_config(None, {"EDGEAI_MODEL_URI": uri}, model_name="chain")
    client = await aiohttp_client(create_app(config))
    meta = await (await client.get("/v2/models/chain")).json()
    assert meta["parameters"] == {"stage": 0, "tier": "edge", "uri": uri}


async def test_binary_in_binary_out_and_metrics(
    aiohttp_client: Any, model: ChainModel, x: np.ndarray
) -> None:
    app = create_app(WorkerConfig(model_name="chain", partitions=(model.path,), tier="edge"))
    client = await aiohttp_client(app)
    body, headers = _binary_request(x, parameters={"binary_data_output": True})
    resp = await client.post("/v2/models/chain/versions/1/infer", data=body, headers=headers)
    assert resp.status == 200
    data = await resp.read()
    length = int(resp.headers[HEADER_LENGTH])
    header = json.loads(data[:length])
    (out,) = header["outputs"]
    assert out["parameters"]["binary_data_size"] == 40
    got = np.frombuffer(data[length:], "<f4").reshape(out["shape"])
    np.testing.assert_allclose(got, run_onnx(model.path, {"input": x})[0], rtol=1e-6)
    text = await (await client.get("/metrics")).text()
    assert 'edgeai_stage_latency_seconds_count{stage="0",tier="edge"} 1' in text
    assert f'edgeai_bytes_in_total{{stage="0"}} {len(body)}' in text
    assert 'edgeai_batch_size_count{stage="0"} 1' in text
    assert 'edgeai_requests_total{code="200",stage="0"} 1' in text
    assert "edgeai_queue_depth" in text


# ------------------------------------------------------------ real worker process


@pytest.fixture(scope="module")
def worker(model: ChainModel, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("worker")
    w = start_worker(
        tmp,
        {
            "model_name": "chain",
            "partitions": [str(model.path)],
            "tier": "edge",
            "max_body_bytes": MAX_BODY,
        },
    )
    yield w
    w.stop()


def _http(
    w: Worker,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    host, port = w.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _metric(w: Worker, series: str) -> float:
    """The value of one series (name and labels as /metrics writes them), 0 if absent."""
    _, _, text = _http(w, "GET", "/metrics")
    for line in text.decode().splitlines():
        if line.startswith(f"{series} "):
            return float(line.split()[-1])
    return 0.0


def _bad_inputs(x: np.ndarray) -> list[tuple[str, str, str, bytes, dict[str, str], int, str]]:
    good_binary, good_headers = _binary_request(x)
    wrong = np.zeros((1, 3, 16, 16), np.float32)
    infer = "/v2/models/chain/infer"
    js = {"Content-Type": "application/json"}

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj).encode()

    request = _json_request(x)
    renamed = json.loads(json.dumps(request))
    renamed["inputs"][0]["name"] = "pixels"
    as_fp64 = json.loads(json.dumps(request))
    as_fp64["inputs"][0]["datatype"] = "FP64"
    return [
        ("non-JSON body", "POST", infer, b"\x00garbage{", js, 400, "is not valid JSON"),
        (
            "unknown model",
            "POST",
            "/v2/models/nope/infer",
            dumps(request),
            js,
            404,
            "model 'nope' is not served here (accepted: chain)",
        ),
        (
            "unknown version",
            "POST",
            "/v2/models/chain/versions/9/infer",
            dumps(request),
            js,
            404,
            "version '9' of model 'chain' is not served here",
        ),
        (
            "wrong input name",
            "POST",
            infer,
            dumps(renamed),
            js,
            400,
            "input 'pixels' is not an input of model 'chain' (accepted: input)",
        ),
        (
            "wrong shape",
            "POST",
            infer,
            dumps(_json_request(wrong)),
            js,
            400,
            "shape [1, 3, 16, 16] does not match the model's [-1, 3, 32, 32]",
        ),
        (
            "wrong dtype",
            "POST",
            infer,
            dumps(as_fp64),
            js,
            400,
            "datatype FP64 does not match the model's FP32",
        ),
        (
            "header length not a number",
            "POST",
            infer,
            good_binary,
            {**good_headers, HEADER_LENGTH: "ten"},
            400,
            "Inference-Header-Content-Length must be an integer",
        ),
        (
            "header length past body",
            "POST",
            infer,
            good_binary,
            {**good_headers, HEADER_LENGTH: str(len(good_binary) + 5)},
            400,
            "but the body has",
        ),
        (
            "binary data truncated",
            "POST",
            infer,
            good_binary[:-100],
            good_headers,
            400,
            "runs past the end of the body",
        ),
        (
            "oversized body",
            "POST",
            infer,
            b"{" + b" " * (MAX_BODY + 10) + b"}",
            js,
            413,
            f"larger than the limit of {MAX_BODY} bytes",
        ),
        (
            "unknown datatype",
            "POST",
            infer,
            dumps({"inputs": [{"name": "input", "shape": [1], "datatype": "FLOAT", "data": [1]}]}),
            js,
            400,
            "datatype 'FLOAT' is not one of BOOL",
        ),
        (
            "element count",
            "POST",
            infer,
            dumps(
                {
                    "inputs": [
                        {
                            "name": "input",
                            "shape": [1, 3, 32, 32],
                            "datatype": "FP32",
                            "data": [1.0],
                        }
                    ]
                }
            ),
            js,
            400,
            "data has 1 elements but shape [1, 3, 32, 32] needs 3072",
        ),
        (
            "unknown output",
            "POST",
            infer,
            dumps(_json_request(x, outputs=[{"name": "logits"}])),
            js,
            400,
            "output 'logits' is not an output of model 'chain' (accepted: output)",
        ),
        (
            "bad priority",
            "POST",
            infer,
            dumps(_json_request(x, parameters={"priority": "high"})),
            js,
            400,
            "parameters.priority must be an integer",
        ),
        ("no inputs", "POST", infer, dumps({"id": "1"}), js, 400, "the request has no 'inputs'"),
        ("GET on infer", "GET", infer, b"", {}, 405, "method GET is not allowed"),
        ("unknown endpoint", "GET", "/v3/models", b"", {}, 404, "no such endpoint: GET /v3/models"),
    ]


def test_bad_inputs_get_clear_4xx_and_worker_keeps_serving(
    worker: Worker, model: ChainModel, x: np.ndarray
) -> None:
    cases = _bad_inputs(x)
    assert len(cases) >= 12
    for what, method, path, body, headers, status, message in cases:
        got_status, _, got_body = _http(worker, method, path, body or None, headers)
        assert got_status == status, f"{what}: {got_status} {got_body[:300]!r}"
        error = json.loads(got_body)["error"]
        assert message in error, f"{what}: {error}"
        assert error.startswith("stage 0 (edge): "), error
        # After every bad request the worker still answers correctly.
        ok_status, _, ok_body = _http(
            worker,
            "POST",
            "/v2/models/chain/infer",
            json.dumps(_json_request(x)).encode(),
            {"Content-Type": "application/json"},
        )
        assert ok_status == 200, f"after {what}: {ok_body[:200]!r}"
    assert worker.process.poll() is None
    out = json.loads(ok_body)["outputs"][0]
    np.testing.assert_allclose(
        np.array(out["data"], np.float32).reshape(out["shape"]),
        run_onnx(model.path, {"input": x})[0],
        rtol=1e-6,
    )


def test_raw_wire_format_as_the_spec_documents(
    worker: Worker, model: ChainModel, x: np.ndarray
) -> None:
    """What Triton's binary_tensor_data extension documents: JSON header, then the raw
    tensor; the response's header length splits JSON from binary outputs."""
    raw = x.astype("<f4").tobytes()
    header = json.dumps(
        {
            "id": "wire-1",
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 3, 32, 32],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        }
    ).encode()
    status, headers, body = _http(
        worker,
        "POST",
        "/v2/models/chain/infer",
        header + raw,
        {
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
    )
    assert status == 200, body[:300]
    length = int(headers["Inference-Header-Content-Length"])
    response = json.loads(body[:length])
    assert response["id"] == "wire-1"
    assert response["outputs"][0]["parameters"] == {"binary_data_size": 40}
    np.testing.assert_allclose(
        np.frombuffer(body[length:], "<f4").reshape(1, 10),
        run_onnx(model.path, {"input": x})[0],
        rtol=1e-6,
    )


TRITON_CLIENT_SCRIPT = textwrap.dedent(
    """
    import sys, json
    import numpy as np
    import tritonclient.http as httpclient
    url, path = sys.argv[1], sys.argv[2]
    x = np.load(path)
    client = httpclient.InferenceServerClient(url=url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("chain")
    meta = client.get_model_metadata("chain")
    results = {}
    for binary in (True, False):
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = httpclient.InferRequestedOutput("output", binary_data=binary)
        r = client.infer("chain", [inp], outputs=[out], request_id="tc-%d" % binary)
        results[str(binary)] = r.as_numpy("output").tolist()
    r = client.infer("chain", [inp])  # no outputs named: binary_data_output
    results["default"] = r.as_numpy("output").tolist()
    try:
        client.infer("nope", [inp])
        results["error"] = None
    except Exception as exc:
        results["error"] = str(exc)
    print(json.dumps({"meta": meta, "results": results}))
    """
)


def test_stock_triton_http_client_works_unchanged(
    worker: Worker, model: ChainModel, x: np.ndarray, tmp_path: Path
) -> None:
    # tritonclient[http] is a dev dependency (pyproject.toml): the stock client always runs.
    np.save(tmp_path / "x.npy", x)
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            TRITON_CLIENT_SCRIPT,
            worker.url.removeprefix("http://"),
            str(tmp_path / "x.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["meta"]["inputs"][0]["name"] == "input"
    expected = run_onnx(model.path, {"input": x})[0]
    for key in ("True", "False", "default"):
        np.testing.assert_allclose(
            np.array(report["results"][key], np.float32), expected, rtol=1e-6
        )
    assert "model 'nope' is not served here" in report["results"]["error"]


def test_shutdown_drains_in_flight_requests(
    model: ChainModel, x: np.ndarray, tmp_path: Path
) -> None:
    # A long batching window keeps the request in flight while SIGTERM arrives.
    w = start_worker(
        tmp_path,
        {
            "model_name": "chain",
            "partitions": [str(model.path)],
            "max_batch": 8,
            "max_wait_ms": 1500,
            "shutdown_grace_s": 10,
        },
    )
    result: dict[str, Any] = {}

    def call() -> None:
        result["reply"] = _http(
            w,
            "POST",
            "/v2/models/chain/infer",
            json.dumps(_json_request(x)).encode(),
            {"Content-Type": "application/json"},
        )

    thread = threading.Thread(target=call)
    thread.start()
    wait_until(lambda: _metric(w, "edgeai_in_flight_requests") == 1, "the request to arrive")
    w.process.send_signal(signal.SIGTERM)
    thread.join(30)
    assert w.process.wait(30) == 0
    status, _, body = result["reply"]
    assert status == 200, body[:300]
    out = json.loads(body)["outputs"][0]
    np.testing.assert_allclose(
        np.array(out["data"], np.float32).reshape(out["shape"]),
        run_onnx(model.path, {"input": x})[0],
        rtol=1e-6,
    )


# ------------------------------------------------------------------------- config


def test_config_from_file_environment_and_plan_stage(tmp_path: Path) -> None:
    from edgeai_worker.config import ConfigError, load_config, stage_config

    (tmp_path / "stage.onnx").write_bytes(b"")
    path = tmp_path / "worker.yaml"
    path.write_text(
        "modelName: chain\ntier: edge\nport: 9001\npartitions: [stage.onnx]\n"
        "nextUrls: [http://cloud-a:8000/, http://cloud-b:8000]\nmaxBatch: 8\n"
    )
    env = {"EDGEAI_MAX_WAIT_MS": "5", "EDGEAI_PORT": "9002", "EDGEAI_CACHE_DIR": "/elsewhere"}
    config = load_config(path, env, tier="cloud")
    assert config.model_name == "chain"
    assert config.partitions == (tmp_path / "stage.onnx",)  # relative to the file
    assert config.next_urls == ("http://cloud-a:8000", "http://cloud-b:8000")
    assert (config.max_batch, config.max_wait_ms, config.port) == (8, 5.0, 9002)  # env wins
    assert config.tier == "cloud"  # explicit arguments win over both
    path.write_text("maxBatchSize: 8\n")
    with pytest.raises(ConfigError, match="maxBatchSize: unknown setting"):
        load_config(path, {})
    with pytest.raises(ConfigError, match=r"tier: 'fog' is not a tier.*device, edge, cloud"):
        load_config(None, {"EDGEAI_TIER": "fog"})
    with pytest.raises(ConfigError, match="max_batch: must be at least 1"):
        load_config(None, {"EDGEAI_MAX_BATCH": "0"})
    plan = {
        "kind": "Plan",
        "model": {"zoo": "resnet18"},
        "stages": [
            {"index": 0, "tier": "device", "inputs": ["input"], "outputs": ["x"]},
            {"index": 1, "tier": "cloud", "inputs": ["x"], "outputs": ["output"]},
        ],
    }
    stage = stage_config(plan, 1, [tmp_path / "stage.onnx"], max_batch=4)
    assert (stage.model_name, stage.tier, stage.stage_index, stage.max_batch) == (
        "resnet18",
        "cloud",
        1,
        4,
    )
    with pytest.raises(ConfigError, match="stage_index: 2 is out of range"):
        stage_config(plan, 2, [])


def test_gzip_request_body_is_accepted(worker: Worker, model: ChainModel, x: np.ndarray) -> None:
    """tritonclient's request_compression_algorithm="gzip" sends Content-Encoding: gzip."""
    import gzip

    body = gzip.compress(json.dumps(_json_request(x, id="gz")).encode())
    status, _, reply = _http(
        worker,
        "POST",
        "/v2/models/chain/infer",
        body,
        {"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert status == 200, reply[:300]
    out = json.loads(reply)["outputs"][0]
    np.testing.assert_allclose(
        np.array(out["data"], np.float32).reshape(out["shape"]),
        run_onnx(model.path, {"input": x})[0],
        rtol=1e-6,
    )


def test_a_client_gone_mid_body_is_its_error_and_the_worker_keeps_serving(
    worker: Worker, x: np.ndarray
) -> None:
    """A body cut short by the client closing its side is counted as a 400 that says
    how much of `Content-Length` arrived, not as an internal error."""
    import socket

    def count(code: str) -> float:
        return _metric(worker, f'edgeai_requests_total{{code="{code}",stage="0"}}')

    before = count("400"), count("500")
    host, port = worker.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v2/models/chain/infer HTTP/1.1\r\nHost: worker\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            b'{"inputs": ['
        )
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    wait_until(lambda: count("400") != before[0], "the cut-short request to be counted")
    assert (count("400"), count("500")) == (before[0] + 1, before[1])
    log = worker.log.read_text()
    assert "the body ended after 12 of its 1000 bytes (Content-Length)" in log
    body, headers = _binary_request(x)
    status, _, _ = _http(worker, "POST", "/v2/models/chain/infer", body, headers)
    assert status == 200


async def test_server_time_header_excludes_the_upload(
    aiohttp_client: Any, model: ChainModel, x: np.ndarray
) -> None:
    """The device subtracts Edgeai-Server-Ms from its round trip to measure the uplink,
    so the header must not count the time the body spent arriving."""
    client = await aiohttp_client(
        create_app(WorkerConfig(model_name="chain", partitions=(model.path,)))
    )
    body, headers = _binary_request(x)

    async def slow_body() -> Any:
        yield body[:100]
        # A slow link: the upload's duration is what the test measures, not a wait for
        # something to happen.
        await asyncio.sleep(0.3)
        yield body[100:]

    started = time.perf_counter()
    resp = await client.post("/v2/models/chain/infer", data=slow_body(), headers=headers)
    assert resp.status == 200
    await resp.read()
    round_trip_ms = (time.perf_counter() - started) * 1000
    assert round_trip_ms >= 300
    assert float(resp.headers["Edgeai-Server-Ms"]) < round_trip_ms - 250  # upload excluded
