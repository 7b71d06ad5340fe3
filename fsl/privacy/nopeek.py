"""NoPeek: a distance-correlation penalty between a client's inputs and its smashed activations.

Vepakomma et al., "NoPeek: Information leakage reduction to share activations in distributed deep
learning" (2020). The client adds ``weight * dCor(x, h)`` to its objective, so its segment learns
activations that keep what the task needs but are less (non-linearly) correlated with the raw inputs.

What it protects
----------------
It makes reconstructing inputs from the activations harder *empirically* (see the attack suite);
it gives no epsilon, no worst-case bound, and nothing for the segment updates or the labels.
The penalty couples the samples of a batch, so it is not combined with DP-SGD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["NoPeek", "distance_correlation"]


def _centred_distances(z: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(z, z)  # (B, B) Euclidean distances
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()


def distance_correlation(x: torch.Tensor, h: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Sample distance correlation dCor(x, h) in [0, 1] (Szekely et al. 2007) over the batch dimension.

    ``x`` (B, ...) and ``h`` (B, ...) are flattened per sample; differentiable in both.
    """
    if x.shape[0] != h.shape[0]:
        raise ValueError(f"x and h need the same batch size, got {x.shape[0]} and {h.shape[0]}")
    a = _centred_distances(x.reshape(x.shape[0], -1).float())
    b = _centred_distances(h.reshape(h.shape[0], -1).float())
    dcov2_xy = (a * b).mean()
    dvar2_x, dvar2_y = (a * a).mean(), (b * b).mean()
    dcor2 = dcov2_xy / (dvar2_x * dvar2_y).sqrt().clamp_min(eps)
    return dcor2.clamp_min(0.0).add(eps).sqrt()


@dataclass(frozen=True)
class NoPeek:
    """``penalty(x, h) = weight * dCor(x, h)``, the trainer's client-side loss term (``TrainHooks(penalty=...)``)."""

    weight: float

    def __call__(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.weight * distance_correlation(x, h)
