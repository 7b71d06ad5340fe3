"""The activation defense: clipping bound, noise scale, and the per-release (epsilon, delta)."""

import math

import pytest
import torch

from fsl.privacy import ActivationNoise, activation_release, clip_per_sample, gaussian_epsilon, gaussian_sigma


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_clip_bounds_every_sample_and_keeps_small_ones(p):
    h = torch.randn(7, 3, 4, 4) * torch.tensor([0.01, 1, 5, 10, 50, 0.1, 3]).view(-1, 1, 1, 1)
    out = clip_per_sample(h, 2.0, p=p)
    norms_in = h.flatten(1).norm(p=p, dim=1)
    norms = out.flatten(1).norm(p=p, dim=1)
    assert (norms <= 2.0 + 1e-5).all()
    small = norms_in <= 2.0
    assert torch.allclose(out[small], h[small])  # inside the ball: unchanged
    assert torch.allclose(norms[~small], torch.full_like(norms[~small], 2.0), atol=1e-5)  # outside: on the sphere
    assert clip_per_sample(torch.zeros(0, 5), 1.0).shape == (0, 5)  # an empty batch is fine


def test_gaussian_noise_has_the_stated_scale_and_is_seeded():
    noise = ActivationNoise("gaussian", clip_norm=0.5, noise_multiplier=2.0, seed=3)
    h = torch.zeros(4000, 16)  # norm 0: clipping does nothing, what comes out is the noise
    out = noise(h)
    assert out.std().item() == pytest.approx(1.0, rel=0.03)  # 2.0 * 0.5
    assert out.mean().abs().item() < 0.02
    again = ActivationNoise("gaussian", clip_norm=0.5, noise_multiplier=2.0, seed=3)(h)
    assert torch.equal(out, again)


def test_laplace_noise_scale_and_pure_dp():
    noise = ActivationNoise("laplace", clip_norm=1.0, noise_multiplier=0.5, seed=0)
    out = noise(torch.zeros(20000, 8))
    assert out.abs().mean().item() == pytest.approx(0.5, rel=0.03)  # E|Laplace(0, b)| = b
    g = noise.guarantee(1e-5)
    assert g.delta == 0.0 and g.epsilon == pytest.approx(2 * 1.0 / 0.5)  # sensitivity 2C over b


def test_gaussian_epsilon_is_tighter_than_the_classical_bound_and_inverts():
    delta, sens = 1e-5, 2.0
    for eps in (0.3, 0.9):
        classical_sigma = sens * math.sqrt(2 * math.log(1.25 / delta)) / eps
        assert gaussian_epsilon(classical_sigma, delta, sens) < eps  # analytic is exact: never worse
        s = gaussian_sigma(eps, delta, sens)
        assert s < classical_sigma
        assert gaussian_epsilon(s, delta, sens) == pytest.approx(eps, rel=1e-4)
    # more noise, smaller epsilon; no noise, no guarantee
    assert gaussian_epsilon(10.0, delta, sens) < gaussian_epsilon(1.0, delta, sens)
    assert ActivationNoise("gaussian", 1.0, 0.0).guarantee().epsilon == math.inf


def test_guarantee_matches_the_mechanism_parameters():
    noise = ActivationNoise("gaussian", clip_norm=3.0, noise_multiplier=4.0)
    assert noise.guarantee(1e-5).epsilon == pytest.approx(gaussian_epsilon(12.0, 1e-5, 6.0))


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="mechanism"):
        ActivationNoise("uniform")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="clip_norm"):
        ActivationNoise("gaussian", clip_norm=0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        ActivationNoise("gaussian", noise_multiplier=-1)


def test_release_from_config():
    from fsl.config import ActivationNoiseConfig, ConfigError

    assert activation_release(ActivationNoiseConfig()) is None
    rel = activation_release(ActivationNoiseConfig("laplace", clip_norm=2.0, noise_multiplier=0.1), seed=1)
    assert isinstance(rel, ActivationNoise) and rel.scale == pytest.approx(0.2)
    with pytest.raises(ConfigError):
        ActivationNoiseConfig("uniform")


def test_activation_noise_reaches_every_split_client_through_one_path():
    """client_privacy is the one place the ClientApp gets its release from, for split and U-shaped clients."""
    from fsl.config import load_experiment
    from fsl.models import build_model
    from fsl.privacy.client import client_privacy
    from fsl.training import TrainOptions

    noise = ["activation_noise.mechanism=gaussian", "activation_noise.clip_norm=2.0"]
    opts = TrainOptions(seed=11, proximal_mu=0.1)
    for mode in ("fsl", "ushaped", "sl"):
        cfg = load_experiment("quickstart", [f"mode={mode}", *noise])
        p = client_privacy(cfg, build_model("cnn", seed=0), 64, opts, 0)
        assert p.hooks.release == ActivationNoise("gaussian", clip_norm=2.0, seed=11), mode
        assert p.hooks.optimizer is None and p.options == opts
    fl = client_privacy(load_experiment("quickstart", ["mode=fl", *noise]), build_model("cnn", seed=0), 64, opts, 0)
    assert fl.hooks.release is None  # a whole model sends no activations
    dp = load_experiment("quickstart", ["privacy.dp.enabled=true", *noise])
    p = client_privacy(dp, build_model("cnn", seed=0), 64, opts, 0)
    assert p.hooks.optimizer is not None and p.hooks.batches is not None and p.hooks.release is not None
    assert p.options.proximal_mu == 0.0  # FedProx's term is outside what DP-SGD bounds
    assert p.metrics()["dp_steps"] == 0
