"""Compressed model variants and their accuracy on held-out digits.

- `int8-dynamic`: onnxruntime dynamic quantization (int8 weights, activations
  quantized on the fly).
- `int8-static`: onnxruntime static QDQ quantization, per-channel weights, activation
  ranges calibrated on 256 images of the digits train split (random inputs for the
  latency-only zoo models).
- `pruned-50`: global magnitude pruning of half the conv/linear weights; the digits
  model is fine-tuned for a few epochs with the mask held.
- `distilled`: a 10x smaller student CNN trained on the teacher's softened outputs
  (digits only).

Accuracy is measured with onnxruntime on the fixed held-out split of
`zoo.digits_split()`. Built files are cached next to the zoo's, keyed by the code
hash of this module and the zoo.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxruntime as ort

from edgeai_worker import zoo

if TYPE_CHECKING:
    import torch

VARIANT_NAMES = ("fp32", "int8-dynamic", "int8-static", "pruned-50", "distilled")
CALIBRATION_IMAGES = 256
PRUNE_SPARSITY = 0.5


def _hash() -> str:
    source = Path(__file__).read_bytes() + zoo.code_hash().encode()
    return hashlib.sha256(source).hexdigest()[:16]


def _progress(message: str) -> None:
    zoo._progress(message)


def onnx_accuracy(model: str | Path | onnx.ModelProto) -> float:
    """Top-1 accuracy on the held-out digits."""
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    _, _, x_test, y_test = zoo.digits_split()
    (logits,) = session.run(None, {"input": x_test})
    return float((np.asarray(logits).argmax(axis=1) == y_test).mean())


def _calibration_batches(model: str) -> list[np.ndarray]:
    if model == "digits_cnn":
        x_train, _, _, _ = zoo.digits_split()
        images = x_train[:CALIBRATION_IMAGES]
        return [images[i : i + 32] for i in range(0, len(images), 32)]
    return [zoo.example_input(model, seed=100 + i) for i in range(8)]


def _quantize(model: str, source: Path, target: Path, mode: str) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    # the quantizer logs advice at WARNING through the root logger
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        if mode == "dynamic":
            quantize_dynamic(
                source,
                tmp,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul", "Gemm", "LSTM"],
            )
        else:
            batches = _calibration_batches(model)

            class Reader(CalibrationDataReader):  # type: ignore[misc]
                def __init__(self) -> None:
                    self.position = 0

                def get_next(self) -> dict[str, np.ndarray] | None:
                    if self.position >= len(batches):
                        return None
                    self.position += 1
                    return {"input": batches[self.position - 1]}

                def rewind(self) -> None:
                    self.position = 0

            quantize_static(
                source,
                tmp,
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
            )
    finally:
        quiet.setLevel(level)
    tmp.replace(target)


def prune_magnitude(module: torch.nn.Module, sparsity: float) -> int:
    """Zeroes the smallest-magnitude conv/linear weights (global threshold); returns
    how many weights are zero afterwards."""
    import torch
    from torch import nn

    weights = [m.weight for m in module.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    flat = torch.cat([w.detach().abs().flatten() for w in weights])
    k = int(sparsity * flat.numel())
    if k == 0:
        return 0
    threshold = flat.kthvalue(k).values
    with torch.no_grad():
        for w in weights:
            w.mul_((w.abs() > threshold).to(w.dtype))
    return int(sum((w == 0).sum().item() for w in weights))


def _pruned(model: str) -> torch.nn.Module:
    import torch
    from torch import nn

    if model != "digits_cnn":
        module = zoo.build_torch(model)
        prune_magnitude(module, PRUNE_SPARSITY)
        return module
    module = zoo.trained_digits_cnn()
    prune_magnitude(module, PRUNE_SPARSITY)
    masks = {
        id(m.weight): (m.weight != 0).float()
        for m in module.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    }
    # a short fine-tune with the mask held recovers most of the accuracy
    x_train, y_train, _, _ = zoo.digits_split()
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    torch.manual_seed(zoo.SEED)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    module.train()
    for _ in range(5):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            loss = torch.nn.functional.cross_entropy(module(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            with torch.no_grad():
                for p in module.parameters():
                    if id(p) in masks:
                        p.mul_(masks[id(p)])
    return module.eval()


def _student() -> torch.nn.Module:
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


def variant_path(model: str, variant: str) -> Path:
    """The ONNX file of a variant, built on first use and cached."""
    zoo._check_name(model)
    if variant not in VARIANT_NAMES:
        raise ValueError(f"unknown variant {variant!r} (accepted: {', '.join(VARIANT_NAMES)})")
    if variant == "fp32":
        return zoo.export_onnx(model, trained=model == "digits_cnn")
    if variant == "distilled" and model != "digits_cnn":
        raise ValueError("the distilled variant exists for digits_cnn only")
    target = zoo.cache_dir() / f"{model}-{variant}-{_hash()}.onnx"
    if target.exists():
        return target
    zoo._need_torch(f"{model} variant {variant}")
    started = time.monotonic()
    _progress(f"building {model} variant {variant}")
    shape = zoo.input_spec(model)[1]
    if variant.startswith("int8"):
        source = variant_path(model, "fp32")
        _quantize(model, source, target, variant.removeprefix("int8-"))
    elif variant == "pruned-50":
        zoo.export_module(_pruned(model), shape, target)
    else:
        teacher = zoo.trained_digits_cnn()
        student = zoo.train_digits(_student(), teacher=teacher, epochs=40)
        zoo.export_module(student, shape, target)
    _progress(f"built {model} {variant} in {time.monotonic() - started:.1f}s")
    return target


def prebuild_digits() -> list[Path]:
    """Every file a preparation of `zoo: digits_cnn` reads, built into the cache: the
    exports, each variant, the noise-trained models (at the levels `noise_training`
    ships), the per-input offloading files (a folder: exit heads, small models,
    validation tables; `offload.build.prebuild_offload`), the heads on its trunk
    (`trunks`) and the digits split. The worker image ships them, having neither torch
    nor scikit-learn."""
    from edgeai_worker import noise_training, trunks
    from edgeai_worker.offload.build import prebuild_offload

    paths = [zoo.export_onnx("digits_cnn", trained=True), zoo.export_onnx("digits_cnn")]
    paths += [variant_path("digits_cnn", v) for v in VARIANT_NAMES if v != "fp32"]
    paths += noise_training.prebuild()
    paths.append(prebuild_offload())
    paths += trunks.prebuild()
    zoo.digits_split()
    return paths


def _nonzero_parameters(model: onnx.ModelProto) -> tuple[int, int]:
    total = nonzero = 0
    for init in model.graph.initializer:
        values = onnx.numpy_helper.to_array(init)
        if values.dtype.kind in "fiu" and values.size > 1:
            total += values.size
            nonzero += int(np.count_nonzero(values))
    return total, nonzero


def digits_variants() -> list[dict[str, Any]]:
    """Every digits variant with its held-out accuracy and size (plain data)."""
    import zlib

    rows = []
    for variant in VARIANT_NAMES:
        path = variant_path("digits_cnn", variant)
        data = path.read_bytes()
        model = onnx.load_from_string(data)
        total, nonzero = _nonzero_parameters(model)
        rows.append(
            {
                "name": variant,
                "accuracy": round(onnx_accuracy(model), 4),
                "sizeBytes": len(data),
                "compressedBytes": len(zlib.compress(data, 6)),
                "parameters": total,
                "nonzeroParameters": nonzero,
                "path": str(path),
            }
        )
    return rows
