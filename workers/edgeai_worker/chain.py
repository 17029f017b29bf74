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
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from edgeai_worker.body import body_of, body_size
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

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=60.0, force_close=False)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout_s)
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

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

    async def infer(self, request: InferRequest) -> ForwardResult:
        body, headers = body_of(*encode_request_parts(request, binary=True))
        sent = body_size(body)
        headers[IDEMPOTENCY_HEADER] = uuid.uuid4().hex
        path = f"/v2/models/{quote(self.model_name, safe='')}/infer"
        tried: set[str] = set()
        last_error = ""
        started = time.perf_counter()
        for attempt in range(1, self.attempts + 1):
            url = self._pick(tried)
            tried.add(url)
            if attempt > 1 and self._metrics is not None:
                self._metrics.forward_retries.inc(stage=str(self.next_stage - 1))
            try:
                async with self.session.post(url + path, data=body, headers=headers) as resp:
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
            text = _error_text(data)
            if status in RETRYABLE_STATUS:
                self._down_until[url] = time.monotonic() + self.cooldown_s
                last_error = f"HTTP {status}: {text}"
                continue
            # Not retryable: the downstream message already says what and where.
            prefix = "" if text.startswith("stage ") else f"{self._name(url)}: "
            raise StageError(status, prefix + text)
        raise StageError(
            502 if "Timeout" not in last_error else 504,
            f"{self._name(', '.join(sorted(tried)))} failed after {self.attempts} attempt(s): "
            f"{last_error}",
        )

    async def metadata(self) -> dict[str, Any]:
        """The next stage's model metadata (used to describe the chain's final outputs)."""
        last: Exception | None = None
        for url in self.urls:
            try:
                async with self.session.get(
                    f"{url}/v2/models/{quote(self.model_name, safe='')}"
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
            async with self.session.post(url + PROBE_PATH, data=b"") as resp:
                await resp.read()
            rtt_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        async with self.session.post(url + PROBE_PATH, data=payload) as resp:
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
