"""Helpers for the worker tests: small ONNX models built with onnx.helper, partitions
cut with onnx.utils.Extractor, and real worker processes on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.utils
from onnx import TensorProto, helper, numpy_helper

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class ChainModel:
    """A conv chain: input -> conv/relu blocks -> global pool -> gemm -> output."""

    path: Path
    input_shape: tuple[int, ...]
    cuts: tuple[str, ...]  # single-tensor cut points, in order


def build_conv_chain(
    path: Path,
    *,
    channels: Sequence[int] = (3, 8, 16, 16),
    strides: Sequence[int] = (1, 2, 1),
    hw: int = 32,
    classes: int = 10,
    seed: int = 0,
    spatial_dynamic: bool = False,
) -> ChainModel:
    """Build and save a conv chain with a dynamic batch dimension (and, if asked,
    dynamic height and width: the conv prefix can then run on tiles)."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    cuts: list[str] = []
    current = "input"
    for i, (cin, cout, stride) in enumerate(zip(channels[:-1], channels[1:], strides, strict=True)):
        w = (rng.standard_normal((cout, cin, 3, 3)) * (1.0 / np.sqrt(cin * 9))).astype(np.float32)
        b = (rng.standard_normal(cout) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(
            helper.make_node(
                "Conv",
                [current, f"w{i}", f"b{i}"],
                [f"conv{i}"],
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
                strides=[stride, stride],
            )
        )
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"]))
        current = f"relu{i}"
        cuts.append(current)
    nodes.append(helper.make_node("GlobalAveragePool", [current], ["pooled"]))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"], axis=1))
    wf = rng.standard_normal((channels[-1], classes)).astype(np.float32)
    inits.append(numpy_helper.from_array(wf, "wf"))
    nodes.append(helper.make_node("MatMul", ["flat", "wf"], ["output"]))
    cuts.append("flat")
    h: int | str = "H" if spatial_dynamic else hw
    w_: int | str = "W" if spatial_dynamic else hw
    graph = helper.make_graph(
        nodes,
        "conv_chain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels[0], h, w_])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return ChainModel(path, (1, channels[0], hw, hw), tuple(cuts))


def extract(model: Path, inputs: Sequence[str], outputs: Sequence[str], out: Path) -> Path:
    onnx.utils.extract_model(str(model), str(out), list(inputs), list(outputs))
    return out


def run_onnx(path: Path, feeds: dict[str, Array]) -> list[Array]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [np.asarray(r) for r in session.run(None, feeds)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


# How often a bounded wait looks at the condition it waits for.
POLL_INTERVAL_S = 0.01


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Return as soon as `condition()` holds (state in another process or thread); fail
    naming `what` if it does not within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(POLL_INTERVAL_S)  # the poll interval, not a guess at how long it takes


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """`wait_until` for state the event loop changes: the loop runs between looks."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(POLL_INTERVAL_S)  # the poll interval; lets the loop run meanwhile


def wait_ready(
    url: str, process: subprocess.Popen[bytes] | None = None, timeout_s: float = 30.0
) -> None:
    """Wait until the worker at `url` reports ready; fail at once if `process` exits."""

    def ready() -> bool:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"worker for {url} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    wait_until(ready, f"{url} to be ready", timeout_s)


def start_worker(
    tmp: Path, settings: dict[str, Any], *, wait: bool = True, args: Sequence[str] = ()
) -> Worker:
    """Start a worker process with `settings` in its config file and `args` on its
    command line."""
    port = int(settings.setdefault("port", free_port()))
    config = tmp / f"worker-{port}.json"
    config.write_text(json.dumps(settings))
    log = tmp / f"worker-{port}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEAI_")}
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "edgeai_worker", "--config", str(config), *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    worker = Worker(process, f"http://127.0.0.1:{port}", log)
    if wait:
        try:
            wait_ready(worker.url, process)
        except Exception:
            worker.stop()
            raise RuntimeError(f"worker failed to start:\n{log.read_text()}") from None
    return worker


@contextlib.contextmanager
def workers(tmp: Path, *settings: dict[str, Any]) -> Iterator[list[Worker]]:
    """Start workers (last first, so each one's next stage is up) and stop them after."""
    started: list[Worker] = []
    try:
        for s in reversed(settings):
            started.insert(0, start_worker(tmp, s))
        yield started
    finally:
        for worker in started:
            worker.stop()


def build_mlp(
    path: Path, *, features: int = 64, hidden: int = 128, classes: int = 10, seed: int = 0
) -> Path:
    """Build and save a two-layer MLP (`input` [N, features] -> `output` [N, classes])."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((features, hidden)) / np.sqrt(features)).astype(np.float32)
    b1 = (rng.standard_normal(hidden) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((hidden, classes)) / np.sqrt(hidden)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["input", "w1", "b1"], ["hidden"]),
            helper.make_node("Relu", ["hidden"], ["relu"]),
            helper.make_node("MatMul", ["relu", "w2"], ["output"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", classes])],
        [
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(b1, "b1"),
            numpy_helper.from_array(w2, "w2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def labelled_infer(
    url: str, x: np.ndarray, label: int | None = None, model: str = "digits"
) -> dict[str, Any]:
    """An OIP v2 JSON request of `x` to `model`, with `edgeai_label` when given."""
    body: dict[str, Any] = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }
    if label is not None:
        body["parameters"] = {"edgeai_label": label}
    request = urllib.request.Request(
        f"{url}/v2/models/{model}/infer",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        result: dict[str, Any] = json.loads(response.read())
    return result


def metric_value(url: str, name: str, **labels: str) -> float:
    """The first series of `name` with `labels` on the worker's /metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        named = series == name or series.startswith(name + "{")
        if named and all(f'{k}="{v}"' in series for k, v in labels.items()):
            return float(value)
    raise AssertionError(f"{name}{{{wanted}}} not in /metrics")
