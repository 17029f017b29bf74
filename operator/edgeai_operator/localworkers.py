"""A plan's stages as local worker processes on loopback (`edgeai run-local`, tests,
demos): `start_local` starts one `edgeai-worker` process per stage replica, the last
stage first so each one's next stage is up, and returns once every one is ready;
`LocalRun.stop` stops them all."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeai_operator.errors import SpecError
from edgeai_operator.partitions import (
    DEVICE_SETTINGS,
    StageSpec,
    offload_settings,
    plan_settings,
)
from edgeai_operator.plandoc import PlanDocument


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SpecError("run-local", f"the worker for {url} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise SpecError("run-local", f"the worker at {url} was not ready in {timeout_s:.0f} s")


@dataclass
class LocalRun:
    processes: list[subprocess.Popen[bytes]]
    urls: list[list[str]]  # per stage, its replicas
    model_name: str
    # a device entry that runs no layer (a cascade in front of a plan without a device
    # stage), else None: the first stage is the entry
    entry: str | None = None

    @property
    def entry_url(self) -> str:
        return self.entry or self.urls[0][0]

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def start_local(
    plan: PlanDocument,
    specs: Sequence[StageSpec],
    workdir: Path,
    *,
    replicas: int = 1,
    settings: Mapping[str, Any] | None = None,
    log: Any = None,
    model_path: Path | None = None,
    reuse_data: Path | None = None,
    cascade_models: Sequence[Path] = (),
) -> LocalRun:
    """Start the workers, last stage first; returns once every one is ready. Each
    worker gets the settings the plan carries (`plan_settings`), then `settings`
    (device-only ones reach the device stage only), which win. A plan with `offload`
    gives the device its cascade (a device entry of its own in front of a plan without
    a device stage) and the next stage its reuse cache (`model_path`: the
    plan's model, for a reuse cache that keys on features; `reuse_data`: the labelled
    rows a user's model's reuse is calibrated on; `cascade_models`: its small models)."""
    name = plan.model.name
    extra = dict(settings or {})
    run = LocalRun([], [[] for _ in specs], name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEAI_")}

    def launch(index: int, tier: str, spec: StageSpec | None, next_urls: list[str], r: int) -> str:
        port = _free_port()
        config: dict[str, Any] = {
            "model_name": name, "port": port, "tier": tier,
            "stage_index": max(index, 0), "next_urls": next_urls,
            "partitions": [str(p) for p in spec.partitions] if spec else [],
            "splits": spec.splits if spec else [],
        }  # fmt: skip
        config.update(plan_settings(plan, tier))
        config.update(
            offload_settings(plan, index, workdir, model_path, reuse_data, cascade_models)
        )
        config.update(
            {k: v for k, v in extra.items() if tier == "device" or k not in DEVICE_SETTINGS}
        )
        path = workdir / f"stage{index}-{r}.json"
        path.write_text(json.dumps(config, indent=2))
        log_path = workdir / f"stage{index}-{r}.log"
        with log_path.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "edgeai_worker", "--config", str(path)],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        run.processes.append(process)
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, process, 60.0)
        if log is not None:
            print(
                f"stage {index} ({tier}) replica {r}: {url} "
                f"[{len(config['partitions'])} partition(s), log {log_path}]",
                file=log, flush=True,
            )  # fmt: skip
        return url

    try:
        for spec in reversed(specs):
            count = 1 if spec.tier == "device" else replicas
            next_urls = run.urls[spec.index + 1] if spec.index + 1 < len(specs) else []
            for r in range(count):
                run.urls[spec.index].append(launch(spec.index, spec.tier, spec, next_urls, r))
        cascade = plan.offload is not None and plan.offload.cascade_rule is not None
        if cascade and specs and specs[0].tier != "device":
            run.entry = launch(-1, "device", None, run.urls[0], 0)
    except BaseException:
        run.stop()
        raise
    return run


def answer_once(
    plan: PlanDocument, model_path: Path, workdir: Path, feeds: Mapping[str, Any]
) -> tuple[list[StageSpec], list[Any]]:
    """The plan's stages cut from `model_path` into `workdir`, started, sent `feeds`
    (arrays by input name) once in binary form, and stopped: the stages and the output
    tensors (`edgeai_worker.protocol.Tensor`) of the answer."""
    from edgeai_operator.partitions import build_partitions, exit_heads
    from edgeai_worker.profiler import infer_binary

    specs = build_partitions(
        plan.stages, plan.alternatives, model_path, workdir, exits=exit_heads(plan)
    )
    run = start_local(plan, specs, workdir)
    try:
        return specs, list(infer_binary(run.entry_url, run.model_name, feeds))
    finally:
        run.stop()
