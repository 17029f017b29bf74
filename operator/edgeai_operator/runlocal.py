"""`edgeai run-local -f plan.yaml`: run a plan's stages as local worker processes.

For laptops, tests and demos: every stage of a `kind: Plan` becomes an `edgeai-worker`
process on loopback (the last stage first, so each one's next stage is up), chained in
the plan's order. With a device stage first and `alternatives` in the plan, the device
holds every prefix its adaptive split may choose and the next stage the matching
suffixes. Prints the entry URL, serves until interrupted, then stops every worker.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgeai_operator.errors import SpecError

TIERS = ("device", "edge", "cloud")


@dataclass
class StageSpec:
    index: int
    tier: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    partitions: list[Path] = field(default_factory=list)
    splits: list[dict[str, Any]] = field(default_factory=list)


def load_plan(path: Path) -> dict[str, Any]:
    try:
        plan = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError("-f", f"cannot read {path}: {exc}") from None
    if not isinstance(plan, dict) or plan.get("kind", "Plan") != "Plan":
        raise SpecError("kind", f"{path} is not a Plan", "kind: Plan")
    stages = plan.get("stages")
    if not isinstance(stages, list) or not stages:
        raise SpecError("stages", "the plan has no stages", "a list of {tier, inputs, outputs}")
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict):
            raise SpecError(f"stages[{i}]", "must be a mapping")
        if stage.get("tier") not in TIERS:
            raise SpecError(f"stages[{i}].tier", f"{stage.get('tier')!r}", ", ".join(TIERS))
        for key in ("inputs", "outputs"):
            value = stage.get(key)
            if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
                raise SpecError(f"stages[{i}].{key}", "must be a list of tensor names")
    for i in range(1, len(stages)):
        if list(stages[i]["inputs"]) != list(stages[i - 1]["outputs"]):
            raise SpecError(
                f"stages[{i}].inputs",
                f"{stages[i]['inputs']} are not stage {i - 1}'s outputs {stages[i - 1]['outputs']}",
            )
    return plan


def model_file(plan: Mapping[str, Any], plan_path: Path) -> Path:
    """The ONNX file of the plan's model: `model.path` (relative to the plan) or a zoo name."""
    model = plan.get("model") or {}
    if not isinstance(model, dict):
        raise SpecError("model", "must be a mapping", "{zoo: NAME} or {path: FILE.onnx}")
    if model.get("path"):
        path = (plan_path.parent / str(model["path"])).resolve()
        if not path.exists():
            raise SpecError("model.path", f"{path} does not exist")
        return path
    if model.get("zoo"):
        from edgeai_worker import zoo

        try:
            return zoo.export_onnx(str(model["zoo"]), trained=bool(model.get("trained", False)))
        except ValueError as exc:
            raise SpecError("model.zoo", str(exc), ", ".join(zoo.ZOO_NAMES)) from None
    raise SpecError("model", "names no model", "{zoo: NAME} or {path: FILE.onnx}")


def build_partitions(
    plan: Mapping[str, Any], model_path: Path, workdir: Path, *, adaptive: bool = True
) -> list[StageSpec]:
    """Cut the model into each stage's partition files (and the adaptive split's)."""
    import onnx

    from edgeai_worker.graph import Partitioner, cut_points

    model = onnx.load(str(model_path))
    partitioner = Partitioner(model)
    specs: list[StageSpec] = []
    for i, stage in enumerate(plan["stages"]):
        spec = StageSpec(i, stage["tier"], tuple(stage["inputs"]), tuple(stage["outputs"]))
        if set(spec.outputs) != set(spec.inputs):  # an empty stage only forwards
            try:
                sub = partitioner.extract(spec.inputs, spec.outputs)
            except ValueError as exc:
                raise SpecError(f"stages[{i}]", str(exc)) from None
            path = workdir / f"stage{i}-{spec.tier}.onnx"
            onnx.save(sub, str(path))
            spec.partitions.append(path)
        specs.append(spec)
    alternatives = plan.get("alternatives") or []
    if adaptive and len(specs) == 1 and specs[0].tier == "device":
        # A device-only plan whose alternatives offload at other bandwidths: add the
        # stage they offload to, holding only the suffixes the device may hand over.
        tier = _offload_tier(alternatives)
        if tier is not None:
            outputs = specs[0].outputs
            specs.append(StageSpec(1, tier, outputs, outputs))
    if adaptive and len(specs) >= 2 and specs[0].tier == "device" and alternatives:
        _adaptive_splits(specs, alternatives, partitioner, cut_points(model), workdir)
    return specs


