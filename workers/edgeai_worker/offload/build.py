"""Early exits and cascades for the zoo's `digits_cnn`, trained on scikit-learn's digits
and exported to ONNX, with thresholds calibrated on held-out digits (needs torch).

- Exits: two heads on the trained, frozen `digits_cnn` backbone, `exit_0` after the
  first convolution (max-pool + linear) and `exit_1` after the pooled features (linear),
  trained on the train split. `exits.onnx` is the model with the heads' logits as
  extra outputs (`output`, `exit_0`, `exit_1`, the form a user's model declares exits
  in); the tensors the heads branch from are renamed `features_0` and `features_1`, so
  the model cuts there: `device-exits.onnx` (input -> features_1, exit_0, exit_1) and
  `edge-from-features.onnx` (features_1 -> output).
- Cascade: the small models are the distilled student (`distilled` variant) and a
  64-32-10 perceptron (the second opinion of the disagreement rule); the large one is
  `digits_cnn` itself (`full.onnx`).
- Data: the held-out quarter of `zoo.digits_split()` is halved, even rows for
  calibration ("validation"), odd rows for every accuracy this module reports
  ("held-out"), so no threshold is fitted on the data it is judged on.
- Prebuilt (`prebuild_offload`, part of `variants.prebuild_digits`): the exit heads as
  files of their own, the small models and the validation tables, in the zoo cache, so
  a stage without torch grafts the heads onto its model and calibrates for any target
  (`offload.exits`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from edgeai_worker import variants, zoo
from edgeai_worker.offload.gate import RULES, calibrate_thresholds, confidence

if TYPE_CHECKING:
    import torch

EXIT_OUTPUTS = ("exit_0", "exit_1")
FEATURES = ("features_0", "features_1")


def validation_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_val, y_val, x_heldout, y_heldout): the even and odd rows of the test split."""
    _, _, x_test, y_test = zoo.digits_split()
    return x_test[0::2], y_test[0::2], x_test[1::2], y_test[1::2]


def _heads() -> tuple[torch.nn.Module, torch.nn.Module]:
    from torch import nn

    return (
        nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 10)),
        nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 10)),
    )


def exits_module(*, progress: bool = True) -> torch.nn.Module:
    """`digits_cnn` (trained) with its two exit heads trained on the frozen backbone;
    forward returns (output, exit_0, exit_1)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    backbone = zoo.trained_digits_cnn(progress=progress)
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    head0, head1 = _heads()

    class DigitsWithExits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.exit0 = head0
            self.exit1 = head1

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            f: Any = self.backbone.features
            a = f[1](f[0](x))
            b = f[4](f[3](f[2](a)))
            classifier: Any = self.backbone.classifier
            return classifier(b), self.exit0(a), self.exit1(b)

    model = DigitsWithExits()
    cached = zoo.cache_dir() / f"digits_cnn-exits-{_hash()}.pt"
    if cached.exists():
        state = torch.load(cached, weights_only=True)
        head0.load_state_dict(state["exit0"])
        head1.load_state_dict(state["exit1"])
        return model.eval()
    x_train, y_train, _, _ = zoo.digits_split()
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    torch.manual_seed(zoo.SEED)
    optimizer = torch.optim.Adam([*head0.parameters(), *head1.parameters()], lr=3e-3)
    started = time.monotonic()
    for epoch in range(40):
        model.train()
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            _, e0, e1 = model(x[idx])
            loss = F.cross_entropy(e0, y[idx]) + F.cross_entropy(e1, y[idx])
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        if progress and (epoch + 1) % 20 == 0:
            zoo._progress(
                f"exit heads epoch {epoch + 1}/40 loss={loss.item():.4f} "
                f"({time.monotonic() - started:.1f}s)"
            )
    torch.save({"exit0": head0.state_dict(), "exit1": head1.state_dict()}, cached)
    return model.eval()


def _hash() -> str:
    import hashlib

    return hashlib.sha256(Path(__file__).read_bytes() + zoo.code_hash().encode()).hexdigest()[:16]


def _mlp(*, progress: bool = True) -> torch.nn.Module:
    import torch
    from torch import nn

    model: torch.nn.Module = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    cached = zoo.cache_dir() / f"digits-mlp-{_hash()}.pt"
    if cached.exists():
        model.load_state_dict(torch.load(cached, weights_only=True))
        return model.eval()
    model = zoo.train_digits(model, epochs=60, progress=progress)
    torch.save(model.state_dict(), cached)
    return model


def branch_tensor(model: onnx.ModelProto, output: str) -> str:
    """The tensor an exit head (a chain ending in `output`) branches off the backbone
    from: walking back from `output`, the first tensor with another consumer."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    initializers = {i.name for i in graph.initializer}
    tensor = output
    while tensor in producer:
        node = producer[tensor]
        inputs = [i for i in node.input if i and i not in initializers]
        if len(inputs) != 1:
            raise ValueError(f"exit '{output}': node {node.name} has {len(inputs)} inputs")
        tensor = inputs[0]
        if consumers.get(tensor, 0) > 1:
            return str(tensor)
    raise ValueError(f"exit '{output}' does not branch off the model")


