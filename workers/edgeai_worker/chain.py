"""Forwarding a stage's output to the next stage.

The intermediate tensors go in the binary form of the protocol over one pooled
keep-alive aiohttp session per worker. The forwarder draws one `Idempotency-Key` per
request and sends it with every attempt; a forward that fails on the way (connection
refused or reset, a replica that died mid-request, a timeout, a 502/503/504) is retried
on another replica with the same bytes and the same key, so the request is neither lost
nor answered twice: a replica that already has that key (and a body of that length)
waits for or returns its recorded answer instead of running again (see
`app.Deduplicator`). The request's OIP `id` plays no part in this (clients reuse ids). A
4xx from downstream is the caller's fault and is passed back unchanged; every error
names the stage that failed.

Replicas given as `grpc://host:port` are reached over the protocol's gRPC service
instead: one keep-alive channel per replica, the key in the `idempotency-key`
metadata, and the same retry rule (UNAVAILABLE and DEADLINE_EXCEEDED, the gRPC forms
of 502/503/504 and of a lost connection, are retried; other codes are passed back).
`grpcs://host:port` is the same over mutual TLS with the stage's certificate
(security.py); when the certificate is renewed, new calls go on a new channel and the
old one closes once its calls are done.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import ssl
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import grpc

from edgeai_worker import grpc_predict_v2_pb2 as pb
from edgeai_worker.body import body_of, body_size
from edgeai_worker.grpc_codec import parse_infer_response, serialize_infer_request
from edgeai_worker.metrics import WorkerMetrics
from edgeai_worker.protocol import (
    HEADER_LENGTH,
    InferRequest,
    InferResponse,
    ProtocolError,
    decode_response,
    encode_request_parts,
    parse_header_length,
)
from edgeai_worker.security import STAGE_TLS_NAME, StageTLS

# Header in which a stage reports how long it (and the stages after it) took, so the
# stage before it can tell network time from compute time when measuring the uplink.
SERVER_TIME_HEADER = "Edgeai-Server-Ms"
# What onnxruntime took of that, for this request (its batch's run), on this stage only.
COMPUTE_TIME_HEADER = "Edgeai-Compute-Ms"
# One value per request, sent with each of its attempts: the receiver answers a retry
# it has already run (or is running) without running the model again.
IDEMPOTENCY_HEADER = "Idempotency-Key"
PROBE_PATH = "/edgeai/v1/probe"
RETRYABLE_STATUS = frozenset({502, 503, 504})
GRPC_SCHEME = "grpc://"
GRPCS_SCHEME = "grpcs://"  # gRPC over mutual TLS
# The gRPC forms of the headers above (metadata keys are lower case).
IDEMPOTENCY_METADATA = "idempotency-key"
SERVER_TIME_METADATA = "edgeai-server-ms"
COMPUTE_TIME_METADATA = "edgeai-compute-ms"
GRPC_SERVICE = "inference.GRPCInferenceService"
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# gRPC status code -> the HTTP status a stage answers with when it passes the error back
HTTP_STATUS_OF_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def is_grpc_url(url: str) -> bool:
    return url.startswith((GRPC_SCHEME, GRPCS_SCHEME))


def transport_of(urls: Sequence[str]) -> str:
    """`grpc` when every replica URL is `grpc://` or `grpcs://host:port`, `http` when
    none is; ValueError for a mix."""
    grpc_urls = [u for u in urls if is_grpc_url(u)]
    if grpc_urls and len(grpc_urls) != len(urls):
        raise ValueError(
            f"next stage replicas mix grpc:// and http:// URLs: {', '.join(urls)} "
            "(accepted: all of one kind)"
        )
    return "grpc" if grpc_urls else "http"


class StageError(Exception):
    """A downstream failure; `message` names the stage, `status` is what we answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class ForwardResult:
    response: InferResponse
    sent_bytes: int
    elapsed_s: float
    server_s: float  # time the next stage reported spending, network excluded
    replica: str
    attempts: int


def _error_text(body: bytes) -> str:
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return body[:200].decode("utf-8", "replace")
    if isinstance(parsed, dict) and "error" in parsed:
        return str(parsed["error"])
    return str(parsed)[:200]


def _as_is(data: bytes) -> bytes:
    return data


