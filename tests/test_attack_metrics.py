"""Leakage metrics against known values."""

import math

import pytest
import torch

from attacks.metrics import image_scores, match_by_assignment, match_by_key, psnr, roc_auc, ssim


def test_ssim_is_one_for_identical_images_and_falls_with_noise():
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(x, x), torch.ones(4), atol=1e-6)
    gen = torch.Generator().manual_seed(1)
    noisy = [(x + s * torch.randn(x.shape, generator=gen)).clamp(0, 1) for s in (0.05, 0.2, 0.5)]
    vals = [float(ssim(n, x).mean()) for n in noisy]
    assert vals[0] > vals[1] > vals[2]
    assert abs(float(ssim(torch.full_like(x, 0.5), x).mean())) < 0.05  # a flat image shares no structure


def test_ssim_works_on_8x8_and_rgb():
    x = torch.rand(2, 3, 8, 8)
    assert ssim(x, x).shape == (2,)


def test_psnr_known_value():
    x = torch.zeros(1, 1, 4, 4)
    assert float(psnr(x + 0.1, x)) == pytest.approx(20.0, abs=1e-4)  # mse 0.01 -> 20 dB


def test_scores_clamp_reconstructions_to_unit_range():
    x = torch.rand(3, 1, 8, 8)
    s = image_scores(x + 5.0, x)  # clamped to 1 before scoring
    assert float(s["mse"].max()) <= 1.0


def test_match_by_key_and_by_assignment():
    truth = {f"k{i}": torch.full((1, 2, 2), float(i) / 10) for i in range(5)}
    rec = torch.stack([truth[k] for k in ("k3", "k1", "k4")])
    r, o = match_by_key(rec, ["k3", "k1", "k4"], truth)
    assert torch.equal(r, o)
    shuffled = o[torch.tensor([2, 0, 1])]
    assert torch.equal(match_by_assignment(shuffled, o), o)


def test_auc_binary_and_multiclass():
    y = torch.tensor([0, 0, 1, 1])
    assert roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), y) == pytest.approx(0.75)
    assert roc_auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), y) == pytest.approx(0.5)  # ties count half
    scores = torch.eye(3)[torch.tensor([0, 1, 2, 0])]
    assert roc_auc(scores, torch.tensor([0, 1, 2, 0])) == pytest.approx(1.0)
    assert math.isnan(roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))
