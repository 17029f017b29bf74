"""From a plan to the files and settings its stage workers run.

`load_plan` reads a Plan file into a `PlanDocument`; `model_file` finds the ONNX file
of the planned model (and variant); `build_partitions` cuts it into each stage's
partition(s). With a device stage first and adaptive-split alternatives, the device
holds every prefix its split may choose and the next stage the matching suffixes.
`stage_settings` is the worker config of one stage of a plan (what `edgeai run-stage`
serves in a stage pod).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeai_operator import TIERS
from edgeai_operator.errors import SpecError, read_yaml_documents
from edgeai_operator.files import file_sha256
from edgeai_operator.plandoc import PlanAlternative, PlanDocument, PlanStage

if TYPE_CHECKING:
    from edgeai_worker.offload.exits import ExitPoint


@dataclass
class StageSpec:
    """One stage as workers run it: its partition files and, on the device, the
    adaptive split's options (`edgeai_worker.config.WorkerConfig.splits`)."""

    index: int
    tier: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    partitions: list[Path] = field(default_factory=list)
    splits: list[dict[str, Any]] = field(default_factory=list)


def load_plan(path: Path, option: str = "-f") -> PlanDocument:
    """The Plan document in the file `path` (`option` names it in errors)."""
    docs = read_yaml_documents(path, option)
    if len(docs) != 1:
        raise SpecError(option, f"{path} holds {len(docs)} documents", "one Plan document")
    return PlanDocument.from_dict(docs[0])


def verified_model_file(plan: PlanDocument, path: Path) -> Path:
    """`path`, the file fetched for a plan whose model is a prepared artefact, once its
    sha256 is the plan's `model.digest`; a SpecError naming `--model-file` otherwise."""
    if not path.is_file():
        raise SpecError("--model-file", f"{path} is not a file")
    if plan.model.digest is None:
        raise SpecError(
            "plan.model.digest",
            f"the plan pins no digest to check {path} against",
            "a plan whose model has a uri and its sha256 digest",
        )
    actual = file_sha256(path)
    if actual != plan.model.digest:
        raise SpecError(
            "--model-file",
            f"{path} has digest {actual}, but the plan's model {plan.model.uri} has digest "
            f"{plan.model.digest}; refusing to serve it",
        )
    return path


def model_file(plan: PlanDocument, plan_path: Path) -> Path:
    """The ONNX file of the plan's model: `model.path` (relative to the plan file), or
    the zoo model in the planned variant (built as `model.build` says). A prepared
    artefact (`model.uri`) is not found here: its file is fetched (`edgeai fetch`) and
    named with `--model-file`."""
    model = plan.model
    if model.uri is not None and model.zoo is None and model.path is None:
        raise SpecError(
            "--model-file",
            f"the plan's model is the artefact {model.uri}, and no file of it was given",
            "--model-file=PATH, the artefact as `edgeai fetch` wrote it",
        )
    if model.path:
        path = (plan_path.parent / model.path).resolve()
        if not path.exists():
            raise SpecError("plan.model.path", f"{path} does not exist")
        return path
    assert model.zoo is not None  # PlanDocument.from_dict requires a zoo name or a path
    from edgeai_worker import zoo

    if model.zoo not in zoo.ZOO_NAMES:
        raise SpecError("plan.model.zoo", f"unknown model {model.zoo!r}", ", ".join(zoo.ZOO_NAMES))
    # a DNNModel's variant is named by its user; `build` says how its file is made
    build = model.build or model.variant
    if build not in (None, "fp32"):
        from edgeai_worker import variants

        if build not in variants.VARIANT_NAMES:
            field = "plan.model.build" if model.build else "plan.model.variant"
            raise SpecError(field, f"unknown variant {build!r}", ", ".join(variants.VARIANT_NAMES))
        return variants.variant_path(model.zoo, build)
    return zoo.export_onnx(model.zoo, trained=model.trained)


