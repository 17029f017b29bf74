"""Gossip training: no server. Each worker trains `localSteps` steps a round, then
averages its weights with one peer (push-pull: it sends its weights, the peer answers
with its own, both keep the mean). Peers are the next worker on a ring or a random
one; a peer that does not answer within the round timeout is routed around (the next
one on the ring, or another random one) and tried again a few rounds later.

    POST /exchange  a peer's weights in, this worker's weights out (410 once it is done)
    GET  /health    ready once the worker has its shard and model
    GET  /status    progress as JSON (also written to status.json)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web

from edgeai_worker.training.data import held_out, worker_shard
from edgeai_worker.training.learner import Learner, accuracy, get_flat, set_flat
from edgeai_worker.training.spec import TrainingSpec
from edgeai_worker.training.wire import CONTENT_TYPE, WireError, pack, unpack

log = logging.getLogger("edgeai_worker.training.gossip")

JOIN_WAIT_S = 60.0  # how long a worker waits for its peers to come up before round 1
RETRY_AFTER_ROUNDS = 5  # a peer that failed is skipped for this many rounds
CONNECT_TIMEOUT_S = 5.0  # a peer that does not accept a connection in this long is down
SHUTDOWN_S = 2.0  # a finished worker waits this long for its last exchanges' answers


@dataclass
class GossipWorker:
    spec: TrainingSpec
    index: int
    peers: list[str]  # every worker's URL, by index (this one's included)
    workdir: Path
    learner: Learner = field(init=False)
    round: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    exchanges: int = 0
    routed_around: int = 0
    dead_until: dict[int, int] = field(default_factory=dict)  # peer -> round to retry at
    history: list[dict[str, Any]] = field(default_factory=list)
    accuracy: float = 0.0
    done: bool = False
    model_path: Path | None = None
    training_s: float = 0.0  # from every peer up (or the join wait over) to the last round

    def __post_init__(self) -> None:
        import torch

        torch.set_num_threads(1)
        x, y = worker_shard(self.spec.data, self.spec.workers, self.index, self.spec.seed)
        self.learner = Learner(self.spec, x, y, self.index)
        self.rng = np.random.default_rng([self.spec.seed, self.index])
        self.workdir.mkdir(parents=True, exist_ok=True)

    # --- peers --------------------------------------------------------------------------

    def candidates(self) -> list[int]:
        """Peers to try this round, in order: the ring's next live workers, or the live
        ones in a random order."""
        n = len(self.peers)
        others = [(self.index + k) % n for k in range(1, n)]
        live = [p for p in others if self.dead_until.get(p, 0) <= self.round]
        if self.spec.algorithm.gossip_peers == "random":
            live = [live[i] for i in self.rng.permutation(len(live))]
        return live

    async def exchange(self, session: aiohttp.ClientSession) -> int | None:
        """Averages with the first peer that answers; its index (None: none did)."""
        for peer in self.candidates():
            body = pack({"worker": self.index, "round": self.round}, self._weights())
            try:
                async with session.post(
                    self.peers[peer] + "/exchange",
                    data=body,
                    headers={"Content-Type": CONTENT_TYPE},
                    timeout=aiohttp.ClientTimeout(
                        total=self.spec.round_timeout_s,
                        sock_connect=min(CONNECT_TIMEOUT_S, self.spec.round_timeout_s),
                    ),
                ) as response:
                    answer = await response.read()
                    if response.status != 200:
                        raise WireError(f"peer {peer} answered {response.status}")
            except (TimeoutError, aiohttp.ClientError, WireError) as err:
                log.info("peer %d unreachable (%s): routing around it", peer, err)
                self.dead_until[peer] = self.round + RETRY_AFTER_ROUNDS
                self.routed_around += 1
                continue
            self.bytes_up += len(body)
            self.bytes_down += len(answer)
            _, payload = unpack(answer)
            self._average(payload)
            self.exchanges += 1
            return peer
        return None

    def _weights(self) -> bytes:
        return get_flat(self.learner.model).astype("<f4").tobytes()

    def _average(self, payload: bytes) -> None:
        theirs = np.frombuffer(payload, dtype="<f4")
        mine = get_flat(self.learner.model)
        if len(theirs) != len(mine):
            raise WireError(f"peer sent {len(theirs)} weights, the model has {len(mine)}")
        set_flat(self.learner.model, ((mine + theirs) / 2).astype(np.float32))

    # --- rounds -------------------------------------------------------------------------

    async def train(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await self._wait_for_peers(session)
            started = time.monotonic()
            x_test, y_test = held_out()
            stop = self.spec.stop
            while not self.done:
                loss = self.learner.train_steps(self.spec.algorithm.local_steps)
                peer = await self.exchange(session)
                self.round += 1
                self.accuracy = accuracy(self.learner.model, x_test, y_test)
                self.history.append(
                    {
                        "round": self.round,
                        "accuracy": round(self.accuracy, 4),
                        "loss": round(loss, 4),
                        "peer": peer,
                        "bytesUp": self.bytes_up,
                    }
                )
                self.done = self.accuracy >= stop.target_accuracy or self.round >= stop.max_rounds
                self.training_s = time.monotonic() - started
                self.write_status()
                await asyncio.sleep(0)  # let peers' exchanges in between rounds

    def export(self) -> None:
        """The worker's model as ONNX, for a DNNModel to reference."""
        from edgeai_worker.zoo import export_module, input_spec

        _, shape, _ = input_spec(self.spec.model)
        self.model_path = export_module(
            self.learner.model.eval(), shape, self.workdir / "model.onnx"
        )
        self.write_status()

    async def _wait_for_peers(self, session: aiohttp.ClientSession) -> None:
        until = time.monotonic() + JOIN_WAIT_S
        waiting = set(range(len(self.peers))) - {self.index}
        while waiting and time.monotonic() < until:
            for peer in sorted(waiting):
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(
                        self.peers[peer] + "/health", timeout=aiohttp.ClientTimeout(total=1)
                    ) as response:
                        if response.status == 200:
                            waiting.discard(peer)
            await asyncio.sleep(0.2)

    def status(self) -> dict[str, Any]:
        return {
            "phase": "Succeeded" if self.done else "Running",
            "mode": "gossip",
            "worker": self.index,
            "round": self.round,
            "accuracy": round(self.accuracy, 4),
            "bytesUp": self.bytes_up,
            "bytesDown": self.bytes_down,
            "exchanges": self.exchanges,
            "routedAround": self.routed_around,
            "trainingSeconds": round(self.training_s, 3),
            "epsilon": self.learner.epsilon(),
            "delta": self.spec.privacy.delta if self.spec.privacy else None,
            "model": str(self.model_path) if self.model_path else None,
            "history": self.history,
        }

    def write_status(self) -> None:
        tmp = self.workdir / ".status.json.tmp"
        tmp.write_text(json.dumps(self.status()))
        tmp.replace(self.workdir / "status.json")


