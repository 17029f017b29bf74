"""Stages chained across worker processes on loopback: the chain reproduces the full
model, forwards in binary form, survives a replica killed under load without losing or
duplicating a request, and names the failing stage in errors."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from _worker_support import ChainModel, build_conv_chain, extract, free_port, run_onnx, workers
from edgeai_worker.protocol import HEADER_LENGTH

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ChainModel:
    return build_conv_chain(tmp_path_factory.mktemp("chain") / "chain.onnx")


def _partitions(model: ChainModel, cuts: list[str], tmp: Path) -> list[Path]:
    bounds = ["input", *cuts, "output"]
    return [
        extract(model.path, [a], [b], tmp / f"part{i}.onnx")
        for i, (a, b) in enumerate(itertools.pairwise(bounds))
    ]


def _binary_body(x: np.ndarray, request_id: str | None = None) -> tuple[bytes, dict[str, str]]:
    raw = x.astype("<f4").tobytes()
    header: dict[str, Any] = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "parameters": {"binary_data_output": True},
    }
    if request_id is not None:
        header["id"] = request_id
    encoded = json.dumps(header).encode()
    return encoded + raw, {HEADER_LENGTH: str(len(encoded))}


async def _infer(
    session: aiohttp.ClientSession,
    url: str,
    x: np.ndarray,
    request_id: str | None = None,
    idempotency_key: str | None = None,
) -> tuple[int, dict[str, Any], np.ndarray | None]:
    body, headers = _binary_body(x, request_id)
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    async with session.post(f"{url}/v2/models/chain/infer", data=body, headers=headers) as resp:
        data = await resp.read()
        if resp.status != 200:
            return resp.status, json.loads(data), None
        length = int(resp.headers[HEADER_LENGTH])
        header = json.loads(data[:length])
        out = np.frombuffer(data[length:], "<f4").reshape(header["outputs"][0]["shape"])
        return 200, header, out


def _metric(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


async def test_three_stage_chain_returns_the_full_models_output(
    model: ChainModel, tmp_path: Path
) -> None:
    parts = _partitions(model, ["relu0", "relu2"], tmp_path)
    ports = [free_port() for _ in range(3)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    settings = [
        {
            "model_name": "chain",
            "port": ports[i],
            "partitions": [str(parts[i])],
            "tier": tier,
            "stage_index": i,
            "next_urls": urls[i + 1 : i + 2],
            "uplink_mbps": 100.0 if i == 0 else None,
        }
        for i, tier in enumerate(["device", "edge", "cloud"])
    ]
    rng = np.random.default_rng(0)
    with workers(tmp_path, *settings):
        async with aiohttp.ClientSession() as session:
            for i in range(5):
                x = rng.standard_normal(model.input_shape).astype(np.float32)
                status, header, out = await _infer(session, urls[0], x, f"r{i}")
                assert status == 200, header
                assert header["id"] == f"r{i}"
                np.testing.assert_allclose(
                    out, run_onnx(model.path, {"input": x})[0], rtol=1e-5, atol=1e-6
                )
            # JSON in, JSON out through the same binary chain.
            x = rng.standard_normal(model.input_shape).astype(np.float32)
            request = {
                "inputs": [
                    {
                        "name": "input",
                        "shape": list(x.shape),
                        "datatype": "FP32",
                        "data": x.tolist(),
                    }
                ]
            }
            async with session.post(f"{urls[0]}/v2/models/chain/infer", json=request) as resp:
                body = await resp.json()
            np.testing.assert_allclose(
                np.array(body["outputs"][0]["data"], np.float32).reshape(1, 10),
                run_onnx(model.path, {"input": x})[0],
                rtol=1e-5,
                atol=1e-6,
            )
            # Metadata at the entry describes the whole chain: its input, the last stage's output.
            async with session.get(f"{urls[0]}/v2/models/chain") as resp:
                meta = await resp.json()
            assert [o["name"] for o in meta["outputs"]] == ["output"]
            assert [i["name"] for i in meta["inputs"]] == ["input"]
            # Stage 0 forwarded relu0 (8x32x32 FP32) in binary: payload plus a small JSON header.
            async with session.get(f"{urls[0]}/metrics") as resp:
                text = await resp.text()
            sent = _metric(text, 'edgeai_forward_bytes_total{stage="0"}')
            payload = 8 * 32 * 32 * 4
            assert 6 * payload <= sent < 6 * (payload + 400)
            # An error at the last stage comes back naming that stage.
            bad = dict(request, outputs=[{"name": "logits"}])
            async with session.post(f"{urls[0]}/v2/models/chain/infer", json=bad) as resp:
                assert resp.status == 400
                error = (await resp.json())["error"]
            assert error.startswith("stage 2 (cloud): output 'logits' is not an output"), error


async def test_unreachable_next_stage_is_named(model: ChainModel, tmp_path: Path) -> None:
    parts = _partitions(model, ["relu1"], tmp_path)
    dead = f"http://127.0.0.1:{free_port()}"
    with workers(
        tmp_path,
        {
            "model_name": "chain",
            "partitions": [str(parts[0])],
            "tier": "edge",
            "next_urls": [dead],
            "forward_attempts": 2,
        },
    ) as (entry,):
        async with aiohttp.ClientSession() as session:
            x = np.zeros(model.input_shape, np.float32)
            status, header, _ = await _infer(session, entry.url, x)
    assert status == 502
    assert header["error"].startswith(f"stage 1 at {dead} failed after 2 attempt(s)"), header


async def test_slow_next_stage_times_out_with_504(model: ChainModel, tmp_path: Path) -> None:
    parts = _partitions(model, ["relu1"], tmp_path)
    port = free_port()
    slow = {
        "model_name": "chain",
        "port": port,
        "partitions": [str(parts[1])],
        "tier": "cloud",
        "stage_index": 1,
        "max_batch": 8,
        "max_wait_ms": 3000,
    }
    entry = {
        "model_name": "chain",
        "partitions": [str(parts[0])],
        "tier": "edge",
        "next_urls": [f"http://127.0.0.1:{port}"],
        "forward_attempts": 1,
        "forward_timeout_s": 0.5,
    }
    with workers(tmp_path, entry, slow) as (front, _):
        async with aiohttp.ClientSession() as session:
            status, header, _ = await _infer(
                session, front.url, np.zeros(model.input_shape, np.float32)
            )
    assert status == 504
    assert header["error"].startswith("stage 1 at http://127.0.0.1:"), header
    assert "TimeoutError" in header["error"]


async def test_replica_killed_under_load_loses_no_request(
    model: ChainModel, tmp_path: Path
) -> None:
    parts = _partitions(model, ["relu1"], tmp_path)
    ports = [free_port(), free_port()]
    replicas = [f"http://127.0.0.1:{p}" for p in ports]
    # A batching window keeps requests in flight on the replicas when one is killed.
    cloud = [
        {
            "model_name": "chain",
            "port": p,
            "partitions": [str(parts[1])],
            "tier": "cloud",
            "stage_index": 1,
            "max_batch": 4,
            "max_wait_ms": 20,
        }
        for p in ports
    ]
    edge = {
        "model_name": "chain",
        "partitions": [str(parts[0])],
        "tier": "edge",
        "next_urls": replicas,
        "forward_attempts": 3,
    }
    total = 240
    rng = np.random.default_rng(7)
    inputs = [rng.standard_normal(model.input_shape).astype(np.float32) for _ in range(total)]
    expected = [run_onnx(model.path, {"input": x})[0] for x in inputs]
    with workers(tmp_path, edge, *cloud) as (front, victim, survivor):
        results: dict[str, tuple[int, Any, Any]] = {}
        sent = asyncio.Semaphore(12)
        third_started = asyncio.Event()

        async def one(session: aiohttp.ClientSession, i: int) -> None:
            async with sent:
                results.setdefault(f"req-{i}", (0, None, None))
                if len(results) >= total // 3:
                    third_started.set()
                status, header, out = await _infer(session, front.url, inputs[i], f"req-{i}")
                assert header.get("id", f"req-{i}") == f"req-{i}"
                results[f"req-{i}"] = (status, header, out)

        async def killer() -> None:
            await third_started.wait()
            victim.process.send_signal(signal.SIGKILL)

        async with aiohttp.ClientSession() as session:
            await asyncio.gather(killer(), *(one(session, i) for i in range(total)))
            async with session.get(f"{front.url}/metrics") as resp:
                front_metrics = await resp.text()
            async with session.get(f"{survivor.url}/metrics") as resp:
                survivor_metrics = await resp.text()
        assert victim.process.wait(5) == -signal.SIGKILL
    failures = {k: v[1] for k, v in results.items() if v[0] != 200}
    assert not failures, failures
    assert len(results) == total
    for i in range(total):
        _, header, out = results[f"req-{i}"]
        assert header["id"] == f"req-{i}"
        np.testing.assert_allclose(out, expected[i], rtol=1e-5, atol=1e-6)
    assert _metric(front_metrics, 'edgeai_forward_retries_total{stage="0"}') >= 1
    assert _metric(front_metrics, 'edgeai_requests_total{code="200",stage="0"}') == total
    # The survivor took over: it served more than its half.
    assert _metric(survivor_metrics, 'edgeai_requests_total{code="200",stage="1"}') > total / 2


async def test_retried_request_runs_once(model: ChainModel, tmp_path: Path) -> None:
    """The same Idempotency-Key and body arriving again (a retry) is answered each time
    but run once; a reused request id alone is not a retry."""
    with workers(
        tmp_path,
        {
            "model_name": "chain",
            "partitions": [str(model.path)],
            "tier": "cloud",
            "max_batch": 4,
            "max_wait_ms": 100,
        },
    ) as (w,):
        x = np.random.default_rng(1).standard_normal(model.input_shape).astype(np.float32)
        async with aiohttp.ClientSession() as session:
            a, b = await asyncio.gather(
                _infer(session, w.url, x, "dup", "key-1"), _infer(session, w.url, x, "dup", "key-1")
            )
            c = await _infer(session, w.url, x, "dup", "key-1")
            other = await _infer(session, w.url, x + 1, "dup", "key-2")  # another key: new request
            same_id = await _infer(session, w.url, x + 2, "dup")  # an id reused without a key
            async with session.get(f"{w.url}/metrics") as resp:
                text = await resp.text()
    for status, header, out in (a, b, c):
        assert status == 200
        assert header["id"] == "dup"
        np.testing.assert_allclose(out, run_onnx(model.path, {"input": x})[0], rtol=1e-6)
    np.testing.assert_allclose(other[2], run_onnx(model.path, {"input": x + 1})[0], rtol=1e-6)
    np.testing.assert_allclose(same_id[2], run_onnx(model.path, {"input": x + 2})[0], rtol=1e-6)
    assert _metric(text, 'edgeai_deduplicated_requests_total{stage="0"}') == 2
    assert _metric(text, 'edgeai_batch_size_count{stage="0"}') == 3  # three runs, five answers


async def test_requests_rotate_over_healthy_replicas(model: ChainModel, tmp_path: Path) -> None:
    parts = _partitions(model, ["relu1"], tmp_path)
    ports = [free_port(), free_port()]
    cloud = [
        {"model_name": "chain", "port": p, "partitions": [str(parts[1])], "tier": "cloud",
         "stage_index": 1}
        for p in ports
    ]  # fmt: skip
    edge = {"model_name": "chain", "partitions": [str(parts[0])], "tier": "edge",
            "next_urls": [f"http://127.0.0.1:{p}" for p in ports]}  # fmt: skip
    with workers(tmp_path, edge, *cloud) as (front, *replicas):
        async with aiohttp.ClientSession() as session:
            x = np.zeros(model.input_shape, np.float32)
            for i in range(10):
                assert (await _infer(session, front.url, x, f"rr-{i}"))[0] == 200
            served = []
            for replica in replicas:
                async with session.get(f"{replica.url}/metrics") as resp:
                    text = await resp.text()
                served.append(_metric(text, 'edgeai_requests_total{code="200",stage="1"}'))
    assert served == [5.0, 5.0]


async def test_dedupe_record_is_bounded_by_count_and_age() -> None:
    from edgeai_worker.app import Deduplicator

    now_s = [0.0]
    record = Deduplicator(capacity=3, ttl_s=0.2, clock=lambda: now_s[0])
    first = record.begin("a")
    for key in ("b", "c", "d"):
        record.begin(key)
    assert record.lookup("a") is None  # pushed out by count
    assert len(record) == 3
    failed = record.lookup("d")
    assert failed is not None
    record.fail("d", failed, RuntimeError("boom"))
    assert record.lookup("d") is None  # a failed request may be retried
    now_s[0] = 0.25  # b and c are now older than the 0.2 s limit
    record.begin("e")
    assert [k for k in ("b", "c", "e") if record.lookup(k) is not None] == ["e"]  # aged out
    assert not first.done()


def _identity_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    dims = ["N", "C", "H", "W"]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        "identity",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, dims)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


async def test_large_tensors_cross_a_hop_intact(tmp_path: Path) -> None:
    """Bodies above the size the worker joins before writing (its response, and the
    request a stage forwards) go out as the JSON header and the array's own bytes:
    a 1x3x224x224 tensor comes back bit for bit, in binary and in JSON."""
    from edgeai_worker.body import JOIN_BELOW_BYTES

    identity = _identity_model(tmp_path / "identity.onnx")
    port = free_port()
    front = {"model_name": "chain", "tier": "edge", "next_urls": [f"http://127.0.0.1:{port}"]}
    back = {"model_name": "chain", "port": port, "partitions": [str(identity)],
            "tier": "cloud", "stage_index": 1}  # fmt: skip
    x = np.random.default_rng(7).standard_normal((1, 3, 224, 224)).astype(np.float32)
    assert x.nbytes > JOIN_BELOW_BYTES
    with workers(tmp_path, front, back) as (w, direct):
        async with aiohttp.ClientSession() as session:
            for url in (w.url, direct.url):
                for i in range(3):
                    status, header, out = await _infer(session, url, x + i, f"big-{i}")
                    assert status == 200, header
                    assert header["outputs"][0]["parameters"]["binary_data_size"] == x.nbytes
                    assert out is not None
                    assert np.array_equal(out, x + i)
            request = {
                "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                            "data": x.reshape(-1).tolist()}],
            }  # fmt: skip
            body = io.BytesIO(json.dumps(request).encode())  # aiohttp warns on large bytes
            headers = {"Content-Type": "application/json"}
            async with session.post(
                f"{w.url}/v2/models/chain/infer", data=body, headers=headers
            ) as resp:
                assert resp.status == 200
                assert resp.content_type == "application/json"
                answer = await resp.json()
            async with session.get(f"{w.url}/metrics") as resp:
                text = await resp.text()
    data = np.asarray(answer["outputs"][0]["data"], np.float32).reshape(x.shape)
    assert np.array_equal(data, x)
    # What the front stage forwarded: four requests of the tensor and a JSON header each.
    forwarded = _metric(text, 'edgeai_forward_bytes_total{stage="0"}')
    assert 4 * x.nbytes < forwarded < 4 * (x.nbytes + 1024)
