"""Stage TLS benchmark: the cost of mutual TLS per hop, side by side with plain HTTP, for
the 602 KB (1x3x224x224 FP32) and 43 KB (1x64x13x13) tensors, on loopback.

    python bench/tls/run.py [--requests 200] [--rounds 3] [--conditions "..."]

Two measurements per tensor and transport, each with one client and with four:

- hop: a client sends the tensor straight to a stage serving an Identity model (so the
  answer is as large as the request) on its plain port, or on its TLS port with the
  upstream stage's certificate; one keep-alive connection per client;
- chain: a client sends the tensor (plain HTTP) to an entry stage that runs nothing
  and forwards it to that stage, over plain HTTP or over mutual TLS.

Each row also reports the CPU time the worker processes spent per request (from
/proc), which, unlike latency, what else runs on the machine hardly moves.

Run as root, the same rows are measured once more with the stage in a network namespace
of its own behind a veth pair shaped with `tc tbf` (`--link-mbps`, 100 Mbit/s by default:
a backhaul between tiers), the hop as it is between nodes; `--link-mbps 0` skips it.

Beside the rows, `crypto` measures the floor of any TLS hop: the record encryption and
decryption of one request and its answer alone (the client's and the stage's, with the
stages' own contexts over memory buffers, no socket, no event loop), and each TLS row
checks that its clients handshook once each (keep-alive, no handshake per request).

Certificates come from the operator's own code (edgeai_operator.stagetls). Plain and TLS
rows alternate in `--rounds` rounds and each row reports the median of the rounds' p50,
p95 and throughput, so a drift of the machine's load falls on both alike. The result
goes to docs/results/tls.json, which `make docs-numbers` renders into docs/security.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))  # the renderer beside the benches
sys.path.insert(0, str(ROOT / "tests"))  # the worker processes

import render_numbers  # noqa: E402
from _worker_support import Worker, free_port, start_worker, wait_ready  # noqa: E402
from edgeai_operator.builders import Owner, stage_identity  # noqa: E402
from edgeai_operator.stagetls import issue_ca, issue_stage  # noqa: E402
from edgeai_worker import protocol  # noqa: E402
from edgeai_worker.protocol import InferRequest, Tensor  # noqa: E402
from edgeai_worker.security import StageTLS  # noqa: E402

TENSORS = {"602 KB": [1, 3, 224, 224], "43 KB": [1, 64, 13, 13]}
CLIENTS = (1, 4)
OWNER = Owner(name="bench", namespace="bench", uid="u")
Call = Callable[[], None]


def identity_model(shape: list[int], path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        "identity",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def write_certs(tmp: Path) -> dict[str, Path]:
    """The deployment's CA and the device and edge stage certificates, as the Secrets
    hold them."""
    now = datetime.datetime.now(datetime.UTC)
    ca_cert, ca_key = issue_ca(OWNER, now)
    dirs = {}
    for tier in ("device", "edge"):
        cert, key = issue_stage(ca_cert, ca_key, stage_identity(OWNER, tier), now)
        d = tmp / tier
        d.mkdir()
        (d / "tls.crt").write_bytes(cert)
        (d / "tls.key").write_bytes(key)
        (d / "ca.crt").write_bytes(ca_cert)
        dirs[tier] = d
    return dirs


def caller(
    host: str, port: int, x: np.ndarray, context: ssl.SSLContext | None
) -> Callable[[], Call]:
    request = InferRequest([Tensor.from_numpy("input", x)], parameters={"binary_data_output": True})
    body, headers = protocol.encode_request(request, binary=True)

    def make() -> Call:
        if context is None:
            conn: http.client.HTTPConnection = http.client.HTTPConnection(host, port, timeout=120)
        else:
            conn = http.client.HTTPSConnection(host, port, timeout=120, context=context)

        def call() -> None:
            conn.request("POST", "/v2/models/hop/infer", body, headers)
            reply = conn.getresponse()
            data = reply.read()
            if reply.status != 200:
                raise RuntimeError(f"HTTP {reply.status}: {data[:200]!r}")

        return call

    return make


def handshakes(context: ssl.SSLContext) -> int:
    return int(context.session_stats()["connect"])


def crypto_floor(certs: dict[str, Path], size_bytes: int, rounds: int) -> dict[str, Any]:
    """CPU ms to encrypt and decrypt a request and an answer of `size_bytes` each, on
    both ends, with the device's client context and the edge's server context
    (`StageTLS`, as the workers build them) over memory BIOs: what TLS adds to a hop
    whatever the transport around it does. Median of `rounds` rounds of 20."""
    client_tls, server_tls = StageTLS(certs["device"]), StageTLS(certs["edge"])
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_tls.client_context.wrap_bio(c_in, c_out)
    server = server_tls.server_context.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(4):  # the handshake, pumped by hand
        for obj, out, into in ((client, c_out, s_in), (server, s_out, c_in)):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
            into.write(out.read())
    payload = np.random.default_rng(1).bytes(size_bytes)

    def one_way(
        sender: ssl.SSLObject, wire: ssl.MemoryBIO, into: ssl.MemoryBIO, receiver: ssl.SSLObject
    ) -> None:
        sender.write(payload)
        into.write(wire.read())
        got = 0
        while got < size_bytes:
            got += len(receiver.read(size_bytes))

    samples = []
    for _ in range(rounds):
        started = time.thread_time()
        for _ in range(20):
            one_way(client, c_out, s_in, server)
            one_way(server, s_out, c_in, client)
        samples.append((time.thread_time() - started) * 1000 / 20)
    return {
        "cipher": server.cipher()[0] if server.cipher() else "",
        "version": server.version(),
        "msPerRequest": round(statistics.median(samples), 3),
    }


def cpu_s(pids: list[int]) -> float:
    """CPU seconds the processes `pids` (all their threads) have run so far, from the
    scheduler's nanosecond accounting."""
    total_ns = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a thread that just ended
                total_ns += int((task / "schedstat").read_text().split()[0])
    return total_ns / 1e9


