"""The torch side shared by aggregator and workers: the model as one flat float32
vector, local SGD steps on a shard (DP-SGD when the spec asks for privacy), and
held-out accuracy."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edgeai_worker.training.compressors import as_vector
from edgeai_worker.training.privacy import epsilon, private_gradients
from edgeai_worker.training.spec import TrainingSpec

if TYPE_CHECKING:
    import torch
    from numpy.typing import NDArray

    Vector = NDArray[np.float32]


def build_model(spec: TrainingSpec) -> torch.nn.Module:
    """The spec's model with its seeded initial weights (the same in every process)."""
    import torch

    from edgeai_worker.zoo import build_torch

    torch.manual_seed(spec.seed)
    return build_torch(spec.model).train()


def get_flat(model: torch.nn.Module) -> Vector:
    import torch

    with torch.no_grad():
        flat = torch.cat([p.reshape(-1) for p in model.parameters()])
    return as_vector(flat.numpy())


def set_flat(model: torch.nn.Module, flat: Vector) -> None:
    import torch

    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            size = p.numel()
            p.copy_(torch.from_numpy(flat[offset : offset + size]).view_as(p))
            offset += size


def accuracy(model: torch.nn.Module, x: NDArray[np.float32], y: NDArray[np.int64]) -> float:
    preds = predict(model, x).argmax(axis=1)
    return float((preds == y).mean())


def predict(model: torch.nn.Module, x: NDArray[np.float32]) -> NDArray[np.float32]:
    """Logits for `x`."""
    import torch

    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(x)).numpy()
    model.train()
    return as_vector(out)


class Learner:
    """A worker's model, shard and optimiser state."""

    def __init__(
        self, spec: TrainingSpec, x: NDArray[np.float32], y: NDArray[np.int64], index: int
    ) -> None:
        import torch

        self.spec = spec
        self.model = build_model(spec)
        self.x = torch.from_numpy(x)
        self.y = torch.from_numpy(y)
        self.generator = torch.Generator().manual_seed(spec.seed * 1000 + index + 1)
        self.steps = 0  # SGD steps taken on this shard (for the privacy accountant)
        self.size = len(x)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        size = min(self.spec.algorithm.batch_size, self.size)
        idx = torch.randperm(self.size, generator=self.generator)[:size]
        return self.x[idx], self.y[idx]

    def train_steps(
        self, steps: int, teacher: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> float:
        """`steps` SGD steps at the spec's learning rate; the last batch's loss. With
        `teacher` (public inputs, ensemble probabilities) a distillation term is added."""
        import torch
        import torch.nn.functional as F

        lr = self.spec.algorithm.learning_rate
        privacy = self.spec.privacy
        loss_value = 0.0
        for _ in range(steps):
            x, y = self.batch()
            logits = self.model(x)
            loss = F.cross_entropy(logits, y)
            loss_value = float(loss.item())
            if privacy is not None:
                grads = private_gradients(self.model, x, y, privacy, self.generator)
            else:
                if teacher is not None:
                    public_x, public_p = teacher
                    pick = torch.randperm(len(public_x), generator=self.generator)[: len(x)]
                    student = F.log_softmax(self.model(public_x[pick]), dim=1)
                    loss = loss + F.kl_div(student, public_p[pick], reduction="batchmean")
                params = list(self.model.parameters())
                grads = list(torch.autograd.grad(loss, params))
            with torch.no_grad():
                for p, g in zip(self.model.parameters(), grads, strict=True):
                    p.sub_(lr * g)
            self.steps += 1
        return loss_value

    def epsilon(self) -> float | None:
        if self.spec.privacy is None:
            return None
        rate = min(self.spec.algorithm.batch_size, self.size) / self.size
        return epsilon(self.spec.privacy, rate, self.steps)
