"""Noise on the smashed activations: per-sample clipping plus Gaussian or Laplace noise.

What it protects
----------------
The activations a client sends every batch (``release``), one sample at a time. At a traced cut
that sends several tensors, each hidden state is released on its own (its own clipping and noise);
values derived from the raw inputs alone, such as an additive attention mask, travel unchanged
(:func:`fsl.cutvalues.map_hidden`).
Each sample's activation ``h = f(x)`` is clipped to norm ``clip_norm`` (L2 for the
Gaussian mechanism, L1 for Laplace) and noise is added before it leaves the
client. Two inputs ``x, x'`` then give clipped activations at most ``2 * clip_norm``
apart, whatever the client segment is, so one release of one sample is
(epsilon, delta)-DP with respect to replacing that sample's input by any other.

What it does not protect
------------------------
* The client-segment *updates* that the server aggregates (use DP-SGD for those).
* Repeated releases of the same sample: every epoch sends it again, and the
  guarantee composes (the per-release figure here is the building block an
  accountant multiplies out; it is not a whole-training guarantee).
* Labels, when the split sends them.
* What travels beside the hidden states: an attention mask tells the server each text's length.
* Several hidden states at one cut: each is clipped and noised on its own, and the per-release
  guarantees of the tensors add up.

The gradient the server returns is applied to the *unclipped, noiseless*
activations on the client (see ``fsl.training.TrainHooks.release``),
so the client segment still trains, on a biased gradient.

Example
-------
>>> noise = ActivationNoise("gaussian", clip_norm=5.0, noise_multiplier=1.0, seed=0)
>>> sent = noise(h)                     # (B, ...) clipped + N(0, (1.0 * 5.0)^2)
>>> noise.guarantee(delta=1e-5).epsilon  # per release, analytic Gaussian mechanism
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

__all__ = [
    "ActivationNoise",
    "PrivacyGuarantee",
    "activation_release",
    "clip_per_sample",
    "gaussian_epsilon",
    "gaussian_sigma",
]

Mechanism = Literal["gaussian", "laplace"]


@dataclass(frozen=True)
class PrivacyGuarantee:
    """An (epsilon, delta) pair and what it refers to."""

    epsilon: float
    delta: float
    scope: str = "one release of one sample's activation (replace-one neighbouring inputs)"


def clip_per_sample(h: torch.Tensor, max_norm: float, p: float = 2.0) -> torch.Tensor:
    """Scale each sample of ``h`` (B, ...) so that its ``p``-norm over all non-batch dims is <= ``max_norm``.

    Samples already inside the ball are returned unchanged; a batch of size 0 is fine.
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    if h.ndim == 0:
        raise ValueError("clip_per_sample needs a batch dimension")
    if h.shape[0] == 0:
        return h.clone()
    flat = h.reshape(h.shape[0], -1)
    norms = flat.norm(p=p, dim=1)  # (B,)
    factor: torch.Tensor = (max_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
    return (flat * factor[:, None]).reshape(h.shape)


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _gaussian_delta(eps: float, sigma: float, sensitivity: float) -> float:
    """delta(eps) of the Gaussian mechanism, exactly (Balle & Wang 2018, Theorem 8)."""
    a = sensitivity / (2.0 * sigma)
    b = eps * sigma / sensitivity
    first = _phi(a - b)
    tail = 0.5 * math.erfc((a + b) / math.sqrt(2.0))  # Phi(-a - b)
    second = 0.0 if tail == 0.0 else math.exp(min(eps + math.log(tail), 700.0))
    return max(0.0, first - second)


def gaussian_epsilon(sigma: float, delta: float, sensitivity: float) -> float:
    """Smallest epsilon for which N(0, sigma^2) noise on an L2-``sensitivity`` query is (epsilon, delta)-DP.

    Uses the analytic Gaussian mechanism (exact, valid for every epsilon, unlike the
    classical ``sigma = sensitivity * sqrt(2 ln(1.25/delta)) / epsilon`` bound, which needs epsilon < 1).
    """
    if sigma <= 0:
        return math.inf
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if _gaussian_delta(0.0, sigma, sensitivity) <= delta:
        return 0.0
    return _smallest_meeting(lambda eps: _gaussian_delta(eps, sigma, sensitivity), delta, 0.0, 1.0, give_up=1e6)


def gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Smallest noise std that makes an L2-``sensitivity`` query (epsilon, delta)-DP (inverse of the above)."""
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    return _smallest_meeting(
        lambda sigma: gaussian_epsilon(sigma, delta, sensitivity), epsilon, 1e-6 * sensitivity, sensitivity
    )


def _smallest_meeting(
    f: Callable[[float], float], target: float, lo: float, hi: float, give_up: float = math.inf
) -> float:
    """The smallest ``x >= lo`` with ``f(x) <= target``, for a non-increasing ``f``, to within float precision.

    ``hi`` doubles until it meets the target (past ``give_up``: ``inf``), then 100 bisection steps.
    """
    while f(hi) > target:
        hi *= 2.0
        if hi > give_up:
            return math.inf
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass(frozen=True)
class ActivationNoise:
    """Clip each sample's activation to ``clip_norm`` and add noise of scale ``noise_multiplier * clip_norm``.

    Parameters
    ----------
    mechanism
        ``"gaussian"``: L2 clipping, N(0, sigma^2) noise with sigma = noise_multiplier * clip_norm.
        ``"laplace"``: L1 clipping, Laplace(0, b) noise with b = noise_multiplier * clip_norm.
    clip_norm
        Per-sample norm bound C (> 0). Pick it near the typical norm of the activations at the cut:
        far below, the clipping itself destroys the signal; far above, the noise must be larger for the
        same guarantee.
    noise_multiplier
        Noise scale in units of ``clip_norm`` (0 = clipping only, no guarantee).
    seed
        Seeds the noise (``None``: torch's global RNG).
    """

    mechanism: Mechanism = "gaussian"
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    seed: int | None = None
    _gen: list[torch.Generator] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mechanism not in ("gaussian", "laplace"):
            raise ValueError(f"mechanism must be 'gaussian' or 'laplace', not {self.mechanism!r}")
        if self.clip_norm <= 0:
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm}")
        if self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")

    @property
    def sensitivity(self) -> float:
        """Largest distance (L2 or L1) between two clipped activations: 2 * clip_norm."""
        return 2.0 * self.clip_norm

    @property
    def scale(self) -> float:
        """Noise std (Gaussian) or Laplace scale b."""
        return self.noise_multiplier * self.clip_norm

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if not self._gen:
            self._gen.append(torch.Generator(device=device).manual_seed(self.seed))
        return self._gen[0]

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """The released activations: clipped per sample, plus noise; same shape and dtype as ``h``."""
        p = 2.0 if self.mechanism == "gaussian" else 1.0
        out = clip_per_sample(h.detach().float(), self.clip_norm, p=p)
        if self.scale > 0:
            gen = self._generator(out.device)
            if self.mechanism == "gaussian":
                noise = torch.randn(out.shape, generator=gen, device=out.device) * self.scale
            else:  # Laplace(0, b) = b * (E1 - E2) with E1, E2 ~ Exp(1)
                u = torch.rand((2, *out.shape), generator=gen, device=out.device).clamp_min(1e-12)
                noise = (u[1].log() - u[0].log()) * self.scale
            out = out + noise
        return out.to(h.dtype)

    def guarantee(self, delta: float = 1e-5) -> PrivacyGuarantee:
        """The per-release guarantee; Laplace is pure DP (delta = 0 whatever is asked)."""
        if self.scale == 0:
            return PrivacyGuarantee(math.inf, delta if self.mechanism == "gaussian" else 0.0)
        if self.mechanism == "laplace":
            return PrivacyGuarantee(self.sensitivity / self.scale, 0.0)
        return PrivacyGuarantee(gaussian_epsilon(self.scale, delta, self.sensitivity), delta)


def activation_release(config: object, seed: int | None = None) -> ActivationNoise | None:
    """The release transform an ``ActivationNoiseConfig`` (``fsl.config``) asks for; ``None`` when it is off."""
    mechanism = str(getattr(config, "mechanism", "none"))
    if mechanism == "none":
        return None
    return ActivationNoise(
        mechanism,  # type: ignore[arg-type]
        clip_norm=float(getattr(config, "clip_norm", 1.0)),
        noise_multiplier=float(getattr(config, "noise_multiplier", 1.0)),
        seed=seed,
    )