def build_partitions(
    stages: Sequence[PlanStage],
    alternatives: Sequence[PlanAlternative],
    model_path: Path,
    workdir: Path,
    *,
    adaptive: bool = True,
    exits: Sequence[ExitPoint] = (),
) -> list[StageSpec]:
    """Cut the model into each stage's partition files (and the adaptive split's).
    With `exits` (`exit_heads`), the heads that are files are grafted onto the model
    first (the exits a model declares are its own) and each stage's partition also
    outputs the exits whose tensor its layers compute."""
    import onnx

    from edgeai_worker.graph import Partitioner, cut_points
    from edgeai_worker.offload.exits import ExitHead, graft_exits, produced_exits

    model = onnx.load(str(model_path))
    heads = [h for h in exits if isinstance(h, ExitHead)]
    if heads:
        model = graft_exits(model, heads)
    partitioner = Partitioner(model)
    specs: list[StageSpec] = []
    for i, stage in enumerate(stages):
        spec = StageSpec(i, stage.tier, stage.inputs, stage.outputs)
        if set(spec.outputs) != set(spec.inputs):  # an empty stage only forwards
            try:
                sub = partitioner.extract(spec.inputs, spec.outputs)
                extra = produced_exits(sub, exits)
                if extra:
                    sub = partitioner.extract(spec.inputs, (*spec.outputs, *extra))
            except ValueError as exc:
                raise SpecError(f"plan.stages[{i}]", str(exc)) from None
            path = workdir / f"stage{i}-{spec.tier}.onnx"
            onnx.save(sub, str(path))
            spec.partitions.append(path)
        specs.append(spec)
    if adaptive and len(specs) == 1 and specs[0].tier == "device":
        # A device-only plan whose alternatives offload at other bandwidths: add the
        # stage they offload to, holding only the suffixes the device may hand over.
        tier = _offload_tier(alternatives)
        if tier is not None:
            outputs = specs[0].outputs
            specs.append(StageSpec(1, tier, outputs, outputs))
    if adaptive and len(specs) >= 2 and specs[0].tier == "device" and alternatives:
        cuts = cut_points(model, sized=False)  # the same cuts; no sizes needed here
        _adaptive_splits(specs, alternatives, partitioner, cuts, workdir)
    return specs


def _offload_tier(alternatives: Sequence[PlanAlternative]) -> str | None:
    """The tier right after the device in the alternatives that offload (the nearest
    such tier if they differ)."""
    found = {alt.stages[1][0] for alt in alternatives if len(alt.stages) > 1}
    return next((tier for tier in TIERS[1:] if tier in found), None)


