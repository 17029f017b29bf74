"""What the benchmark runs inside a namespace: profiling, an OIP client, a raw aiohttp
echo server and the per-hop comparison. Prints one JSON object on stdout."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np


def _connection(url: str) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    return http.client.HTTPConnection(
        parts.hostname or "", parts.port or 80, timeout=120
    ), parts.path


def oip_body(x: np.ndarray, request_id: str) -> tuple[bytes, dict[str, str]]:
    raw = x.astype("<f4").tobytes()
    header = json.dumps(
        {
            "id": request_id,
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return header + raw, {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }


def cmd_profile(args: argparse.Namespace) -> dict[str, Any]:
    from edgeai_worker.profiler import profile_model

    return profile_model(
        args.model, repeats=args.repeats, warmup=2, threads=args.threads, gflops=1.0, progress=None
    )


def cmd_client(args: argparse.Namespace) -> dict[str, Any]:
    """Send the input `--requests` times (or for `--duration-s`), one at a time, binary in
    and out (each after `--pause-ms` idle); latencies, the device's split per request and
    each request's start time.
    With several `--url`s the requests go to each in turn (`--counts` per URL), so that
    all see the same conditions; `per_url` has each one's latencies."""
    from edgeai_worker.profiler import post_timed

    x = np.load(args.input)
    targets = [_connection(url) for url in args.url]
    counts = [int(c) for c in args.counts.split(",")] if args.counts else None
    if counts is None:
        counts = [args.requests] * len(targets)
    if len(counts) != len(targets):
        raise SystemExit(f"{len(counts)} counts for {len(targets)} URLs")
    latencies: list[list[float]] = [[] for _ in targets]
    splits: list[str] = []
    offsets: list[float] = []
    begin = time.perf_counter()
    i = 0
    while True:
        if args.duration_s is None and i >= args.warmup + max(counts):
            break
        if args.duration_s is not None and time.perf_counter() - begin >= args.duration_s:
            break
        for j, (conn, path) in enumerate(targets):
            if args.duration_s is None and i >= args.warmup + counts[j]:
                continue
            body, headers = oip_body(x, f"bench-{os.getpid()}-{i}-{j}")  # workers dedupe ids
            time.sleep(args.pause_ms / 1000.0)
            started = time.perf_counter()
            elapsed, resp, data = post_timed(conn, path, body, headers)
            if i >= args.warmup:
                latencies[j].append(elapsed)
                if j == 0:
                    offsets.append(started - begin)
                    length = int(resp.getheader("Inference-Header-Content-Length") or len(data))
                    header = json.loads(data[:length])
                    splits.append(str(header.get("parameters", {}).get("edgeai_split")))
        i += 1
    for conn, _ in targets:
        conn.close()
    return {
        "latencies_ms": latencies[0],
        "median_ms": statistics.median(latencies[0]),
        "splits": splits,
        "offsets_s": offsets,
        "per_url": [{"median_ms": statistics.median(t), "latencies_ms": t} for t in latencies],
    }


def cmd_echo_server(args: argparse.Namespace) -> dict[str, Any]:
    from aiohttp import web

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(
            body=body,
            headers={
                k: v for k, v in request.headers.items() if k == "Inference-Header-Content-Length"
            },
        )

    app = web.Application(client_max_size=1 << 30)

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_post("/echo", echo)
    app.router.add_get("/health", health)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)
    return {}


def cmd_hop(args: argparse.Namespace) -> dict[str, Any]:
    """An OIP binary inference request to a stage without a model (our binary path:
    the HTTP exchange, decoding and checking the request, encoding the answer), the
    same through an Identity model (onnxruntime's run added), and a raw echo of the
    same bytes, interleaved so all see the same conditions."""
    x = np.random.default_rng(0).standard_normal(json.loads(args.shape)).astype(np.float32)
    targets = [
        ("oip", *_connection(args.oip)),
        ("model", *_connection(args.oip_model)),
        ("echo", *_connection(args.echo)),
    ]
    times: dict[str, list[float]] = {name: [] for name, _, _ in targets}
    for i in range(args.warmup + args.requests):
        # A new id each time, as the application sends: every OIP request is run.
        body, headers = oip_body(x, f"hop-{os.getpid()}-{i:06d}")
        for name, conn, path in targets:
            started = time.perf_counter()
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            elapsed = (time.perf_counter() - started) * 1000
            if resp.status != 200 or len(data) < len(x.tobytes()):
                raise SystemExit(f"{name}: HTTP {resp.status} {len(data)} bytes")
            if i >= args.warmup:
                times[name].append(elapsed)
    return {
        "bytes": len(body),
        "oip_ms": statistics.median(times["oip"]),
        "model_ms": statistics.median(times["model"]),
        "echo_ms": statistics.median(times["echo"]),
    }


