"""A training job as real processes on this host (loopback): what the tests and the
bench start. Each process is `python -m edgeai_worker.training ...`; `wrap` can put a
command line into a network namespace."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeai_worker.training.spec import TrainingSpec

Wrap = Callable[[str, list[str]], list[str]]  # (role, argv) -> argv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _no_wrap(role: str, argv: list[str]) -> list[str]:
    return argv


def _env() -> dict[str, str]:
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    # SIGABRT then prints every thread's stack: what a job that never ends is doing
    env.setdefault("PYTHONFAULTHANDLER", "1")
    return env


@dataclass
class LocalJob:
    spec: TrainingSpec
    workdir: Path
    host: str = "127.0.0.1"
    wrap: Wrap = _no_wrap
    aggregator_host: str | None = None  # the address workers use (default: host)
    worker_delays: dict[int, tuple[float, int | None]] = field(default_factory=dict)
    aggregator: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    port: int = 0
    gossip_hosts: list[str] = field(default_factory=list)  # per worker (default: host)
    gossip_ports: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "spec.json").write_text(json.dumps(self.spec.to_dict()))
        self.port = self.port or free_port()

    @property
    def spec_path(self) -> Path:
        return self.workdir / "spec.json"

    @property
    def url(self) -> str:
        return f"http://{self.aggregator_host or self.host}:{self.port}"

    def _start(self, role: str, args: Sequence[str], log: str) -> subprocess.Popen[bytes]:
        argv = self.wrap(role, [sys.executable, "-m", "edgeai_worker.training", *args])
        with (self.workdir / log).open("ab") as out:
            return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=_env())

    def start_aggregator(self) -> None:
        self.aggregator = self._start(
            "aggregator",
            [
                "aggregator",
                "--spec",
                str(self.spec_path),
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--workdir",
                str(self.workdir / "aggregator"),
            ],
            "aggregator.log",
        )

    def start_worker(self, index: int) -> subprocess.Popen[bytes]:
        args = [
            "worker",
            "--spec",
            str(self.spec_path),
            "--index",
            str(index),
            "--aggregator",
            self.url,
            "--stats",
            str(self.workdir / f"worker-{index}.json"),
        ]
        if index in self.worker_delays:
            delay_s, updates = self.worker_delays[index]
            args += ["--delay-s", str(delay_s)]
            if updates is not None:
                args += ["--delay-updates", str(updates)]
        process = self._start(f"worker-{index}", args, f"worker-{index}.log")
        if index < len(self.workers):
            self.workers[index] = process
        else:
            self.workers.append(process)
        return process

    def gossip_urls(self) -> list[str]:
        hosts = self.gossip_hosts or [self.host] * self.spec.workers
        if not self.gossip_ports:
            self.gossip_ports = [free_port() for _ in range(self.spec.workers)]
        return [f"http://{h}:{p}" for h, p in zip(hosts, self.gossip_ports, strict=True)]

    def start_gossip_worker(self, index: int) -> subprocess.Popen[bytes]:
        urls = self.gossip_urls()
        hosts = self.gossip_hosts or [self.host] * self.spec.workers
        args = [
            "gossip",
            "--spec",
            str(self.spec_path),
            "--index",
            str(index),
            "--host",
            hosts[index],
            "--port",
            str(self.gossip_ports[index]),
            "--peers",
            ",".join(urls),
            "--workdir",
            str(self.workdir / f"gossip-{index}"),
        ]
        process = self._start(f"worker-{index}", args, f"worker-{index}.log")
        self.workers.append(process)
        return process

    def start(self) -> None:
        """Every process of the job: gossip workers, or an aggregator and its workers."""
        if self.spec.algorithm.mode == "gossip":
            for index in range(self.spec.workers):
                self.start_gossip_worker(index)
            return
        self.start_aggregator()
        for index in range(self.spec.workers):
            self.start_worker(index)

    def gossip_status(self, index: int) -> dict[str, Any]:
        path = self.workdir / f"gossip-{index}" / "status.json"
        data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        return data

    def status(self) -> dict[str, Any]:
        path = self.workdir / "aggregator" / "status.json"
        data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        return data

    def wait_round(self, round_: int, timeout_s: float) -> dict[str, Any]:
        """The status once the aggregator has closed `round_` (or the job is done)."""
        until = time.monotonic() + timeout_s
        while time.monotonic() < until:
            status = self.status()
            if status.get("round", 0) >= round_ or status.get("phase") == "Succeeded":
                return status
            time.sleep(0.05)
        raise TimeoutError(f"round {round_} not reached in {timeout_s}s: {self.log_tail()}")

    def wait(self, timeout_s: float) -> dict[str, Any]:
        """Waits for the aggregator and every worker to exit; the final status."""
        until = time.monotonic() + timeout_s
        aggregator = [self.aggregator] if self.aggregator else []
        for process in [*aggregator, *self.workers]:
            left = max(0.1, until - time.monotonic())
            try:
                process.wait(timeout=left)
            except subprocess.TimeoutExpired as err:
                self.dump_stacks()
                self.stop()
                raise TimeoutError(f"job not done in {timeout_s}s: {self.log_tail()}") from err
        return self.status() if self.aggregator else {}

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of every process's log (the aggregator's first)."""
        logs = sorted(self.workdir.glob("*.log"), key=lambda p: p.name != "aggregator.log")
        parts = []
        for path in logs:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def dump_stacks(self, wait_s: float = 2.0) -> None:
        """SIGABRT to every process still running: with PYTHONFAULTHANDLER (set by _env)
        each writes its threads' stacks to its log before it dies."""
        alive = [p for p in [*self.workers, self.aggregator] if p and p.poll() is None]
        for process in alive:
            process.send_signal(signal.SIGABRT)
        for process in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=wait_s)

    def stop(self) -> None:
        for process in [*self.workers, *([self.aggregator] if self.aggregator else [])]:
            if process.poll() is None:
                process.kill()
                process.wait()

    def worker_stats(self, index: int) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.workdir / f"worker-{index}.json").read_text())
        return data