def _serialized(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


_Parsed = InferResponse | ProtocolError


def _parsed_response(data: bytes) -> _Parsed:
    """The forwarder's response deserializer: a bad response comes back as its error
    (raised from a deserializer, gRPC would turn it into a status of its own)."""
    try:
        return parse_infer_response(data)
    except ProtocolError as exc:
        return exc


class Forwarder:
    """Sends requests to the replicas of the next stage."""

    def __init__(
        self,
        urls: Sequence[str],
        model_name: str,
        *,
        stage_index: int,
        timeout_s: float = 30.0,
        attempts: int = 3,
        cooldown_s: float = 2.0,
        metrics: WorkerMetrics | None = None,
        tls: StageTLS | None = None,
    ) -> None:
        if not urls:
            raise ValueError("a forwarder needs at least one replica URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.model_name = model_name
        self.next_stage = stage_index + 1
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.cooldown_s = cooldown_s
        self._metrics = metrics
        self._rotation = itertools.cycle(range(len(self.urls)))
        self._down_until: dict[str, float] = {}
        self._session: aiohttp.ClientSession | None = None
        self.transport = transport_of(self.urls)
        self._tls = tls
        if tls is None and any(u.startswith(("https://", GRPCS_SCHEME)) for u in self.urls):
            raise ValueError("https:// and grpcs:// replicas need the stage's certificate (tls)")
        # url -> (channel, the certificate generation it was opened with)
        self._channels: dict[str, tuple[Any, int]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def _channel(self, url: str) -> Any:
        """The replica's channel; over TLS, a new one once the certificate changed (the
        old one closes when its calls are done, within the forward timeout)."""
        generation = self._tls.generation if self._tls is not None else 0
        current = self._channels.get(url)
        if current is not None and current[1] == generation:
            return current[0]
        options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", -1),
            ("grpc.keepalive_time_ms", 30_000),
        ]
        if url.startswith(GRPCS_SCHEME):
            assert self._tls is not None
            cert, key, ca = self._tls.pem
            credentials = grpc.ssl_channel_credentials(
                root_certificates=ca, private_key=key, certificate_chain=cert
            )
            # the next stage's certificate is checked against the CA and the name
            # every stage certificate carries (stage addresses are Service names)
            options.append(("grpc.ssl_target_name_override", STAGE_TLS_NAME))
            channel = grpc.aio.secure_channel(
                url.removeprefix(GRPCS_SCHEME), credentials, options=options
            )
        else:
            channel = grpc.aio.insecure_channel(url.removeprefix(GRPC_SCHEME), options=options)
        if current is not None:
            closing = asyncio.get_running_loop().create_task(current[0].close(grace=self.timeout_s))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
        self._channels[url] = (channel, generation)
        return channel

    def _stub(
        self,
        url: str,
        method: str,
        serializer: Callable[[Any], bytes],
        deserializer: Callable[[bytes], Any],
    ) -> Any:
        return self._channel(url).unary_unary(
            f"/{GRPC_SERVICE}/{method}",
            request_serializer=serializer,
            response_deserializer=deserializer,
        )

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=60.0, force_close=False)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout_s)
        )

    async def close(self) -> None:
        for channel, _ in self._channels.values():
            await channel.close()
        self._channels.clear()
        for closing in list(self._closing):
            await closing
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _ssl(self, url: str) -> ssl.SSLContext | bool:
        """The newest client context for an https:// replica (a renewed certificate is
        used by new connections), the default otherwise."""
        if self._tls is not None and url.startswith("https://"):
            return self._tls.client_context
        return True

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Forwarder.start() was not awaited")
        return self._session

    def _pick(self, tried: set[str]) -> str:
        """Next replica by rotation, preferring untried replicas that are not cooling down."""
        now = time.monotonic()
        start = next(self._rotation)
        order = self.urls[start:] + self.urls[:start]
        for url in order:
            if url not in tried and self._down_until.get(url, 0.0) <= now:
                return url
        for url in order:
            if url not in tried:
                return url
        return order[0]

    def _name(self, url: str) -> str:
        return f"stage {self.next_stage} at {url}"

    def _attempt_on(self, tried: set[str], attempt: int) -> str:
        """The replica for this attempt (counted as a retry after the first)."""
        url = self._pick(tried)
        tried.add(url)
        if attempt > 1 and self._metrics is not None:
            self._metrics.forward_retries.inc(stage=str(self.next_stage - 1))
        return url

    def _forwarded(
        self,
        response: InferResponse,
        sent: int,
        started: float,
        server_ms: str | None,
        url: str,
        attempt: int,
    ) -> ForwardResult:
        """The result of a forward answered after `started` (`perf_counter()`), with the
        next stage's reported milliseconds."""
        if self._metrics is not None:
            self._metrics.forward_bytes.inc(sent, stage=str(self.next_stage - 1))
        return ForwardResult(
            response,
            sent,
            time.perf_counter() - started,
            float(server_ms) / 1000.0 if server_ms else 0.0,
            url,
            attempt,
        )

    def _exhausted(self, tried: set[str], last_error: str, timed_out: bool) -> StageError:
        return StageError(
            504 if timed_out else 502,
            f"{self._name(', '.join(sorted(tried)))} failed after {self.attempts} attempt(s): "
            f"{last_error}",
        )

    async def infer(self, request: InferRequest) -> ForwardResult:
        if self.transport == "grpc":
            return await self._infer_grpc(request)
        body, headers = body_of(*encode_request_parts(request, binary=True))
        sent = body_size(body)
        headers[IDEMPOTENCY_HEADER] = uuid.uuid4().hex
        path = f"/v2/models/{quote(self.model_name, safe='')}/infer"
        tried: set[str] = set()
        last_error = ""
        started = time.perf_counter()
        for attempt in range(1, self.attempts + 1):
            url = self._attempt_on(tried, attempt)
            try:
                async with self.session.post(
                    url + path, data=body, headers=headers, ssl=self._ssl(url)
                ) as resp:
                    data = await resp.read()
                    server_ms = resp.headers.get(SERVER_TIME_HEADER)
                    length_header = resp.headers.get(HEADER_LENGTH)
                    status = resp.status
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
                self._down_until[url] = time.monotonic() + self.cooldown_s
                last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                continue
            if status == 200:
                try:
                    response = decode_response(data, parse_header_length(length_header, len(data)))
                except ProtocolError as exc:
                    raise StageError(502, f"{self._name(url)} sent a bad response: {exc}") from exc
                return self._forwarded(response, sent, started, server_ms, url, attempt)
            text = _error_text(data)
            if status in RETRYABLE_STATUS:
                self._down_until[url] = time.monotonic() + self.cooldown_s
                last_error = f"HTTP {status}: {text}"
                continue
            # Not retryable: the downstream message already says what and where.
            prefix = "" if text.startswith("stage ") else f"{self._name(url)}: "
            raise StageError(status, prefix + text)
        raise self._exhausted(tried, last_error, timed_out="Timeout" in last_error)

    async def _infer_grpc(self, request: InferRequest) -> ForwardResult:
        # serialized once for every attempt, the tensors copied once (grpc_codec)
        message = serialize_infer_request(request, self.model_name)
        sent = len(message)
        metadata = ((IDEMPOTENCY_METADATA, uuid.uuid4().hex),)
        tried: set[str] = set()
        last_error = ""
        started = time.perf_counter()
        for attempt in range(1, self.attempts + 1):
            url = self._attempt_on(tried, attempt)
            stub = self._stub(url, "ModelInfer", _as_is, _parsed_response)
            call = stub(message, timeout=self.timeout_s, metadata=metadata)
            try:
                parsed: _Parsed = await call
                trailing = dict(await call.trailing_metadata() or ())
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
                if code in RETRYABLE_CODES:
                    self._down_until[url] = time.monotonic() + self.cooldown_s
                    last_error = f"gRPC {code.name}: {details}"
                    continue
                prefix = "" if details.startswith("stage ") else f"{self._name(url)}: "
                raise StageError(HTTP_STATUS_OF_CODE.get(code, 500), prefix + details) from exc
            if isinstance(parsed, ProtocolError):
                raise StageError(502, f"{self._name(url)} sent a bad response: {parsed}")
            response = parsed
            server_ms = trailing.get(SERVER_TIME_METADATA)
            return self._forwarded(response, sent, started, server_ms, url, attempt)
        raise self._exhausted(tried, last_error, timed_out="DEADLINE_EXCEEDED" in last_error)

    async def _metadata_grpc(self) -> dict[str, Any]:
        last: Exception | None = None
        for url in self.urls:
            stub = self._stub(
                url, "ModelMetadata", _serialized, pb.ModelMetadataResponse.FromString
            )
            try:
                reply = await stub(
                    pb.ModelMetadataRequest(name=self.model_name), timeout=self.timeout_s
                )
            except grpc.aio.AioRpcError as exc:
                last = exc
                continue

            def tensors(items: Any) -> list[dict[str, Any]]:
                return [
                    {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items
                ]

            return {
                "name": reply.name,
                "versions": list(reply.versions),
                "platform": reply.platform,
                "inputs": tensors(reply.inputs),
                "outputs": tensors(reply.outputs),
            }
        raise StageError(502, f"stage {self.next_stage} metadata unavailable: {last}")

    async def metadata(self) -> dict[str, Any]:
        """The next stage's model metadata (used to describe the chain's final outputs)."""
        if self.transport == "grpc":
            return await self._metadata_grpc()
        last: Exception | None = None
        for url in self.urls:
            try:
                async with self.session.get(
                    f"{url}/v2/models/{quote(self.model_name, safe='')}", ssl=self._ssl(url)
                ) as resp:
                    if resp.status == 200:
                        result: dict[str, Any] = await resp.json()
                        return result
                    last = StageError(resp.status, _error_text(await resp.read()))
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = exc
        raise StageError(502, f"stage {self.next_stage} metadata unavailable: {last}")

    async def probe_mbps(self, size_bytes: int = 256 * 1024) -> float:
        """Measure the uplink by timing an upload of `size_bytes` to the next stage."""
        payload = bytes(size_bytes)
        url = self._pick(set())
        # Two small pings first: the second gives the round trip on a warm connection.
        for _ in range(2):
            t0 = time.perf_counter()
            async with self.session.post(url + PROBE_PATH, data=b"", ssl=self._ssl(url)) as resp:
                await resp.read()
            rtt_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        async with self.session.post(url + PROBE_PATH, data=payload, ssl=self._ssl(url)) as resp:
            await resp.read()
        elapsed = max(time.perf_counter() - t0 - rtt_s, 1e-6)
        return size_bytes * 8 / elapsed / 1e6


async def wait_ready(url: str, timeout_s: float = 30.0) -> None:
    """Poll `/v2/health/ready` until the worker at `url` answers 200."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(f"{url}/v2/health/ready") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} was not ready within {timeout_s:.0f} s")
            await asyncio.sleep(0.05)
