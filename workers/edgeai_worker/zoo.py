"""The model zoo: torch definitions, digits training and cached ONNX export.

Every model is exported with one input tensor named `input` (batch dimension
dynamic, `batch`) and one output named `output`, opset 17. Latency models use
random weights from a fixed seed; `digits_cnn` can be trained on scikit-learn's
bundled digits. Exports and trained weights are cached under
`$EDGEAI_CACHE_DIR/zoo` (default `~/.cache/edgeai/zoo`), keyed by a hash of this
file's source and the seed, so a code change invalidates the cache.

torch is imported lazily: serving workers import this module's siblings with
only onnx and onnxruntime installed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

ZOO_NAMES = ("digits_cnn", "mobilenet_v2", "resnet18", "vgg_like", "alexnet_like", "kws_lstm")
OPSET = 17
SEED = 0
INPUT_NAME = "input"
OUTPUT_NAME = "output"

# name -> (input shape at batch 1, dtype); dtype names follow the inference protocol.
_INPUTS: dict[str, tuple[tuple[int, ...], str]] = {
    "digits_cnn": ((1, 1, 8, 8), "FP32"),
    "mobilenet_v2": ((1, 3, 224, 224), "FP32"),
    "resnet18": ((1, 3, 224, 224), "FP32"),
    "vgg_like": ((1, 3, 224, 224), "FP32"),
    "alexnet_like": ((1, 3, 224, 224), "FP32"),
    "kws_lstm": ((1, 49, 40), "FP32"),  # 49 frames x 40 MFCC features, 12 keywords
}


def _check_name(name: str) -> None:
    if name not in ZOO_NAMES:
        raise ValueError(f"unknown zoo model {name!r} (accepted: {', '.join(ZOO_NAMES)})")


def input_spec(name: str) -> tuple[str, tuple[int, ...], str]:
    """(input tensor name, shape at batch 1, dtype) of a zoo model."""
    _check_name(name)
    shape, dtype = _INPUTS[name]
    return INPUT_NAME, shape, dtype


def cache_dir() -> Path:
    root = os.environ.get("EDGEAI_CACHE_DIR")
    path = Path(root or Path.home() / ".cache" / "edgeai") / "zoo"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        if root:
            raise
        # A user whose home cannot be written (the images' `edgeai` has /nonexistent):
        # the temporary directory instead, which pods have.
        path = Path(tempfile.gettempdir()) / "edgeai-zoo"
        path.mkdir(parents=True, exist_ok=True)
    return path


def code_hash() -> str:
    """Hash of this module's source, the seed and the opset: the cache key."""
    source = Path(__file__).read_bytes()
    return hashlib.sha256(source + f"seed={SEED};opset={OPSET}".encode()).hexdigest()[:16]


def _need_torch(what: str) -> None:
    """A clear error where a file is not in the cache and torch, which builds it, is
    not installed (the worker image, whose cache holds digits_cnn's files only)."""
    if importlib.util.find_spec("torch") is None:
        raise ModuleNotFoundError(
            f"zoo model {what} is not in the cache {cache_dir()} and building it needs "
            "torch, which is not installed here: give the model as a file instead "
            "(spec.source.uri), or prepare it where torch is installed",
            name="torch",
        )


@contextlib.contextmanager
def replaced_file(final: Path) -> Iterator[Path]:
    """A temporary path beside `final`, renamed to it when the block succeeds: parallel
    readers see the whole file or none."""
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        tmp.replace(final)
    finally:
        tmp.unlink(missing_ok=True)


