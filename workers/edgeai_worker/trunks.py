"""Applications fine-tuned from one trunk: heads on the trained `digits_cnn`'s frozen
features (needs torch unless cached).

The trunk is `digits_cnn`'s `features` (two convolutions and a max-pool, most of its
compute); each head is a new `classifier` of the same shape trained on the frozen
trunk's features of the digits train split for its own task. A head model is exported
as a whole model, trunk included, with the zoo's conventions: its graph up to
`TRUNK_TENSOR` is `digits_cnn`'s (same ops, same initializer bytes), which is what a
DNNModel's `spec.base` claims and the preparation checks.

Tasks: `parity` (odd or even, 2 classes) and `tercile` (0-2, 3-5, 6-9: 3 classes).
Files are cached in `zoo.cache_dir()` keyed by a hash of this module and the zoo;
`prebuild()` builds the ones the worker image ships.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeai_worker import zoo

if TYPE_CHECKING:
    import numpy as np
    import torch

# The output of digits_cnn's `features` (its MaxPool) in the exported graph.
TRUNK_TENSOR = "/features/features.4/MaxPool_output_0"
CLASSES = {"parity": 2, "tercile": 3}
TASKS = tuple(CLASSES)
EPOCHS = 30


def task_labels(task: str, digits: np.ndarray) -> np.ndarray:
    """The class of each digit for `task`."""
    import numpy as np

    if task == "parity":
        return np.asarray(digits % 2)
    if task == "tercile":
        return np.asarray((digits >= 3).astype(digits.dtype) + (digits >= 6).astype(digits.dtype))
    raise ValueError(f"unknown head task {task!r} (accepted: {', '.join(TASKS)})")


def _hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes() + zoo.code_hash().encode()).hexdigest()[:16]


def cached_path(task: str) -> Path:
    return zoo.cache_dir() / f"digits_cnn-head-{task}-{_hash()}.onnx"


def digits_head(task: str, *, progress: bool = True) -> Path:
    """The ONNX file of the trained `digits_cnn` trunk with a `task` head trained on its
    frozen features (built once, then served from the cache)."""
    if task not in TASKS:
        raise ValueError(f"unknown head task {task!r} (accepted: {', '.join(TASKS)})")
    path = cached_path(task)
    if path.exists():
        return path
    zoo._need_torch(f"digits_cnn with a {task} head")
    model = train_head(task, progress=progress)
    zoo.export_module(model, zoo.input_spec("digits_cnn")[1], path)
    return path


def train_head(task: str, *, epochs: int = EPOCHS, progress: bool = True) -> torch.nn.Module:
    """The trained `digits_cnn` whose classifier is replaced by a new one for `task`,
    trained (seeded) on the frozen features of the train split."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    model = zoo.trained_digits_cnn(progress=progress)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    torch.manual_seed(zoo.SEED)
    head = nn.Sequential(
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, CLASSES[task])
    )
    model.classifier = head
    x_train, y_train, _, _ = zoo.digits_split()
    trunk: Any = model.features
    with torch.no_grad():
        features = trunk(torch.from_numpy(x_train))
    y = torch.from_numpy(task_labels(task, y_train))
    generator = torch.Generator().manual_seed(zoo.SEED)
    optimizer = torch.optim.Adam(head.parameters(), lr=2e-3)
    started = time.monotonic()
    for epoch in range(epochs):
        head.train()
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), 64):
            idx = order[start : start + 64]
            loss = F.cross_entropy(head(features[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        if progress and (epoch + 1) % 10 == 0:
            zoo._progress(
                f"{task} head epoch {epoch + 1}/{epochs} loss={loss.item():.4f} "
                f"({time.monotonic() - started:.1f}s)"
            )
    return model.eval()


def head_accuracy(task: str) -> float:
    """The head model's top-1 accuracy for `task` on the held-out digits (onnxruntime)."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(digits_head(task)), providers=["CPUExecutionProvider"])
    _, _, x_test, y_test = zoo.digits_split()
    (logits,) = session.run(None, {zoo.INPUT_NAME: x_test})
    return float((np.asarray(logits).argmax(axis=1) == task_labels(task, y_test)).mean())


def prebuild() -> list[Path]:
    """Every head model, for the worker image's cache."""
    return [digits_head(task) for task in TASKS]
