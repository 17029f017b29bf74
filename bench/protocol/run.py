"""Protocol benchmark: one worker process on loopback, the same requests over REST with
binary tensor data, REST with JSON (orjson, and the replaced json-module path side by
side) and gRPC, for a 1x3x224x224 conv model and an 8x64 MLP, with one client and with
four concurrent ones; and a two-stage chain forwarding over HTTP and over gRPC.

    python bench/protocol/run.py [--requests 100] [--rounds 5] [--conditions "..."]

Clients run as threads of this process (one keep-alive connection or channel each) and
encode every request and decode every answer with the worker's own codecs, so a row
is the whole round trip; each row names its client (`CLIENTS_USED`). The rows of one
model and client count are measured in turns (`--rounds` slices of each in rotation),
so a change in the load of the shared machine falls on all of them alike. The result
goes to docs/results/protocol.json, which `make docs-numbers` renders into
docs/dataplane.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))  # the renderer beside the benches
sys.path.insert(0, str(ROOT / "tests"))  # the test models and worker processes

import grpc  # noqa: E402

import render_numbers  # noqa: E402
from _worker_support import (  # noqa: E402
    Worker,
    build_conv_chain,
    build_mlp,
    extract,
    free_port,
    start_worker,
)
from edgeai_worker import grpc_predict_v2_pb2 as pb  # noqa: E402
from edgeai_worker import protocol  # noqa: E402
from edgeai_worker.grpc_codec import parse_infer_response, serialize_infer_request  # noqa: E402
from edgeai_worker.protocol import InferRequest, Tensor  # noqa: E402

CLIENTS = (1, 4)
# mode -> (transport, JSON codec of worker and client, binary tensors)
MODES = {
    "rest_binary": ("rest", "orjson", True),
    "rest_json": ("rest", "orjson", False),
    "rest_json_stdlib": ("rest", "stdlib", False),
    "grpc": ("grpc", "orjson", True),
}
# mode -> the client of its rows
CLIENTS_USED = {
    "rest_binary": "http.client, the worker's REST codec (binary)",
    "rest_json": "http.client, the worker's REST codec (orjson)",
    "rest_json_stdlib": "http.client, the worker's REST codec (json module)",
    "grpc": "grpc sync stub (Channel.unary_unary), the worker's gRPC wire codec",
}

Call = Callable[[], np.ndarray]


def _connection(url: str) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=120)


def _exchange(
    connection: http.client.HTTPConnection,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[bytes, http.client.HTTPResponse]:
    """One request on a kept connection; its body and reply, raising on any status but 200."""
    connection.request(method, path, body, dict(headers or {}))
    reply = connection.getresponse()
    data = reply.read()
    if reply.status != 200:
        raise RuntimeError(f"{reply.status}: {data[:300]!r}")
    return data, reply


def _stub(target: str, method: str, deserializer: Callable[[bytes], Any] | None) -> Any:
    """A plain unary stub on a new channel: requests go as the bytes given."""
    channel = grpc.insecure_channel(target)
    return channel.unary_unary(method, request_serializer=None, response_deserializer=deserializer)


def _rest_caller(url: str, model: str, x: np.ndarray, binary: bool) -> Callable[[], Call]:
    def make() -> Call:
        connection = _connection(url)

        def call() -> np.ndarray:
            request = InferRequest(
                [Tensor.from_numpy("input", x)],
                parameters={"binary_data_output": True} if binary else {},
            )
            body, headers = protocol.encode_request(request, binary=binary)
            data, reply = _exchange(connection, "POST", f"/v2/models/{model}/infer", body, headers)
            length = reply.getheader(protocol.HEADER_LENGTH)
            response = protocol.decode_response(data, int(length) if length else None)
            return response.outputs[0].array

        return call

    return make


def _grpc_caller(target: str, model: str, x: np.ndarray) -> Callable[[], Call]:
    def make() -> Call:
        # a plain stub, no client library on top: the request with raw_input_contents
        # as the worker's forwarder writes it, the reply parsed as it reads it
        stub = _stub(target, "/inference.GRPCInferenceService/ModelInfer", parse_infer_response)

        def call() -> np.ndarray:
            request = serialize_infer_request(InferRequest([Tensor.from_numpy("input", x)]), model)
            response = stub(request, timeout=120)
            return response.outputs[0].array

        return call

    return make


@dataclass(frozen=True)
class Row:
    """What a row measures: a client maker, its request count, the serving worker."""

    make: Callable[[], Call]
    requests: int
    worker: Worker


def _cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds so far of a process's main thread (the worker's event loop, where
    aiohttp and grpc.aio run the handlers) and of its other threads together (gRPC's
    own, onnxruntime's)."""
    tick = os.sysconf("SC_CLK_TCK")
    main = other = 0.0
    for task in os.listdir(f"/proc/{pid}/task"):
        fields = Path(f"/proc/{pid}/task/{task}/stat").read_text().rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / tick
        if int(task) == pid:
            main = seconds
        else:
            other += seconds
    return main, other


