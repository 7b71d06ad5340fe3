"""Privacy mechanisms that protect what leaves a client.

:mod:`fsl.privacy.activation` protects the smashed activations sent every batch
(per-sample clipping plus Gaussian or Laplace noise, with a per-release
(epsilon, delta) guarantee). It does nothing for the client-segment updates that
get aggregated: that is DP-SGD's job, with its own accounting.
"""

# the ``X as X`` form re-exports each name (PEP 484), so the list is written once
from fsl.privacy.activation import ActivationNoise as ActivationNoise
from fsl.privacy.activation import PrivacyGuarantee as PrivacyGuarantee
from fsl.privacy.activation import activation_release as activation_release
from fsl.privacy.activation import clip_per_sample as clip_per_sample
from fsl.privacy.activation import gaussian_epsilon as gaussian_epsilon
from fsl.privacy.activation import gaussian_sigma as gaussian_sigma
