"""The device stage against a real edge worker: adaptive split by uplink, change-detection
skipping with its rate reported, Gaussian feature noise, and raw input kept on the device
when privacy is required."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from _worker_support import (
    POLL_INTERVAL_S,
    build_conv_chain,
    extract,
    free_port,
    run_onnx,
    workers,
)
from edgeai_worker.config import ConfigError, SplitOption, WorkerConfig
from edgeai_worker.device import DeviceStage, Split
from edgeai_worker.metrics import WorkerMetrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("device")
    model = build_conv_chain(tmp / "chain.onnx")
    return {
        "model": model,
        "head0": extract(model.path, ["input"], ["relu0"], tmp / "head0.onnx"),
        "tail0": extract(model.path, ["relu0"], ["output"], tmp / "tail0.onnx"),
        "head2": extract(model.path, ["input"], ["relu2"], tmp / "head2.onnx"),
        "tail2": extract(model.path, ["relu2"], ["output"], tmp / "tail2.onnx"),
    }


def _settings(
    parts: dict[str, Any], device: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], str]:
    port = free_port()
    edge = {
        "model_name": "chain",
        "port": port,
        "tier": "edge",
        "stage_index": 1,
        # The edge holds the suffix of every split the device may choose, and the whole
        # model for a device that forwards raw input.
        "partitions": [str(parts["model"].path), str(parts["tail0"]), str(parts["tail2"])],
    }
    dev = {
        "model_name": "chain",
        "tier": "device",
        "next_urls": [f"http://127.0.0.1:{port}"],
        **device,
    }
    return dev, edge, f"http://127.0.0.1:{port}"


def _splits(parts: dict[str, Any], raw: bool = False) -> list[dict[str, Any]]:
    options = [
        {"partition": str(parts["head2"]), "minMbps": 0, "maxMbps": 20},
        {"partition": str(parts["head0"]), "minMbps": 20, "maxMbps": 500},
    ]
    if raw:
        options.append({"minMbps": 500})  # forward the raw input on very fast links
    return options


async def _infer(session: aiohttp.ClientSession, url: str, x: np.ndarray) -> dict[str, Any]:
    request = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }
    async with session.post(f"{url}/v2/models/chain/infer", json=request) as resp:
        body: dict[str, Any] = await resp.json()
        assert resp.status == 200, body
        return body


def _out(body: dict[str, Any]) -> np.ndarray:
    out = body["outputs"][0]
    return np.array(out["data"], np.float32).reshape(out["shape"])


async def _metrics(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(f"{url}/metrics") as resp:
        return await resp.text()


def _metric(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in metrics")


@pytest.mark.parametrize(("uplink", "label"), [(5.0, "head2"), (100.0, "head0")])
async def test_fixed_uplink_picks_the_split_for_its_range(
    parts: dict[str, Any], tmp_path: Path, uplink: float, label: str
) -> None:
    dev, edge, _ = _settings(parts, {"splits": _splits(parts), "uplink_mbps": uplink})
    x = np.random.default_rng(0).standard_normal(parts["model"].input_shape).astype(np.float32)
    with workers(tmp_path, dev, edge) as (device, _):
        async with aiohttp.ClientSession() as session:
            body = await _infer(session, device.url, x)
    assert body["parameters"]["edgeai_split"] == label
    np.testing.assert_allclose(
        _out(body), run_onnx(parts["model"].path, {"input": x})[0], rtol=1e-5, atol=1e-6
    )


async def _first_uplink_measurement(
    session: aiohttp.ClientSession, url: str, timeout_s: float = 30.0
) -> None:
    """Waits for the start-up probe: a device is ready before it has measured its
    uplink, and the gauge appears with the first measurement."""
    deadline = time.monotonic() + timeout_s
    # The HELP and TYPE lines are always there; the sample line starts the line.
    while not any(
        line.startswith("edgeai_uplink_mbps ")
        for line in (await _metrics(session, url)).splitlines()
    ):
        if time.monotonic() > deadline:
            raise AssertionError(f"no uplink measurement within {timeout_s:g} s")
        await asyncio.sleep(POLL_INTERVAL_S)


async def test_measured_uplink_drives_the_choice(parts: dict[str, Any], tmp_path: Path) -> None:
    """No fixed uplink: the device measures loopback (how fast depends on the machine's
    load) and each request runs the split whose range holds the measured estimate."""
    ranges = {"head2": (0.0, 20.0), "head0": (20.0, 500.0), "raw": (500.0, float("inf"))}
    dev, edge, _ = _settings(parts, {"splits": _splits(parts, raw=True)})
    x = np.random.default_rng(1).standard_normal(parts["model"].input_shape).astype(np.float32)
    checked = 0
    with workers(tmp_path, dev, edge) as (device, _):
        async with aiohttp.ClientSession() as session:
            await _first_uplink_measurement(session, device.url)
            for _ in range(10):
                before = _metric(await _metrics(session, device.url), "edgeai_uplink_mbps")
                body = await _infer(session, device.url, x)
                low, high = ranges[body["parameters"]["edgeai_split"]]
                # The split is chosen from the estimate when the request arrives (a probe
                # confirming an outlying sample may rarely move it in between).
                checked += low <= before < high
                np.testing.assert_allclose(
                    _out(body), run_onnx(parts["model"].path, {"input": x})[0], rtol=1e-5, atol=1e-6
                )
    assert before > 0
    assert checked >= 8


async def test_raw_input_never_leaves_a_private_device(
    parts: dict[str, Any], tmp_path: Path
) -> None:
    dev, edge, _ = _settings(
        parts,
        {
            "splits": _splits(parts, raw=True),
            "raw_input_stays_on_device": True,
            "uplink_mbps": 1000.0,  # in the raw split's range
        },
    )
    x = np.random.default_rng(2).standard_normal(parts["model"].input_shape).astype(np.float32)
    with workers(tmp_path, dev, edge) as (device, _):
        async with aiohttp.ClientSession() as session:
            labels = [
                (await _infer(session, device.url, x))["parameters"]["edgeai_split"]
                for _ in range(5)
            ]
            device_text = await _metrics(session, device.url)
    # The link is fast enough for "raw", but raw is not an option with privacy on.
    assert set(labels) == {"head0"}
    # What left the device: 5 x relu0 (8x32x32 FP32) features, not the 3x32x32 input.
    sent = _metric(device_text, 'edgeai_forward_bytes_total{stage="0"}')
    assert 5 * 8 * 32 * 32 * 4 <= sent < 5 * (8 * 32 * 32 * 4 + 400)


def test_privacy_without_device_layers_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="would forward the raw input"):
        WorkerConfig(tier="device", next_urls=("http://edge:8000",), raw_input_stays_on_device=True)
    config = WorkerConfig(tier="device", raw_input_stays_on_device=True)
    with pytest.raises(ConfigError, match="every split forwards the raw input"):
        DeviceStage(config, [Split(SplitOption(None), None, "raw")], WorkerMetrics())


async def test_feature_noise_is_gaussian_with_the_spec_sigma(
    parts: dict[str, Any], tmp_path: Path
) -> None:
    sigma, seed = 0.25, 11
    dev, edge, _ = _settings(
        parts,
        {
            "partitions": [str(parts["head0"])],
            "feature_noise_std": sigma,
            "noise_seed": seed,
            "uplink_mbps": 100.0,
        },
    )
    x = np.random.default_rng(3).standard_normal(parts["model"].input_shape).astype(np.float32)
    with workers(tmp_path, dev, edge) as (device, _):
        async with aiohttp.ClientSession() as session:
            noisy = _out(await _infer(session, device.url, x))
    features = run_onnx(parts["head0"], {"input": x})[0]
    noise = np.random.default_rng(seed).normal(0.0, sigma, size=features.shape)
    expected = run_onnx(parts["tail0"], {"relu0": (features + noise).astype(np.float32)})[0]
    clean = run_onnx(parts["model"].path, {"input": x})[0]
    np.testing.assert_allclose(noisy, expected, rtol=1e-4, atol=1e-5)
    assert np.abs(noisy - clean).max() > 1e-3


async def test_unchanged_frames_are_skipped_and_the_rate_reported(
    parts: dict[str, Any], tmp_path: Path
) -> None:
    dev, edge, edge_url = _settings(
        parts,
        {
            "partitions": [str(parts["head0"])],
            "skip_unchanged_threshold": 0.02,
            "uplink_mbps": 100.0,
        },
    )
    rng = np.random.default_rng(4)
    x = rng.standard_normal(parts["model"].input_shape).astype(np.float32)
    nudged = x + rng.normal(0, 1e-3, x.shape).astype(np.float32)  # ~0.01% of the range
    moved = x + rng.normal(0, 1.0, x.shape).astype(np.float32)
    with workers(tmp_path, dev, edge) as (device, _):
        async with aiohttp.ClientSession() as session:
            first = await _infer(session, device.url, x)
            second = await _infer(session, device.url, nudged)
            third = await _infer(session, device.url, moved)
            fourth = await _infer(session, device.url, moved)
            device_text = await _metrics(session, device.url)
            edge_text = await _metrics(session, edge_url)
    assert "edgeai_skipped" not in first["parameters"]
    assert second["parameters"]["edgeai_skipped"] is True
    np.testing.assert_array_equal(_out(second), _out(first))
    assert "edgeai_skipped" not in third["parameters"]
    np.testing.assert_allclose(
        _out(third), run_onnx(parts["model"].path, {"input": moved})[0], rtol=1e-5, atol=1e-6
    )
    assert fourth["parameters"]["edgeai_skipped"] is True
    assert _metric(device_text, "edgeai_skipped_frames_total") == 2
    assert _metric(device_text, "edgeai_skip_rate") == 0.5
    # Skipped frames cost the edge nothing.
    assert _metric(edge_text, 'edgeai_requests_total{code="200",stage="1"}') == 2


def test_split_choice_and_uplink_estimate() -> None:
    config = WorkerConfig(tier="device")
    low = Split(SplitOption(Path("a.onnx"), 0, 10), None, "low")
    high = Split(SplitOption(Path("b.onnx"), 10, 100), None, "high")
    stage = DeviceStage(config, [high, low], WorkerMetrics())
    assert stage.choose() is low  # before any measurement: the lowest-bandwidth split
    stage.observe_transfer(1_000_000, elapsed_s=0.2, server_s=0.1)  # 8 Mbit in 0.1 s = 80 Mbps
    assert stage.uplink_mbps == pytest.approx(80.0)
    assert stage.choose() is high
    stage.observe_transfer(1_000, elapsed_s=10.0, server_s=0.0)  # too small to say anything
    assert stage.uplink_mbps == pytest.approx(80.0)
    for _ in range(20):
        stage.observe_transfer(1_000_000, elapsed_s=1.1, server_s=0.1)  # 8 Mbps
    assert stage.uplink_mbps == pytest.approx(8.0, rel=0.01)
    assert stage.choose() is low
    stage.observe_uplink(9.0)  # within 2x: averaged
    assert stage.uplink_mbps == pytest.approx(8.3, rel=0.01)
    assert not stage.needs_probe(interval_s=5.0)  # a sample just came
    assert stage.needs_probe(interval_s=0.0)
    assert stage.probe_size_bytes() == 51_875  # 50 ms at 8.3 Mbps
    stage.observe_uplink(0.5)  # one stalled transfer is not a new link
    assert stage.uplink_mbps == pytest.approx(8.3, rel=0.01)
    assert stage.awaiting_confirmation
    stage.observe_uplink(9.0)
    stage.observe_uplink(1e6)  # a step change: the second sample far off confirms it
    assert stage.uplink_mbps == pytest.approx(8.51, rel=0.01)
    stage.observe_uplink(1e6)
    assert stage.uplink_mbps == 1e6
    assert stage.probe_size_bytes() == 512 * 1024
    assert stage.choose() is high  # past every range: the nearest one
    fixed = DeviceStage(WorkerConfig(tier="device", uplink_mbps=3.0), [low, high], WorkerMetrics())
    fixed.observe_uplink(50.0)
    assert fixed.uplink_mbps == 3.0
    assert not fixed.needs_probe(interval_s=0.0)
    assert json.dumps(stage.skip_rate) == "0.0"
