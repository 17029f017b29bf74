"""The worker's gRPC endpoint: the Open Inference Protocol v2 `GRPCInferenceService`
beside the REST API, in the same process and event loop (a `grpc.aio` server).

It serves the same stage state: the batcher, priorities and deadlines, idempotency
keys, metrics, readiness and the drain on shutdown. Errors carry the REST message
with the status code mapped to a gRPC one (`GRPC_CODES`).

A stage that takes inference over mutual TLS (`tls_port`, security.py) serves this
port over mutual TLS only, with the same certificate, CA and upstream identities as
its TLS port: a handshake without a certificate of the deployment's CA fails, and a
verified peer that is not an upstream stage gets PERMISSION_DENIED on every method but
ServerLive and ServerReady. Each handshake takes the newest certificate files.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from aiohttp import web
from google.protobuf.message import Message

from edgeai_worker import grpc_predict_v2_pb2 as pb
from edgeai_worker.app import (
    EXTENSIONS,
    SERVER_NAME,
    SERVER_VERSION,
    STATE,
    WorkerState,
    check_model,
    model_metadata_of,
    serve_once,
)
from edgeai_worker.chain import (
    COMPUTE_TIME_METADATA,
    GRPC_SERVICE,
    IDEMPOTENCY_METADATA,
    SERVER_TIME_METADATA,
    StageError,
)
from edgeai_worker.grpc_codec import (
    WireRequest,
    parse_infer_request,
    serialize_infer_response,
    tensor_metadata,
)
from edgeai_worker.protocol import ProtocolError
from edgeai_worker.security import StageTLS, check_identities, grpc_peer_identities

log = logging.getLogger("edgeai_worker")

SERVICE = GRPC_SERVICE

# HTTP status of a worker error -> the gRPC status code a client gets
GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

GRPC_SERVER = web.AppKey("grpc_server", object)

Reply = TypeVar("Reply", bound=Message)


def _version(value: str) -> str | None:
    return value or None


class InferenceService:
    """The service's methods over one stage's state."""

    def __init__(self, state: WorkerState) -> None:
        self.state = state
        # the identities that may call it, when it is served over mutual TLS
        self.peers = state.config.tls_peers if state.config.tls_port is not None else None

    def _check_peer(self, context: Any) -> None:
        """Over mutual TLS: ProtocolError (403) for a peer that is not an upstream stage."""
        if self.peers is None:
            return
        problem = check_identities(grpc_peer_identities(context.auth_context()), self.peers)
        if problem is not None:
            self.state.metrics.auth_failures.inc(stage=self.state.stage, reason="peer")
            raise ProtocolError(problem, 403)

    async def _abort(self, context: Any, status: int, message: str) -> None:
        code = GRPC_CODES.get(status, grpc.StatusCode.INTERNAL)
        await context.abort(code, self.state.error_message(message))

    async def _guarded(
        self, context: Any, call: Callable[[], Awaitable[Reply]], what: str
    ) -> Reply:
        try:
            self._check_peer(context)
            return await call()
        except ProtocolError as exc:
            await self._abort(context, exc.status, str(exc))
        except StageError as exc:
            await self._abort(context, exc.status, exc.message)
        raise AssertionError(f"{what}: context.abort returned")  # abort always raises

    async def server_live(self, request: pb.ServerLiveRequest, context: Any) -> Message:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: pb.ServerReadyRequest, context: Any) -> Message:
        return pb.ServerReadyResponse(ready=self.state.ready)

    async def server_metadata(self, request: pb.ServerMetadataRequest, context: Any) -> Message:
        async def answer() -> pb.ServerMetadataResponse:
            return pb.ServerMetadataResponse(
                name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS
            )

        return await self._guarded(context, answer, "ServerMetadata")

    async def model_ready(self, request: pb.ModelReadyRequest, context: Any) -> Message:
        async def answer() -> pb.ModelReadyResponse:
            check_model(self.state.config, request.name, _version(request.version))
            return pb.ModelReadyResponse(ready=self.state.ready)

        return await self._guarded(context, answer, "ModelReady")

    async def model_metadata(self, request: pb.ModelMetadataRequest, context: Any) -> Message:
        async def answer() -> pb.ModelMetadataResponse:
            check_model(self.state.config, request.name, _version(request.version))
            metadata = await model_metadata_of(self.state)
            return pb.ModelMetadataResponse(
                name=metadata["name"],
                versions=metadata["versions"],
                platform=metadata["platform"],
                inputs=tensor_metadata(metadata["inputs"]),
                outputs=tensor_metadata(metadata["outputs"]),
            )

        return await self._guarded(context, answer, "ModelMetadata")

    async def model_infer(self, wire: WireRequest, context: Any) -> bytes:
        """ModelInfer, from the request as read off the wire to the serialized reply
        (`grpc_codec`: the tensors are not copied into or out of protobuf messages)."""
        state = self.state
        arrived = time.monotonic()
        started = time.perf_counter()
        request = wire.message
        state.request_started()
        status = 200
        reply: bytes | None = None
        try:
            reply = await self._infer(wire, context, arrived)
            return reply
        except ProtocolError as exc:
            status = exc.status
            await self._abort(context, exc.status, str(exc))
        except StageError as exc:
            status = exc.status
            await self._abort(context, exc.status, exc.message)
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            status = 500
            log.exception("stage %s: internal error in ModelInfer", state.stage)
            await self._abort(context, 500, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            state.request_finished()
            state.record_answer(status, started, len(reply) if reply is not None else 0)
            if status >= 400:
                log.log(
                    logging.WARNING if status >= 500 else logging.INFO,
                    "stage %s: gRPC ModelInfer -> %d (request id %s)",
                    state.stage,
                    status,
                    request.id or "-",
                )
        raise AssertionError("ModelInfer: context.abort returned")

    async def _infer(self, wire: WireRequest, context: Any, arrived: float) -> bytes:
        state = self.state
        request, size_bytes = wire.message, wire.size_bytes
        self._check_peer(context)
        check_model(state.config, request.model_name, _version(request.model_version))
        if state.draining:
            raise ProtocolError("the worker is shutting down; retry on another replica", 503)
        state.metrics.bytes_in.inc(size_bytes, stage=state.stage)
        infer_request = wire.decode()
        remaining_s = context.time_remaining()
        if remaining_s is not None and "timeout" not in infer_request.parameters:
            # the call's gRPC deadline bounds the queueing as a `timeout` parameter would
            infer_request.parameters["timeout"] = max(0, int(remaining_s * 1e6))
        key = dict(context.invocation_metadata() or ()).get(IDEMPOTENCY_METADATA)
        compute: list[float] = []
        started = time.perf_counter()
        response = await serve_once(state, infer_request, arrived, compute, key, size_bytes)
        # as REST's headers: what this stage (and those after it) took, for the sender's
        # uplink estimate, and its own onnxruntime time
        trailing = [(SERVER_TIME_METADATA, f"{(time.perf_counter() - started) * 1000:.3f}")]
        if compute:
            trailing.append((COMPUTE_TIME_METADATA, f"{sum(compute) * 1000:.3f}"))
        context.set_trailing_metadata(tuple(trailing))
        return serialize_infer_response(response)


def _serialized(message: Message) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def _as_is(data: bytes) -> bytes:
    return data


def _handler(method: Callable[..., Awaitable[Message]], request_type: type[Message]) -> Any:
    return grpc.unary_unary_rpc_method_handler(
        method, request_deserializer=request_type.FromString, response_serializer=_serialized
    )


def create_grpc_server(state: WorkerState) -> Any:
    """A `grpc.aio` server with the inference service (not yet bound or started)."""
    service = InferenceService(state)
    # max_body_bytes bounds a gRPC message as it bounds a REST body
    limit = state.config.max_body_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", -1),
        ]
    )
    handlers = {
        "ServerLive": _handler(service.server_live, pb.ServerLiveRequest),
        "ServerReady": _handler(service.server_ready, pb.ServerReadyRequest),
        "ServerMetadata": _handler(service.server_metadata, pb.ServerMetadataRequest),
        "ModelReady": _handler(service.model_ready, pb.ModelReadyRequest),
        "ModelMetadata": _handler(service.model_metadata, pb.ModelMetadataRequest),
        "ModelInfer": grpc.unary_unary_rpc_method_handler(
            service.model_infer,
            request_deserializer=parse_infer_request,
            response_serializer=_as_is,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    return server


def server_credentials(tls: StageTLS) -> Any:
    """Mutual TLS with the stage's certificate, asking for the newest files (reloaded
    by the worker) at each handshake."""

    def configuration() -> Any:
        cert, key, ca = tls.pem
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    served = [tls.generation]

    def newest() -> Any:
        # called by gRPC for each new connection; None keeps the current certificate
        if tls.generation == served[0]:
            return None
        served[0] = tls.generation
        return configuration()

    return grpc.dynamic_ssl_server_credentials(
        configuration(), newest, require_client_authentication=True
    )


async def _serve_grpc(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    config = state.config
    server = create_grpc_server(state)
    address = f"{config.host}:{config.grpc_port}"
    secure = config.tls_port is not None and state.tls is not None
    if secure:
        assert state.tls is not None
        bound = server.add_secure_port(address, server_credentials(state.tls))
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {address} (grpc_port)")
    await server.start()
    app[GRPC_SERVER] = server
    log.info(
        "stage %s: gRPC on %s%s",
        config.stage_index,
        address,
        " (mutual TLS)" if secure else "",
    )
    yield
    await server.stop(None)


async def _drain_grpc(app: web.Application) -> None:
    """On shutdown: refuse new calls and give those in flight the grace period."""
    server = app.get(GRPC_SERVER)
    if server is not None:
        app[STATE].draining = True
        await server.stop(app[STATE].config.shutdown_grace_s)  # type: ignore[attr-defined]


def add_grpc_endpoint(app: web.Application) -> None:
    """Serve the worker's stage over gRPC as well, on `grpc_port`, once its resources
    are open; on shutdown it drains before the REST side does."""
    app.cleanup_ctx.append(_serve_grpc)
    app.on_shutdown.insert(0, _drain_grpc)


__all__ = ["GRPC_CODES", "IDEMPOTENCY_METADATA", "SERVICE", "add_grpc_endpoint"]