def _slice(calls: list[Call], per_client: int, latencies: list[float]) -> float:
    """`per_client` calls on each of `calls`, one thread each; the wall seconds taken."""
    lock = threading.Lock()

    def run(call: Call) -> None:
        for _ in range(per_client):
            started = time.perf_counter()
            call()
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def measure_in_turns(
    rows: dict[str, Row], clients: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Each row's requests spread over `clients` threads after one warm-up call each,
    in `rounds` slices taken in rotation with the other rows' slices: p50/p95 latency,
    throughput, and CPU microseconds per request of this process (the client side)
    and of the worker's event loop and its other threads."""
    calls = {name: [row.make() for _ in range(clients)] for name, row in rows.items()}
    for each in calls.values():
        for call in each:
            call()
    latencies: dict[str, list[float]] = {name: [] for name in rows}
    spent = {name: [0.0, 0.0, 0.0, 0.0] for name in rows}  # wall, client, loop, other
    for turn in range(rounds):
        for name, row in rows.items():
            # the requests of a slice per client; the last slice takes what is left
            per_client = max(1, row.requests // clients)
            share = per_client // rounds
            if turn == rounds - 1:
                share = per_client - share * (rounds - 1)
            if share > 0:
                client, (loop, other) = time.process_time(), _cpu_s(row.worker.process.pid)
                wall_s = _slice(calls[name], share, latencies[name])
                loop_after, other_after = _cpu_s(row.worker.process.pid)
                for i, amount in enumerate(
                    (wall_s, time.process_time() - client, loop_after - loop, other_after - other)
                ):
                    spent[name][i] += amount
    return {name: _summary(latencies[name], *spent[name]) for name in rows}


def _summary(
    latencies: list[float], wall_s: float, client_s: float, loop_s: float, other_s: float
) -> dict[str, float]:
    latencies.sort()
    per_request_us = 1e6 / len(latencies)
    return {
        "clientCpuUs": round(client_s * per_request_us),
        "serverLoopCpuUs": round(loop_s * per_request_us),
        "serverThreadsCpuUs": round(other_s * per_request_us),
        "p50Ms": round(statistics.median(latencies) * 1000, 3),
        "p95Ms": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] * 1000, 3),
        "perSecond": round(len(latencies) / wall_s, 1),
        "requests": len(latencies),
    }


@contextlib.contextmanager
def _worker(tmp: Path, settings: dict[str, Any]) -> Iterator[Worker]:
    worker = start_worker(tmp, {"intra_op_threads": 1, **settings})
    try:
        yield worker
    finally:
        worker.stop()


def _with_codec(codec: str, make: Callable[[], Call]) -> Call:
    """A call of `make` with the client's JSON codec set to the mode's (the turns
    interleave)."""
    call = make()

    def wrapped() -> np.ndarray:
        protocol.set_json_codec(codec)
        return call()

    return wrapped


