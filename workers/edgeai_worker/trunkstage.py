"""A shared trunk stage: the layers several applications share, run once per input.

Applications fine-tuned from one base network (`DNNModel.spec.base`) compute the same
trunk: the base's graph up to one cut tensor. One trunk stage serves all of them over
the Open Inference Protocol: a request to `/v2/models/{application}/infer` runs the
trunk partition on its input and forwards the trunk's output to that application's
head stage (`routes`: application model name -> head URL), whose answer it returns.
The trunk's output for an input is kept (`reuse_entries`, by the sha256 of the input's
bytes, shape and datatype) and concurrent requests for one input share one run, so
when the applications are asked about the same input (one camera frame, each
application's model asked once) the trunk runs once for all of them and only the heads
run per application. Outputs are those of each application's full model: the trunk is
the same computation on the same weights.

    python -m edgeai_worker.trunkstage --trunk trunk.onnx --port 8080 \\
        --route digits=http://head-digits:8080 --route parity=http://head-parity:8080
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from aiohttp import web

from edgeai_worker.chain import Forwarder, StageError
from edgeai_worker.metrics import LATENCY_BUCKETS_S, Counter, Gauge, Histogram
from edgeai_worker.protocol import (
    HEADER_LENGTH,
    InferRequest,
    ProtocolError,
    Tensor,
    decode_request,
    encode_response,
    error_body,
    parse_header_length,
)
from edgeai_worker.runtime import Partition


@dataclass(frozen=True)
class TrunkConfig:
    trunk: Path  # ONNX partition: the model input -> the trunk tensor
    routes: Mapping[str, str]  # application model name -> its head stage's URL
    host: str = "127.0.0.1"
    port: int = 8000
    reuse_entries: int = 256
    forward_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.routes:
            raise ValueError("routes: a trunk stage needs at least one application")
        if self.reuse_entries < 0:
            raise ValueError(f"reuse_entries: must be >= 0, got {self.reuse_entries}")


class TrunkState:
    def __init__(self, config: TrunkConfig) -> None:
        self.config = config
        self.partition = Partition(config.trunk)
        self.forwarders: dict[str, Forwarder] = {}
        self.kept: OrderedDict[str, asyncio.Future[dict[str, np.ndarray]]] = OrderedDict()
        self.runs = Counter("edgeai_trunk_runs_total", "Trunk partition runs.")
        self.reused = Counter(
            "edgeai_trunk_reused_total", "Requests answered with a kept trunk output."
        )
        self.compute_s = Counter(
            "edgeai_trunk_compute_seconds_total", "onnxruntime seconds of trunk runs."
        )
        self.compute_cpu = Counter(
            "edgeai_stage_compute_cpu_seconds_total",
            "CPU seconds of onnxruntime runs of the trunk (no waits).",
        )
        self.requests = Counter("edgeai_trunk_requests_total", "Requests by application.")
        # what the operator's autoscaler reads, as for any stage: every application's
        # requests pass here, so these measure the sum of their loads
        self.latency = Histogram(
            "edgeai_stage_latency_seconds",
            "Time from receiving a request to answering it, the trunk and the head after it.",
            LATENCY_BUCKETS_S,
        )
        self.in_flight = Gauge("edgeai_in_flight_requests", "Requests being served.")
        self.serving = 0

    def render(self) -> str:
        self.compute_cpu.inc(self.partition.cpu_s - self.compute_cpu.get())
        series = [
            self.runs,
            self.reused,
            self.compute_s,
            self.compute_cpu,
            self.requests,
            self.latency,
            self.in_flight,
        ]
        return "\n".join(line for s in series for line in s.render()) + "\n"


STATE = web.AppKey("trunk_state", TrunkState)


def _key(tensors: Sequence[Tensor]) -> str:
    h = hashlib.sha256()
    for t in sorted(tensors, key=lambda t: t.name):
        h.update(f"{t.name}:{t.datatype}:{list(t.array.shape)}:".encode())
        h.update(np.ascontiguousarray(t.array).tobytes())
    return h.hexdigest()


def _run(partition: Partition, tensors: Sequence[Tensor]) -> tuple[dict[str, np.ndarray], float]:
    started = time.perf_counter()
    outputs = partition.run({t.name: t.array for t in tensors})
    return outputs, time.perf_counter() - started


async def trunk_outputs(state: TrunkState, tensors: Sequence[Tensor]) -> dict[str, np.ndarray]:
    """The trunk's outputs for `tensors`: kept, being computed, or computed now."""
    key = _key(tensors)
    found = state.kept.get(key)
    if found is not None:
        state.kept.move_to_end(key)
        state.reused.inc()
        return await asyncio.shield(found)
    future: asyncio.Future[dict[str, np.ndarray]] = asyncio.get_running_loop().create_future()
    if state.config.reuse_entries:
        state.kept[key] = future
        while len(state.kept) > state.config.reuse_entries:
            state.kept.popitem(last=False)
    try:
        outputs, compute_s = await asyncio.to_thread(_run, state.partition, tensors)
        state.compute_s.inc(compute_s)
        state.runs.inc()
    except Exception as exc:
        state.kept.pop(key, None)
        future.set_exception(exc)
        future.exception()  # retrieved: a failed run is reported by this request only
        raise
    future.set_result(outputs)
    return outputs


