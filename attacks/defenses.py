"""The defenses the leakage experiment sweeps, as client-side training hooks.

* ``noise`` — :class:`fsl.privacy.ActivationNoise` on every release (the framework's mechanism);
  the clip norm is calibrated by the client on its own data (median per-sample L2 norm at the cut).
* ``compression`` — top-k sparsification of each sample's activation (keep the largest fraction).
* ``nopeek`` — NoPeek (Vepakomma et al. 2020): the client adds ``alpha * DCor(x, h)`` to its loss,
  decorrelating the smashed activations from the inputs.
* ``dpsgd`` — DP-SGD on the client segment (per-sample gradient clipping to 1 and Gaussian noise of
  ``noise_multiplier``): protects the aggregated *updates*, not the activations (STYLE.md, point 5).

NoPeek and DP-SGD live here, in the attack suite, only until the privacy issue provides the
framework's own; they are small, exact implementations, not approximations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fsl.channel import SplitChannel
from fsl.privacy import ActivationNoise

__all__ = ["DEFENSES", "Defense", "distance_correlation", "topk_release", "train_client_custom"]

DEFENSES = ("none", "noise", "compression", "nopeek", "dpsgd")


@dataclass(frozen=True)
class Defense:
    """One cell of the defense axis: ``kind`` and its parameter (noise multiplier, kept fraction, alpha, sigma)."""

    kind: str = "none"
    param: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in DEFENSES:
            raise ValueError(f"unknown defense {self.kind!r}; choose one of {DEFENSES}")

    @property
    def label(self) -> str:
        return self.kind if self.kind == "none" else f"{self.kind}({self.param:g})"


def topk_release(fraction: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Keep each sample's ``fraction`` largest-magnitude activation entries, zero the rest."""
    if not 0 < fraction <= 1:
        raise ValueError(f"compression fraction must lie in (0, 1], got {fraction}")

    def release(h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(h.shape[0], -1)
        k = max(1, int(round(flat.shape[1] * fraction)))
        idx = flat.abs().topk(k, dim=1).indices
        out = torch.zeros_like(flat).scatter_(1, idx, flat.gather(1, idx))
        return out.reshape(h.shape)

    return release


def calibrated_noise(segment: nn.Module, x: torch.Tensor, multiplier: float, seed: int) -> ActivationNoise:
    """Activation noise with the clip norm set to the median per-sample L2 norm of ``segment(x)``."""
    with torch.no_grad():
        norms = segment(x[:256]).flatten(1).norm(dim=1)
    return ActivationNoise("gaussian", clip_norm=float(norms.median()), noise_multiplier=multiplier, seed=seed)


def distance_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation (Szekely et al. 2007) between batches ``x`` (B, ...) and ``y`` (B, ...)."""

    def centred(t: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(t.flatten(1), t.flatten(1))
        return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()

    a, b = centred(x), centred(y)
    dcov_xy = (a * b).mean().clamp_min(0)
    dcov_xx, dcov_yy = (a * a).mean(), (b * b).mean()
    return torch.sqrt(dcov_xy / (torch.sqrt(dcov_xx * dcov_yy) + 1e-12) + 1e-12)


def train_client_custom(
    segment: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    channel: SplitChannel,
    defense: Defense,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.05,
    momentum: float = 0.9,
    seed: int = 0,
) -> None:
    """The client's side of split training with NoPeek or DP-SGD (the trainer's loop plus the defense)."""
    if defense.kind not in ("nopeek", "dpsgd"):
        raise ValueError(f"train_client_custom runs nopeek or dpsgd, not {defense.kind!r}")
    segment.train()
    opt = torch.optim.SGD(segment.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator().manual_seed(seed + 1)
    n = len(y)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            xb = x[idx]
            h = segment(xb)  # (B, ...) smashed
            step = channel.train_step(h.detach(), y[idx])  # up: h, y · down: dL/dh (mean loss)
            opt.zero_grad(set_to_none=True)
            if defense.kind == "nopeek":
                loss = (h * step.grad).sum() + defense.param * distance_correlation(xb, h)
                loss.backward()
            else:
                _dp_grads(segment, xb, step.grad, defense.param, noise_gen)
            opt.step()


def _dp_grads(segment: nn.Module, xb: torch.Tensor, grad_h: torch.Tensor, sigma: float, gen: torch.Generator) -> None:
    """Per-sample gradients (torch.func), clipped to norm 1, summed, plus N(0, sigma^2), over B."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in segment.named_parameters()}
    b = xb.shape[0]

    def sample_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, gi: torch.Tensor) -> torch.Tensor:
        hi = functional_call(segment, p, (xi[None],))
        return (hi[0] * gi).sum() * b  # the server's loss is a mean: per-sample gradient = B * J^T g_i

    per = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, xb, grad_h)  # name -> (B, *shape)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in per.values()))  # (B,)
    factor = (1.0 / norms.clamp_min(1e-12)).clamp(max=1.0)
    for name, p in segment.named_parameters():
        g = (per[name] * factor.view(-1, *[1] * (per[name].ndim - 1))).sum(0)
        g = g + torch.randn(g.shape, generator=gen) * sigma
        p.grad = g / b
