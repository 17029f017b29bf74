"""`edgeai run-local`: a plan's stages as local worker processes, chained, answering
with the full model's output; adaptive-split plans give the device its prefixes."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from _worker_support import ChainModel, build_conv_chain, run_onnx
from edgeai_operator.errors import SpecError
from edgeai_operator.localworkers import start_local
from edgeai_operator.partitions import build_partitions, load_plan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ChainModel:
    return build_conv_chain(tmp_path_factory.mktemp("runlocal") / "chain.onnx")


def _plan(model: ChainModel, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "Plan",
        "model": {
            "path": str(model.path),
            "input": {"name": "input", "shape": list(model.input_shape), "dtype": "FP32"},
        },
        "predictedLatencyMs": 3.0,
        "stages": [
            {
                "index": 0,
                "tier": "device",
                "layers": "0-1",
                "inputs": ["input"],
                "outputs": ["relu0"],
            },
            {
                "index": 1,
                "tier": "edge",
                "layers": "2-5",
                "inputs": ["relu0"],
                "outputs": ["relu2"],
            },
            {
                "index": 2,
                "tier": "cloud",
                "layers": "6-8",
                "inputs": ["relu2"],
                "outputs": ["output"],
            },
        ],
        **extra,
    }


def _infer(url: str, x: np.ndarray) -> dict[str, Any]:
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        }
    )
    request = urllib.request.Request(
        url, data=body.encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        result: dict[str, Any] = json.loads(resp.read())
        return result


def _assert_answers_like(body: dict[str, Any], expected: np.ndarray) -> None:
    """The answer's first output is the full model's output."""
    out = body["outputs"][0]
    np.testing.assert_allclose(
        np.array(out["data"], np.float32).reshape(out["shape"]), expected, rtol=1e-5, atol=1e-6
    )


def _port_open(url: str) -> bool:
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, int(port))) == 0


def test_run_local_serves_the_plan_and_stops_cleanly(model: ChainModel, tmp_path: Path) -> None:
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(yaml.safe_dump(_plan(model)))
    process = subprocess.Popen(
        [sys.executable, "-m", "edgeai_operator.cli", "run-local", "-f", str(plan_path),
         "--replicas", "2", "--workdir", str(tmp_path / "run")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if line.startswith("entry: "):
                break
        entry = lines[-1].removeprefix("entry: ").strip()
        assert entry.endswith("/v2/models/chain/infer"), lines
        x = np.random.default_rng(0).standard_normal(model.input_shape).astype(np.float32)
        for _ in range(4):  # the two edge and two cloud replicas take turns
            _assert_answers_like(_infer(entry, x), run_onnx(model.path, {"input": x})[0])
        workers = [line.split(": ")[1].split()[0] for line in lines if line.startswith("stage ")]
        assert len(workers) == 5  # device + 2 edge + 2 cloud
    finally:
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=30)
    assert process.returncode == 0, "".join(lines) + rest
    assert "stopped" in rest
    assert not [url for url in workers if _port_open(url)]


def test_adaptive_plan_gives_device_prefixes_and_edge_suffixes(
    model: ChainModel, tmp_path: Path
) -> None:
    alternatives = [
        {"minMbps": 0, "maxMbps": 0.4, "cutIndex": 9, "predictedLatencyMs": 8.0},  # device only
        {"minMbps": 0.4, "maxMbps": 0.5, "cutIndex": 8, "predictedLatencyMs": 30.0},  # past edge
        {"minMbps": 0.5, "maxMbps": 5, "cutIndex": 4, "predictedLatencyMs": 9.0},  # after relu1
        {"minMbps": 5, "maxMbps": 50, "cutIndex": 2, "predictedLatencyMs": 4.0},  # after relu0
        {"minMbps": 50, "maxMbps": None, "cutIndex": 0, "predictedLatencyMs": 2.0},  # raw input
    ]
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(yaml.safe_dump(_plan(model, alternatives=alternatives)))
    plan = load_plan(plan_path)
    specs = build_partitions(plan.stages, plan.alternatives, model.path, tmp_path)
    device, edge, cloud = specs
    assert [s.get("partition") is not None for s in device.splits] == [True, True, True, False]
    assert [s.get("final", False) for s in device.splits] == [True, False, False, False]
    assert [s["maxMbps"] for s in device.splits] == [0.4, 5.0, 50.0, float("inf")]
    assert len(edge.partitions) == 1 + 2  # its own, plus suffixes from cut 4 and cut 0
    assert len(cloud.partitions) == 1
    x = np.random.default_rng(1).standard_normal(model.input_shape).astype(np.float32)
    expected = run_onnx(model.path, {"input": x})[0]
    for uplink, label in (
        (0.1, "stage0-device-whole"),
        (1.0, "stage0-device-cut4"),
        (20.0, "stage0-device-cut2"),
        (500.0, "raw"),
    ):
        run = start_local(plan, specs, tmp_path, settings={"uplink_mbps": uplink})
        try:
            body = _infer(f"{run.entry_url}/v2/models/chain/infer", x)
            with urllib.request.urlopen(f"{run.urls[1][0]}/metrics", timeout=10) as resp:
                edge_served = "edgeai_requests_total{" in resp.read().decode()
        finally:
            run.stop()
        assert body["parameters"]["edgeai_split"] == label
        assert edge_served == (label != "stage0-device-whole")  # the whole model answers alone
        _assert_answers_like(body, expected)


def test_plan_errors_name_the_field(model: ChainModel, tmp_path: Path) -> None:
    broken = _plan(model)
    broken["stages"][1]["inputs"] = ["relu1"]
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(broken))
    with pytest.raises(
        SpecError, match=r"stages\[1\].inputs: \['relu1'\] are not stage 0's outputs"
    ):
        load_plan(path)
    broken = _plan(model)
    broken["stages"][0]["tier"] = "fog"
    path.write_text(yaml.safe_dump(broken))
    with pytest.raises(SpecError, match=r"stages\[0\].tier.*accepted: device, edge, cloud"):
        load_plan(path)
    run = subprocess.run(
        [sys.executable, "-m", "edgeai_operator.cli", "run-local", "-f", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2
    assert "error: plan.stages[0].tier" in run.stderr


def test_device_only_plan_with_offloading_alternatives_gets_an_edge(
    model: ChainModel, tmp_path: Path
) -> None:
    """`edgeai plan` keeps everything on the device at its bandwidth but lists splits
    that offload at others: run-local adds the edge stage those splits need."""
    plan = _plan(model)
    plan["stages"] = [
        {"index": 0, "tier": "device", "layers": "0-8", "inputs": ["input"], "outputs": ["output"]}
    ]
    plan["alternatives"] = [
        {"minMbps": 0.0, "maxMbps": 10.0, "cutIndex": 9, "stages": [{"tier": "device"}]},
        {"minMbps": 10.0, "maxMbps": None, "cutIndex": 2,
         "stages": [{"tier": "device"}, {"tier": "edge"}]},
    ]  # fmt: skip
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    loaded = load_plan(path)
    device, edge = build_partitions(loaded.stages, loaded.alternatives, model.path, tmp_path)
    assert edge.tier == "edge"
    assert len(edge.partitions) == 1  # the suffix after cut 2 only
    assert [s.get("final", False) for s in device.splits] == [True, False]
    x = np.random.default_rng(5).standard_normal(model.input_shape).astype(np.float32)
    run = start_local(loaded, [device, edge], tmp_path, settings={"uplink_mbps": 50.0})
    try:
        body = _infer(f"{run.entry_url}/v2/models/chain/infer", x)
    finally:
        run.stop()
    assert body["parameters"]["edgeai_split"] == "stage0-device-cut2"
    _assert_answers_like(body, run_onnx(model.path, {"input": x})[0])


def test_the_plans_preprocessing_reaches_the_device_and_flags_override_it(
    model: ChainModel, tmp_path: Path
) -> None:
    """A plan with `preprocessing.skipUnchangedThreshold` skips an unchanged frame on
    the device; the run's own settings win over the plan's."""
    plan = _plan(model, preprocessing={"skipUnchangedThreshold": 0.05}, priority=3)
    plan["stages"] = [
        {"index": 0, "tier": "device", "layers": "0-8", "inputs": ["input"], "outputs": ["output"]}
    ]
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    loaded = load_plan(path)
    specs = build_partitions(loaded.stages, loaded.alternatives, model.path, tmp_path)
    x = np.random.default_rng(7).standard_normal(model.input_shape).astype(np.float32)
    for settings, skipped in (({}, True), ({"skip_unchanged_threshold": 0.0}, False)):
        run = start_local(loaded, specs, tmp_path, settings=settings)
        try:
            url = f"{run.entry_url}/v2/models/chain/infer"
            first, second = _infer(url, x), _infer(url, x)
        finally:
            run.stop()
        assert not (first.get("parameters") or {}).get("edgeai_skipped")
        assert bool((second.get("parameters") or {}).get("edgeai_skipped")) is skipped
        _assert_answers_like(second, run_onnx(model.path, {"input": x})[0])
    config = json.loads((tmp_path / "stage0-0.json").read_text())
    assert config["default_priority"] == 3
