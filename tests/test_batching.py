"""Dynamic micro-batching on a real onnxruntime partition: merging, splitting back,
priority then earliest-deadline-first when saturated, queue limits and deadlines."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from _worker_support import ChainModel, build_conv_chain, run_onnx, until
from edgeai_worker.batching import DeadlineExceeded, MicroBatcher, QueueFull
from edgeai_worker.metrics import WorkerMetrics
from edgeai_worker.protocol import Array
from edgeai_worker.runtime import Partition


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ChainModel:
    return build_conv_chain(tmp_path_factory.mktemp("batching") / "chain.onnx", hw=16)


@pytest.fixture(scope="module")
def partition(model: ChainModel) -> Partition:
    p = Partition(model.path)
    p.load()
    return p


def _x(model: ChainModel, seed: int, rows: int = 1) -> Array:
    shape = (rows, *model.input_shape[1:])
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


async def test_concurrent_requests_share_one_run_and_split_back(
    model: ChainModel, partition: Partition
) -> None:
    metrics = WorkerMetrics()
    batcher = MicroBatcher(lambda p, f: p.run(f), max_batch=8, max_wait_ms=3000, metrics=metrics)
    await batcher.start()
    try:
        inputs = [_x(model, i) for i in range(8)]
        started = time.perf_counter()
        outputs = await asyncio.gather(*(batcher.submit(partition, {"input": x}) for x in inputs))
        elapsed = time.perf_counter() - started
    finally:
        await batcher.stop()
    assert partition.batchable
    for x, out in zip(inputs, outputs, strict=True):
        np.testing.assert_allclose(
            out["output"], run_onnx(model.path, {"input": x})[0], rtol=1e-5, atol=1e-6
        )
    # Eight requests, one run of eight: it ran as soon as the batch was full, long before
    # the 3 s window ended.
    assert metrics.batch_size.count(stage="0") == 1
    assert metrics.batch_size.sums[(("stage", "0"),)] == 8
    assert elapsed < 1.5


async def test_batch_waits_at_most_max_wait(model: ChainModel, partition: Partition) -> None:
    metrics = WorkerMetrics()
    batcher = MicroBatcher(lambda p, f: p.run(f), max_batch=8, max_wait_ms=30, metrics=metrics)
    await batcher.start()
    try:
        started = time.perf_counter()
        await asyncio.gather(
            *(batcher.submit(partition, {"input": _x(model, i)}) for i in range(3))
        )
        elapsed = time.perf_counter() - started
    finally:
        await batcher.stop()
    assert metrics.batch_size.count(stage="0") == 1  # three requests, one run
    assert 0.03 <= elapsed < 2.0


async def test_multi_row_requests_and_batch_limit(model: ChainModel, partition: Partition) -> None:
    metrics = WorkerMetrics()
    batcher = MicroBatcher(lambda p, f: p.run(f), max_batch=4, max_wait_ms=50, metrics=metrics)
    await batcher.start()
    try:
        inputs = [_x(model, i, rows=2) for i in range(4)]  # 8 rows, 4 per run at most
        outputs = await asyncio.gather(*(batcher.submit(partition, {"input": x}) for x in inputs))
    finally:
        await batcher.stop()
    for x, out in zip(inputs, outputs, strict=True):
        assert out["output"].shape == (2, 10)
        np.testing.assert_allclose(
            out["output"], run_onnx(model.path, {"input": x})[0], rtol=1e-5, atol=1e-6
        )
    assert metrics.batch_size.count(stage="0") == 2


async def test_saturated_stage_serves_priority_then_earliest_deadline(
    model: ChainModel, partition: Partition
) -> None:
    gate = threading.Event()
    order: list[int] = []
    loop = asyncio.get_running_loop()
    first_running = asyncio.Event()

    def run(p: Partition, feeds: Mapping[str, Array]) -> dict[str, Array]:
        order.append(int(feeds["input"][0, 0, 0, 0]))
        if len(order) == 1:
            loop.call_soon_threadsafe(first_running.set)
            gate.wait(10)  # the first run holds the stage busy while the queue fills
        return p.run(feeds)

    batcher = MicroBatcher(run, max_batch=1)
    await batcher.start()
    now = time.monotonic()

    def tagged(tag: int) -> Array:
        x = _x(model, tag)
        x[0, 0, 0, 0] = tag
        return x

    busy = asyncio.create_task(batcher.submit(partition, {"input": tagged(0)}))
    await asyncio.wait_for(first_running.wait(), 10)
    # (tag, priority, deadline seconds from now)
    queued = [(1, 0, 9.0), (2, 0, 3.0), (3, 10, 8.0), (4, 10, 2.0), (5, 5, None), (6, 0, None)]
    tasks = [
        asyncio.create_task(
            batcher.submit(
                partition,
                {"input": tagged(tag)},
                priority=priority,
                deadline=None if due is None else now + due,
            )
        )
        for tag, priority, due in queued
    ]
    await until(lambda: batcher.depth == len(queued), "every request to queue")
    gate.set()
    await asyncio.gather(busy, *tasks)
    await batcher.stop()
    assert order == [0, 4, 3, 5, 2, 1, 6]


async def test_queue_limit_and_expired_deadline(model: ChainModel, partition: Partition) -> None:
    gate = threading.Event()
    loop = asyncio.get_running_loop()
    first_running = asyncio.Event()

    def run(p: Partition, feeds: Mapping[str, Array]) -> dict[str, Array]:
        loop.call_soon_threadsafe(first_running.set)
        gate.wait(10)
        return p.run(feeds)

    batcher = MicroBatcher(run, max_batch=1, max_queue=2)
    await batcher.start()
    x = {"input": _x(model, 0)}
    first = asyncio.create_task(batcher.submit(partition, x))
    await asyncio.wait_for(first_running.wait(), 10)  # the runner holds it: the queue is empty
    # A deadline already past when the runner reaches it, however fast the machine
    expired = time.monotonic() - 1.0
    waiting = [asyncio.create_task(batcher.submit(partition, x, deadline=expired))]
    waiting.append(asyncio.create_task(batcher.submit(partition, x)))
    await until(lambda: batcher.depth == 2, "both requests to queue")
    with pytest.raises(QueueFull) as full:
        await batcher.submit(partition, x)
    assert full.value.status == 503
    assert "queue is full (2 requests)" in str(full.value)
    gate.set()
    await first
    with pytest.raises(DeadlineExceeded) as late:
        await waiting[0]
    assert late.value.status == 504
    assert (await waiting[1])["output"].shape == (1, 10)
    await batcher.stop()


async def test_fixed_batch_model_runs_requests_one_by_one(tmp_path: Path) -> None:
    import onnx

    fixed = build_conv_chain(tmp_path / "fixed.onnx", hw=8)
    proto = onnx.load(str(fixed.path))
    for value in [*proto.graph.input, *proto.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(proto, str(tmp_path / "fixed1.onnx"))
    p = Partition(tmp_path / "fixed1.onnx")
    p.load()
    assert not p.batchable
    metrics = WorkerMetrics()
    batcher = MicroBatcher(lambda q, f: q.run(f), max_batch=8, max_wait_ms=50, metrics=metrics)
    await batcher.start()
    try:
        outs = await asyncio.gather(*(batcher.submit(p, {"input": _x(fixed, i)}) for i in range(3)))
    finally:
        await batcher.stop()
    assert [o["output"].shape for o in outs] == [(1, 10)] * 3
    assert metrics.batch_size.count(stage="0") == 3


class _Clock:
    """The batcher's clock in tests: runs take what the test says."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_fast_runs_stay_on_the_event_loop_and_slow_ones_do_not(
    model: ChainModel, partition: Partition
) -> None:
    threads: list[str] = []
    delay_s = {"value": 0.0001}
    clock = _Clock()

    def run(p: Partition, feeds: Mapping[str, Array]) -> dict[str, Array]:
        # Each run takes `delay_s` on the batcher's clock, however loaded the machine.
        threads.append(threading.current_thread().name)
        clock.now += delay_s["value"]
        return p.run(feeds)

    batcher = MicroBatcher(run, max_batch=1, clock=clock)
    x = {"input": _x(model, 0)}
    (expected,) = run_onnx(model.path, x)
    await batcher.start()
    loop_thread = threading.current_thread().name
    for _ in range(3):
        (out,) = (await batcher.submit(partition, x)).values()
        assert np.allclose(out, expected, rtol=1e-6, atol=1e-6)
    # the first run (nothing known yet) goes to the executor, the fast ones after it not
    assert threads[0] != loop_thread
    assert threads[1:] == [loop_thread, loop_thread]
    # runs that become slow move back to the executor once the average says so
    delay_s["value"] = 0.02
    for _ in range(3):
        await batcher.submit(partition, x)
    assert threads[-1] != loop_thread
    await batcher.stop()


