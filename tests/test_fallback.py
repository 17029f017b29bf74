"""The device's local fallback across real worker processes: when the next stage is
stopped (packets go nowhere, as on a node that lost power) or killed, a device stage
with the whole model answers every request itself, with the full model's outputs, and
goes back to the chain once the next stage serves again. Without the fallback the same
stop fails requests."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from _worker_support import ChainModel, build_conv_chain, extract, free_port, run_onnx, workers
from edgeai_worker.config import ConfigError, WorkerConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ChainModel:
    return build_conv_chain(tmp_path_factory.mktemp("fallback") / "chain.onnx")


def _stages(model: ChainModel, tmp: Path, **device: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    head = extract(model.path, ["input"], ["relu1"], tmp / "head.onnx")
    tail = extract(model.path, ["relu1"], ["output"], tmp / "tail.onnx")
    port = free_port()
    edge = {
        "model_name": "chain",
        "port": port,
        "partitions": [str(tail)],
        "tier": "edge",
        "stage_index": 1,
    }
    entry = {
        "model_name": "chain",
        "partitions": [str(head)],
        "tier": "device",
        "next_urls": [f"http://127.0.0.1:{port}"],
        "uplink_mbps": 100.0,
        "forward_attempts": 1,
        **device,
    }
    return entry, edge


async def _infer(
    session: aiohttp.ClientSession, url: str, x: np.ndarray
) -> tuple[int, dict[str, Any], np.ndarray | None]:
    payload = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }
    timeout = aiohttp.ClientTimeout(total=10)
    async with session.post(f"{url}/v2/models/chain/infer", json=payload, timeout=timeout) as resp:
        body = await resp.json()
        if resp.status != 200:
            return resp.status, body, None
        output = body["outputs"][0]
        return 200, body, np.asarray(output["data"], np.float32).reshape(output["shape"])


def _metric(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


async def test_a_stopped_next_stage_is_answered_by_the_device_alone(
    model: ChainModel, tmp_path: Path
) -> None:
    entry, edge = _stages(
        model,
        tmp_path,
        fallback_model=str(model.path),
        fallback_after_ms=300,
        fallback_cooldown_s=1.0,
        forward_timeout_s=30,
    )
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal(model.input_shape).astype(np.float32) for _ in range(8)]
    expected = [run_onnx(model.path, {"input": x})[0] for x in inputs]
    answered: list[tuple[str, Any]] = []
    with workers(tmp_path, entry, edge) as (device, edge_worker):
        async with aiohttp.ClientSession() as session:

            async def round_of_requests(phase: str) -> None:
                for x, want in zip(inputs, expected, strict=True):
                    status, body, out = await _infer(session, device.url, x)
                    assert status == 200, (phase, body)
                    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
                    answered.append((phase, body.get("parameters", {}).get("edgeai_fallback")))

            await round_of_requests("chain")
            edge_worker.process.send_signal(signal.SIGSTOP)  # alive, answers nothing
            try:
                await round_of_requests("stopped")
            finally:
                edge_worker.process.send_signal(signal.SIGCONT)
            # back to the chain once the cooldown ran out and the next stage answers
            deadline = time.monotonic() + 15
            while True:
                status, body, _ = await _infer(session, device.url, inputs[0])
                assert status == 200, body
                if "edgeai_fallback" not in body.get("parameters", {}):
                    break
                assert time.monotonic() < deadline, "the device never went back to the chain"
                await asyncio.sleep(0.2)
            edge_worker.process.send_signal(signal.SIGKILL)
            edge_worker.process.wait(5)
            await round_of_requests("killed")
            async with session.get(f"{device.url}/metrics") as resp:
                metrics = await resp.text()
    assert [reason for phase, reason in answered if phase == "chain"] == [None] * 8
    stopped = [reason for phase, reason in answered if phase == "stopped"]
    # the first request waits out fallback_after_ms; the others skip the chain meanwhile
    assert stopped[0] == "late", stopped
    assert set(stopped[1:]) <= {"late", "cooldown"}, stopped
    killed = [reason for phase, reason in answered if phase == "killed"]
    assert killed[0] == "failed", killed
    assert set(killed) <= {"failed", "cooldown"}, killed
    counted = {
        reason: _metric(metrics, f'edgeai_fallback_answers_total{{reason="{reason}"}}')
        for reason in ("late", "failed", "cooldown")
    }
    # at least what the answers said (the wait to go back to the chain adds a few)
    for reason, count in Counter(stopped + killed).items():
        assert counted[reason] >= count, counted


async def test_without_a_fallback_a_stopped_next_stage_fails_requests(
    model: ChainModel, tmp_path: Path
) -> None:
    entry, edge = _stages(model, tmp_path, forward_timeout_s=0.5)
    x = np.zeros(model.input_shape, np.float32)
    with workers(tmp_path, entry, edge) as (device, edge_worker):
        async with aiohttp.ClientSession() as session:
            assert (await _infer(session, device.url, x))[0] == 200
            edge_worker.process.send_signal(signal.SIGSTOP)
            try:
                status, body, _ = await _infer(session, device.url, x)
            finally:
                edge_worker.process.send_signal(signal.SIGCONT)
    assert status == 504, body
    assert "edgeai_fallback" not in body


def test_only_a_device_stage_takes_a_fallback_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fallback_model"):
        WorkerConfig(tier="edge", fallback_model=tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="fallback_after_ms"):
        WorkerConfig(tier="device", fallback_after_ms=0)


@pytest.mark.parametrize(("status", "answered_alone"), [(403, True), (429, True), (400, False)])
async def test_a_refusing_next_stage_is_answered_alone_but_a_bad_request_is_not(
    model: ChainModel, tmp_path: Path, status: int, answered_alone: bool
) -> None:
    """A next stage that refuses the device's credentials (403) or sheds load (429) is
    a stage's fault: the device answers alone. A 400 is the request's: passed back."""
    from aiohttp import web

    async def refuse(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"error": f"refused with {status}"}, status=status)

    app = web.Application()
    app.router.add_post("/v2/models/chain/infer", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    entry, _ = _stages(model, tmp_path, fallback_model=str(model.path))
    entry["next_urls"] = [f"http://127.0.0.1:{port}"]
    x = np.random.default_rng(5).standard_normal(model.input_shape).astype(np.float32)
    try:
        with workers(tmp_path, entry) as (device,):
            async with aiohttp.ClientSession() as session:
                got, body, out = await _infer(session, device.url, x)
    finally:
        await runner.cleanup()
    if answered_alone:
        assert got == 200, body
        assert body["parameters"]["edgeai_fallback"] == "failed"
        np.testing.assert_allclose(out, run_onnx(model.path, {"input": x})[0], rtol=1e-4, atol=1e-5)
    else:
        assert got == 400, body
        assert body["error"].endswith("refused with 400")
