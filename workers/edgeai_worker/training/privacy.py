"""DP-SGD on a worker: every example's gradient is clipped to `clipNorm`, the clipped
sum gets Gaussian noise of std `noiseMultiplier * clipNorm`, then it is averaged. The
privacy spent is the subsampled Gaussian mechanism composed over the worker's steps,
from opacus's RDP accountant (sampling rate = batch size / shard size)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgeai_worker.training.spec import PrivacySpec

if TYPE_CHECKING:
    import torch

# RDP orders opacus uses by default
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def epsilon(privacy: PrivacySpec, sample_rate: float, steps: int) -> float:
    """The epsilon spent (at privacy.delta) after `steps` noisy steps; inf without noise."""
    if steps == 0:
        return 0.0
    if privacy.noise_multiplier == 0:
        return float("inf")
    from opacus.accountants.analysis.rdp import (  # type: ignore[import-untyped]
        compute_rdp,
        get_privacy_spent,
    )

    rdp = compute_rdp(
        q=min(1.0, sample_rate),
        noise_multiplier=privacy.noise_multiplier,
        steps=steps,
        orders=ORDERS,
    )
    eps, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=privacy.delta)
    return float(eps)


def private_gradients(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    privacy: PrivacySpec,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """The noisy mean of per-example clipped gradients, one tensor per parameter."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap

    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_of(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per_example = vmap(grad(loss_of), in_dims=(None, 0, 0))(params, x, y)
    grads = [per_example[name] for name in params]
    norms = torch.sqrt(sum(g.reshape(len(x), -1).pow(2).sum(dim=1) for g in grads))
    factor = (privacy.clip_norm / (norms + 1e-6)).clamp(max=1.0)
    std = privacy.noise_multiplier * privacy.clip_norm
    out = []
    for g in grads:
        clipped = (g * factor.view(-1, *([1] * (g.dim() - 1)))).sum(dim=0)
        noise = torch.normal(0.0, std, size=clipped.shape, generator=generator) if std else 0.0
        out.append((clipped + noise) / len(x))
    return out