def rename_tensor(model: onnx.ModelProto, old: str, new: str) -> None:
    for node in model.graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
        node.output[:] = [new if o == old else o for o in node.output]
    for value in [*model.graph.value_info, *model.graph.output]:
        if value.name == old:
            value.name = new


def export_exits(path: Path, *, progress: bool = True) -> Path:
    """The exits model as ONNX: outputs output, exit_0, exit_1; features_0/1 named."""
    import warnings

    import torch

    model = exits_module(progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros((1, 1, 8, 8)),),
            str(path),
            input_names=[zoo.INPUT_NAME],
            output_names=[zoo.OUTPUT_NAME, *EXIT_OUTPUTS],
            dynamic_axes={
                name: {0: "batch"} for name in (zoo.INPUT_NAME, zoo.OUTPUT_NAME, *EXIT_OUTPUTS)
            },
            opset_version=zoo.OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    graph = onnx.load(str(path))
    for exit_name, features in zip(EXIT_OUTPUTS, FEATURES, strict=True):
        rename_tensor(graph, branch_tensor(graph, exit_name), features)
    onnx.save(graph, str(path))
    return path


def _run(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of a digits model at `path` on the rows of `x`."""
    return _outputs(path, zoo.INPUT_NAME, x)


def _correct(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    result: np.ndarray = logits.argmax(axis=1) == labels
    return result


def calibrate(
    exits_path: Path,
    small_paths: Sequence[Path],
    target_accuracy: float,
    rule: str,
) -> dict[str, Any]:
    """Thresholds for the exits and for the cascade under `rule`, calibrated on the
    validation half for `target_accuracy`, and what they give on the held-out half."""
    x_val, y_val, x_ho, y_ho = validation_split()
    result: dict[str, Any] = {"rule": rule, "targetAccuracy": target_accuracy}
    for name, xs, ys in (("validation", x_val, y_val), ("heldout", x_ho, y_ho)):
        outputs = _run(exits_path, xs)
        small = [_run(p, xs)[zoo.OUTPUT_NAME] for p in small_paths]
        second = small[1] if len(small) > 1 else None
        final_correct = _correct(outputs[zoo.OUTPUT_NAME], ys)
        if rule != "disagreement":
            exit_conf = [confidence(outputs[e], rule) for e in EXIT_OUTPUTS]
            exit_correct = [_correct(outputs[e], ys) for e in EXIT_OUTPUTS]
        cascade_conf = [confidence(small[0], rule, second)]
        cascade_correct = [_correct(small[0], ys)]
        if name == "validation":
            if rule != "disagreement":
                exits = calibrate_thresholds(
                    exit_conf, exit_correct, final_correct, target_accuracy
                )
                result["exitThresholds"] = list(exits.thresholds)
                result["validation"] = {"exits": asdict(exits)}
            else:
                result["validation"] = {}
            cascade = calibrate_thresholds(
                cascade_conf, cascade_correct, final_correct, target_accuracy
            )
            result["cascadeThreshold"] = cascade.thresholds[0]
            result["validation"]["cascade"] = asdict(cascade)
        else:
            from edgeai_worker.offload.gate import mix_outcome

            held: dict[str, Any] = {"finalAccuracy": float(final_correct.mean())}
            if rule != "disagreement":
                by, acc = mix_outcome(
                    exit_conf, exit_correct, final_correct, result["exitThresholds"]
                )
                held["exits"] = {
                    "accuracy": acc,
                    "exitRates": [float(np.mean(by == k)) for k in range(len(EXIT_OUTPUTS))],
                }
            by, acc = mix_outcome(
                cascade_conf, cascade_correct, final_correct, [result["cascadeThreshold"]]
            )
            held["cascade"] = {"accuracy": acc, "escalationRate": float(np.mean(by == 1))}
            result["heldout"] = held
    return result


def build_digits_offload(
    workdir: Path, target_accuracy: float, *, progress: bool = True
) -> dict[str, Any]:
    """Every file the digits offloading serves, written into `workdir`, and the
    calibration per rule (also `calibration.json` there)."""
    from edgeai_worker.graph import Partitioner

    workdir.mkdir(parents=True, exist_ok=True)
    exits_path = export_exits(workdir / "exits.onnx", progress=progress)
    partitioner = Partitioner(onnx.load(str(exits_path)))
    onnx.save(
        partitioner.extract((zoo.INPUT_NAME,), (FEATURES[1], *EXIT_OUTPUTS)),
        str(workdir / "device-exits.onnx"),
    )
    onnx.save(
        partitioner.extract((FEATURES[1],), (zoo.OUTPUT_NAME,)),
        str(workdir / "edge-from-features.onnx"),
    )
    shutil.copyfile(zoo.export_onnx("digits_cnn", trained=True), workdir / "full.onnx")
    shutil.copyfile(variants.variant_path("digits_cnn", "distilled"), workdir / "small.onnx")
    zoo.export_module(_mlp(progress=progress), (1, 1, 8, 8), workdir / "small2.onnx")
    smalls = [workdir / "small.onnx", workdir / "small2.onnx"]
    calibration = {
        rule: calibrate(
            exits_path, smalls if rule == "disagreement" else smalls[:1], target_accuracy, rule
        )
        for rule in RULES
    }
    (workdir / "calibration.json").write_text(json.dumps(calibration, indent=2))
    return calibration


def locality_stream(
    x: np.ndarray, y: np.ndarray, n: int, seed: int, low: float = 0.0, high: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """`n` inputs as a camera or a neighbourhood sends them: 40 % exact repeats and 30 %
    perturbed repeats (Gaussian noise, sigma 0.03 of the value range [low, high], clipped
    to it) of one of the last 20 inputs, the rest new rows of `x` in turn."""
    rng = np.random.default_rng(seed)
    sigma = 0.03 * (high - low)
    xs: list[np.ndarray] = []
    ys: list[int] = []
    fresh = 0
    for _ in range(n):
        draw = rng.random()
        if xs and draw < 0.7:
            j = len(xs) - 1 - int(rng.integers(0, min(20, len(xs))))
            frame = xs[j]
            if draw >= 0.4:
                noise = rng.normal(scale=sigma, size=frame.shape)
                frame = np.clip(frame + noise, low, high).astype(frame.dtype)
            xs.append(frame)
            ys.append(ys[j])
        else:
            xs.append(x[fresh % len(x)])
            ys.append(int(y[fresh % len(y)]))
            fresh += 1
    return np.stack(xs), np.asarray(ys)


def calibrate_reuse(
    workdir: Path, entries: int, max_accuracy_loss: float, prefix: Path | None = None
) -> dict[str, Any]:
    """The reuse distance for the full model's cache of `entries`, calibrated on a
    locality stream of the validation half for at most `max_accuracy_loss`; keys are
    the inputs, or what the model `prefix` makes of them (a stage receiving features)."""
    x_val, y_val, _, _ = validation_split()
    stream = locality_stream(x_val, y_val, 600, seed=1)
    return _calibrate_stream(
        stream, workdir / "full.onnx", zoo.INPUT_NAME, zoo.OUTPUT_NAME, entries,
        max_accuracy_loss, prefix,
    )  # fmt: skip


def calibrate_reuse_on_data(
    data_file: Path,
    model: Path,
    input_name: str,
    final_output: str,
    entries: int,
    max_accuracy_loss: float,
    prefix: Path | None = None,
) -> dict[str, Any]:
    """`calibrate_reuse` for any single-input model: the stream is drawn from the
    labelled rows of `data_file` (arrays by input name and `labels`, what the
    preparation stores for it), its noise scaled to the rows' value range, and the
    answers are the model's `final_output`."""
    with np.load(data_file, allow_pickle=False) as npz:
        x, y = np.asarray(npz[input_name]), np.asarray(npz["labels"])
    stream = locality_stream(x, y, 600, seed=1, low=float(x.min()), high=float(x.max()))
    return _calibrate_stream(
        stream, model, input_name, final_output, entries, max_accuracy_loss, prefix
    )


def _calibrate_stream(
    stream: tuple[np.ndarray, np.ndarray],
    model: Path,
    input_name: str,
    output: str,
    entries: int,
    max_accuracy_loss: float,
    prefix: Path | None,
) -> dict[str, Any]:
    from edgeai_worker.offload.reuse import calibrate_distance

    xs, ys = stream
    answers = _outputs(model, input_name, xs)[output]
    predictions = answers.reshape(len(answers), -1).argmax(axis=1)
    keys = xs if prefix is None else next(iter(_outputs(prefix, input_name, xs).values()))
    found = calibrate_distance(list(keys), list(predictions), list(ys), entries, max_accuracy_loss)
    return asdict(found)


def _outputs(path: Path, input_name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of the model at `path` on the rows of `x`, run in the model's
    fixed batch when it has one (the last batch padded with its own first row)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    first = next(i for i in session.get_inputs() if i.name == input_name).shape[0]
    batch = first if isinstance(first, int) and first > 0 else len(x)
    runs = []
    for start in range(0, len(x), batch):
        chunk = x[start : start + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, axis=0)])
        out = session.run(None, {input_name: chunk})
        runs.append([o[: batch - pad] for o in out])
    return {n: np.concatenate([r[k] for r in runs]) for k, n in enumerate(names)}


