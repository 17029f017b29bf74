"""The aggregator (parameter server): an aiohttp app over RoundState.

    GET  /model?worker=I&after=R  long-poll until round R is closed; the model (or, for
                                  codistillation, the ensemble's predictions)
    GET  /public                  codistillation's public and held-out inputs
    POST /update                  one worker's (compressed) update for the open round
    GET  /status                  progress as JSON (also written to status.json)
    GET  /model.onnx              the trained model once exported (404 before)

Every accepted update and every round close is appended to a journal before the reply;
every `checkpoint.everyRounds` rounds the state goes to a checkpoint and the journal
starts again. A restarted aggregator loads the checkpoint and replays the journal, so
no accepted update is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from edgeai_worker.training.compressors import CompressionError, decode
from edgeai_worker.training.rounds import PUBLIC_SIZE, RoundState, Update, UpdateRejected
from edgeai_worker.training.spec import TrainingSpec
from edgeai_worker.training.wire import CONTENT_TYPE, WireError, pack, unpack

log = logging.getLogger("edgeai_worker.training.aggregator")

CHECKPOINT = "checkpoint.bin"
JOURNAL = "journal.bin"
STATUS = "status.json"
MODEL = "model.onnx"
_LENGTH = struct.Struct("<I")
POLL_S = 0.05
JOIN_WAIT_S = 60.0  # the first round waits this long for every worker to ask for the model
LINGER_S = 5.0  # after the last round: how long to wait for workers to hear it is done


@dataclass
class Server:
    spec: TrainingSpec
    workdir: Path
    state: RoundState
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    deadline: float = 0.0
    first_contact: float | None = None
    told_done: set[int] = field(default_factory=set)
    started_at: float = field(default_factory=time.monotonic)
    restored_round: int | None = None
    training_started: float | None = None  # when this process started or resumed rounds
    training_s: float = 0.0  # seconds of rounds in this process, up to the last close
    # every update body this process read, accepted or not (bytesUp: the accepted ones)
    bytes_received: int = 0
    model_path: Path | None = None

    # --- persistence --------------------------------------------------------------------

    @classmethod
    def restore(cls, spec: TrainingSpec, workdir: Path) -> Server:
        workdir.mkdir(parents=True, exist_ok=True)
        checkpoint = workdir / CHECKPOINT
        restored: int | None = None
        if checkpoint.exists():
            header, payload = unpack(checkpoint.read_bytes())
            state = RoundState.from_checkpoint(spec, header, payload)
            restored = state.round
        else:
            state = RoundState.initial(spec)
        server = cls(spec=spec, workdir=workdir, state=state)
        replayed = server._replay()
        # the open round's workers get a whole timeout to reach the restarted aggregator
        server.deadline = time.monotonic() + spec.round_timeout_s
        if checkpoint.exists() or replayed:
            server.restored_round = restored if restored is not None else 0
            log.info(
                "resumed from checkpoint at round %s, replayed %d journal records: round %d",
                restored,
                replayed,
                state.round,
            )
        return server

    def _replay(self) -> int:
        journal = self.workdir / JOURNAL
        if not journal.exists():
            return 0
        data = journal.read_bytes()
        pos = count = 0
        while pos + _LENGTH.size <= len(data):
            (size,) = _LENGTH.unpack_from(data, pos)
            end = pos + _LENGTH.size + size
            if end > len(data):
                break  # a record cut short by the crash: it was never acknowledged
            header, payload = unpack(data[pos + _LENGTH.size : end])
            pos = end
            count += 1
            with contextlib.suppress(UpdateRejected):  # records older than the checkpoint
                if header["t"] == "update":
                    self.state.accept(_update(header, payload, header["wireBytes"]))
                elif header["t"] == "close" and header["round"] == self.state.round:
                    self.state.close(tuple(header["stragglers"]))
                elif header["t"] == "start":
                    self.state.started = True
        return count

    def _journal(self, header: dict[str, Any], payload: bytes = b"") -> None:
        record = pack(header, payload)
        with (self.workdir / JOURNAL).open("ab") as out:
            out.write(_LENGTH.pack(len(record)) + record)

    def _checkpoint(self) -> None:
        header, payload = self.state.to_checkpoint()
        tmp = self.workdir / f".{CHECKPOINT}.tmp"
        tmp.write_bytes(pack(header, payload))
        tmp.replace(self.workdir / CHECKPOINT)
        (self.workdir / JOURNAL).unlink(missing_ok=True)

    def status(self) -> dict[str, Any]:
        s = self.state
        last = s.history[-1] if s.history else {}
        return {
            "phase": "Succeeded" if s.done else ("Running" if s.started else "Pending"),
            "mode": self.spec.algorithm.mode,
            "compression": self.spec.compression.kind,
            "round": s.round,
            "accuracy": last.get("accuracy"),
            "loss": last.get("loss"),
            "bytesUp": s.bytes_up,
            "bytesDown": s.bytes_down,
            "bytesReceived": self.bytes_received,
            "denseBytesUp": s.dense_bytes_up,
            "compressionRatio": round(s.dense_bytes_up / s.bytes_up, 2) if s.bytes_up else None,
            "participants": last.get("participants", []),
            "stragglers": s.stragglers,
            "alive": sorted(s.alive),
            "epsilon": s.epsilon,
            "delta": self.spec.privacy.delta if self.spec.privacy else None,
            "resumedFromRound": self.restored_round,
            "trainingSeconds": round(self.training_s, 3),
            "model": str(self.model_path) if self.model_path else None,
            "history": s.history,
        }

    def write_status(self) -> None:
        tmp = self.workdir / f".{STATUS}.tmp"
        tmp.write_text(json.dumps(self.status()))
        tmp.replace(self.workdir / STATUS)

    # --- rounds -------------------------------------------------------------------------

    async def close_round(self, stragglers: tuple[int, ...]) -> None:
        self._journal({"t": "close", "round": self.state.round, "stragglers": list(stragglers)})
        record = self.state.close(stragglers)
        log.info("round %s", json.dumps(record))
        await self._after_close()

    async def _after_close(self) -> None:
        if self.training_started is not None:
            self.training_s = time.monotonic() - self.training_started
        if self.state.round % self.spec.checkpoint_every == 0 or self.state.done:
            self._checkpoint()
        self.deadline = time.monotonic() + self.spec.round_timeout_s
        if self.state.done:
            self.export()
        self.write_status()
        async with self.changed:
            self.changed.notify_all()

    def export(self) -> None:
        """The trained model as ONNX, for a DNNModel to reference."""
        if self.spec.algorithm.mode == "codistillation":
            return  # no weights reach the aggregator: each worker keeps its own model
        from edgeai_worker.training.learner import build_model, set_flat
        from edgeai_worker.zoo import export_module, input_spec

        model = build_model(self.spec)
        set_flat(model, self.state.params)
        _, shape, _ = input_spec(self.spec.model)
        self.model_path = export_module(model.eval(), shape, self.workdir / MODEL)

    async def tick(self) -> None:
        """Starts the first round, and closes a round whose stragglers ran out of time."""
        s = self.state
        now = time.monotonic()
        if s.done:
            return
        if not s.started:
            everyone = len(s.alive) >= self.spec.workers
            waited = self.first_contact is not None and now - self.first_contact > max(
                JOIN_WAIT_S, self.spec.round_timeout_s
            )
            if s.alive and (everyone or waited):
                self._journal({"t": "start"})
                s.started = True
                self.deadline = now + self.spec.round_timeout_s
                self.write_status()
                async with self.changed:
                    self.changed.notify_all()
            return
        if self.training_started is None:
            self.training_started = now
        if self.spec.algorithm.mode == "asyncSGD":
            return
        if s.round_complete():
            await self.close_round(())
        elif now > self.deadline:
            late = tuple(sorted(s.expected() - set(s.pending)))
            if s.pending:
                await self.close_round(late)
            else:  # nobody answered (an aggregator restart, say): wait for them again
                for worker in late:
                    s.alive.discard(worker)
                self.deadline = now + self.spec.round_timeout_s


def _update(header: dict[str, Any], payload: bytes, wire_bytes: int) -> Update:
    try:
        return Update(
            worker=int(header["worker"]),
            round=int(header["round"]),
            kind=str(header["kind"]),
            payload=payload,
            loss=float(header["loss"]),
            samples=int(header["samples"]),
            wire_bytes=wire_bytes,
            seq=int(header["seq"]),
            incarnation=str(header["incarnation"]),
            epsilon=None if header.get("epsilon") is None else float(header["epsilon"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise WireError(f"update header field {err} is missing or not a number") from err


SERVER = web.AppKey("server", Server)


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except UpdateRejected as err:
        return web.json_response({"error": str(err)}, status=err.status)
    except (WireError, CompressionError, ValueError) as err:
        return web.json_response({"error": str(err)}, status=400)


def _binary(server: Server, header: dict[str, Any], payload: bytes) -> web.Response:
    body = pack(header, payload)
    server.state.bytes_down += len(body)
    return web.Response(body=body, content_type=CONTENT_TYPE)


async def get_model(request: web.Request) -> web.Response:
    server = request.app[SERVER]
    s = server.state
    try:
        worker = int(request.query["worker"])
        after = int(request.query.get("after", "-1"))
    except (KeyError, ValueError) as err:
        raise ValueError("query needs worker=<index> and after=<round>") from err
    if not 0 <= worker < server.spec.workers:
        raise UpdateRejected(f"worker {worker} is not in 0..{server.spec.workers - 1}", 400)
    if server.first_contact is None:
        server.first_contact = time.monotonic()
    s.alive.add(worker)  # a dropped worker that asks again has rejoined
    asynchronous = server.spec.algorithm.mode == "asyncSGD"
    async with server.changed:
        await server.changed.wait_for(
            lambda: s.done or (s.started and (asynchronous or s.round > after))
        )
    if s.done:
        server.told_done.add(worker)
        async with server.changed:
            server.changed.notify_all()
    header = {
        "round": s.version if asynchronous else s.round,
        "done": s.done,
        "selected": worker in s.selected(s.round),
        "submitted": not asynchronous and worker in s.pending,
    }
    if s.done:
        return _binary(server, header, b"")
    if server.spec.algorithm.mode == "codistillation":
        teacher = b"" if s.teacher is None else s.teacher.astype("<f4").tobytes()
        return _binary(server, header, teacher)
    return _binary(server, header, s.params.astype("<f4").tobytes())


async def get_public(request: web.Request) -> web.Response:
    server = request.app[SERVER]
    inputs = server.state.public_inputs()
    header = {"shape": list(inputs.shape), "public": PUBLIC_SIZE}
    return _binary(server, header, inputs.astype("<f4").tobytes())


async def post_update(request: web.Request) -> web.Response:
    server = request.app[SERVER]
    body = await request.read()
    server.bytes_received += len(body)
    header, payload = unpack(body)
    update = _update(header, payload, len(body))
    decode(update.kind, payload, server.state.update_values())  # refuse what cannot decode
    server.state.accept(update)
    server._journal({"t": "update", "wireBytes": len(body), **header}, payload)
    if server.spec.algorithm.mode == "asyncSGD":
        if not server.state.pending:  # accept closed a round of updates
            log.info("round %s", json.dumps(server.state.history[-1]))
            await server._after_close()
    elif server.state.round_complete():
        await server.close_round(())
    return web.json_response({"accepted": True})


async def get_status(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVER].status())


async def get_model_onnx(request: web.Request) -> web.StreamResponse:
    server = request.app[SERVER]
    if server.model_path is None or not server.model_path.exists():
        phase = server.status()["phase"]
        return web.json_response(
            {"error": f"no model exported yet (phase {phase}; it is written when training ends)"},
            status=404,
        )
    return web.FileResponse(server.model_path, headers={"Content-Type": "application/octet-stream"})


async def _ticker(app: web.Application) -> AsyncIterator[None]:
    server = app[SERVER]

    async def loop() -> None:
        while True:
            await server.tick()
            await asyncio.sleep(POLL_S)

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(server: Server) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=64 << 20)
    app[SERVER] = server
    app.router.add_get("/model", get_model)
    app.router.add_get("/public", get_public)
    app.router.add_post("/update", post_update)
    app.router.add_get("/status", get_status)
    app.router.add_get("/model.onnx", get_model_onnx)
    app.cleanup_ctx.append(_ticker)
    return app


async def serve(
    spec: TrainingSpec, host: str, port: int, workdir: Path, *, keep_serving: bool = False
) -> dict[str, Any]:
    """Runs the aggregator until the job is done and the workers have heard; the final
    status. `keep_serving`: after that, go on answering (`/status`, `/model.onnx`) until
    the process is stopped, so a controller can read the outcome and copy the model."""
    server = Server.restore(spec, workdir)
    server.write_status()
    runner = web.AppRunner(create_app(server))
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("aggregator on %s:%d (pid %d), workdir %s", host, port, os.getpid(), workdir)
    try:
        async with server.changed:
            await server.changed.wait_for(lambda: server.state.done)
        if server.model_path is None:
            server.export()
            server.write_status()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LINGER_S), server.changed:
                await server.changed.wait_for(lambda: server.state.alive <= server.told_done)
        server.write_status()  # with the updates that came in after the last round
        if keep_serving:
            log.info("training done; serving /status and /model.onnx until stopped")
            await asyncio.Event().wait()
    finally:
        await runner.cleanup()
    return server.status()