def cmd_serving(args: argparse.Namespace) -> dict[str, Any]:
    """Serving and forwarding overheads, fixed and per MB (the profile's keys): round
    trips straight to a serving-probe worker and through a forward-only worker in front
    of it, with the model's input and with a one-element tensor, in turn."""
    from edgeai_worker.profiler import (
        fit_overheads,
        fit_shapes,
        overheads_from_round_trips,
        tensor_bytes,
        time_binary_requests,
    )

    small, large = fit_shapes(json.loads(args.shape))
    direct, forwarded, small_direct, small_forwarded = time_binary_requests(
        [(args.url, large), (args.front_url, large), (args.url, small), (args.front_url, small)],
        requests=args.requests,
        warmup=args.warmup,
    )
    return fit_overheads(
        tensor_bytes(small),
        overheads_from_round_trips(small_direct, small_forwarded),
        tensor_bytes(large),
        overheads_from_round_trips(direct, forwarded),
    )


def cmd_model_serving(args: argparse.Namespace) -> dict[str, Any]:
    """Round trips to a worker serving the model itself, each with the worker's own
    onnxruntime time (the profiler's calibration of the fixed serving part)."""
    import onnx

    from edgeai_worker.profiler import example_feed, time_model_requests

    feeds = example_feed(onnx.load(str(args.model), load_external_data=False))
    samples = time_model_requests(args.url, feeds, requests=args.requests, warmup=args.warmup)
    return {"samples": samples, "inputBytes": sum(int(a.nbytes) for a in feeds.values())}


def cmd_rtt(args: argparse.Namespace) -> dict[str, Any]:
    conn, path = _connection(args.url)
    samples = []
    for _ in range(args.requests):
        started = time.perf_counter()
        conn.request("POST", path, body=b"x")
        conn.getresponse().read()
        samples.append((time.perf_counter() - started) * 1000)
    return {"rtt_ms": statistics.median(samples[2:])}


def cmd_metrics(args: argparse.Namespace) -> dict[str, Any]:
    """Sums and counts of the worker's latency histograms (Prometheus text)."""
    import urllib.request

    with urllib.request.urlopen(args.url, timeout=10) as resp:
        text = resp.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("edgeai_stage_latency_seconds_", "edgeai_stage_compute_seconds_")):
            name, value = line.rsplit(" ", 1)
            if name.split("{")[0].endswith(("_sum", "_count")):
                values[name.split("{")[0]] = float(value)
    return values


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("profile")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.set_defaults(func=cmd_profile)
    c = sub.add_parser("client")
    c.add_argument("--url", action="append", required=True, help="repeat: sent to in turn")
    c.add_argument("--input", type=Path, required=True)
    c.add_argument("--requests", type=int, default=10)
    c.add_argument("--counts", help="requests per --url, comma-separated (default --requests)")
    c.add_argument("--warmup", type=int, default=2)
    c.add_argument("--duration-s", type=float, help="send for this long instead")
    c.add_argument("--pause-ms", type=float, default=0.0, help="idle before each request")
    c.set_defaults(func=cmd_client)
    e = sub.add_parser("echo-server")
    e.add_argument("--host", required=True)
    e.add_argument("--port", type=int, required=True)
    e.set_defaults(func=cmd_echo_server)
    h = sub.add_parser("hop")
    h.add_argument("--oip", required=True, help="infer URL of a stage without a model")
    h.add_argument("--oip-model", required=True, help="infer URL of a stage with a model")
    h.add_argument("--echo", required=True)
    h.add_argument("--shape", required=True)
    h.add_argument("--requests", type=int, default=60)
    h.add_argument("--warmup", type=int, default=3)
    h.set_defaults(func=cmd_hop)
    v = sub.add_parser("serving")
    v.add_argument("--url", required=True, help="the serving-probe worker's infer URL")
    v.add_argument("--front-url", required=True, help="the forward-only worker's infer URL")
    v.add_argument("--shape", required=True)
    v.add_argument("--requests", type=int, default=30)
    v.add_argument("--warmup", type=int, default=5)
    v.set_defaults(func=cmd_serving)
    ms = sub.add_parser("model-serving")
    ms.add_argument("--url", required=True, help="infer URL of a worker serving the model")
    ms.add_argument("--model", type=Path, required=True)
    ms.add_argument("--requests", type=int, default=30)
    ms.add_argument("--warmup", type=int, default=3)
    ms.set_defaults(func=cmd_model_serving)
    r = sub.add_parser("rtt")
    r.add_argument("--url", required=True)
    r.add_argument("--requests", type=int, default=22)
    r.set_defaults(func=cmd_rtt)
    m = sub.add_parser("metrics")
    m.add_argument("--url", required=True)
    m.set_defaults(func=cmd_metrics)
    args = parser.parse_args()
    result = args.func(args)
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