def bench_model(
    tmp: Path, name: str, path: Path, x: np.ndarray, requests: int, rounds: int
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    grpc_port = free_port()
    fast = {"model_name": name, "partitions": [str(path)], "grpc_port": grpc_port}
    slow = {"model_name": name, "partitions": [str(path)], "json_codec": "stdlib"}
    with _worker(tmp, fast) as orjson_worker, _worker(tmp, slow) as stdlib_worker:
        makes: dict[str, Row] = {}
        for mode, (transport, codec, binary) in MODES.items():
            worker = stdlib_worker if codec == "stdlib" else orjson_worker
            if transport == "grpc":
                make = _grpc_caller(f"127.0.0.1:{grpc_port}", name, x)
            else:
                make = _rest_caller(worker.url, name, x, binary)
            # the JSON-module path is slow on the conv input: fewer requests there
            count = requests // 4 if codec == "stdlib" and x.size > 10_000 else requests
            makes[mode] = Row(functools.partial(_with_codec, codec, make), count, worker)
        for clients in CLIENTS:
            results = measure_in_turns(makes, clients, rounds)
            for mode, result in results.items():
                print(f"[bench] {name} {mode} x{clients}: {result}", file=sys.stderr, flush=True)
                row = {"model": name, "mode": mode, "clients": clients, **result}
                rows.append(row | {"client": CLIENTS_USED[mode]})
    protocol.set_json_codec("orjson")
    return rows


# A bare grpc.aio server in a process of its own: one method that answers its empty
# request with an empty reply; what any Python gRPC server costs per call at least.
NOOP_SERVER = """
import asyncio, sys
import grpc

def same(data):
    return data

async def noop(request, context):
    return b""

async def main():
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(
        noop, request_deserializer=same, response_serializer=same
    )
    service = grpc.method_handlers_generic_handler("bench", {"Noop": handler})
    server.add_generic_rpc_handlers((service,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


def _health_caller(url: str) -> Callable[[], Call]:
    def make() -> Call:
        connection = _connection(url)

        def call() -> np.ndarray:
            _exchange(connection, "GET", "/v2/health/live")
            return np.empty(0)

        return call

    return make


def _grpc_empty_caller(target: str, method: str, request: bytes) -> Callable[[], Call]:
    def make() -> Call:
        stub = _stub(target, method, None)

        def call() -> np.ndarray:
            stub(request, timeout=120)
            return np.empty(0)

        return call

    return make


def bench_floor(tmp: Path, path: Path, requests: int, rounds: int) -> dict[str, Any]:
    """What a call costs with no model: the worker's REST health check, its gRPC
    ServerLive, and a bare grpc.aio server's no-op method, with the clients of the
    rows above (http.client; a plain gRPC stub). The last is the least any Python gRPC
    server answers in here."""
    grpc_port = free_port()
    settings = {"model_name": "mlp", "partitions": [str(path)], "grpc_port": grpc_port}
    noop_log = tmp / "noop.err"
    with noop_log.open("wb") as err:
        noop = subprocess.Popen(
            [sys.executable, "-c", NOOP_SERVER], stdout=subprocess.PIPE, stderr=err
        )
    try:
        assert noop.stdout is not None
        line = noop.stdout.readline()
        if not line.strip():
            raise RuntimeError(f"the no-op gRPC server did not start:\n{noop_log.read_text()}")
        noop_port = int(line)
        bare = Worker(noop, f"grpc://127.0.0.1:{noop_port}", tmp / "noop.log")
        with _worker(tmp, settings) as worker:
            live = pb.ServerLiveRequest().SerializeToString()
            makes = {
                "rest_health": Row(_health_caller(worker.url), requests, worker),
                "grpc_server_live": Row(
                    _grpc_empty_caller(
                        f"127.0.0.1:{grpc_port}", "/inference.GRPCInferenceService/ServerLive", live
                    ),
                    requests,
                    worker,
                ),
                "grpc_noop": Row(
                    _grpc_empty_caller(f"127.0.0.1:{noop_port}", "/bench/Noop", b""),
                    requests,
                    bare,
                ),
            }
            results = measure_in_turns(makes, 1, rounds)
    finally:
        noop.kill()
        noop.wait()
    for mode, result in results.items():
        print(f"[bench] floor {mode}: {result}", file=sys.stderr, flush=True)
    rest = results["rest_health"]["p50Ms"]
    return {
        "rows": [{"mode": mode, "clients": 1, **result} for mode, result in results.items()],
        "grpcNoopOverRestHealth": round(results["grpc_noop"]["p50Ms"] / rest, 3),
        "grpcServerLiveOverRestHealth": round(results["grpc_server_live"]["p50Ms"] / rest, 3),
    }


def bench_chain(tmp: Path, requests: int, rounds: int) -> list[dict[str, Any]]:
    """A conv model cut in two stages: the first forwards to the second over HTTP or
    over gRPC (two first stages, one second stage serving both; the client talks REST
    binary to the first stage both times)."""
    chain = build_conv_chain(tmp / "chain224.onnx", hw=224)
    cut = chain.cuts[0]
    head = extract(chain.path, ["input"], [cut], tmp / "head.onnx")
    tail = extract(chain.path, [cut], ["output"], tmp / "tail.onnx")
    x = np.random.default_rng(1).standard_normal(chain.input_shape).astype(np.float32)
    rows: list[dict[str, Any]] = []
    grpc_port = free_port()
    last = {"model_name": "chain", "partitions": [str(tail)], "grpc_port": grpc_port}
    with contextlib.ExitStack() as stack:
        second = stack.enter_context(_worker(tmp, last))
        makes: dict[str, Row] = {}
        for transport in ("http", "grpc"):
            next_url = second.url if transport == "http" else f"grpc://127.0.0.1:{grpc_port}"
            first = {"model_name": "chain", "partitions": [str(head)], "next_urls": [next_url]}
            front = stack.enter_context(_worker(tmp, first))
            makes[transport] = Row(_rest_caller(front.url, "chain", x, True), requests, front)
        for clients in CLIENTS:
            for transport, result in measure_in_turns(makes, clients, rounds).items():
                print(f"[bench] chain {transport} x{clients}: {result}", file=sys.stderr)
                rows.append({"forwarding": transport, "clients": clients, **result})
    return rows


def _row(rows: list[dict[str, Any]], model: str, mode: str, clients: int) -> dict[str, Any]:
    return next(
        r for r in rows if r["model"] == model and r["mode"] == mode and r["clients"] == clients
    )


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """p50 ratios, one client: gRPC / REST binary and JSON / binary per model, and the
    orjson path / the json-module path."""
    out: dict[str, float] = {}
    for model in ("conv", "mlp"):
        binary = _row(rows, model, "rest_binary", 1)["p50Ms"]
        out[f"{model}GrpcOverBinary"] = round(_row(rows, model, "grpc", 1)["p50Ms"] / binary, 3)
        out[f"{model}JsonOverBinary"] = round(
            _row(rows, model, "rest_json", 1)["p50Ms"] / binary, 3
        )
        out[f"{model}JsonOrjsonOverStdlib"] = round(
            _row(rows, model, "rest_json", 1)["p50Ms"]
            / _row(rows, model, "rest_json_stdlib", 1)["p50Ms"],
            3,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100, help="requests per row")
    parser.add_argument(
        "--rounds", type=int, default=5, help="slices per row, taken in turns with the others"
    )
    render_numbers.add_result_arguments(parser, "protocol.json")
    args = parser.parse_args(argv)
    started = time.monotonic()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="edgeai-protocol-") as name:
        tmp = Path(name)
        conv = build_conv_chain(tmp / "conv224.onnx", hw=224).path
        mlp = build_mlp(tmp / "mlp.onnx")
        rng = np.random.default_rng(0)
        rows = bench_model(
            tmp,
            "conv",
            conv,
            rng.standard_normal((1, 3, 224, 224)).astype(np.float32),
            args.requests,
            args.rounds,
        )
        mlp_x = rng.standard_normal((8, 64)).astype(np.float32)
        rows += bench_model(tmp, "mlp", mlp, mlp_x, args.requests * 4, args.rounds)
        chain = bench_chain(tmp, args.requests, args.rounds)
        floor = bench_floor(tmp, mlp, args.requests * 4, args.rounds)
    report = {
        "kind": "ProtocolBench",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "conditions": args.conditions,
        "cpus": os.cpu_count(),
        # 1-minute load average when the run started and ended (other work shares the CPUs)
        "loadAverage": [round(load_before[0], 1), round(os.getloadavg()[0], 1)],
        "models": {
            "conv": "conv chain 3-8-16-16 channels, 3x3 kernels, input 1x3x224x224 FP32",
            "mlp": "64-128-10 MLP, input 8x64 FP32",
        },
        "rows": rows,
        "chain": chain,
        "floor": floor,
        "ratios": ratios(rows),
        "seconds": round(time.monotonic() - started, 1),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(render_numbers.protocol_table(report))
    print(render_numbers.protocol_summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
