"""The noise-trained private split for the zoo's `digits_cnn` (needs torch unless cached).

The device stage adds Gaussian noise (sigma = `feature_noise_std`) to the features it
sends upstream. A model that never saw such noise loses accuracy; here the layers after
the cut are fine-tuned on noisy features: the trained `digits_cnn`'s layers up to the
cut are frozen, the noise is drawn afresh for every batch of the digits train split, and
the layers after the cut learn from there. The result is exported as the whole model
(the same graph and tensor names; only the weights after the cut differ), so the stages
after the device cut their partitions from it exactly as from the plain model.

Files are cached in `zoo.cache_dir()` keyed by the cut, the noise level and a hash of
this module and the zoo; `prebuild()` builds the ones the worker image ships.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from edgeai_worker import zoo

if TYPE_CHECKING:
    import torch

EPOCHS = 40
# the digits_cnn graph, one node per torch layer (features 0-4, classifier 0-3)
LAYER_OPS = ("Conv", "Relu", "Conv", "Relu", "MaxPool", "Flatten", "Gemm", "Relu", "Gemm")
# the noise levels the worker image ships, at every cut (docs/privacy.md)
PREBUILT_STDS = (0.5, 1.0)
# the noise levels an accuracy floor chooses from, walked upwards
NOISE_LADDER = (0.1, 0.3, 0.5, 1.0, 2.0)
VALIDATION_DRAWS = 3


def first_layer_after(model: onnx.ModelProto, cut: str) -> int:
    """The index of the first `digits_cnn` layer after the single-tensor cut `cut` (0 for
    the input: all layers learn; 9 for the output: none)."""
    ops = tuple(node.op_type for node in model.graph.node)
    if ops != LAYER_OPS:
        raise ValueError(f"not the digits_cnn graph: its nodes are {list(ops)}")
    if cut == model.graph.input[0].name:
        return 0
    for i, node in enumerate(model.graph.node):
        if cut in node.output:
            return i + 1
    raise ValueError(f"{cut!r} is no tensor of digits_cnn (its cuts are its nodes' outputs)")


def _hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes() + zoo.code_hash().encode()).hexdigest()[:16]


def cached_path(cut: str, std: float) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", cut).strip("_")
    return zoo.cache_dir() / f"digits_cnn-noise-{slug}-{std:g}-{_hash()}.onnx"


def noise_trained_digits(cut: str, std: float, *, progress: bool = True) -> Path:
    """The ONNX file of `digits_cnn` with the layers after `cut` fine-tuned on features
    with Gaussian noise of std `std` (built once, then served from the cache)."""
    if not 0 < std <= 10:
        raise ValueError(f"noise std {std} is out of range (above 0, at most 10)")
    path = cached_path(cut, std)
    if path.exists():
        return path
    zoo._need_torch(f"digits_cnn noise-trained at {cut} (std {std:g})")
    first = first_layer_after(onnx.load(str(zoo.export_onnx("digits_cnn", trained=True))), cut)
    model = fine_tune(first, std, progress=progress)
    zoo.export_module(model, zoo.input_spec("digits_cnn")[1], path)
    return path


def fine_tune(
    first: int, std: float, *, epochs: int = EPOCHS, progress: bool = True
) -> torch.nn.Module:
    """The trained `digits_cnn` (a torch module) with layers `first`.. fine-tuned on the
    train split's features at that layer plus N(0, std) noise, seeded."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    model = zoo.trained_digits_cnn(progress=progress)
    features: Any = model.features
    classifier: Any = model.classifier
    layers = [*features, *classifier]
    prefix, suffix = nn.Sequential(*layers[:first]), nn.Sequential(*layers[first:])
    x_train, y_train, _, _ = zoo.digits_split()
    with torch.no_grad():
        features = prefix(torch.from_numpy(x_train))
    y = torch.from_numpy(y_train)
    generator = torch.Generator().manual_seed(zoo.SEED)
    parameters = list(suffix.parameters())
    if not parameters:
        return model.eval()
    optimizer = torch.optim.Adam(parameters, lr=1e-3)
    started = time.monotonic()
    for epoch in range(epochs):
        suffix.train()
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), 64):
            idx = order[start : start + 64]
            noise = torch.randn(features[idx].shape, generator=generator) * std
            loss = F.cross_entropy(suffix(features[idx] + noise), y[idx])
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        if progress and (epoch + 1) % 20 == 0:
            zoo._progress(
                f"noise training (std {std:g}, from layer {first}) epoch {epoch + 1}/{epochs} "
                f"loss={loss.item():.4f} ({time.monotonic() - started:.1f}s)"
            )
    return model.eval()


def validation_accuracy(cut: str, std: float) -> float:
    """The noise-trained model's accuracy on the validation half (even rows) of the
    held-out digits: the plain prefix, noise of `std` (seeded draws), the noise-trained
    suffix, with onnxruntime."""
    import numpy as np
    import onnxruntime as ort

    from edgeai_worker.graph import Partitioner

    def session(path: Path, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> Any:
        graph = Partitioner(onnx.load(str(path))).extract(inputs, outputs)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        return ort.InferenceSession(
            graph.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )

    plain = zoo.export_onnx("digits_cnn", trained=True)
    prefix = session(plain, ("input",), (cut,))
    suffix = session(noise_trained_digits(cut, std, progress=False), (cut,), ("output",))
    _, _, x_test, y_test = zoo.digits_split()
    x, y = x_test[0::2], y_test[0::2]
    (features,) = prefix.run(None, {"input": x})
    correct = 0
    for draw in range(VALIDATION_DRAWS):
        rng = np.random.default_rng(draw)
        noisy = (features + rng.normal(0.0, std, features.shape)).astype(np.float32)
        (logits,) = suffix.run(None, {cut: noisy})
        correct += int((np.asarray(logits).argmax(axis=1) == y).sum())
    return correct / (VALIDATION_DRAWS * len(y))


def std_for_floor(cut: str, floor: float) -> float:
    """The largest noise std of `NOISE_LADDER`, walked upwards until a level falls below
    the floor, whose noise-trained model keeps `floor` validation accuracy at `cut`."""
    chosen: float | None = None
    for std in NOISE_LADDER:
        if validation_accuracy(cut, std) < floor:
            break
        chosen = std
    if chosen is None:
        raise ValueError(
            f"no noise level keeps accuracy {floor:g} at {cut}: the least noise tried, "
            f"{NOISE_LADDER[0]:g}, scores {validation_accuracy(cut, NOISE_LADDER[0]):.4f}"
        )
    return chosen


def prebuild() -> list[Path]:
    """The noise-trained files for every cut of `digits_cnn` at `PREBUILT_STDS`."""
    model = onnx.load(str(zoo.export_onnx("digits_cnn", trained=True)))
    cuts = [model.graph.input[0].name, *(n.output[0] for n in model.graph.node[:-1])]
    return [noise_trained_digits(cut, std) for std in PREBUILT_STDS for cut in cuts]
