"""Leakage metrics: MSE, PSNR, SSIM per image on [0, 1], label accuracy and AUC.

Reconstructions are matched to their originals *before* scoring:
:func:`match_by_key` aligns them by the (round, client, step, index) keys the
observation and the ground truth share, and :func:`match_by_assignment` pairs
them by minimal total MSE (Hungarian) for attacks whose output order is not the
input order (gradient inversion of a batch).
"""

from __future__ import annotations

import math
from collections import Counter
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
    "summarize_scores",
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


def _gaussian_filter(t: torch.Tensor, sigma: float, truncate: float) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter`` over the last two dims of (N, C, H, W), same size out.

    A separable kernel of radius ``int(truncate * sigma + 0.5)`` with scipy's default ``reflect``
    boundary (edge sample repeated: numpy's ``symmetric`` padding), so the SSIM below computes
    exactly what scikit-image's does.
    """
    r = int(truncate * sigma + 0.5)
    ax = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (ax / sigma) ** 2)
    g = (g / g.sum()).to(t.dtype)
    n, c, h, w = t.shape
    rows = torch.from_numpy(np.pad(np.arange(h), r, mode="symmetric"))
    cols = torch.from_numpy(np.pad(np.arange(w), r, mode="symmetric"))
    flat = t.reshape(n * c, 1, h, w)
    flat = F.conv2d(flat.index_select(2, rows), g.view(1, 1, -1, 1))  # (N*C, 1, H, W)
    flat = F.conv2d(flat.index_select(3, cols), g.view(1, 1, 1, -1))  # (N*C, 1, H, W)
    return flat.reshape(n, c, h, w)


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    window: int = 7,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """(N,) structural similarity per image (Wang et al. 2004), Gaussian weights, averaged over channels.

    Equal to scikit-image's ``structural_similarity(data_range=data_range, win_size=window,
    gaussian_weights=True, sigma=sigma, use_sample_covariance=False)`` per image (the tests check it):
    local statistics from a Gaussian filter truncated at 3.5 sigma, averaged over the positions at
    least ``window // 2`` pixels from the border. The window shrinks to the image for tiny images
    (8x8 digits keep 7, 5 would be used below 7 pixels), where scikit-image would refuse.
    """
    _check(x, y)
    x, y = x.double(), y.double()
    size = min(window, x.shape[-1], x.shape[-2])
    size -= 1 - size % 2  # odd
    pad = (size - 1) // 2

    def local(t: torch.Tensor) -> torch.Tensor:
        out = _gaussian_filter(t, sigma, truncate=3.5)
        return out[..., pad : out.shape[-2] - pad, pad : out.shape[-1] - pad]

    mu_x, mu_y = local(x), local(y)
    sxx = local(x * x) - mu_x**2
    syy = local(y * y) - mu_y**2
    sxy = local(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).float()


def image_scores(reconstructed: torch.Tensor, original: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image MSE, PSNR and SSIM of aligned reconstructions (clamped to [0, 1] first)."""
    r = reconstructed.detach().float().clamp(0, 1)
    o = original.detach().float()
    return {"mse": mse(r, o), "psnr": psnr(r, o), "ssim": ssim(r, o)}


def summarize_scores(scores: dict[str, torch.Tensor]) -> dict[str, float]:
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
    common = Counter(predicted.long().tolist()) & Counter(true.long().tolist())  # multiset intersection
    return sum(common.values()) / len(true)


def roc_auc(scores: torch.Tensor, true: torch.Tensor) -> float:
    """ROC AUC (scikit-learn's): binary for (N,) scores, macro one-vs-rest for (N, K) scores; NaN if undefined.

    The (N, K) scores need not be probabilities (scikit-learn's multiclass form requires them), so each
    class present among both positives and negatives is scored as its own binary problem and the
    results are averaged: the macro one-vs-rest AUC.
    """
    from sklearn.metrics import roc_auc_score

    s = scores.detach().double().cpu().numpy()
    y = true.long().cpu().numpy()
    columns = [(s, y == 1)] if s.ndim == 1 else [(s[:, k], y == k) for k in range(s.shape[1])]
    aucs = [float(roc_auc_score(pos, col)) for col, pos in columns if 0 < pos.sum() < len(pos)]
    return float(np.mean(aucs)) if aucs else math.nan