GOSSIP = web.AppKey("gossip", GossipWorker)


async def post_exchange(request: web.Request) -> web.Response:
    worker = request.app[GOSSIP]
    body = await request.read()
    if worker.done:  # its model is final (and being exported): peers route around it
        return web.json_response({"error": f"worker {worker.index} is done"}, status=410)
    try:
        _, payload = unpack(body)
        answer = pack({"worker": worker.index, "round": worker.round}, worker._weights())
        worker._average(payload)
    except WireError as err:
        return web.json_response({"error": str(err)}, status=400)
    worker.bytes_down += len(body)
    worker.bytes_up += len(answer)
    return web.Response(body=answer, content_type=CONTENT_TYPE)


async def get_health(request: web.Request) -> web.Response:
    return web.json_response({"ready": True})


async def get_status(request: web.Request) -> web.Response:
    return web.json_response(request.app[GOSSIP].status())


def create_app(worker: GossipWorker) -> web.Application:
    app = web.Application(client_max_size=64 << 20)
    app[GOSSIP] = worker
    app.router.add_post("/exchange", post_exchange)
    app.router.add_get("/health", get_health)
    app.router.add_get("/status", get_status)
    return app


async def serve_gossip(
    spec: TrainingSpec, index: int, host: str, port: int, peers: list[str], workdir: Path
) -> dict[str, Any]:
    """Runs one gossip worker until it reaches the target or the round limit."""
    if len(peers) != spec.workers:
        raise ValueError(f"--peers lists {len(peers)} URLs, the spec has {spec.workers} workers")
    worker = GossipWorker(spec, index, [p.rstrip("/") for p in peers], workdir)
    runner = web.AppRunner(create_app(worker), shutdown_timeout=SHUTDOWN_S)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    try:
        await worker.train()
        await finish(worker)
    finally:
        await runner.cleanup()
    return worker.status()


async def finish(worker: GossipWorker) -> None:
    """Exports the final model while still listening. The export runs in a thread, so
    the event loop answers every exchange that arrives meanwhile with 410 at once; a
    peer routes around this worker instead of waiting out its round timeout on a
    connection that a closing server holds open (what closing first did)."""
    await asyncio.to_thread(worker.export)
