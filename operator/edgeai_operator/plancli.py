"""`edgeai profile` and `edgeai plan`: measure a model, then plan its partitions for
a DNNDeployment on a topology, offline.

Tier compute times come from one of two sources (`--compute`):

- `measured` (the default when a profile is given or `--compute measured`): each
  segment's median onnxruntime time on this machine, scaled by
  `host GFLOPS / tier GFLOPS`. The host's GFLOPS is measured with an fp32
  onnxruntime MatMul (see `edgeai_worker.profiler.host_gflops`), the same kind of
  number the topology declares per node group (`gflops`).
- `analytic` (the default without a profile): FLOPs per segment / tier GFLOPS.

Links come from the topology: the device tier's `uplinkMbps`/`uplinkRttMs` for the
hop to the next tier, the edge tier's for the hop to the cloud. Within a zone the
slowest device and its link bound the plan; a server tier counts at its fastest node.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from edgeai_operator.deployspec import DeploymentSpec, load_deployment
from edgeai_operator.errors import SpecError
from edgeai_operator.plandoc import PlanDocument
from edgeai_operator.problem import (
    analytic_profile,
    build_problem,
    load_profile,
    model_path,
    plan_document,
    solve,
    termination_summary,
    zoo_names,
)
from edgeai_operator.topology import load_topology

if TYPE_CHECKING:
    import onnx

DEFAULT_TOPOLOGY = Path(__file__).resolve().parents[2] / "hack" / "topology.yaml"
TERMINATION_LOG = "/dev/termination-log"


# ---------------------------------------------------------------------------
# edgeai profile


def profile_command(args: argparse.Namespace) -> int:
    from edgeai_worker import profiler
    from edgeai_worker.graph import GraphError

    if args.repeats < 1:
        raise SpecError(
            "--repeats", f"must be a positive integer, got {args.repeats}", "an integer >= 1"
        )
    path = model_path(args.model, args.variant)
    name = Path(args.model).stem if args.model.endswith(".onnx") else args.model
    if args.serving_requests < 0:
        raise SpecError(
            "--serving-requests",
            f"must not be negative, got {args.serving_requests}",
            "an integer >= 0 (0 skips the measurement)",
        )
    idle_ms = profiler.IDLE_MS if args.idle_ms is None else args.idle_ms
    if not 0 <= idle_ms <= profiler.MAX_IDLE_MS:
        bound = f"0-{profiler.MAX_IDLE_MS}"
        raise SpecError(
            "--idle-ms", f"must be in {bound}, got {args.idle_ms:g}", f"milliseconds, {bound}"
        )
    model = _load_model(path)
    shapes = input_shapes(args.input_shape, model)
    values = input_values(args.input_value, model)
    try:
        profile = profiler.profile_model(
            model,
            name=name,
            variant=args.variant,
            repeats=args.repeats,
            threads=args.threads,
            idle_ms=idle_ms,
            input_shapes=shapes,
            input_values=values,
        )
        feeds = profiler.example_feed(model, shapes=shapes, values=values)
    except GraphError as exc:
        raise SpecError(f"MODEL {args.model}", str(exc)) from None
    if args.serving_requests:
        overheads = profiler.serving_overheads(
            profile["input"]["shape"],
            requests=args.serving_requests,
            threads=args.threads,
            model=path,
            feeds=feeds,
        )
        profile.update({key: round(ms, 4) for key, ms in overheads.items()})
    if name == "digits_cnn":
        from edgeai_worker import variants

        profile["accuracy"] = round(variants.onnx_accuracy(path), 4)
    text = (
        json.dumps(profile, indent=2)
        if args.output == "json"
        else yaml.safe_dump(profile, sort_keys=False)
    )
    if args.save:
        Path(args.save).write_text(text)
    if args.termination_log:
        Path(args.termination_log).write_text(termination_summary(profile))
    print(text, end="" if text.endswith("\n") else "\n")
    return 0


INPUT_SHAPE_FORM = "NAME=D0,D1,... (repeat once per input), or D0,D1,... for a single input"


def _load_model(path: Path) -> onnx.ModelProto:
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as exc:  # onnx raises several types for a file that is no model
        raise SpecError("MODEL", f"{path} is not an ONNX model: {exc}") from None


INPUT_VALUE_FORM = "NAME=NUMBER, repeatable (that input filled with NUMBER)"


def input_values(texts: Sequence[str] | None, model: onnx.ModelProto) -> dict[str, float]:
    """`--input-value` values as {input name: number}; SpecError naming the flag."""
    names = _input_names(model)
    values: dict[str, float] = {}
    for text in texts or []:
        name, _, number = text.partition("=")
        if name not in names:
            raise SpecError(
                "--input-value",
                f"{name!r} is not a model input ({', '.join(names)})",
                INPUT_VALUE_FORM,
            )
        try:
            values[name] = float(number)
        except ValueError:
            raise SpecError(
                "--input-value", f"{text!r} is not NAME=NUMBER", INPUT_VALUE_FORM
            ) from None
    return values


def _input_names(model: onnx.ModelProto) -> list[str]:
    initializers = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def input_shapes(values: Sequence[str] | None, model: onnx.ModelProto) -> dict[str, list[int]]:
    """`--input-shape` values as {input name: shape}; SpecError naming the flag for a
    malformed value, a name the model does not have, or a bare shape given to a model
    with several inputs."""
    names = _input_names(model)
    shapes: dict[str, list[int]] = {}
    for text in values or []:
        name, eq, dims = text.rpartition("=")
        if not eq:
            if len(names) != 1:
                raise SpecError(
                    "--input-shape",
                    f"{text!r} names no input, and the model has {len(names)}: {', '.join(names)}",
                    INPUT_SHAPE_FORM,
                )
            name = names[0]
        if name not in names:
            raise SpecError(
                "--input-shape",
                f"{name!r} is not a model input ({', '.join(names)})",
                INPUT_SHAPE_FORM,
            )
        try:
            shape = [int(d) for d in dims.split(",")]
        except ValueError:
            raise SpecError("--input-shape", f"{text!r} is not a shape", INPUT_SHAPE_FORM) from None
        if min(shape) < 1:
            raise SpecError("--input-shape", f"{text!r} has a dimension below 1", INPUT_SHAPE_FORM)
        if name in shapes:
            raise SpecError("--input-shape", f"{name!r} is given twice", INPUT_SHAPE_FORM)
        shapes[name] = shape
    return shapes


# ---------------------------------------------------------------------------
# edgeai plan


def render_table(doc: PlanDocument) -> str:
    """The plan as `edgeai plan -o table` prints it."""
    lines = [
        f"deployment {doc.deployment}: model {doc.model.name} "
        f"variant {doc.model.variant}, objective {doc.objective}, "
        f"compute {doc.compute_method}"
    ]
    tiers = ", ".join(f"{t} {v['gflops']:g} GFLOPS" for t, v in doc.tiers.items())
    links = ", ".join(
        f"{x.from_tier}->{x.to_tier} {x.mbps:g} Mbps/{x.rtt_ms:g} ms" for x in doc.links
    )
    lines.append(f"tiers: {tiers}; links: {links}")
    if not doc.feasible:
        lines.append(f"INFEASIBLE: {doc.reason}")
        return "\n".join(lines) + "\n"
    rows = [("STAGE", "TIER", "LAYERS", "INPUT", "OUTPUT", "COMPUTE(ms)")]
    for s in doc.stages:
        rows.append(
            (
                str(s.index),
                s.tier,
                s.layers,
                ",".join(s.inputs),
                ",".join(s.outputs),
                f"{s.compute_ms:.3f}",
            )
        )
    for t in doc.transfers:
        rows.append(
            (
                "",
                f"{t.from_tier}->{t.to_tier}",
                "",
                f"{t.bytes} B up",
                f"{t.return_bytes} B back",
                f"{t.ms:.3f}",
            )
        )
    for tier, ms in doc.serving_ms.items():
        rows.append(("", tier, "serving", "", "", f"{ms:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    slo = doc.slo.get("latencyP95Ms")
    lines.append(
        f"predicted latency {doc.predicted_latency_ms or 0.0:.3f} ms"
        + (f" (SLO {slo:g} ms)" if slo is not None else "")
        + f", device energy {doc.device_energy_mj or 0.0:.2f} mJ,"
        f" cloud cost {doc.cloud_cost or 0.0:.3f}"
    )
    lines.extend(f"kept in one stage: {reason}" for reason in doc.held)
    if doc.alternatives:
        lines.append("adaptive split (device uplink):")
        for a in doc.alternatives:
            high = "inf" if a.max_mbps is None else f"{a.max_mbps:g}"
            where = " + ".join(f"{tier}[{layers}]" for tier, layers in a.stages)
            lines.append(
                f"  {a.min_mbps:g}-{high} Mbps: {where}  "
                f"{a.predicted_latency_ms:.2f} ms at {a.at_mbps:g} Mbps"
                + ("" if a.meets_slo else " (misses the SLO)")
            )
    return "\n".join(lines) + "\n"


def _resolve_model(spec: DeploymentSpec, profiles: list[dict[str, Any]]) -> str:
    if profiles:
        names = {str(p["model"]) for p in profiles}
        if len(names) > 1:
            raise SpecError(
                "--profile",
                f"profiles of different models {sorted(names)}",
                "profiles of one model (one per variant)",
            )
        return names.pop()
    if spec.zoo:
        if spec.zoo not in zoo_names():
            raise SpecError(
                "spec.model.zoo", f"unknown zoo model {spec.zoo!r}", ", ".join(zoo_names())
            )
        return spec.zoo
    assert spec.model_ref is not None
    candidate = spec.model_ref.replace("-", "_")
    if candidate in zoo_names():
        return candidate
    raise SpecError(
        "spec.modelRef.name",
        f"DNNModel {spec.model_ref!r} cannot be resolved offline",
        "a name matching a zoo model (mobilenet-v2), spec.model.zoo, or --profile",
    )


def plan_command(args: argparse.Namespace) -> int:
    from edgeai_worker.graph import GraphError

    spec = load_deployment(args.file)
    topology = load_topology(args.topology)
    profiles = [load_profile(p) for p in args.profile or []]
    model = _resolve_model(spec, profiles)
    method = args.compute
    if method == "auto":
        method = "measured" if profiles else "analytic"
    try:
        if not profiles:
            if method == "measured":
                from edgeai_worker import profiler

                path = model_path(model, "fp32")
                profiles = [profiler.profile_model(path, name=model, repeats=10)]
            else:
                profiles = [analytic_profile(model)]
        problem, context = build_problem(
            spec, profiles, topology, zone=args.zone, method=method, granularity=args.granularity
        )
    except GraphError as exc:
        raise SpecError(f"model {model}", str(exc)) from None
    plan = solve(spec, problem)
    doc = plan_document(spec, profiles, plan, context, method, granularity=args.granularity)
    if args.output == "yaml":
        sys.stdout.write(yaml.safe_dump(doc.to_dict(), sort_keys=False))
    elif args.output == "json":
        sys.stdout.write(json.dumps(doc.to_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(render_table(doc))
    if args.save:
        Path(args.save).write_text(yaml.safe_dump(doc.to_dict(), sort_keys=False))
    return 0 if plan.feasible else 1


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    profile = subparsers.add_parser(
        "profile", help="measure a model's per-segment latency, cut sizes and FLOPs"
    )
    profile.add_argument("model", metavar="MODEL", help="a zoo model name or an .onnx file")
    profile.add_argument("--variant", default="fp32", help="fp32 or a compressed variant")
    profile.add_argument(
        "--input-shape",
        action="append",
        metavar="[NAME=]SHAPE",
        help="the shape to profile an input at, for dimensions the model leaves free "
        f"(a free batch dimension is profiled at 1): {INPUT_SHAPE_FORM}",
    )
    profile.add_argument(
        "--input-value",
        action="append",
        metavar="NAME=NUMBER",
        help="fill an input with a number instead of random values, where the model "
        "branches on it (a sample rate, a mode); repeatable",
    )
    profile.add_argument("--repeats", type=int, default=20, help="timed runs per segment")
    profile.add_argument("--threads", type=int, default=None, help="onnxruntime threads")
    profile.add_argument(
        "--idle-ms",
        type=float,
        default=None,
        help="idleness before each timed run, as a request finds a stage that is not "
        "saturated (default 100; 0 times runs back to back)",
    )
    profile.add_argument(
        "--serving-requests",
        type=int,
        default=60,
        help="requests through a worker to measure the fixed per-request serving and "
        "forwarding overheads (servingMs, forwardingMs); 0 skips them",
    )
    profile.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml")
    profile.add_argument("--save", metavar="FILE", help="also write the profile to FILE")
    profile.add_argument(
        "--termination-log",
        metavar="PATH",
        nargs="?",
        const=TERMINATION_LOG,
        default=None,
        help="also write a compact JSON summary (< 4096 bytes) to PATH, "
        f"default {TERMINATION_LOG} (the container's termination message)",
    )
    profile.set_defaults(func=profile_command)

    plan = subparsers.add_parser(
        "plan", help="plan a DNNDeployment's partitions over a topology (offline)"
    )
    plan.add_argument("-f", "--file", required=True, help="a DNNDeployment manifest")
    plan.add_argument("--topology", default=str(DEFAULT_TOPOLOGY), help="a topology file")
    plan.add_argument(
        "--profile", action="append", help="a profile from edgeai profile (repeat once per variant)"
    )
    plan.add_argument(
        "--compute",
        choices=("auto", "measured", "analytic"),
        default="auto",
        help="tier compute from measured profiles or from FLOPs",
    )
    plan.add_argument("--zone", default=None, help="the zone whose devices to plan for")
    plan.add_argument(
        "--granularity",
        choices=("segments", "nodes"),
        default="segments",
        help="plan over segments between cuts (chain, exact DP) "
        "or over every ONNX node (DAG, min-cut); layers then count nodes",
    )
    plan.add_argument("-o", "--output", choices=("table", "yaml", "json"), default="table")
    plan.add_argument("--save", metavar="FILE", help="also write the plan YAML to FILE")
    plan.set_defaults(func=plan_command)
