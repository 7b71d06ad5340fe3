"""Privacy mechanisms that protect what leaves a client.

:mod:`fsl.privacy.activation` protects the smashed activations sent every batch
(per-sample clipping plus Gaussian or Laplace noise, with a per-release
(epsilon, delta) guarantee). It does nothing for the client-segment updates that
get aggregated: that is DP-SGD's job, with its own accounting.
"""

from fsl.privacy.activation import (
    ActivationNoise,
    PrivacyGuarantee,
    activation_release,
    clip_per_sample,
    gaussian_epsilon,
    gaussian_sigma,
)

__all__ = [
    "ActivationNoise",
    "PrivacyGuarantee",
    "activation_release",
    "clip_per_sample",
    "gaussian_epsilon",
    "gaussian_sigma",
]