def measure(
    make: Callable[[], Call],
    clients: int,
    requests: int,
    pids: list[int],
    context: ssl.SSLContext | None = None,
) -> dict[str, float]:
    """`requests` calls over `clients` threads after two warm-up calls each, and the CPU
    time the worker processes `pids` spent on them (unlike wall time, hardly moved by
    what else runs on the machine). With the clients' TLS `context`: each client must
    have handshaken exactly once."""
    before = handshakes(context) if context is not None else 0
    calls = [make() for _ in range(clients)]
    for call in calls:
        call()
        call()
    latencies: list[float] = []
    lock = threading.Lock()
    per_client = max(1, requests // clients)

    def run(call: Call) -> None:
        for _ in range(per_client):
            started = time.perf_counter()
            call()
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    cpu_before = cpu_s(pids)
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall_s = time.perf_counter() - started
    cpu_ms = (cpu_s(pids) - cpu_before) * 1000 / len(latencies)
    if context is not None and handshakes(context) - before != clients:
        raise RuntimeError(
            f"{handshakes(context) - before} TLS handshakes for {clients} keep-alive clients"
        )
    latencies.sort()
    return {
        "cpuMs": cpu_ms,
        "p50Ms": statistics.median(latencies) * 1000,
        "p95Ms": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] * 1000,
        "perSecond": len(latencies) / wall_s,
    }