def _adaptive_splits(
    specs: list[StageSpec],
    alternatives: Sequence[PlanAlternative],
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
        cut_index = alt.cut_index
        if cut_index is None or not (0 <= cut_index < end or cut_index == last):
            continue
        tensors = tuple(cuts[cut_index].tensors)
        option: dict[str, Any] = {
            "minMbps": alt.min_mbps,
            "maxMbps": alt.max_mbps if alt.max_mbps is not None else float("inf"),
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


# worker settings that only the device stage takes (edgeai_worker.config.WorkerConfig)
DEVICE_SETTINGS = frozenset(
    {
        "uplink_mbps",
        "skip_unchanged_threshold",
        "feature_noise_std",
        "raw_input_stays_on_device",
        "noise_seed",
    }
)


def plan_settings(plan: PlanDocument, tier: str) -> dict[str, Any]:
    """The worker settings the plan itself carries for a stage on `tier`: every stage's
    default request priority, the device stage's privacy and change detection, and the
    homomorphic head."""
    settings: dict[str, Any] = {
        "default_priority": plan.priority,
        "raw_input_stays_on_device": plan.raw_input_stays_on_device,
        "feature_noise_std": plan.feature_noise_std,
        "skip_unchanged_threshold": plan.skip_unchanged_threshold,
        # the device encrypts, the stage after it (the last) evaluates the dense head
        **({"homomorphic_head": True} if plan.homomorphic_head else {}),
    }
    return {k: v for k, v in settings.items() if tier == "device" or k not in DEVICE_SETTINGS}


# --- the noise-trained private split (spec.privacy.noiseTraining) ---------------------


def _noise_cut(plan: PlanDocument) -> str | None:
    """The tensor the device sends upstream (None: nothing runs after the device)."""
    first_up = next((s for s in plan.stages if s.tier != "device"), None)
    if first_up is None:
        return None
    model = plan.model
    variant = model.build or model.variant or "fp32"
    if model.zoo != "digits_cnn" or not model.trained or variant != "fp32":
        raise SpecError(
            "spec.privacy.noiseTraining",
            f"the noise-trained layers are built for the zoo's trained digits_cnn (fp32), "
            f"not model {model.name!r} ({'trained' if model.trained else 'random'} weights, "
            f"variant {variant})",
            "a deployment of the trained digits_cnn in its fp32 variant, or noiseTraining: false",
        )
    (cut,) = first_up.inputs  # digits_cnn is a chain: single-tensor cuts
    return cut


def noise_std(plan: PlanDocument) -> float:
    """The device's feature noise: the plan's featureNoiseStd, or with
    noiseAccuracyFloor the largest std whose noise-trained model keeps the floor
    (edgeai_worker.noise_training.std_for_floor)."""
    floor = plan.noise_accuracy_floor
    cut = _noise_cut(plan) if floor is not None else None
    if floor is None or cut is None:
        return plan.feature_noise_std
    from edgeai_worker.noise_training import std_for_floor

    try:
        return std_for_floor(cut, floor)
    except ValueError as exc:
        raise SpecError("spec.privacy.noiseAccuracyFloor", str(exc), "a lower floor") from None


def noise_trained_model(plan: PlanDocument, stage: int) -> Path | None:
    """The model file that stage `stage` cuts its partitions from when the plan trains on
    the device's feature noise: `digits_cnn` with the layers after the device's cut
    fine-tuned on features with the device's noise (edgeai_worker.noise_training).
    None for the device stage and for plans without noise training."""
    if not plan.noise_training or stage < 0 or plan.stages[stage].tier == "device":
        return None
    cut = _noise_cut(plan)
    assert cut is not None  # stage is after the device
    from edgeai_worker.noise_training import noise_trained_digits

    return noise_trained_digits(cut, noise_std(plan))


# --- per-input offloading (spec.offload; edgeai_worker.offload) -----------------------


def _digits_only(plan: PlanDocument) -> None:
    """SpecError unless the plan serves the zoo's digits_cnn, as a zoo model or as a
    prepared copy whose profile carried the zoo's calibration."""
    calibrated = plan.offload is not None and plan.offload.calibration == "digits_cnn"
    if plan.model.zoo != "digits_cnn" and not calibrated:
        raise SpecError(
            "spec.offload",
            f"cascades, exits and reuse are built and calibrated for the zoo's digits_cnn, "
            f"not model {plan.model.name!r}",
            "a deployment of digits_cnn, or no spec.offload",
        )


def exit_heads(plan: PlanDocument) -> tuple[ExitPoint, ...]:
    """The exits of a plan with `offload.exits`: those the model declares (its own
    outputs), else the heads it grafts onto digits_cnn (prebuilt in the zoo cache,
    `edgeai_worker.offload.build.prebuild_offload`); none otherwise."""
    if plan.offload is None or plan.offload.exits_rule is None:
        return ()
    if plan.offload.declared_exits:
        return plan.offload.declared_exits
    _digits_only(plan)
    from edgeai_worker.offload.build import prebuild_offload
    from edgeai_worker.offload.exits import read_heads

    return read_heads(prebuild_offload(progress=False))


def offload_settings(
    plan: PlanDocument,
    stage: int,
    workdir: Path,
    model_path: Path | None = None,
    reuse_data: Path | None = None,
    cascade_models: Sequence[Path] = (),
) -> dict[str, Any]:
    """The worker's `offload` setting for stage `stage` (-1: the device entry) of a
    plan with `offload`: on the device, the cascade (its small models and the
    threshold for the plan's target accuracy); on every stage whose layers compute an
    exit's tensor, that exit with its threshold; on the first stage after the device,
    result reuse (the distance calibrated, on what that stage receives, for the plan's
    largest accuracy loss). Empty for the other stages and for plans without offload.
    Models and thresholds come from the prebuilt files (no torch); a reuse key model
    is written to `workdir/offload`; `model_path` is the plan's model, needed when the
    reusing stage receives features instead of the input. A user's model (exits it
    declares, reuse calibrated on the labelled rows its preparation stored: the file
    `reuse_data`, checked against the plan's digest, a cascade from the small models
    its preparation stored: `cascade_models`, checked likewise, with the plan's
    threshold) needs no prebuilt files."""
    offload = plan.offload
    if offload is None:
        return {}
    tier = "device" if stage == -1 else plan.stages[stage].tier
    first_up = next((i for i, s in enumerate(plan.stages) if s.tier != "device"), None)
    cascade = offload.cascade_rule is not None and tier == "device"
    reuse = offload.reuse_entries > 0 and stage == first_up
    exits = offload.exits_rule is not None and stage >= 0
    if not cascade and not reuse and not exits:
        return {}
    import onnx

    from edgeai_worker.graph import Partitioner
    from edgeai_worker.offload.exits import produced_exits

    # the plan's model, read by exits and reuse only (a device entry's cascade needs none)
    source = model_path or (model_file(plan, Path(".")) if exits or reuse else Path())
    user = offload.declared_exits or offload.reuse_data is not None or offload.cascade_models
    if user:
        own: dict[str, Any] = {}
        if cascade:
            own.update(_user_cascade(plan, cascade_models))
        if exits and offload.declared_exits:
            declared = _declared_settings(plan, stage, source)
            if declared["exits"]:
                own.update(declared)
        if reuse and offload.reuse_data is not None:
            assert first_up is not None
            own.update(_user_reuse(plan, first_up, workdir, source, reuse_data))
        return {"offload": own} if own else {}
    _digits_only(plan)
    from edgeai_worker.offload.build import calibrate_reuse, prebuild_offload
    from edgeai_worker.offload.exits import calibrated, read_heads

    files = prebuild_offload(progress=False)
    settings: dict[str, Any] = {}
    if exits:
        found = calibrated(files, str(offload.exits_rule), offload.exits_target_accuracy or 0.0)
        heads = read_heads(files)
        ours: list[str] = []
        current = plan.stages[stage]
        if set(current.outputs) != set(current.inputs):
            part = Partitioner(onnx.load(str(source))).extract(current.inputs, current.outputs)
            ours = produced_exits(part, heads)
        settings["rule"] = found.rule
        settings["exits"] = [
            {"output": h.output, "threshold": t}
            for h, t in zip(heads, found.exit_thresholds, strict=True)
            if h.output in ours
        ]
    if cascade:
        rule = str(offload.cascade_rule)
        smalls = ["small.onnx", "small2.onnx"] if rule == "disagreement" else ["small.onnx"]
        settings["rule"] = rule
        settings["cascadeModels"] = [str(files / m) for m in smalls]
        settings["cascadeThreshold"] = calibrated(
            files, rule, offload.target_accuracy or 0.0
        ).cascade_threshold
    if reuse:
        assert first_up is not None
        prefix = _reuse_prefix(plan, first_up, workdir, source)
        distance = calibrate_reuse(
            files, offload.reuse_entries, offload.reuse_max_accuracy_loss, prefix
        )
        settings["reuseEntries"] = offload.reuse_entries
        settings["reuseMaxDistance"] = distance["max_distance"]
    if not settings.get("exits") and not cascade and not reuse:
        return {}
    return {"offload": settings}


def _checked_file(path: Path | None, digest: str, flag: str, what: str) -> Path:
    """`path` once it is a file whose sha256 is `digest`; SpecError naming `flag`."""
    if path is None or not path.is_file():
        raise SpecError(flag, f"{what}: no such file ({path})", "the file the pod fetched")
    actual = file_sha256(path)
    if actual != digest:
        raise SpecError(flag, f"{path} has digest {actual}, the plan's {digest}; refusing it")
    return path


def _user_cascade(plan: PlanDocument, files: Sequence[Path]) -> dict[str, Any]:
    """The cascade setting of a user's model's device stage: the small models the plan
    names (the fetched `files`, in its order, digests checked) and its threshold."""
    offload = plan.offload
    assert offload is not None
    if not offload.cascade_models:
        _digits_only(plan)  # a cascade on a user's model without small models
    if len(files) != len(offload.cascade_models):
        raise SpecError(
            "--cascade-model",
            f"{len(files)} given, the plan's cascade runs {len(offload.cascade_models)}",
            "one file per small model the plan names, in its order",
        )
    checked = [
        str(_checked_file(f, m.digest, "--cascade-model", f"small model {m.uri}"))
        for f, m in zip(files, offload.cascade_models, strict=True)
    ]
    return {
        "rule": offload.cascade_rule,
        "cascadeModels": checked,
        "cascadeThreshold": offload.cascade_threshold,
        "finalOutput": offload.final_output or "output",
    }


def _reuse_prefix(plan: PlanDocument, stage: int, workdir: Path, source: Path) -> Path | None:
    """The model from the input to what stage `stage` receives (the reuse cache's
    keys), written to `workdir/offload`; None when it receives the input."""
    import onnx

    from edgeai_worker.graph import Partitioner

    inputs = plan.stages[stage].inputs
    if inputs == (plan.model.input.name,):
        return None
    (workdir / "offload").mkdir(parents=True, exist_ok=True)
    prefix = workdir / "offload" / f"to-stage{stage}.onnx"
    graph = Partitioner(onnx.load(str(source))).extract((plan.model.input.name,), inputs)
    onnx.save(graph, str(prefix))
    return prefix


def _user_reuse(
    plan: PlanDocument, stage: int, workdir: Path, source: Path, data: Path | None
) -> dict[str, Any]:
    """The reuse setting of a user's model's first stage after the device: the distance
    calibrated on the labelled rows its preparation stored (`data`, the plan's digest)."""
    from edgeai_worker.offload.build import calibrate_reuse_on_data

    offload = plan.offload
    assert offload is not None
    assert offload.reuse_data is not None
    data = _checked_file(
        data,
        offload.reuse_data.digest,
        "--reuse-data",
        f"the labelled rows stage {stage} calibrates its reuse on",
    )
    found = calibrate_reuse_on_data(
        data,
        source,
        plan.model.input.name,
        offload.reuse_data.final_output,
        offload.reuse_entries,
        offload.reuse_max_accuracy_loss,
        _reuse_prefix(plan, stage, workdir, source),
    )
    return {"reuseEntries": offload.reuse_entries, "reuseMaxDistance": found["max_distance"]}


def _declared_settings(plan: PlanDocument, stage: int, model_path: Path) -> dict[str, Any]:
    """The offload setting of a stage of a plan whose model declares its exits: those
    its layers compute, with the plan's thresholds, and the model's final output."""
    import onnx

    from edgeai_worker.graph import Partitioner
    from edgeai_worker.offload.exits import produced_exits

    offload = plan.offload
    assert offload is not None
    current = plan.stages[stage]
    ours: list[str] = []
    if set(current.outputs) != set(current.inputs):
        part = Partitioner(onnx.load(str(model_path))).extract(current.inputs, current.outputs)
        ours = produced_exits(part, offload.declared_exits)
    return {
        "rule": offload.exits_rule,
        "exits": [
            {"output": e.output, "threshold": e.threshold}
            for e in offload.declared_exits
            if e.output in ours
        ],
        "finalOutput": offload.final_output or "output",
    }


def stage_settings(
    plan: PlanDocument,
    stage: int,
    *,
    plan_path: Path,
    workdir: Path,
    host: str,
    port: int,
    next_urls: Sequence[str] = (),
    model_path: Path | None = None,
    grpc_port: int | None = None,
    reuse_data: Path | None = None,
    cascade_models: Sequence[Path] = (),
) -> dict[str, Any]:
    """The worker config of one stage (see `edgeai_worker.config.WorkerConfig`):
    its partitions cut into `workdir` from `model_path` (the fetched artefact, checked
    against the plan's digest) or else `model_file(plan, plan_path)` (`reuse_data`: the
    labelled rows a user's model's reusing stage calibrates on), the model's
    identity (digest, variant, uri) for its metadata, the device stage's privacy and
    change detection, and every stage's default request priority. Stage -1 is the device
    entry of a plan that runs nothing on the device: it serves the model name and
    forwards."""
    if not -1 <= stage < len(plan.stages):
        raise SpecError("--stage", f"{stage} is out of range", f"-1 to {len(plan.stages) - 1}")
    tier = "device" if stage == -1 else plan.stages[stage].tier
    settings: dict[str, Any] = {
        "model_name": plan.model.name,
        "host": host,
        "port": port,
        "tier": tier,
        "stage_index": max(stage, 0),
        "next_urls": list(next_urls),
        "partitions": [],
        "model_digest": plan.model.digest,
        "model_variant": plan.model.variant,
        "model_uri": plan.model.uri,
        **plan_settings(plan, tier),
    }
    if tier == "device" and plan.noise_accuracy_floor is not None:
        settings["feature_noise_std"] = noise_std(plan)
    if grpc_port is not None:
        settings["grpc_port"] = grpc_port
    if model_path is not None:
        # checked even for the entry stage: no stage serves under a wrong artefact
        verified_model_file(plan, model_path)
    fallback = tier == "device" and plan.fallback == "device" and bool(next_urls)
    if stage < 0:
        # an entry that runs no layers still runs the cascade (the small models first,
        # the raw input forwarded on an escalation), with or without the fallback model
        settings.update(
            offload_settings(
                plan, stage, workdir, reuse_data=reuse_data, cascade_models=cascade_models
            )
        )
        if not fallback:
            return settings
    source = model_path if model_path is not None else model_file(plan, plan_path)
    if fallback:
        # the whole model as it is: the device answers alone when the next stage cannot
        settings["fallback_model"] = str(source)
        settings["fallback_after_ms"] = plan.fallback_after_ms
    if stage >= 0:
        noisy = noise_trained_model(plan, stage)
        if noisy is not None:  # its own folder: a shared workdir keeps the plain files
            (workdir / "noise-trained").mkdir(parents=True, exist_ok=True)
        cut_into = workdir if noisy is None else workdir / "noise-trained"
        specs = build_partitions(
            plan.stages, plan.alternatives, noisy or source, cut_into, exits=exit_heads(plan)
        )
        settings["partitions"] = [str(p) for p in specs[stage].partitions]
        settings["splits"] = specs[stage].splits
        settings.update(offload_settings(plan, stage, workdir, source, reuse_data, cascade_models))
    return settings
