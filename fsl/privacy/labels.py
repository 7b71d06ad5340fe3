"""Label differential privacy by randomized response: what a client's labels reveal, bounded.

In a split whose server computes the loss the labels travel to the server in the clear with every
batch; in a U-shaped split they stay home, but the gradients the client returns carry them (norm
and direction attacks read a label from one gradient, ``attacks/label_leakage.py``). Replacing
each label *once* by k-ary randomized response makes everything derived from it epsilon-label-DP:
a label is kept with probability ``e^eps / (e^eps + K - 1)``, else replaced by one of the other
``K - 1`` classes uniformly (Warner 1965; Ghazi et al., "Deep Learning with Label Differential
Privacy", NeurIPS 2021, whose RR baseline this is). The replacement is fixed per client for the
whole run: drawing it again every round would hand the server several releases of one label to
average.
"""

from __future__ import annotations

import math

import torch

__all__ = ["keep_probability", "randomized_response"]


def keep_probability(epsilon: float, num_classes: int) -> float:
    """The probability that randomized response keeps a label: ``e^eps / (e^eps + K - 1)``."""
    if epsilon <= 0:
        raise ValueError(f"label DP needs epsilon > 0, got {epsilon}")
    if num_classes < 2:
        raise ValueError(f"label DP needs at least 2 classes, got {num_classes}")
    return 1.0 / (1.0 + (num_classes - 1) * math.exp(-epsilon))  # the same, without overflow at large eps


def randomized_response(y: torch.Tensor, epsilon: float, num_classes: int, seed: int = 0) -> torch.Tensor:
    """``y`` (class indices, one per sample) with each label replaced by epsilon-randomized response."""
    if y.dim() != 1 or y.is_floating_point():
        raise ValueError(
            f"label DP protects class labels (one integer per sample); got labels of shape {list(y.shape)} "
            f"and dtype {y.dtype} (a language-model task's token targets are not labels it can protect)"
        )
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got [{int(y.min())}, {int(y.max())}]")
    gen = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(y), generator=gen) >= keep_probability(epsilon, num_classes)
    other = (y + torch.randint(1, num_classes, (len(y),), generator=gen)) % num_classes  # uniform over the rest
    return torch.where(flip, other, y)
