"""Dynamic micro-batching for edge and cloud stages.

Requests wait in one queue ordered by (priority high first, deadline earliest first,
arrival). A single runner takes the head, waits up to `max_wait_ms` for more requests
that can share its run (same partition, same per-sample shapes), concatenates them along
the batch axis, runs once, and splits the outputs back. When the stage is saturated the
queue order is what decides who runs next: priority, then earliest deadline.

Runs go to an executor thread so the event loop keeps serving, except for partitions
whose recent runs took less than `INLINE_BELOW_S` (a forwarding identity, a tiny
head): for those the two thread hand-offs cost more than the run, so they run on the
loop, and a request that finds nothing queued or running and no batch to wait for runs
at once in its own handler (the runner would take it next anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeai_worker.metrics import WorkerMetrics
from edgeai_worker.protocol import Array, ProtocolError
from edgeai_worker.runtime import Partition

RunFn = Callable[[Partition, Mapping[str, Array]], dict[str, Array]]

INLINE_BELOW_S = 0.001
# weight of the newest run in a partition's moving average of compute time
_AVERAGE_WEIGHT = 0.2


@dataclass(order=True)
class _Item:
    key: tuple[int, float, int]
    partition: Partition = field(compare=False)
    feeds: Mapping[str, Array] = field(compare=False)
    future: asyncio.Future[tuple[dict[str, Array], float]] = field(compare=False)
    deadline: float = field(compare=False)

    def signature(self) -> tuple[Any, ...]:
        """Requests with the same signature can be concatenated into one run."""
        return (
            id(self.partition),
            tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(self.feeds.items())),
        )

    @property
    def rows(self) -> int:
        first = next(iter(self.feeds.values()))
        return int(first.shape[0]) if first.ndim else 1


class QueueFull(ProtocolError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the stage queue is full ({limit} requests); retry later", status=503)


class DeadlineExceeded(ProtocolError):
    def __init__(self, waited_ms: float) -> None:
        super().__init__(
            f"the request's deadline passed after {waited_ms:.1f} ms in the stage queue",
            status=504,
        )


class MicroBatcher:
    def __init__(
        self,
        run: RunFn,
        *,
        max_batch: int = 1,
        max_wait_ms: float = 2.0,
        max_queue: int = 1024,
        metrics: WorkerMetrics | None = None,
        stage: str = "0",
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._run = run
        self._clock = clock  # times the runs (tests pass their own)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._metrics = metrics
        self._stage = stage
        self._heap: list[_Item] = []
        self._seq = itertools.count()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # partition id -> moving average of its compute seconds; a partition not yet
        # run is absent and runs in the executor
        self._average_s: dict[int, float] = {}
        self._running = False  # the runner is running a batch

    @property
    def depth(self) -> int:
        return len(self._heap)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"batcher-{self._stage}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for item in self._heap:
            if not item.future.done():
                item.future.set_exception(ProtocolError("the worker is shutting down", 503))
        self._heap.clear()

    async def submit(
        self,
        partition: Partition,
        feeds: Mapping[str, Array],
        *,
        priority: int = 0,
        deadline: float | None = None,
    ) -> dict[str, Array]:
        """Queue one request and wait for its outputs. `deadline` is `time.monotonic()`."""
        outputs, _ = await self.submit_timed(partition, feeds, priority=priority, deadline=deadline)
        return outputs

    async def submit_timed(
        self,
        partition: Partition,
        feeds: Mapping[str, Array],
        *,
        priority: int = 0,
        deadline: float | None = None,
    ) -> tuple[dict[str, Array], float]:
        """`submit`, and the seconds of the run that computed the outputs (the whole
        batch's run where the request was batched)."""
        if (
            not self._heap
            and not self._running
            and (self.max_batch == 1 or not partition.batchable)
            and self._average_s.get(id(partition), INLINE_BELOW_S) < INLINE_BELOW_S
        ):
            # Nothing queued or running and nothing to wait for: a fast partition runs
            # here and now, as the runner would, without the two task switches.
            return self._run_now(partition, feeds)
        if len(self._heap) >= self.max_queue:
            raise QueueFull(self.max_queue)
        due = deadline if deadline is not None else float("inf")
        future: asyncio.Future[tuple[dict[str, Array], float]] = (
            asyncio.get_running_loop().create_future()
        )
        item = _Item((-priority, due, next(self._seq)), partition, feeds, future, due)
        heapq.heappush(self._heap, item)
        self._update_depth()
        self._arrived.set()
        return await future

    def _run_now(
        self, partition: Partition, feeds: Mapping[str, Array]
    ) -> tuple[dict[str, Array], float]:
        started = self._clock()
        outputs = self._run(partition, feeds)
        compute_s = self._clock() - started
        self._record(partition, compute_s, 1)
        return outputs, compute_s

    def _record(self, partition: Partition, compute_s: float, rows: int) -> None:
        average = self._average_s.get(id(partition), compute_s)
        self._average_s[id(partition)] = average + _AVERAGE_WEIGHT * (compute_s - average)
        if self._metrics is not None:
            self._metrics.batch_size.observe(rows, stage=self._stage)
            self._metrics.compute_latency.observe(compute_s, stage=self._stage)

    def _update_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(len(self._heap), stage=self._stage)

    def _take_compatible(self, head: _Item) -> list[_Item]:
        """Pop, in queue order, the requests that can join `head`'s run."""
        if self.max_batch == 1 or not head.partition.batchable:
            return []
        signature = head.signature()
        chosen: list[_Item] = []
        rows = head.rows
        rest: list[_Item] = []
        while self._heap:
            item = heapq.heappop(self._heap)
            if item.signature() == signature and rows + item.rows <= self.max_batch:
                chosen.append(item)
                rows += item.rows
            else:
                rest.append(item)
        for item in rest:
            heapq.heappush(self._heap, item)
        return chosen

    def _compatible_count(self, head: _Item) -> int:
        signature = head.signature()
        return sum(item.rows for item in self._heap if item.signature() == signature)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._heap:
                self._arrived.clear()
                await self._arrived.wait()
            head = heapq.heappop(self._heap)
            if head.deadline < time.monotonic():
                head.future.set_exception(DeadlineExceeded(0.0))
                self._update_depth()
                continue
            if self.max_batch > 1 and head.partition.batchable:
                wait_until = loop.time() + self.max_wait_s
                while self._compatible_count(head) + head.rows < self.max_batch:
                    remaining = wait_until - loop.time()
                    if remaining <= 0:
                        break
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), remaining)
                    except TimeoutError:
                        break
            batch = [head, *self._take_compatible(head)]
            self._update_depth()
            batch = [item for item in batch if not item.future.cancelled()]
            if not batch:
                continue
            self._running = True
            try:
                if self._average_s.get(id(head.partition), INLINE_BELOW_S) < INLINE_BELOW_S:
                    outputs, compute_s = self._run_batch(batch)
                else:
                    outputs, compute_s = await loop.run_in_executor(None, self._run_batch, batch)
            except Exception as exc:  # the runtime's error goes to every caller in the batch
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            finally:
                self._running = False
            rows = sum(item.rows for item in batch) if len(batch) > 1 else 1
            self._record(head.partition, compute_s, rows)
            for item, result in zip(batch, outputs, strict=True):
                if not item.future.done():
                    item.future.set_result((result, compute_s))

    def _run_batch(self, batch: list[_Item]) -> tuple[list[dict[str, Array]], float]:
        started = self._clock()
        partition = batch[0].partition
        if len(batch) == 1:
            results = [self._run(partition, batch[0].feeds)]
        else:
            feeds = {
                name: np.concatenate([item.feeds[name] for item in batch], axis=0)
                for name in batch[0].feeds
            }
            merged = self._run(partition, feeds)
            bounds = np.cumsum([item.rows for item in batch])[:-1]
            split = {name: np.split(array, bounds, axis=0) for name, array in merged.items()}
            results = [{name: split[name][i] for name in merged} for i in range(len(batch))]
        return results, self._clock() - started
