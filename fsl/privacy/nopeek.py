"""NoPeek: a distance-correlation penalty between a client's inputs and its smashed activations.

Vepakomma et al., "NoPeek: Information leakage reduction to share activations in distributed deep
learning" (2020). The client adds ``weight * dCor(x, h)`` to its objective, so its segment learns
activations that keep what the task needs but are less (non-linearly) correlated with the raw inputs.

What it protects
----------------
It makes reconstructing inputs from the activations harder *empirically* (see the attack suite);
it gives no epsilon, no worst-case bound, and nothing for the segment updates or the labels.
The penalty couples the samples of a batch, so it is not combined with DP-SGD.

Token inputs are categories, not quantities: an integer tensor (token ids, an attention mask) is
compared as its one-hot encoding, whose Euclidean distance between two samples is
``sqrt(2 * number of positions where they differ)``. Named inputs (``input_ids`` and
``attention_mask``) count as their concatenation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["NoPeek", "distance_correlation"]


Inputs = torch.Tensor | Mapping[str, torch.Tensor]


def _squared_distances(z: torch.Tensor) -> torch.Tensor:
    """(B, B) squared Euclidean distances between the samples of ``z`` (B, ...); one-hot for integers."""
    flat = z.reshape(z.shape[0], -1)
    if z.is_floating_point():
        return torch.cdist(flat.float(), flat.float()).square()
    differ = torch.stack([(row[None, :] != flat).sum(1) for row in flat])  # (B, B) positions that differ
    return 2.0 * differ.float()


def _distances(x: Inputs) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if x.is_floating_point():
            flat = x.reshape(x.shape[0], -1).float()
            return torch.cdist(flat, flat)  # (B, B): exact zeros on the diagonal, unlike sqrt of squares
        return _squared_distances(x).sqrt()
    parts = [_squared_distances(t) for t in x.values()]
    if not parts:
        raise ValueError("distance correlation needs at least one input tensor")
    return torch.stack(parts).sum(0).clamp_min(0.0).sqrt()


def _centred(d: torch.Tensor) -> torch.Tensor:
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()


def _batch(x: Inputs) -> int:
    return int(x.shape[0] if isinstance(x, torch.Tensor) else next(iter(x.values())).shape[0])


def distance_correlation(x: Inputs, h: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Sample distance correlation dCor(x, h) in [0, 1] (Szekely et al. 2007) over the batch dimension.

    ``x`` (B, ...) and ``h`` (B, ...) are flattened per sample; differentiable in both. ``x`` may be
    named tensors, and integer tensors count as categories (see the module docstring).
    """
    if _batch(x) != h.shape[0]:
        raise ValueError(f"x and h need the same batch size, got {_batch(x)} and {h.shape[0]}")
    a = _centred(_distances(x))
    b = _centred(_distances(h))
    dcov2_xy = (a * b).mean()
    dvar2_x, dvar2_y = (a * a).mean(), (b * b).mean()
    dcor2 = dcov2_xy / (dvar2_x * dvar2_y).sqrt().clamp_min(eps)
    return dcor2.clamp_min(0.0).add(eps).sqrt()


@dataclass(frozen=True)
class NoPeek:
    """``penalty(x, h) = weight * dCor(x, h)``, the trainer's client-side loss term (``TrainHooks(penalty=...)``)."""

    weight: float

    def __call__(self, x: Inputs, h: torch.Tensor) -> torch.Tensor:
        return self.weight * distance_correlation(x, h)
