"""A training worker: trains on its shard and talks to the aggregator over HTTP.

Each round it fetches the model (long-polling until the round it last worked on is
closed), trains `localSteps` steps and sends its update compressed (with error
feedback). syncSGD, asyncSGD and FedAvg send the change of the weights; EASGD keeps its
own weights and sends the elastic move alpha * (local - centre); codistillation sends
its predictions on the shared public batch and distils from the ensemble's.
A lost connection (the aggregator restarting) is retried until it comes back.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np

from edgeai_worker.training.compressors import Compressor
from edgeai_worker.training.data import worker_shard
from edgeai_worker.training.learner import Learner, get_flat, set_flat
from edgeai_worker.training.spec import TrainingSpec
from edgeai_worker.training.wire import CONTENT_TYPE, pack, unpack

log = logging.getLogger("edgeai_worker.training.worker")

RECONNECT_S = 60.0  # how long a worker keeps trying to reach a restarting aggregator


class AggregatorGone(RuntimeError):
    """The aggregator did not answer for RECONNECT_S."""


@dataclass
class WorkerStats:
    rounds: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    epsilon: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "bytesUp": self.bytes_up,
            "bytesDown": self.bytes_down,
            "epsilon": self.epsilon,
        }


class Worker:
    def __init__(
        self,
        spec: TrainingSpec,
        index: int,
        url: str,
        delay_s: float = 0.0,
        delay_updates: int | None = None,
    ) -> None:
        import torch

        torch.set_num_threads(1)
        self.spec = spec
        self.index = index
        self.url = url.rstrip("/")
        # a deliberately slow worker (for straggler tests): its first `delay_updates`
        # updates (all, if None) wait `delay_s` before they are sent
        self.delay_s = delay_s
        self.delay_updates = delay_updates
        x, y = worker_shard(spec.data, spec.workers, index, spec.seed)
        self.learner = Learner(spec, x, y, index)
        self.compressor = Compressor(
            spec.compression, len(get_flat(self.learner.model)), spec.seed * 1000 + index
        )
        self.stats = WorkerStats()
        self.seq = 0
        self.incarnation = uuid.uuid4().hex[:12]
        self.public: Any = None  # codistillation: torch tensor of public + held-out inputs
        self.public_rows = 0

    async def _request(
        self, session: aiohttp.ClientSession, method: str, path: str, body: bytes | None = None
    ) -> tuple[int, bytes]:
        until = time.monotonic() + RECONNECT_S
        while True:
            try:
                async with session.request(
                    method,
                    self.url + path,
                    data=body,
                    headers={"Content-Type": CONTENT_TYPE} if body is not None else None,
                ) as response:
                    data = await response.read()
                    if body is not None:
                        self.stats.bytes_up += len(body)
                    if response.status == 200:
                        self.stats.bytes_down += len(data)
                    return response.status, data
            except (TimeoutError, aiohttp.ClientConnectionError) as err:
                if time.monotonic() > until:
                    raise AggregatorGone(f"{self.url} unreachable for {RECONNECT_S}s") from err
                await asyncio.sleep(0.2)

    async def run(self) -> WorkerStats:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            if self.spec.algorithm.mode == "codistillation":
                await self._fetch_public(session)
            after = -1
            while True:
                status, body = await self._request(
                    session, "GET", f"/model?worker={self.index}&after={after}"
                )
                if status != 200:
                    raise RuntimeError(f"GET /model answered {status}: {body[:200]!r}")
                header, payload = unpack(body)
                if header["done"]:
                    return self.stats
                round_ = int(header["round"])
                if header["selected"] and not header["submitted"]:
                    update = self._train(round_, payload)
                    if self.delay_s and (
                        self.delay_updates is None or self.seq <= self.delay_updates
                    ):
                        await asyncio.sleep(self.delay_s)
                    status, answer = await self._request(session, "POST", "/update", update)
                    if status not in (200, 409):  # 409: stale or already sent; go on
                        raise RuntimeError(f"POST /update answered {status}: {answer[:200]!r}")
                    self.stats.rounds += 1
                after = round_

    async def _fetch_public(self, session: aiohttp.ClientSession) -> None:
        import torch

        _, body = await self._request(session, "GET", "/public")
        header, payload = unpack(body)
        inputs = np.frombuffer(payload, dtype="<f4").reshape(header["shape"])
        self.public = torch.from_numpy(inputs.copy())
        self.public_rows = int(header["public"])

    def _train(self, round_: int, payload: bytes) -> bytes:
        import torch

        mode = self.spec.algorithm.mode
        steps = self.spec.algorithm.local_steps
        learner = self.learner
        if mode == "codistillation":
            teacher = None
            if payload:
                probs = np.frombuffer(payload, dtype="<f4").reshape(-1, 10).copy()
                teacher = (self.public[: self.public_rows], torch.from_numpy(probs))
            loss = learner.train_steps(steps, teacher)
            learner.model.eval()
            with torch.no_grad():
                logits = learner.model(self.public).numpy().astype(np.float32).reshape(-1)
            learner.model.train()
            sent = logits.astype("<f4").tobytes()
            kind = "none"
        else:
            centre = np.frombuffer(payload, dtype="<f4").astype(np.float32)
            if mode == "easgd":
                if round_ == 0 and self.stats.rounds == 0:
                    set_flat(learner.model, centre)
                loss = learner.train_steps(steps)
                local = get_flat(learner.model)
                move = (self.spec.algorithm.moving_rate * (local - centre)).astype(np.float32)
                sent, decoded = self.compressor.compress(move)
                set_flat(learner.model, local - decoded)
            else:
                set_flat(learner.model, centre)
                loss = learner.train_steps(steps)
                sent, _ = self.compressor.compress(get_flat(learner.model) - centre)
            kind = self.spec.compression.kind
        self.stats.epsilon = learner.epsilon()
        header = {
            "worker": self.index,
            "round": round_,
            "seq": self.seq,
            "incarnation": self.incarnation,
            "kind": kind,
            "loss": round(loss, 5),
            "samples": self._weight(),
            "epsilon": self.stats.epsilon,
        }
        self.seq += 1
        return pack(header, sent)

    def _weight(self) -> int:
        """How much this update counts in the average: FedAvg weighs by shard size."""
        if self.spec.algorithm.mode == "fedavg":
            return self.learner.size
        return min(self.spec.algorithm.batch_size, self.learner.size) * (
            self.spec.algorithm.local_steps
        )
