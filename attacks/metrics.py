"""Leakage metrics: MSE, PSNR, SSIM per image on [0, 1], label accuracy and AUC.

Reconstructions are matched to their originals *before* scoring:
:func:`match_by_key` aligns them by the (round, client, step, index) keys the
observation and the ground truth share, and :func:`match_by_assignment` pairs
them by minimal total MSE (Hungarian) for attacks whose output order is not the
input order (gradient inversion of a batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

__all__ = [
    "image_scores",
    "label_accuracy",
    "label_multiset_accuracy",
    "match_by_assignment",
    "match_by_key",
    "mse",
    "psnr",
    "roc_auc",
    "ssim",
    "summarize",
]


def _check(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W) of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N,) mean squared error per image."""
    _check(x, y)
    return ((x.float() - y.float()) ** 2).flatten(1).mean(1)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, max_db: float = 100.0) -> torch.Tensor:
    """(N,) peak signal-to-noise ratio in dB per image (capped at ``max_db`` for identical images)."""
    m = mse(x, y).clamp_min(data_range**2 * 10 ** (-max_db / 10))
    return 10.0 * torch.log10(data_range**2 / m)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    window: int = 7,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """(N,) structural similarity per image (Wang et al. 2004), Gaussian window, averaged over channels.

    The window shrinks to the image for tiny images (8x8 digits use a 7x7 window,
    5x5 would be used below 7 pixels). Only "valid" positions are averaged, as in
    scikit-image's ``structural_similarity(gaussian_weights=True)``.
    """
    _check(x, y)
    x, y = x.double(), y.double()
    c = x.shape[1]
    size = min(window, x.shape[-1], x.shape[-2])
    size -= 1 - size % 2  # odd
    w = _gaussian_window(size, sigma).double().expand(c, 1, size, size).contiguous()
    conv = lambda t: F.conv2d(t, w, groups=c)  # noqa: E731
    mu_x, mu_y = conv(x), conv(y)
    sxx = conv(x * x) - mu_x**2
    syy = conv(y * y) - mu_y**2
    sxy = conv(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).float()


def image_scores(reconstructed: torch.Tensor, original: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image MSE, PSNR and SSIM of aligned reconstructions (clamped to [0, 1] first)."""
    r = reconstructed.detach().float().clamp(0, 1)
    o = original.detach().float()
    return {"mse": mse(r, o), "psnr": psnr(r, o), "ssim": ssim(r, o)}


def summarize(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    """``mse_mean``, ``psnr_mean``, ``ssim_mean`` (and ``*_std``) from :func:`image_scores`."""
    out: dict[str, float] = {}
    for k, v in scores.items():
        out[f"{k}_mean"] = float(v.mean()) if v.numel() else math.nan
        out[f"{k}_std"] = float(v.std(unbiased=False)) if v.numel() else math.nan
    return out


def match_by_key(
    reconstructed: torch.Tensor, keys: Sequence[str], truth: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstructed, original) for the keys present in both, in observation order."""
    rows = [i for i, k in enumerate(keys) if k in truth]
    if not rows:
        raise ValueError("no reconstruction has a ground-truth image with the same key")
    orig = torch.stack([truth[keys[i]] for i in rows])
    return reconstructed[rows], orig


def match_by_assignment(reconstructed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Reorder ``reconstructed`` so that row i is the reconstruction closest to ``original[i]`` (one-to-one)."""
    from scipy.optimize import linear_sum_assignment

    r = reconstructed.detach().float().flatten(1)
    o = original.detach().float().flatten(1)
    cost = torch.cdist(o.double(), r.double()) ** 2  # (N_orig, N_rec)
    rows, cols = linear_sum_assignment(cost.numpy())
    order = np.empty(len(rows), dtype=np.int64)
    order[rows] = cols
    return reconstructed[torch.from_numpy(order)]


def label_accuracy(predicted: torch.Tensor, true: torch.Tensor) -> float:
    return float((predicted.long() == true.long()).float().mean()) if len(true) else math.nan


def label_multiset_accuracy(predicted: torch.Tensor, true: torch.Tensor) -> float:
    """Fraction of ``true`` labels found in ``predicted`` counted as multisets (for a batch whose order is lost)."""
    if not len(true):
        return math.nan
    left = predicted.long().tolist()
    hits = 0
    for y in true.long().tolist():
        if y in left:
            left.remove(y)
            hits += 1
    return hits / len(true)


def roc_auc(scores: torch.Tensor, true: torch.Tensor) -> float:
    """ROC AUC: binary for (N,) scores, macro one-vs-rest for (N, K) scores (ties count one half)."""
    s = scores.detach().double()
    y = true.long()
    if s.ndim == 1:
        return _binary_auc(s, y == 1)
    aucs = [_binary_auc(s[:, k], y == k) for k in range(s.shape[1]) if 0 < int((y == k).sum()) < len(y)]
    return float(np.mean(aucs)) if aucs else math.nan


def _binary_auc(s: torch.Tensor, pos: torch.Tensor) -> float:
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    # rank-sum (Mann-Whitney U) with average ranks for ties
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    sorted_s = s[order]
    i = 0
    n = len(s)
    while i < n:
        j = i
        while j + 1 < n and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = float(ranks[pos].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)