async def test_a_fast_run_with_nothing_queued_is_answered_without_a_task_switch(
    model: ChainModel, partition: Partition
) -> None:
    """With nothing queued or running and no batch to wait for, a fast partition runs in
    the caller's own task (the runner would take it next anyway): the event loop runs
    nothing else meanwhile. With batching on, the request goes through the queue."""

    clock = _Clock()

    def double(p: Partition, feeds: Mapping[str, Array]) -> dict[str, Array]:
        clock.now += 0.0001  # a run of 0.1 ms on the batcher's clock
        return {"output": feeds["input"] * 2}

    loop = asyncio.get_running_loop()
    x = {"input": _x(model, 3)}
    metrics = WorkerMetrics()
    single = MicroBatcher(double, max_batch=1, metrics=metrics, clock=clock)
    batching = MicroBatcher(double, max_batch=4, max_wait_ms=1, clock=clock)
    await single.start()
    await batching.start()
    try:
        await single.submit(partition, x)  # the first run (nothing known yet): the executor
        await batching.submit(partition, x)
        other: list[str] = []
        loop.call_soon(other.append, "ran")
        outputs, compute_s = await single.submit_timed(partition, x)
        assert other == []  # answered without yielding to the loop
        await asyncio.sleep(0)  # one turn of the loop: the callback queued above runs
        assert other == ["ran"]
        other.clear()
        loop.call_soon(other.append, "ran")
        batched = await batching.submit(partition, x)
        assert other == ["ran"]  # through the queue and the runner task
    finally:
        await single.stop()
        await batching.stop()
    assert partition.batchable
    for out in (outputs["output"], batched["output"]):
        np.testing.assert_array_equal(out, x["input"] * 2)
    assert compute_s == pytest.approx(0.0001)
    # the fast path keeps the same books: two runs, their compute times observed
    assert metrics.batch_size.count(stage="0") == 2
    assert metrics.compute_latency.count(stage="0") == 2
