"""Shared pieces of the optimisation attacks: the total-variation prior and input optimisation."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from attacks.base import Progress, progress_or_silent

__all__ = ["feature_loss", "invert_features", "total_variation"]


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """(N,) anisotropic total variation per image: mean absolute difference of neighbouring pixels."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
    return dh + dw


def feature_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) squared distance between features, relative to the target's energy (scale-free across cuts)."""
    num = ((pred - target) ** 2).flatten(1).sum(1)
    den = (target**2).flatten(1).sum(1).clamp_min(1e-8)
    return num / den


def invert_features(
    forward: Callable[[torch.Tensor], torch.Tensor],
    target: torch.Tensor,
    input_shape: tuple[int, ...],
    *,
    iters: int = 500,
    lr: float = 0.05,
    tv: float = 0.05,
    init: torch.Tensor | None = None,
    extra_params: list[nn.Parameter] | None = None,
    extra_lr: float = 1e-3,
    progress: Progress | None = None,
    label: str = "rmle",
) -> torch.Tensor:
    """Regularised maximum likelihood: argmin_x ||F(x) - h||^2 / ||h||^2 + tv * TV(x), x in [0, 1].

    Projected Adam on the pixels (clamped to [0, 1] after every step). ``extra_params`` are optimised jointly (UnSplit's clone weights).
    Returns the reconstructions (N, C, H, W) in [0, 1].
    """
    report = progress_or_silent(progress)
    n = target.shape[0]
    x = (torch.full((n, *input_shape), 0.5) if init is None else init.clamp(0, 1)).detach().clone()
    x.requires_grad_(True)
    groups: list[dict[str, object]] = [{"params": [x], "lr": lr}]
    if extra_params:
        groups.append({"params": extra_params, "lr": extra_lr})
    opt = torch.optim.Adam(groups)  # type: ignore[arg-type]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, iters))
    target = target.detach().float()
    step_every = max(1, iters // 50)
    for it in range(iters):
        opt.zero_grad(set_to_none=True)
        loss = (feature_loss(forward(x), target) + tv * total_variation(x)).sum()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(0, 1)  # projected: exact 0 and 1 stay reachable (MNIST backgrounds are exactly 0)
        if it % step_every == 0 or it == iters - 1:
            report(it + 1, iters, f"{label}: loss {float(loss.detach()) / n:.4f}")
    return x.detach()
