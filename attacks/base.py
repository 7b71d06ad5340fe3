"""The attack protocol: what the attacker observed, what it knows, and what it returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

__all__ = ["REGISTRY", "Attack", "AttackResult", "Observation", "ThreatModel", "get_attack", "register"]


@dataclass(frozen=True)
class Observation:
    """What the split server saw (never the ground-truth inputs: those are kept apart for scoring)."""

    activations: torch.Tensor  # (N, ...) smashed activations at the cut
    model: str  # zoo name of the architecture
    cut: str
    input_shape: tuple[int, ...]  # (C, H, W) of one input
    labels: torch.Tensor | None = None  # (N,) when the split sends labels
    gradients: torch.Tensor | None = None  # gradients the server received (U-shaped splits)
    client_segment: dict[str, torch.Tensor] | None = None  # weights, unless secure aggregation hides them


@dataclass(frozen=True)
class ThreatModel:
    """What the attacker knows besides the observation."""

    knows_client_weights: bool = True
    auxiliary: Literal["none", "same-set", "same-distribution", "other"] = "none"
    auxiliary_data: torch.Tensor | None = field(default=None, repr=False)


@dataclass(frozen=True)
class AttackResult:
    reconstructed: torch.Tensor  # (N, C, H, W) in [0, 1], aligned with the observation
    labels: torch.Tensor | None = None  # inferred labels, for label attacks


class Attack(Protocol):
    """One attack: reconstruct inputs (or labels) from an observation under a threat model."""

    name: str

    def run(self, observation: Observation, threat: ThreatModel) -> AttackResult: ...


REGISTRY: dict[str, Callable[..., Attack]] = {}


def register(name: str) -> Callable[[Callable[..., Attack]], Callable[..., Attack]]:
    """Class decorator: make an attack available as ``name``."""

    def deco(factory: Callable[..., Attack]) -> Callable[..., Attack]:
        if name in REGISTRY:
            raise ValueError(f"attack {name!r} is registered twice")
        REGISTRY[name] = factory
        return factory

    return deco


def get_attack(name: str, **options: object) -> Attack:
    """Instantiate registered attack ``name`` or raise a ``ValueError`` listing the choices."""
    try:
        factory = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; registered: {sorted(REGISTRY) or 'none yet'}") from None
    return factory(**options)