def digits_offload_files(workdir: Path, target_accuracy: float) -> dict[str, Any]:
    """`build_digits_offload` once per workdir and target (its calibration.json, with
    the target in it, says whether the files there are for this target)."""
    calibration_file = workdir / "calibration.json"
    if calibration_file.exists():
        calibration: dict[str, Any] = json.loads(calibration_file.read_text())
        if all(c.get("targetAccuracy") == target_accuracy for c in calibration.values()):
            return calibration
    return build_digits_offload(workdir, target_accuracy)


# --- prebuilt: what a stage serving spec.offload reads, built once with torch ----------


def prebuilt_dir() -> Path:
    """Where `prebuild_offload` keeps its files (the zoo cache, keyed by the code)."""
    return zoo.cache_dir() / f"digits_cnn-offload-{_hash()}"


def _session_outputs(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {zoo.INPUT_NAME: x}), strict=True))


def _backbone_tensor(backbone: onnx.ModelProto, features: np.ndarray, x: np.ndarray) -> str:
    """The tensor of `backbone` holding `features` (what an exit head reads) on `x`:
    the exits model is exported from a module wrapping the backbone, so its names
    differ; its values do not."""
    probe = onnx.ModelProto()
    probe.CopyFrom(backbone)
    names = [str(o) for n in probe.graph.node for o in n.output]
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    values = _session_outputs(probe, x)
    for name in names:
        value = values[name]
        if value.shape == features.shape and np.allclose(value, features, atol=1e-5):
            return name
    raise ValueError("no backbone tensor holds the exit head's features")