async def infer(request: web.Request) -> web.Response:
    state = request.app[STATE]
    name = request.match_info["name"]
    forwarder = state.forwarders.get(name)
    if forwarder is None:
        return _not_served(state, name)
    started = time.perf_counter()
    state.serving += 1
    state.in_flight.set(state.serving)
    try:
        return await _infer(request, state, name, forwarder)
    finally:
        state.serving -= 1
        state.in_flight.set(state.serving)
        state.latency.observe(time.perf_counter() - started)


async def _infer(
    request: web.Request, state: TrunkState, name: str, forwarder: Forwarder
) -> web.Response:
    body = await request.read()
    try:
        decoded = decode_request(
            body, parse_header_length(request.headers.get(HEADER_LENGTH), len(body))
        )
    except ProtocolError as exc:
        return web.Response(status=exc.status, body=error_body(str(exc)))
    state.requests.inc(model=name)
    try:
        features = await trunk_outputs(state, decoded.inputs)
    except Exception as exc:  # onnxruntime raises many types; the message says what
        return web.Response(status=400, body=error_body(f"trunk: {exc}"))
    onward = InferRequest(
        [Tensor.from_numpy(n, a) for n, a in features.items()],
        id=decoded.id,
        parameters={k: v for k, v in decoded.parameters.items() if k != "binary_data_output"},
    )
    try:
        result = await forwarder.infer(onward)
    except StageError as exc:
        return web.Response(status=exc.status, body=error_body(str(exc)))
    payload, headers = encode_response(result.response, decoded)
    return web.Response(body=payload, headers=headers)


async def _health(_: web.Request) -> web.Response:
    return web.json_response({})


async def _model_ready(request: web.Request) -> web.Response:
    """Ready for the applications it routes; 404 naming them for any other."""
    state = request.app[STATE]
    name = request.match_info["name"]
    if name not in state.forwarders:
        return _not_served(state, name)
    return web.json_response({"name": name, "ready": True})


def _not_served(state: TrunkState, name: str) -> web.Response:
    message = f"model '{name}' is not served here (accepted: {', '.join(state.forwarders)})"
    return web.Response(status=404, body=error_body(message), content_type="application/json")


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(text=request.app[STATE].render(), content_type="text/plain")


async def _resources(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    await asyncio.to_thread(state.partition.load)
    for name, url in state.config.routes.items():
        state.forwarders[name] = Forwarder(
            [url], name, stage_index=0, timeout_s=state.config.forward_timeout_s
        )
        await state.forwarders[name].start()
    yield
    for forwarder in state.forwarders.values():
        await forwarder.close()


def create_trunk_app(config: TrunkConfig) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE] = TrunkState(config)
    app.cleanup_ctx.append(_resources)
    app.router.add_get("/v2/health/live", _health)
    app.router.add_get("/v2/health/ready", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/v2/models/{name}/ready", _model_ready)
    app.router.add_post("/v2/models/{name}/infer", infer)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgeai-trunk", description=__doc__.splitlines()[0])
    parser.add_argument("--trunk", type=Path, required=True, help="the trunk's ONNX partition")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--route", action="append", default=[], help="MODEL=HEAD_URL")
    parser.add_argument("--reuse-entries", type=int, default=256)
    args = parser.parse_args(argv)
    routes = dict(r.split("=", 1) for r in args.route if "=" in r)
    if len(routes) != len(args.route):
        parser.error("--route takes MODEL=HEAD_URL")
    config = TrunkConfig(args.trunk, routes, args.host, args.port, args.reuse_entries)
    web.run_app(create_trunk_app(config), host=config.host, port=config.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
