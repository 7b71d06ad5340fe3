"""Leakage attacks on what an honest-but-curious (or malicious) split server observes.

The protocol lives in :mod:`attacks.base`; each attack is one module that
registers itself with :func:`attacks.base.register`. Importing this package
registers them all.
"""

from attacks import fsha, gradient_inversion, inverse_network, label_inference, query_free, rmle  # noqa: F401
from attacks.base import REGISTRY, Attack, AttackResult, Observation, ThreatModel, get_attack, register

__all__ = ["REGISTRY", "Attack", "AttackResult", "Observation", "ThreatModel", "get_attack", "register"]