def _progress(message: str) -> None:
    print(f"[edgeai zoo] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# torch definitions (built lazily so that importing this module needs no torch)


def _definitions() -> dict[str, Callable[[], torch.nn.Module]]:
    import torch
    from torch import nn

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )
            self.classifier = nn.Sequential(
                nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.classifier(self.features(x))
            return out

    class InvertedResidual(nn.Module):
        def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
            super().__init__()
            hidden = inp * expand
            self.use_residual = stride == 1 and inp == out
            layers: list[nn.Module] = []
            if expand != 1:
                layers += [
                    nn.Conv2d(inp, hidden, 1, bias=False),
                    nn.BatchNorm2d(hidden),
                    nn.ReLU6(),
                ]
            layers += [
                nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU6(),
                nn.Conv2d(hidden, out, 1, bias=False),
                nn.BatchNorm2d(out),
            ]
            self.conv = nn.Sequential(*layers)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y: torch.Tensor = self.conv(x)
            return x + y if self.use_residual else y

    class MobileNetV2(nn.Module):
        # (expansion, channels, repeats, stride) as in Sandler et al. 2018
        SETTINGS = (
            (1, 16, 1, 1),
            (6, 24, 2, 2),
            (6, 32, 3, 2),
            (6, 64, 4, 2),
            (6, 96, 3, 1),
            (6, 160, 3, 2),
            (6, 320, 1, 1),
        )

        def __init__(self, classes: int = 1000) -> None:
            super().__init__()
            layers: list[nn.Module] = [
                nn.Conv2d(3, 32, 3, 2, 1, bias=False),
                nn.BatchNorm2d(32),
                nn.ReLU6(),
            ]
            inp = 32
            for t, c, n, s in self.SETTINGS:
                for i in range(n):
                    layers.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                    inp = c
            layers += [
                nn.Conv2d(inp, 1280, 1, bias=False),
                nn.BatchNorm2d(1280),
                nn.ReLU6(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            ]
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Linear(1280, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.classifier(self.features(x))
            return out

    class BasicBlock(nn.Module):
        def __init__(self, inp: int, out: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(out)
            self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(out)
            self.relu = nn.ReLU()
            self.down: nn.Module = nn.Identity()
            if stride != 1 or inp != out:
                self.down = nn.Sequential(
                    nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out)
                )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            out: torch.Tensor = self.relu(y + self.down(x))
            return out

    class ResNet18(nn.Module):
        def __init__(self, classes: int = 1000) -> None:
            super().__init__()
            blocks: list[nn.Module] = [
                nn.Conv2d(3, 64, 7, 2, 3, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(),
                nn.MaxPool2d(3, 2, 1),
            ]
            inp = 64
            for out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                blocks += [BasicBlock(inp, out, stride), BasicBlock(out, out, 1)]
                inp = out
            blocks += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            self.features = nn.Sequential(*blocks)
            self.fc = nn.Linear(512, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.fc(self.features(x))
            return out

    def vgg_like() -> nn.Module:
        # VGG-11 layout at a quarter of the width: a pure chain of 3x3 convs and pools.
        layers: list[nn.Module] = []
        inp = 3
        for item in (16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128, "M"):
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                assert isinstance(item, int)
                layers += [nn.Conv2d(inp, item, 3, padding=1), nn.ReLU()]
                inp = item
        layers += [
            nn.Flatten(),
            nn.Linear(128 * 7 * 7, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, 1000),
        ]
        return nn.Sequential(*layers)

    def alexnet_like() -> nn.Module:
        # AlexNet's shape at half width: big early activations, pools that shrink them,
        # parameter-heavy fully connected layers at the end.
        return nn.Sequential(
            nn.Conv2d(3, 32, 11, 4, 2),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(32, 96, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(96, 192, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(192, 128, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(128, 128, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
            nn.Flatten(),
            nn.Linear(128 * 6 * 6, 1024),
            nn.ReLU(),
            nn.Linear(1024, 1024),
            nn.ReLU(),
            nn.Linear(1024, 1000),
        )

    class KwsLSTM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(40, 64)
            self.lstm = nn.LSTM(64, 128, batch_first=True)
            self.head = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 12))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seq, _ = self.lstm(torch.relu(self.proj(x)))
            out: torch.Tensor = self.head(seq[:, -1])
            return out

    return {
        "digits_cnn": DigitsCNN,
        "mobilenet_v2": MobileNetV2,
        "resnet18": ResNet18,
        "vgg_like": vgg_like,
        "alexnet_like": alexnet_like,
        "kws_lstm": KwsLSTM,
    }


def _init_weights(model: torch.nn.Module) -> None:
    """He init so that random-weight activations keep a sane scale through depth."""
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def _calibrate_batchnorm(model: torch.nn.Module, shape: tuple[int, ...]) -> None:
    """Sets BatchNorm running statistics from random inputs, as a trained net has them,
    so that outputs of random-weight residual nets stay O(1) instead of exploding."""
    import torch
    from torch import nn

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        return
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    model.train()
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn((4, *shape[1:]), generator=generator))
    model.eval()


def build_torch(name: str) -> torch.nn.Module:
    """The torch module of a zoo model, in eval mode, with seeded random weights."""
    import torch

    _check_name(name)
    torch.manual_seed(SEED)
    model = _definitions()[name]()
    _init_weights(model)
    _calibrate_batchnorm(model, _INPUTS[name][0])
    return model.eval()


# ---------------------------------------------------------------------------
# digits: data, training


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits as (x_train, y_train, x_test, y_test): NCHW float32 in
    [0, 1], a fixed stratified 75/25 split (random_state=0). Kept in the cache once
    made, so that an image with the cache built in needs no scikit-learn."""
    import numpy as np

    cached = cache_dir() / f"digits-split-{code_hash()}.npz"
    if cached.exists():
        with np.load(cached) as data:
            return data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    x_train, y_train, x_test, y_test = _split_digits()
    # a read-only cache (OSError): made again next time
    with contextlib.suppress(OSError), replaced_file(cached) as out, out.open("wb") as file:
        np.savez(file, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return x_train, y_train, x_test, y_test


def _split_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    return x_train, y_train, x_test, y_test


def train_digits(
    model: torch.nn.Module,
    *,
    epochs: int = 30,
    teacher: torch.nn.Module | None = None,
    temperature: float = 4.0,
    progress: bool = True,
) -> torch.nn.Module:
    """Trains a digits classifier with Adam (seeded). With `teacher`, trains by
    knowledge distillation: KL to the teacher's softened outputs plus cross-entropy."""
    import torch
    import torch.nn.functional as F

    x_train, y_train, _, _ = digits_split()
    x = torch.from_numpy(x_train)
    y = torch.from_numpy(y_train)
    torch.manual_seed(SEED)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    soft: torch.Tensor | None = None
    if teacher is not None:
        teacher.eval()
        with torch.no_grad():
            soft = F.softmax(teacher(x) / temperature, dim=1)
    started = time.monotonic()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            if soft is not None:
                kd = F.kl_div(
                    F.log_softmax(logits / temperature, dim=1), soft[idx], reduction="batchmean"
                )
                loss = 0.3 * loss + 0.7 * kd * temperature**2
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        if progress and (epoch + 1) % 10 == 0:
            _progress(
                f"training epoch {epoch + 1}/{epochs} loss={loss.item():.4f} "
                f"({time.monotonic() - started:.1f}s)"
            )
    return model.eval()


def trained_digits_cnn(*, progress: bool = True) -> torch.nn.Module:
    """`digits_cnn` trained on the digits train split; weights cached by code hash."""
    import torch

    model = build_torch("digits_cnn")
    path = cache_dir() / f"digits_cnn-trained-{code_hash()}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    model = train_digits(model, progress=progress)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model


def accuracy_torch(model: torch.nn.Module) -> float:
    import torch

    _, _, x_test, y_test = digits_split()
    with torch.no_grad():
        pred = model(torch.from_numpy(x_test)).argmax(dim=1).numpy()
    return float((pred == y_test).mean())


# ---------------------------------------------------------------------------
# ONNX export


def export_module(model: torch.nn.Module, shape: tuple[int, ...], path: Path) -> Path:
    """Exports a torch module with the zoo's conventions (names, opset, dynamic batch),
    writing atomically."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export, which takes
        # seconds per model and cannot fold BatchNorm into Conv as cleanly. It is kept
        # for the clean per-layer graphs that partitioning works on; its deprecation
        # and tracer warnings (the LSTM's batch-size checks) are expected here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(shape),),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    tmp.replace(path)
    return path


def export_onnx(name: str, path: str | Path | None = None, *, trained: bool = False) -> Path:
    """The ONNX file of a zoo model (exported once, then served from the cache).
    `trained=True` is accepted for `digits_cnn` only. With `path`, the cached file is
    also copied there."""
    _check_name(name)
    if trained and name != "digits_cnn":
        raise ValueError(f"trained weights exist for digits_cnn only, not {name!r}")
    suffix = "trained" if trained else "random"
    cached = cache_dir() / f"{name}-{suffix}-{code_hash()}.onnx"
    if not cached.exists():
        _need_torch(f"{name} ({suffix} weights)")
        started = time.monotonic()
        _progress(f"exporting {name} ({suffix} weights) to ONNX")
        model = trained_digits_cnn() if trained else build_torch(name)
        export_module(model, _INPUTS[name][0], cached)
        _progress(f"exported {name} in {time.monotonic() - started:.1f}s -> {cached}")
    if path is None:
        return cached
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(cached.read_bytes())
    return target


def example_input(name: str, batch: int = 1, seed: int = SEED) -> Any:
    """A deterministic input for a zoo model (numpy array)."""
    import numpy as np

    _, shape, _ = input_spec(name)
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, *shape[1:])).astype(np.float32)
