"""Leakage attacks on what an honest-but-curious (or malicious) split server observes.

The protocol lives in :mod:`attacks.base`; each attack is one module that
registers itself with :func:`attacks.base.register`.
"""

from attacks.base import REGISTRY, Attack, Observation, ThreatModel, get_attack, register

__all__ = ["REGISTRY", "Attack", "Observation", "ThreatModel", "get_attack", "register"]