def _offload_tier(alternatives: Sequence[Mapping[str, Any]]) -> str | None:
    """The tier right after the device in the alternatives that offload (the nearest
    such tier if they differ)."""
    found = {
        stages[1].get("tier")
        for alt in alternatives
        if isinstance(stages := alt.get("stages"), list) and len(stages) > 1
    }
    for tier in TIERS[1:]:
        if tier in found:
            return tier
    return None


def _adaptive_splits(
    specs: list[StageSpec],
    alternatives: Sequence[Mapping[str, Any]],
    partitioner: Any,
    cuts: Sequence[Any],
    workdir: Path,
) -> None:
    """Give the device a prefix per alternative cut, and stage 1 the matching suffix.
    A device-only alternative gives the device the whole model (it answers alone);
    other alternatives whose cut lies past stage 1's end are left out: stage 1 could not
    finish them."""
    import onnx

    device, after = specs[0], specs[1]
    position = {tuple(c.tensors): c.index for c in cuts}
    end = position.get(tuple(after.outputs))
    if end is None:
        return
    last = len(cuts) - 1
    options: list[dict[str, Any]] = []
    for alt in alternatives:
        cut_index = alt.get("cutIndex")
        if not isinstance(cut_index, int) or not (0 <= cut_index < end or cut_index == last):
            continue
        tensors = tuple(cuts[cut_index].tensors)
        option: dict[str, Any] = {
            "minMbps": float(alt.get("minMbps") or 0.0),
            "maxMbps": float(alt["maxMbps"]) if alt.get("maxMbps") is not None else float("inf"),
        }
        if cut_index == last:  # the whole model on the device: it answers by itself
            whole = workdir / "stage0-device-whole.onnx"
            onnx.save(partitioner.extract(device.inputs, tensors), str(whole))
            options.append({**option, "partition": str(whole), "final": True})
            continue
        if cut_index > 0:
            head = workdir / f"stage0-device-cut{cut_index}.onnx"
            onnx.save(partitioner.extract(device.inputs, tensors), str(head))
            option["partition"] = str(head)
        if tensors != device.outputs:
            tail = workdir / f"stage1-{after.tier}-from-cut{cut_index}.onnx"
            onnx.save(partitioner.extract(tensors, after.outputs), str(tail))
            after.partitions.append(tail)
        options.append(option)
    if len(options) > 1:
        device.splits = options


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

    @property
    def entry_url(self) -> str:
        return self.urls[0][0]

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
    plan: Mapping[str, Any],
    specs: Sequence[StageSpec],
    workdir: Path,
    *,
    replicas: int = 1,
    settings: Mapping[str, Any] | None = None,
    log: Any = None,
) -> LocalRun:
    """Start the workers, last stage first; returns once every one is ready."""
    model = plan.get("model") or {}
    name = str(model.get("zoo") or model.get("name") or Path(str(model.get("path", "model"))).stem)
    extra = dict(settings or {})
    device_only = {
        "uplink_mbps", "skip_unchanged_threshold", "feature_noise_std",
        "raw_input_stays_on_device", "noise_seed",
    }  # fmt: skip
    run = LocalRun([], [[] for _ in specs], name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEAI_")}
    try:
        for spec in reversed(specs):
            count = 1 if spec.tier == "device" else replicas
            next_urls = run.urls[spec.index + 1] if spec.index + 1 < len(specs) else []
            for r in range(count):
                port = _free_port()
                config: dict[str, Any] = {
                    "model_name": name, "port": port, "tier": spec.tier,
                    "stage_index": spec.index, "next_urls": next_urls,
                    "partitions": [str(p) for p in spec.partitions],
                    "splits": spec.splits,
                }  # fmt: skip
                config.update(
                    {
                        k: v
                        for k, v in extra.items()
                        if spec.tier == "device" or k not in device_only
                    }
                )
                path = workdir / f"stage{spec.index}-{r}.json"
                path.write_text(json.dumps(config, indent=2))
                log_path = workdir / f"stage{spec.index}-{r}.log"
                with log_path.open("wb") as out:
                    process = subprocess.Popen(
                        [sys.executable, "-m", "edgeai_worker", "--config", str(path)],
                        stdout=out, stderr=subprocess.STDOUT, env=env,
                    )  # fmt: skip
                run.processes.append(process)
                url = f"http://127.0.0.1:{port}"
                _wait_ready(url, process, 60.0)
                run.urls[spec.index].append(url)
                if log is not None:
                    print(
                        f"stage {spec.index} ({spec.tier}) replica {r}: {url} "
                        f"[{len(spec.partitions)} partition(s), log {log_path}]",
                        file=log, flush=True,
                    )  # fmt: skip
    except BaseException:
        run.stop()
        raise
    return run


def _cmd_run_local(args: argparse.Namespace) -> int:
    plan_path = Path(args.file)
    plan = load_plan(plan_path)
    model_path = model_file(plan, plan_path)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="edgeai-run-"))
    workdir.mkdir(parents=True, exist_ok=True)
    specs = build_partitions(plan, model_path, workdir, adaptive=not args.no_adaptive)
    settings = {
        key: value
        for key, value in {
            "max_batch": args.max_batch,
            "max_wait_ms": args.max_wait_ms,
            "uplink_mbps": args.uplink_mbps,
            "skip_unchanged_threshold": args.skip_unchanged_threshold,
            "feature_noise_std": args.feature_noise_std,
            "raw_input_stays_on_device": args.raw_input_stays_on_device or None,
        }.items()
        if value is not None
    }
    run = start_local(
        plan, specs, workdir, replicas=args.replicas, settings=settings, log=sys.stdout
    )
    stop = False

    def _stop(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"entry: {run.entry_url}/v2/models/{run.model_name}/infer", flush=True)
    try:
        while not stop and all(p.poll() is None for p in run.processes):
            time.sleep(0.1)
    finally:
        run.stop()
    failed = [p.args for p in run.processes if p.returncode not in (0, -signal.SIGTERM)]
    if failed:
        print(f"error: worker(s) exited abnormally; logs in {workdir}", file=sys.stderr)
        return 1
    print("stopped", flush=True)
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run-local", help="run a plan's stages as local worker processes and print the entry URL"
    )
    parser.add_argument("-f", "--file", required=True, help="Plan YAML (kind: Plan)")
    parser.add_argument("--workdir", help="where partitions, configs and logs go (default: temp)")
    parser.add_argument("--replicas", type=int, default=1, help="replicas of edge/cloud stages")
    parser.add_argument("--max-batch", type=int, help="micro-batch size of edge/cloud stages")
    parser.add_argument("--max-wait-ms", type=float, help="micro-batch window")
    parser.add_argument("--uplink-mbps", type=float, help="fix the device's uplink estimate")
    parser.add_argument("--skip-unchanged-threshold", type=float, help="device change detection")
    parser.add_argument("--feature-noise-std", type=float, help="noise on features sent upstream")
    parser.add_argument(
        "--raw-input-stays-on-device", action="store_true", help="never forward the raw input"
    )
    parser.add_argument(
        "--no-adaptive", action="store_true", help="ignore the plan's alternatives (fixed split)"
    )
    parser.set_defaults(func=_cmd_run_local)
