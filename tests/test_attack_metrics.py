"""Leakage metrics against known values."""

import math

import pytest
import torch

from attacks.metrics import (
    image_scores,
    label_multiset_accuracy,
    match_by_assignment,
    match_by_key,
    psnr,
    roc_auc,
    ssim,
    summarize_scores,
)


def test_ssim_is_one_for_identical_images_and_falls_with_noise():
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(x, x), torch.ones(4), atol=1e-6)
    gen = torch.Generator().manual_seed(1)
    noisy = [(x + s * torch.randn(x.shape, generator=gen)).clamp(0, 1) for s in (0.05, 0.2, 0.5)]
    vals = [float(ssim(n, x).mean()) for n in noisy]
    assert vals[0] > vals[1] > vals[2]
    assert abs(float(ssim(torch.full_like(x, 0.5), x).mean())) < 0.05  # a flat image shares no structure


@pytest.mark.parametrize("dataset", ["mnist5k", "digits"])
def test_ssim_equals_scikit_images_at_the_attacks_settings(dataset):
    """Our SSIM (what every attack is scored with) against scikit-image's, image by image.

    Real test images against noisy copies, blurred copies and other images, at the settings the
    scorer uses: data range 1, 7-pixel window, Gaussian weights of sigma 1.5, population covariance.
    """
    import numpy as np
    from skimage.metrics import structural_similarity

    from fsl.data import load_dataset

    x = load_dataset(dataset).x_test[:12]
    gen = torch.Generator().manual_seed(0)
    noisy = (x + 0.15 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    for other in (noisy, blurred, x.roll(1, dims=0)):
        ours = ssim(other, x).numpy()
        ref = [
            structural_similarity(
                a[0].numpy().astype(np.float64),
                b[0].numpy().astype(np.float64),
                data_range=1.0,
                win_size=7,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
            )
            for a, b in zip(other, x, strict=True)
        ]
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_ssim_averages_channels_as_scikit_image_does():
    import numpy as np
    from skimage.metrics import structural_similarity

    gen = torch.Generator().manual_seed(2)
    x, y = torch.rand(3, 3, 16, 16, generator=gen), torch.rand(3, 3, 16, 16, generator=gen)
    ref = [
        structural_similarity(
            a.numpy().astype(np.float64),
            b.numpy().astype(np.float64),
            data_range=1.0,
            win_size=7,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            channel_axis=0,
        )
        for a, b in zip(x, y, strict=True)
    ]
    np.testing.assert_allclose(ssim(x, y).numpy(), ref, rtol=0, atol=1e-6)


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


def test_summarize_scores_gives_mean_and_population_std():
    out = summarize_scores({"ssim": torch.tensor([0.2, 0.4]), "psnr": torch.tensor([])})
    assert out["ssim_mean"] == pytest.approx(0.3) and out["ssim_std"] == pytest.approx(0.1)
    assert math.isnan(out["psnr_mean"]) and math.isnan(out["psnr_std"])


def test_label_multiset_accuracy_ignores_order_and_counts_repeats_once_each():
    assert label_multiset_accuracy(torch.tensor([3, 1, 1]), torch.tensor([1, 3, 2])) == pytest.approx(2 / 3)
    assert label_multiset_accuracy(torch.tensor([2, 2, 2]), torch.tensor([2, 5, 2])) == pytest.approx(2 / 3)
    assert math.isnan(label_multiset_accuracy(torch.tensor([]), torch.tensor([])))


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
    # (N, K) scores need not be probabilities; a class absent from the labels is left out of the mean
    cosines = torch.tensor([[0.9, -0.2, 0.1], [0.3, 0.8, -1.0], [0.5, 0.1, 0.0], [-0.4, 0.6, 0.2]])
    assert roc_auc(cosines, torch.tensor([0, 1, 0, 1])) == pytest.approx(1.0)
    assert math.isnan(roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))