def prebuild_offload(*, progress: bool = True) -> Path:
    """The files a stage serving `spec.offload` for `digits_cnn` reads, built once into
    `prebuilt_dir()`: the exit heads (`exit_k.onnx`, input named after the backbone
    tensor it reads, listed in `heads.json`), the cascade's small models
    (`small.onnx`, `small2.onnx`), the full model (`full.onnx`) and the validation
    tables (`validation.npz`) thresholds are calibrated from for any target."""
    from edgeai_worker.graph import Partitioner
    from edgeai_worker.offload.exits import EXIT_RULES, TABLES_FILE, ExitHead, write_heads

    folder = prebuilt_dir()
    if (folder / TABLES_FILE).exists():
        return folder
    if importlib.util.find_spec("torch") is None:
        raise RuntimeError(
            f"the offload files are not prebuilt in {folder} and torch, which builds "
            "them, is not installed (build them with edgeai_worker.variants.prebuild_digits)"
        )
    work = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    exits_path = export_exits(work / "exits.onnx", progress=progress)
    exits_model = onnx.load(str(exits_path))
    partitioner = Partitioner(exits_model)
    shutil.copyfile(zoo.export_onnx("digits_cnn", trained=True), work / "full.onnx")
    shutil.copyfile(variants.variant_path("digits_cnn", "distilled"), work / "small.onnx")
    zoo.export_module(_mlp(progress=progress), (1, 1, 8, 8), work / "small2.onnx")
    backbone = onnx.load(str(work / "full.onnx"))
    x_val, y_val, _, _ = validation_split()
    features = _session_outputs(partitioner.extract((zoo.INPUT_NAME,), FEATURES), x_val)
    heads = []
    for exit_name, feature in zip(EXIT_OUTPUTS, FEATURES, strict=True):
        after = _backbone_tensor(backbone, features[feature], x_val)
        head = partitioner.extract((feature,), (exit_name,))
        rename_tensor(head, feature, after)
        for value in head.graph.input:
            value.name = after if value.name == feature else value.name
        onnx.save(head, str(work / f"{exit_name}.onnx"))
        heads.append(ExitHead(exit_name, after, work / f"{exit_name}.onnx", 10 * 4))
    write_heads(work, heads)
    (work / "exits.onnx").unlink()
    from edgeai_worker.offload.exits import graft_exits

    outputs = _session_outputs(graft_exits(backbone, heads), x_val)
    small = [_run(work / m, x_val)[zoo.OUTPUT_NAME] for m in ("small.onnx", "small2.onnx")]
    tables: dict[str, np.ndarray] = {
        "final_correct": _correct(outputs[zoo.OUTPUT_NAME], y_val),
        "exits_correct": np.stack([_correct(outputs[e], y_val) for e in EXIT_OUTPUTS]),
        "cascade_correct": _correct(small[0], y_val),
    }
    for rule in EXIT_RULES:
        tables[f"exits_{rule}"] = np.stack([confidence(outputs[e], rule) for e in EXIT_OUTPUTS])
    for rule in RULES:
        second = small[1] if rule == "disagreement" else None
        tables[f"cascade_{rule}"] = confidence(small[0], rule, second)
    np.savez(work / TABLES_FILE, **tables)  # type: ignore[arg-type]
    shutil.rmtree(folder, ignore_errors=True)
    work.rename(folder)
    return folder