class Link:
    """A network namespace joined to this one by a veth pair, both ends shaped to
    `mbps` with tc tbf; the stage runs inside it at `STAGE_IP`. Removed on exit."""

    def __init__(self, mbps: float) -> None:
        tag = os.getpid() % 100_000
        self.mbps = mbps
        self.ns = f"etls-{tag}"
        self.host_dev, self.ns_dev = f"etls{tag}h", f"etls{tag}n"
        subnet = f"10.231.{tag % 250}"
        self.host_ip, self.stage_ip = f"{subnet}.1", f"{subnet}.2"

    def __enter__(self) -> Link:
        burst = max(int(self.mbps * 1e6 / 8 / 250), 16 * 1024)  # 4 ms at the rate
        shaped = ["root", "tbf", "rate", f"{self.mbps:g}mbit", "burst", str(burst)]
        steps = [
            ["ip", "netns", "add", self.ns],
            ["ip", "link", "add", self.host_dev, "type", "veth", "peer", "name", self.ns_dev],
            ["ip", "link", "set", self.ns_dev, "netns", self.ns],
            ["ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_dev],
            ["ip", "-n", self.ns, "addr", "add", f"{self.stage_ip}/24", "dev", self.ns_dev],
            ["ip", "link", "set", self.host_dev, "up"],
            ["ip", "-n", self.ns, "link", "set", self.ns_dev, "up"],
            ["ip", "-n", self.ns, "link", "set", "lo", "up"],
            ["tc", "qdisc", "add", "dev", self.host_dev, *shaped, "latency", "50ms"],
            ["tc", "-n", self.ns, "qdisc", "add", "dev", self.ns_dev, *shaped, "latency", "50ms"],
        ]
        try:
            for step in steps:
                subprocess.run(step, check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            self.__exit__()
            raise RuntimeError(f"{' '.join(exc.cmd)}: {exc.stderr.strip()}") from None
        return self

    def __exit__(self, *_: object) -> None:
        # deleting the namespace deletes its veth end, and with it the pair
        subprocess.run(["ip", "netns", "delete", self.ns], check=False, capture_output=True)
        subprocess.run(["ip", "link", "delete", self.host_dev], check=False, capture_output=True)


@contextlib.contextmanager
def running(tmp: Path, settings: dict[str, Any], link: Link | None = None) -> Iterator[Worker]:
    """A worker process on loopback, or in `link`'s namespace on its address."""
    if link is None:
        worker = start_worker(tmp, {"intra_op_threads": 1, **settings})
    else:
        port = free_port()
        config = tmp / f"worker-{link.ns}-{port}.json"
        values = {"intra_op_threads": 1, **settings, "host": link.stage_ip, "port": port}
        config.write_text(json.dumps(values))
        log = tmp / f"{config.stem}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [
                    *("ip", "netns", "exec", link.ns),
                    *(sys.executable, "-m", "edgeai_worker", "--config", str(config)),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        worker = Worker(process, f"http://{link.stage_ip}:{port}", log)
        wait_ready(worker.url, process)
    try:
        yield worker
    finally:
        worker.stop()


def client_context(certs: Path) -> ssl.SSLContext:
    """The upstream (device) stage's TLS, as its forwarder sets it up."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(certs / "ca.crt"))
    ctx.load_cert_chain(certs / "tls.crt", certs / "tls.key")
    return ctx


def bench_tensor(
    tmp: Path,
    label: str,
    shape: list[int],
    certs: dict[str, Path],
    requests: int,
    rounds: int,
    link: Link | None = None,
) -> list[dict[str, Any]]:
    model = identity_model(shape, tmp / f"identity-{'x'.join(map(str, shape))}.onnx")
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    tls_port = free_port()
    stage = {
        "model_name": "hop",
        "partitions": [str(model)],
        "tier": "edge",
        "stage_index": 1,
        "tls_dir": str(certs["edge"]),
        "tls_port": tls_port,
        "tls_peers": [stage_identity(OWNER, "device")],
    }
    samples: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    plain_stage = {k: v for k, v in stage.items() if not k.startswith("tls")}
    host = "127.0.0.1" if link is None else link.stage_ip
    where = "loopback" if link is None else f"{link.mbps:g} Mbit/s link"
    with (
        running(tmp, stage, link) as tls_edge,
        running(tmp, plain_stage, link) as plain_edge,
    ):
        plain_port = int(plain_edge.url.rsplit(":", 1)[1])
        entry = {
            "model_name": "hop",
            "tier": "device",
            "stage_index": 0,
            "uplink_mbps": 1000.0,
        }
        tls_entry = {
            **entry,
            "tls_dir": str(certs["device"]),
            "next_urls": [f"https://{host}:{tls_port}"],
        }
        plain_entry = {**entry, "next_urls": [f"http://{host}:{plain_port}"]}
        hop_context = client_context(certs["device"])
        with running(tmp, tls_entry) as front_tls, running(tmp, plain_entry) as front_plain:
            makers = {
                ("hop", "plain"): (
                    caller(host, plain_port, x, None),
                    [plain_edge.process.pid],
                ),
                ("hop", "tls"): (
                    caller(host, tls_port, x, hop_context),
                    [tls_edge.process.pid],
                ),
                ("chain", "plain"): (
                    caller("127.0.0.1", int(front_plain.url.rsplit(":", 1)[1]), x, None),
                    [front_plain.process.pid, plain_edge.process.pid],
                ),
                ("chain", "tls"): (
                    caller("127.0.0.1", int(front_tls.url.rsplit(":", 1)[1]), x, None),
                    [front_tls.process.pid, tls_edge.process.pid],
                ),
            }
            for round_ in range(rounds):
                for (path, transport), (make, pids) in makers.items():
                    for clients in CLIENTS:
                        context = hop_context if (path, transport) == ("hop", "tls") else None
                        result = measure(make, clients, requests, pids, context)
                        samples.setdefault((path, transport, clients), []).append(result)
                        print(
                            f"[bench] {label} {where} {path} {transport} x{clients} round "
                            f"{round_ + 1}: p50 {result['p50Ms']:.3f} ms, "
                            f"{result['perSecond']:.0f}/s, {result['cpuMs']:.3f} CPU ms",
                            file=sys.stderr,
                            flush=True,
                        )
    rows = []
    for (path, transport, clients), runs in samples.items():
        rows.append(
            {
                "tensor": label,
                "link": where,
                "shape": shape,
                "bytes": int(np.prod(shape)) * 4,
                "path": path,
                "transport": transport,
                "clients": clients,
                "p50Ms": round(statistics.median(r["p50Ms"] for r in runs), 3),
                "p95Ms": round(statistics.median(r["p95Ms"] for r in runs), 3),
                "perSecond": round(statistics.median(r["perSecond"] for r in runs), 1),
                "cpuMsPerRequest": round(statistics.median(r["cpuMs"] for r in runs), 3),
                "rounds": len(runs),
            }
        )
    return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """TLS / plain per tensor, path and client count: p50 and throughput."""
    out = []
    for row in rows:
        if row["transport"] != "tls":
            continue
        plain = next(
            r
            for r in rows
            if r["transport"] == "plain"
            and (r["tensor"], r["link"], r["path"], r["clients"])
            == (row["tensor"], row["link"], row["path"], row["clients"])
        )
        out.append(
            {
                "tensor": row["tensor"],
                "link": row["link"],
                "path": row["path"],
                "clients": row["clients"],
                "p50Ratio": round(row["p50Ms"] / plain["p50Ms"], 3),
                "throughputRatio": round(row["perSecond"] / plain["perSecond"], 3),
                "cpuRatio": round(row["cpuMsPerRequest"] / plain["cpuMsPerRequest"], 3),
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per row and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--link-mbps", type=float, default=100.0, help="the shaped link's rate; 0: loopback only"
    )
    parser.add_argument(
        "--link-requests", type=int, default=30, help="requests per row and round on the link"
    )
    render_numbers.add_result_arguments(parser, "tls.json")
    args = parser.parse_args(argv)
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="edgeai-tls-") as name:
        tmp = Path(name)
        certs = write_certs(tmp)
        crypto = {
            label: {"bytes": int(np.prod(shape)) * 4}
            | crypto_floor(certs, int(np.prod(shape)) * 4, args.rounds * 3)
            for label, shape in TENSORS.items()
        }
        rows: list[dict[str, Any]] = []
        for label, shape in TENSORS.items():
            rows += bench_tensor(tmp, label, shape, certs, args.requests, args.rounds)
        if args.link_mbps > 0:
            if os.geteuid() != 0 or shutil.which("tc") is None:
                print("[bench] the shaped link needs root and tc: skipped", file=sys.stderr)
            else:
                with Link(args.link_mbps) as link:
                    for label, shape in TENSORS.items():
                        rows += bench_tensor(
                            tmp, label, shape, certs, args.link_requests, args.rounds, link
                        )
    negotiated = "{version}, {cipher}".format(**next(iter(crypto.values())))
    report = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "loadAverage": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "conditions": args.conditions,
        "tls": f"{ssl.OPENSSL_VERSION}; EC P-256 certificates, {negotiated}",
        "requestsPerRow": args.requests,
        "linkRequestsPerRow": args.link_requests,
        "seconds": round(time.monotonic() - started, 1),
        "goal": 1.2,
        "crypto": crypto,
        "rows": rows,
        "ratios": ratios(rows),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["ratios"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
