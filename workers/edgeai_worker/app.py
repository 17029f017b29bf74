"""The worker's aiohttp application: one stage of a partitioned model behind the Open
Inference Protocol v2 REST API.

    GET  /v2                                   server metadata
    GET  /v2/health/live, /v2/health/ready     liveness, readiness
    GET  /v2/models/{name}[/versions/{v}]      model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer
    GET  /metrics                              Prometheus text
    POST /edgeai/v1/probe                      uplink probe target (reads and drops the body)

A request is decoded, checked against the partition, run (through the micro-batcher, or
the device stage's adaptive split), forwarded in binary form to the next stage if there
is one, and answered in the form the client asked for. Errors leave through one
middleware as `{"error": "..."}` with a 4xx for the caller's mistakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from aiohttp import web

from edgeai_worker.batching import MicroBatcher
from edgeai_worker.body import body_size, parts_response, read_body
from edgeai_worker.chain import (
    COMPUTE_TIME_HEADER,
    IDEMPOTENCY_HEADER,
    PROBE_PATH,
    SERVER_TIME_HEADER,
    Forwarder,
    StageError,
)
from edgeai_worker.config import ConfigError, SplitOption, WorkerConfig
from edgeai_worker.device import DeviceStage, Split
from edgeai_worker.he import (
    CONTEXT_TENSOR,
    OUTPUT_SIZE_PARAMETER,
    UNKNOWN_CONTEXT,
    DenseHead,
    DeviceKeys,
    HeadError,
    HeadEvaluator,
)
from edgeai_worker.metrics import WorkerMetrics
from edgeai_worker.offload.stage import (
    EXIT_PARAMETER,
    FINAL_EXIT,
    REUSED_PARAMETER,
    OffloadStage,
    files_digest,
    record_label,
)
from edgeai_worker.protocol import (
    HEADER_LENGTH,
    JSON_CONTENT_TYPE,
    Array,
    InferRequest,
    InferResponse,
    ProtocolError,
    RequestedOutput,
    Tensor,
    decode_request,
    encode_response_parts,
    error_body,
    parse_header_length,
    set_json_codec,
)
from edgeai_worker.runtime import Partition, StageRuntime
from edgeai_worker.security import (
    EntryToken,
    PeerCheck,
    StageTLS,
    check_client,
    is_open_path,
)
from edgeai_worker.tiling import TiledPrefix

log = logging.getLogger("edgeai_worker")

SERVER_NAME = "edgeai-worker"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Deduplicator:
    """Remembers recent idempotency keys (the `Idempotency-Key` header a forwarding stage,
    or any client, sends with every attempt of one request): a retry of a request this
    worker is running or has answered waits for, or gets, the same answer instead of
    running the model again. Bounded by count and age (a retry comes within the
    sender's timeout), so large answers are not kept long. Ages are measured on `clock`
    (seconds; `time.monotonic` unless a test passes its own)."""

    def __init__(
        self, capacity: int, ttl_s: float = 120.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, asyncio.Future[InferResponse]]] = OrderedDict()

    def lookup(self, key: str) -> asyncio.Future[InferResponse] | None:
        entry = self._entries.get(key)
        return entry[1] if entry is not None else None

    def begin(self, key: str) -> asyncio.Future[InferResponse]:
        future: asyncio.Future[InferResponse] = asyncio.get_running_loop().create_future()
        now = self._clock()
        self._entries[key] = (now, future)
        self._entries.move_to_end(key)
        while self._entries:
            oldest_key, (started, _) = next(iter(self._entries.items()))
            if len(self._entries) <= self.capacity and now - started <= self.ttl_s:
                break
            del self._entries[oldest_key]
        return future

    def fail(self, key: str, future: asyncio.Future[InferResponse], exc: BaseException) -> None:
        # A failed request is forgotten so that a retry runs it again.
        entry = self._entries.get(key)
        if entry is not None and entry[1] is future:
            del self._entries[key]
        if not future.done():
            future.set_exception(exc)
            future.exception()  # mark retrieved: nobody else may be waiting

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class WorkerState:
    config: WorkerConfig
    metrics: WorkerMetrics
    runtime: StageRuntime | None = None
    batcher: MicroBatcher | None = None
    forwarder: Forwarder | None = None
    device: DeviceStage | None = None
    dedupe: Deduplicator = field(default_factory=lambda: Deduplicator(1024))
    in_flight: int = 0
    draining: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    downstream_metadata: dict[str, Any] | None = None
    tiler: TiledPrefix | None = None
    tls: StageTLS | None = None
    peer_check: PeerCheck | None = None
    entry_token: EntryToken | None = None
    # the device's whole model, and until when it answers without trying the next stage
    fallback: Partition | None = None
    fallback_until: float = float("-inf")
    offload: OffloadStage | None = None
    # the homomorphic head: the device's keys and whether the next stage has its public
    # context; the evaluating stage's dense layer
    he_keys: DeviceKeys | None = None
    he_context_sent: bool = False
    he_head: HeadEvaluator | None = None

    @property
    def stage(self) -> str:
        return str(self.config.stage_index)

    @property
    def ready(self) -> bool:
        runtime_ready = self.runtime is None or self.runtime.ready
        return runtime_ready and self.batcher is not None and not self.draining

    def request_started(self) -> None:
        """Count an inference request in flight (REST or gRPC; the drain waits for it)."""
        self.in_flight += 1
        self.idle.clear()
        self.metrics.in_flight.set(self.in_flight)

    def request_finished(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)
        if self.in_flight == 0:
            self.idle.set()

    def record_answer(self, status: int, started: float, bytes_out: int) -> None:
        """Metrics of one answered inference request: its HTTP-equivalent status, its
        time since `started` (`perf_counter()`) and its answer's size."""
        self.metrics.requests.inc(stage=self.stage, code=str(status))
        self.metrics.stage_latency.observe(
            time.perf_counter() - started, stage=self.stage, tier=self.config.tier
        )
        self.metrics.bytes_out.inc(bytes_out, stage=self.stage)

    def error_message(self, message: str) -> str:
        """An error message as the caller reads it: starting with the stage that raised it."""
        if message.startswith("stage "):
            return message
        return f"stage {self.stage} ({self.config.tier}): {message}"


CONFIG = web.AppKey("config", WorkerConfig)
STATE = web.AppKey("state", WorkerState)
REQUEST_ID = web.RequestKey("edgeai_request_id", str)  # for logs
BODY_READ_AT = web.RequestKey("edgeai_body_read_at", float)  # perf_counter() after the body
COMPUTE_S = web.RequestKey("edgeai_compute_s", float)  # onnxruntime seconds of this request


# ---------------------------------------------------------------------------- setup


def _device_splits(config: WorkerConfig) -> list[Split]:
    options = list(config.splits)
    if not options:
        first = config.partitions[0] if config.partitions else None
        options = [SplitOption(first)]
    return [
        Split(
            option,
            Partition(option.partition, config.intra_op_threads) if option.partition else None,
            option.partition.stem if option.partition else "raw",
        )
        for option in options
    ]


async def _resources(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    state = app[STATE]
    partitions: list[Partition]
    splits: list[Split] = []
    if config.is_device:
        splits = _device_splits(config)
        partitions = [s.partition for s in splits if s.partition is not None]
    elif config.homomorphic_head:  # its one dense layer runs on ciphertexts, not onnxruntime
        state.he_head = _head_evaluator(config)
        partitions = []
    else:
        partitions = [Partition(p, config.intra_op_threads) for p in config.partitions]
    if partitions:
        state.runtime = StageRuntime(config.model_name, partitions)
        await asyncio.get_running_loop().run_in_executor(None, state.runtime.load)
    if config.is_device:
        state.device = DeviceStage(config, splits, state.metrics)
        if config.homomorphic_head and config.next_urls:
            state.he_keys = await asyncio.get_running_loop().run_in_executor(None, DeviceKeys)
    if config.fallback_model is not None and config.next_urls:
        state.fallback = Partition(config.fallback_model, config.intra_op_threads)
        await asyncio.get_running_loop().run_in_executor(None, state.fallback.load)
    if config.offload is not None:  # per-input offloading: exits, cascade, reuse
        files = [*config.partitions, *config.offload.cascade_models]
        digest = config.model_digest or files_digest(files)
        state.offload = OffloadStage(
            config.offload, digest, state.metrics, state.stage, config.intra_op_threads
        )
        await asyncio.get_running_loop().run_in_executor(None, state.offload.load)
    if config.next_urls:
        state.forwarder = Forwarder(
            config.next_urls,
            config.model_name,
            stage_index=config.stage_index,
            timeout_s=config.forward_timeout_s,
            attempts=config.forward_attempts,
            metrics=state.metrics,
            tls=state.tls,
        )
        await state.forwarder.start()
    if config.tile_peers and config.tile_prefix is not None:
        import onnx

        state.tiler = TiledPrefix(
            onnx.load(str(config.tile_prefix)),
            config.tile_peers,
            config.model_name,
            config.tile_grid,
            timeout_s=config.forward_timeout_s,
        )
        await state.tiler.__aenter__()
    state.batcher = MicroBatcher(
        lambda partition, feeds: partition.run(feeds),
        max_batch=config.max_batch,
        max_wait_ms=config.max_wait_ms,
        max_queue=config.max_queue,
        metrics=state.metrics,
        stage=state.stage,
    )
    await state.batcher.start()
    probe: asyncio.Task[None] | None = None
    if state.device is not None and state.forwarder is not None and config.uplink_mbps is None:
        probe = asyncio.create_task(_monitor_uplink(state))
    reload = asyncio.create_task(_reload_security(state))
    log.info(
        "stage %s (%s) of model %s ready: %d partition(s), next=%s",
        config.stage_index,
        config.tier,
        config.model_name,
        len(partitions),
        ",".join(config.next_urls) or "-",
    )
    yield
    reload.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reload
    if probe is not None:
        probe.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probe
    await state.batcher.stop()
    if state.forwarder is not None:
        await state.forwarder.close()
    if state.tiler is not None:
        await state.tiler.__aexit__(None, None, None)


def _head_evaluator(config: WorkerConfig) -> HeadEvaluator:
    if len(config.partitions) != 1:
        raise ConfigError(
            "homomorphic_head",
            f"the stage after the device runs {len(config.partitions)} partitions",
            "one partition holding the model's last dense layer",
        )
    try:
        return HeadEvaluator(DenseHead.from_onnx(config.partitions[0]))
    except HeadError as exc:
        raise ConfigError("homomorphic_head", str(exc)) from None


async def _monitor_uplink(state: WorkerState) -> None:
    """Measure the uplink at start (retrying while the next stage starts), then probe
    again whenever forwards have not given a sample for `uplink_probe_interval_s`."""
    forwarder, device = state.forwarder, state.device
    assert forwarder is not None
    assert device is not None
    interval = state.config.uplink_probe_interval_s
    while True:
        if device.needs_probe(interval) or device.awaiting_confirmation:
            try:
                device.observe_uplink(await forwarder.probe_mbps(device.probe_size_bytes()))
            except Exception as exc:  # the next stage may be starting or gone for now
                log.debug("uplink probe failed: %s", exc)
                await asyncio.sleep(0.2)
                continue
        await asyncio.sleep(interval / 2)


async def _reload_security(state: WorkerState) -> None:
    """Re-reads the stage certificate and the entry token (mounted Secrets the operator
    renews) every `security_reload_s` seconds."""
    while True:
        await asyncio.sleep(state.config.security_reload_s)
        if state.tls is not None and state.tls.reload():
            state.metrics.tls_reloads.inc(stage=state.stage)
            log.info("stage %s: new TLS certificate loaded", state.stage)
        if state.entry_token is not None and state.entry_token.reload():
            log.info("stage %s: new entry token loaded", state.stage)


async def _tls_endpoint(app: web.Application) -> AsyncIterator[None]:
    """The protocol once more on `tls_port`, over mutual TLS, for the upstream stages
    only or, at an entry with `entry_client_ca_file`, for the clients of that CA
    (`security.py`); the same state, handlers and error middleware."""
    config, state = app[CONFIG], app[STATE]
    assert state.tls is not None
    assert config.tls_port is not None
    guard = _peer_middleware if config.entry_client_ca_file is None else _client_middleware
    peer = web.Application(
        client_max_size=config.max_body_bytes, middlewares=[error_middleware, guard]
    )
    peer[CONFIG], peer[STATE] = config, state
    _add_routes(peer)
    runner = web.AppRunner(peer, access_log=None, shutdown_timeout=config.shutdown_grace_s)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.tls_port, ssl_context=state.tls.server_context)
    await site.start()
    yield
    await runner.cleanup()


def _refuse(state: WorkerState, status: int, reason: str, message: str) -> web.Response:
    state.metrics.auth_failures.inc(stage=state.stage, reason=reason)
    response = _error_response(state, status, message)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="edgeai"'
    return response


@web.middleware
async def _peer_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """On the TLS port: only the upstream stages' identities are served."""
    state = request.app[STATE]
    assert state.peer_check is not None
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    problem = state.peer_check.check(ssl_object)
    if problem is not None and not is_open_path(request.path):
        return _refuse(state, 403, "peer", problem)
    return await handler(request)


@web.middleware
async def _client_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """On an entry's TLS port: a client certificate (verified in the handshake against
    the clients' CA), then the bearer token where one is set."""
    if is_open_path(request.path):
        return await handler(request)
    state = request.app[STATE]
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    problem = check_client(ssl_object)
    if problem is not None:
        return _refuse(state, 401, "missing-cert", problem)
    refused = _check_token(state, request)
    return refused if refused is not None else await handler(request)


def _check_token(state: WorkerState, request: web.Request) -> web.Response | None:
    """The entry's bearer token, where one is set: None when the request carries it."""
    if state.entry_token is None:
        return None
    refused = state.entry_token.check(request.headers.get("Authorization"))
    if refused is None:
        return None
    reason = "missing-token" if refused[0] == 401 else "wrong-token"
    return _refuse(state, refused[0], reason, refused[1])


@web.middleware
async def _plain_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """On the plain port: the entry's bearer token, and no inference on a stage that
    takes it over TLS only."""
    state = request.app[STATE]
    config = state.config
    if not is_open_path(request.path):
        refused = _check_token(state, request)
        if refused is not None:
            return refused
        if config.tls_port is not None and request.path.endswith("/infer"):
            callers = (
                "from its upstream stage only"
                if config.entry_client_ca_file is None
                else "with a client certificate"
            )
            return _refuse(
                state,
                403,
                "plain",
                f"this stage takes inference over mutual TLS on port {config.tls_port} {callers}",
            )
    return await handler(request)


async def _drain(app: web.Application) -> None:
    """On shutdown: stop reporting ready and wait for in-flight requests to finish."""
    state = app[STATE]
    state.draining = True
    if state.in_flight:
        try:
            await asyncio.wait_for(state.idle.wait(), state.config.shutdown_grace_s)
        except TimeoutError:
            log.warning("shutdown: %d request(s) still in flight after grace", state.in_flight)


# ------------------------------------------------------------------------ middleware


def _error_response(state: WorkerState, status: int, message: str) -> web.Response:
    return web.Response(
        status=status, body=error_body(state.error_message(message)), content_type=JSON_CONTENT_TYPE
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    is_infer = request.path.endswith("/infer")
    if is_infer:
        state.request_started()
    started = time.perf_counter()
    try:
        response = await handler(request)
    except ProtocolError as exc:
        response = _error_response(state, exc.status, str(exc))
    except StageError as exc:
        response = _error_response(state, exc.status, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text or exc.reason
        if exc.status == 413:
            message = (
                f"the request body is larger than the limit of {state.config.max_body_bytes} "
                "bytes (max_body_bytes)"
            )
        elif exc.status == 404:
            message = f"no such endpoint: {request.method} {request.path}"
        elif exc.status == 405:
            message = f"method {request.method} is not allowed on {request.path}"
        response = _error_response(state, exc.status, message)
    except Exception as exc:
        log.exception("stage %s: internal error on %s", state.stage, request.path)
        response = _error_response(state, 500, f"internal error: {type(exc).__name__}: {exc}")
    finally:
        if is_infer:
            state.request_finished()
    if response.status >= 400:
        level = logging.WARNING if response.status >= 500 else logging.INFO
        log.log(
            level,
            "stage %s: %s %s -> %d (request id %s): %s",
            state.stage,
            request.method,
            request.path,
            response.status,
            request.get(REQUEST_ID, "-"),
            response.text if isinstance(response, web.Response) else "",
        )
    if is_infer:
        state.record_answer(response.status, started, body_size(getattr(response, "body", None)))
        # From the whole body on: the sender subtracts this from its round trip to get
        # the time its bytes spent on the network.
        server_s = time.perf_counter() - request.get(BODY_READ_AT, started)
        response.headers[SERVER_TIME_HEADER] = f"{server_s * 1000:.3f}"
        if COMPUTE_S in request:
            response.headers[COMPUTE_TIME_HEADER] = f"{request[COMPUTE_S] * 1000:.3f}"
    return response


# -------------------------------------------------------------------------- handlers


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


async def server_metadata(request: web.Request) -> web.Response:
    return _json({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})


async def live(request: web.Request) -> web.Response:
    return _json({"live": True})


async def ready(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not state.ready:
        reason = "draining" if state.draining else "loading"
        return _error_response(state, 503, f"not ready ({reason})")
    return _json({"ready": True})


def _check_model(state: WorkerState, request: web.Request) -> None:
    check_model(state.config, request.match_info["name"], request.match_info.get("version"))


def check_model(config: WorkerConfig, name: str, version: str | None) -> None:
    """Raise a 404 `ProtocolError` unless this stage serves model `name` (and `version`,
    when one is given)."""
    if name != config.model_name:
        raise ProtocolError(
            f"model '{name}' is not served here (accepted: {config.model_name})", status=404
        )
    if version is not None and version != config.model_version:
        raise ProtocolError(
            f"version '{version}' of model '{name}' is not served here "
            f"(accepted: {config.model_version})",
            status=404,
        )


async def model_metadata(request: web.Request) -> web.Response:
    state = request.app[STATE]
    _check_model(state, request)
    return _json(await model_metadata_of(state))


async def model_metadata_of(state: WorkerState) -> dict[str, Any]:
    """The served model's metadata (a forwarding stage asks the next one for the
    chain's final outputs)."""
    config = state.config
    inputs: list[dict[str, Any]] = []
    outputs: list[dict[str, Any]] = []
    if state.runtime is not None:
        inputs = [s.as_metadata() for s in state.runtime.inputs]
        outputs = [s.as_metadata() for s in state.runtime.outputs]
    if state.forwarder is not None:
        if state.downstream_metadata is None:
            state.downstream_metadata = await state.forwarder.metadata()
        outputs = list(state.downstream_metadata.get("outputs", []))
        if not inputs:
            inputs = list(state.downstream_metadata.get("inputs", []))
    return {
        "name": config.model_name,
        "versions": [config.model_version],
        "platform": "onnxruntime_onnx",
        "inputs": inputs,
        "outputs": outputs,
        "parameters": {
            "stage": config.stage_index,
            "tier": config.tier,
            **_model_identity(config),
        },
    }


def _model_identity(config: WorkerConfig) -> dict[str, str]:
    """The served model's artefact digest, variant and URI, those that are known."""
    identity = {
        "digest": config.model_digest,
        "variant": config.model_variant,
        "uri": config.model_uri,
    }
    return {key: value for key, value in identity.items() if value is not None}


async def model_ready(request: web.Request) -> web.Response:
    state = request.app[STATE]
    _check_model(state, request)
    if not state.ready:
        return _error_response(state, 503, f"model '{state.config.model_name}' is not ready")
    return _json({"name": state.config.model_name, "ready": True})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.batcher is not None:
        state.metrics.queue_depth.set(state.batcher.depth, stage=state.stage)
    if state.runtime is not None:
        cpu_s = sum(p.cpu_s for p in state.runtime.partitions)
        state.metrics.compute_cpu.inc(
            cpu_s - state.metrics.compute_cpu.get(stage=state.stage), stage=state.stage
        )
    return web.Response(text=state.metrics.render(), content_type="text/plain", charset="utf-8")


async def probe(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=204)


def _priority_and_deadline(
    request: InferRequest, arrived: float, default_priority: int
) -> tuple[int, float | None]:
    """The request's queue priority (its own `parameters.priority`, else the stage's
    default) and its deadline in `time.monotonic()` seconds, if it set a timeout."""
    priority = request.parameters.get("priority", default_priority)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ProtocolError(f"parameters.priority must be an integer, got {priority!r:.40}")
    timeout_us = request.parameters.get("timeout")
    if timeout_us is None:
        return priority, None
    if not isinstance(timeout_us, int) or isinstance(timeout_us, bool) or timeout_us < 0:
        raise ProtocolError(
            f"parameters.timeout must be a non-negative integer of microseconds, "
            f"got {timeout_us!r:.40}"
        )
    return priority, arrived + timeout_us / 1e6


async def _run_tiled(state: WorkerState, tensors: list[Tensor], request_id: str) -> list[Tensor]:
    """The conv prefix, computed as tiles on the peer workers and stitched."""
    tiler = state.tiler
    assert tiler is not None
    names = [t.name for t in tensors]
    if names != [tiler.input_name]:
        raise ProtocolError(
            f"inputs {names} do not match model '{state.config.model_name}' "
            f"(accepted: {tiler.input_name})"
        )
    (tensor,) = tensors
    if tensor.datatype != "FP32" or tensor.array.ndim != 4:
        raise ProtocolError(
            f"input '{tensor.name}': a tiled stage takes an FP32 NCHW tensor, got "
            f"{tensor.datatype} of shape {tensor.shape}"
        )
    stitched = await tiler.run(tensor.array, request_id)
    return [Tensor.from_numpy(tiler.output_name, stitched)]


async def _run_local(
    state: WorkerState,
    tensors: list[Tensor],
    priority: int,
    deadline: float | None,
    request_id: str,
    compute: list[float],
) -> tuple[list[Tensor], str | None, bool]:
    """Run this stage's layers; returns the tensors to pass on, the split label, and
    whether they are the model's outputs (a device split that holds the whole model).
    The seconds onnxruntime took are appended to `compute`."""
    if state.tiler is not None:
        tensors = await _run_tiled(state, tensors, request_id)
    if state.he_head is not None:
        return await _evaluate_head(state, state.he_head, tensors, compute), None, False
    runtime = state.runtime
    assert state.batcher is not None
    by_name = {t.name: (t.array, t.datatype) for t in tensors}
    label: str | None = None
    final = False
    if state.device is not None:
        if runtime is not None:
            runtime.validate(by_name)  # the model's input, whichever split runs
        split = state.device.choose()
        label = split.label
        final = split.option.final
        state.metrics.split.inc(option=label)
        if split.partition is None:
            return tensors, label, False
        partition = split.partition
    elif runtime is None:
        return tensors, None, False
    else:
        partition = runtime.validate(by_name)
    feeds = {name: array for name, (array, _) in by_name.items()}
    outputs, compute_s = await state.batcher.submit_timed(
        partition, feeds, priority=priority, deadline=deadline
    )
    compute.append(compute_s)
    if state.device is not None and state.forwarder is not None and not final:
        outputs = state.device.add_noise(outputs)
    return [Tensor.from_numpy(name, array) for name, array in outputs.items()], label, final


async def _evaluate_head(
    state: WorkerState, head: HeadEvaluator, tensors: list[Tensor], compute: list[float]
) -> list[Tensor]:
    """The dense head on the device's ciphertexts (edgeai_worker.he)."""
    by_name = {t.name: t for t in tensors}
    name = head.head.input_name
    for wanted in (name, CONTEXT_TENSOR):
        if wanted not in by_name or by_name[wanted].datatype != "BYTES":
            raise ProtocolError(
                f"input '{wanted}': missing or not BYTES; this stage evaluates model "
                f"'{state.config.model_name}''s last dense layer on CKKS ciphertexts "
                f"(accepted: BYTES tensors '{name}' and '{CONTEXT_TENSOR}')"
            )
    (context_data,) = by_name[CONTEXT_TENSOR].array.reshape(-1)
    ciphertexts = list(by_name[name].array.reshape(-1))
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    try:
        _, context = await loop.run_in_executor(None, head.context, bytes(context_data))
        logits = await loop.run_in_executor(None, head.evaluate, context, ciphertexts)
    except KeyError as exc:
        raise ProtocolError(f"{UNKNOWN_CONTEXT} {exc.args[0]}: send the context", 428) from None
    except HeadError as exc:
        raise ProtocolError(str(exc)) from None
    compute.append(time.perf_counter() - started)
    out = np.empty(len(logits), dtype=np.object_)
    out[:] = logits
    tensor = Tensor(head.head.output_name, out, "BYTES", {OUTPUT_SIZE_PARAMETER: head.head.outputs})
    return [tensor]


def _encrypt(keys: DeviceKeys, tensors: list[Tensor]) -> list[Tensor]:
    """The device's features as ciphertexts, one per sample."""
    encrypted = []
    for tensor in tensors:
        if tensor.datatype != "FP32":
            raise ProtocolError(
                f"tensor '{tensor.name}': the homomorphic head takes FP32 features, "
                f"got {tensor.datatype}"
            )
        out = np.empty(len(tensor.array), dtype=np.object_)
        out[:] = keys.encrypt(tensor.array)
        encrypted.append(Tensor(tensor.name, out, "BYTES"))
    return encrypted


async def _forward_encrypted(
    state: WorkerState,
    keys: DeviceKeys,
    tensors: list[Tensor],
    compute: list[float],
    send: Callable[[list[Tensor]], Awaitable[InferResponse]],
) -> InferResponse:
    """`send` (the forward) with `tensors` encrypted and the answer decrypted. The
    public context goes whole until the next stage has it, then as its digest; a stage
    that does not know the digest (a restart, another replica) gets it whole again."""
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    encrypted = await loop.run_in_executor(None, _encrypt, keys, tensors)
    compute.append(time.perf_counter() - started)
    while True:
        sent_whole = not state.he_context_sent
        holder = np.empty(1, dtype=np.object_)
        holder[0] = keys.public_context if sent_whole else keys.context_digest.encode()
        inputs = [*encrypted, Tensor(CONTEXT_TENSOR, holder, "BYTES")]
        try:
            answer = await send(inputs)
        except StageError as exc:
            if sent_whole or UNKNOWN_CONTEXT not in exc.message:
                raise
            state.he_context_sent = False
            continue
        if "edgeai_fallback" not in answer.parameters:
            state.he_context_sent = True
        started = time.perf_counter()
        decrypted = await loop.run_in_executor(None, _decrypt, keys, answer)
        compute.append(time.perf_counter() - started)
        return decrypted


def _decrypt(keys: DeviceKeys, response: InferResponse) -> InferResponse:
    outputs = []
    for tensor in response.outputs:
        size = tensor.parameters.get(OUTPUT_SIZE_PARAMETER)
        if tensor.datatype == "BYTES" and isinstance(size, int):
            logits = keys.decrypt(list(tensor.array.reshape(-1)), size)
            outputs.append(Tensor.from_numpy(tensor.name, logits))
        else:  # the device's fallback answered in plaintext
            outputs.append(tensor)
    return replace(response, outputs=outputs)


def _select_outputs(
    state: WorkerState, request: InferRequest, outputs: list[Tensor]
) -> list[Tensor]:
    if request.outputs is None:
        return outputs
    available = {t.name: t for t in outputs}
    chosen: list[Tensor] = []
    for requested in request.outputs:
        if requested.name not in available:
            raise ProtocolError(
                f"output '{requested.name}' is not an output of model "
                f"'{state.config.model_name}' (accepted: {', '.join(available)})"
            )
        chosen.append(available[requested.name])
    return chosen


# Downstream answers that say nothing about the request: the device answers alone.
STAGE_4XX = frozenset({401, 403, 408, 429})


async def _forward(
    state: WorkerState,
    forward: InferRequest,
    request: InferRequest,
    priority: int,
    deadline: float | None,
    compute: list[float],
) -> InferResponse:
    """The next stage's answer. A device stage with a fallback model answers with its
    whole model instead when the next stage fails or is later than `fallback_after_ms`
    (a stopped node drops packets: nothing fails fast), and for `fallback_cooldown_s`
    after that without trying the next stage; then it tries again."""
    assert state.forwarder is not None
    config = state.config
    reason = "cooldown"
    if state.fallback is None or time.monotonic() >= state.fallback_until:
        try:
            result = await asyncio.wait_for(
                state.forwarder.infer(forward),
                None if state.fallback is None else config.fallback_after_ms / 1000,
            )
        except (StageError, TimeoutError) as exc:
            # A 4xx is the request's fault (the whole model would refuse it as well),
            # but for the stages' own credentials and load (401, 403, 408, 429).
            status = exc.status if isinstance(exc, StageError) else 504
            if state.fallback is None or not (status >= 500 or status in STAGE_4XX):
                raise
            reason = "late" if isinstance(exc, TimeoutError) else "failed"
            state.fallback_until = time.monotonic() + config.fallback_cooldown_s
            log.warning(
                "next stage %s: the device answers alone for %.0f s",
                reason,
                config.fallback_cooldown_s,
            )
        else:
            if state.device is not None:
                state.device.observe_transfer(result.sent_bytes, result.elapsed_s, result.server_s)
            return result.response
    assert state.fallback is not None
    assert state.batcher is not None
    state.metrics.fallbacks.inc(reason=reason)
    feeds = {t.name: t.array for t in request.inputs}
    outputs, compute_s = await state.batcher.submit_timed(
        state.fallback, feeds, priority=priority, deadline=deadline
    )
    compute.append(compute_s)
    tensors = [Tensor.from_numpy(name, array) for name, array in outputs.items()]
    return InferResponse(
        config.model_name,
        _select_outputs(state, request, tensors),
        parameters={"edgeai_fallback": reason},
    )


async def _serve(
    state: WorkerState, request: InferRequest, arrived: float, compute: list[float]
) -> InferResponse:
    config = state.config
    priority, deadline = _priority_and_deadline(request, arrived, config.default_priority)
    frame: Array | None = None
    if state.device is not None:
        frame = request.inputs[0].array
        previous = state.device.unchanged(frame)
        if previous is not None:
            return replace(
                previous, id=request.id, parameters={**previous.parameters, "edgeai_skipped": True}
            )
    request_id = request.id or uuid.uuid4().hex
    if state.offload is not None:
        early = await _offload_early(state, request, priority, deadline, compute)
        if early is not None:
            return early
    tensors, label, final = await _run_local(
        state, request.inputs, priority, deadline, request_id, compute
    )
    exit_name: str | None = None
    if state.offload is not None and state.offload.settings.exits:
        at_exit, exit_name, rest = state.offload.exit_answer({t.name: t.array for t in tensors})
        tensors = at_exit if at_exit is not None else [t for t in tensors if t.name in rest]
        final = final or at_exit is not None
    if state.forwarder is None or final:
        response = InferResponse(
            config.model_name,
            _select_outputs(state, request, tensors),
            config.model_version,
            request.id,
        )
    else:
        parameters: dict[str, Any] = {"binary_data_output": True}
        # the next stage queues it as this one did, whatever that stage's default
        if priority or "priority" in request.parameters:
            parameters["priority"] = priority
        if deadline is not None:
            parameters["timeout"] = max(0, int((deadline - time.monotonic()) * 1e6))
        outputs = (
            [RequestedOutput(o.name, True) for o in request.outputs]
            if request.outputs is not None
            else None
        )
        forward = InferRequest(tensors, request_id, outputs, parameters)
        if state.he_keys is not None:

            def send(inputs: list[Tensor]) -> Awaitable[InferResponse]:
                encrypted = replace(forward, inputs=inputs)
                return _forward(state, encrypted, request, priority, deadline, compute)

            answer = await _forward_encrypted(state, state.he_keys, tensors, compute, send)
        else:
            answer = await _forward(state, forward, request, priority, deadline, compute)
        response = replace(
            answer, model_name=config.model_name, model_version=config.model_version, id=request.id
        )
    if label is not None:
        response.parameters = {**response.parameters, "edgeai_split": label}
    if state.offload is not None:
        which = exit_name or response.parameters.get(EXIT_PARAMETER, FINAL_EXIT)
        response.parameters = {**response.parameters, EXIT_PARAMETER: which}
        state.offload.remember(request.inputs, response)
    if state.device is not None and frame is not None:
        state.device.remember(frame, response)
    return response


async def _offload_early(
    state: WorkerState,
    request: InferRequest,
    priority: int,
    deadline: float | None,
    compute: list[float],
) -> InferResponse | None:
    """Before this stage's layers: the result of a near-identical earlier input, or the
    cascade's small model(s) when confident; None to go on."""
    offload = state.offload
    assert offload is not None
    assert state.batcher is not None
    config = state.config
    stored = offload.reused(request.inputs)
    if stored is not None:
        parameters = {**stored.parameters, REUSED_PARAMETER: True}
        return replace(stored, id=request.id, parameters=parameters)
    if not offload.cascade_partitions:
        return None
    feeds = {t.name: t.array for t in request.inputs}
    logits = []
    for partition in offload.cascade_partitions:
        outputs, compute_s = await state.batcher.submit_timed(
            partition, feeds, priority=priority, deadline=deadline
        )
        compute.append(compute_s)
        logits.append(next(iter(outputs.values())))
    answer = offload.cascade_answer(logits)
    if answer is None:
        return None
    response = InferResponse(
        config.model_name,
        _select_outputs(state, request, answer),
        config.model_version,
        request.id,
        {EXIT_PARAMETER: "cascade"},
    )
    offload.remember(request.inputs, response)
    return response


async def infer(request: web.Request) -> web.Response:
    arrived = time.monotonic()
    state = request.app[STATE]
    _check_model(state, request)
    if state.draining:
        raise ProtocolError("the worker is shutting down; retry on another replica", 503)
    body = await read_body(request, state.config.max_body_bytes)
    request[BODY_READ_AT] = time.perf_counter()
    state.metrics.bytes_in.inc(len(body), stage=state.stage)
    header_length = parse_header_length(request.headers.get(HEADER_LENGTH), len(body))
    infer_request = decode_request(body, header_length)
    request[REQUEST_ID] = infer_request.id or "-"
    key = request.headers.get(IDEMPOTENCY_HEADER)
    compute: list[float] = []
    response = await serve_once(state, infer_request, arrived, compute, key, len(body))
    if compute:
        request[COMPUTE_S] = sum(compute)
    return parts_response(*encode_response_parts(response, infer_request))


async def serve_once(
    state: WorkerState,
    request: InferRequest,
    arrived: float,
    compute: list[float],
    key: str | None,
    size_bytes: int,
) -> InferResponse:
    """Serve a decoded request, at most once per idempotency `key` (of a request of
    `size_bytes`): a retry of a request this worker runs or has answered gets that
    answer. `arrived` is the request's `time.monotonic()`; the seconds onnxruntime took
    are appended to `compute`."""
    if key is not None:
        # The sender's key names one request over all its attempts (no checksum of the
        # body: that would cost more than the rest of the request's handling); a key
        # reused with a body of another length is another request.
        key = f"{key}:{size_bytes}"
    if key is not None and (known := state.dedupe.lookup(key)) is not None:
        state.metrics.deduplicated.inc(stage=state.stage)
        return await asyncio.shield(known)
    future = state.dedupe.begin(key) if key is not None else None
    try:
        response = await _serve(state, request, arrived, compute)
        record_label(state.metrics, state.stage, request, response)
    except BaseException as exc:
        if future is not None and key is not None:
            state.dedupe.fail(key, future, exc)
        raise
    if future is not None and not future.done():
        future.set_result(response)
    return response


# ---------------------------------------------------------------------------- factory


def create_app(config: WorkerConfig) -> web.Application:
    """The worker application for one stage; resources open in its cleanup context."""
    set_json_codec(config.json_codec)  # the codec's path is per process
    app = web.Application(
        client_max_size=config.max_body_bytes, middlewares=[error_middleware, _plain_middleware]
    )
    app[CONFIG] = config
    state = WorkerState(config, WorkerMetrics(), dedupe=Deduplicator(config.dedupe_entries))
    app[STATE] = state
    if config.tls_dir is not None:
        state.tls = StageTLS(
            config.tls_dir,
            config.entry_client_ca_file,
            lambda reason: state.metrics.tls_refusals.inc(stage=state.stage, reason=reason),
        )
        state.peer_check = PeerCheck(config.tls_peers)
    if config.entry_token_file is not None:
        state.entry_token = EntryToken(config.entry_token_file)
    app.cleanup_ctx.append(_resources)
    if config.tls_port is not None:
        app.cleanup_ctx.append(_tls_endpoint)
    app.on_shutdown.append(_drain)
    _add_routes(app)
    return app


def _add_routes(app: web.Application) -> None:
    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    app.router.add_get("/v2", server_metadata)
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    for base in (model, versioned):
        app.router.add_get(base, model_metadata)
        app.router.add_get(base + "/ready", model_ready)
        app.router.add_post(base + "/infer", infer)
    app.router.add_get("/metrics", metrics)
    app.router.add_post(PROBE_PATH, probe)


__all__ = [
    "CONFIG",
    "EXTENSIONS",
    "SERVER_NAME",
    "SERVER_VERSION",
    "STATE",
    "WorkerState",
    "check_model",
    "create_app",
    "model_metadata_of",
    "serve_once",
]
