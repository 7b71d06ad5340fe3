"""The attack protocol: what the attacker observed, what it knows, and what it returns.

Three things are kept apart (the shape of breaching's "case" / attack / analysis):

* :class:`Observation` — only what the server saw or holds itself: smashed
  activations, labels if the split sent them, gradients it received (U-shaped),
  the client segment it aggregates (unless secure aggregation hides it), its own
  server segment, and the architecture. Never the inputs.
* :class:`ThreatModel` — what the attacker knows besides: the client weights or
  only the architecture, auxiliary data and how it relates to the private data.
* an :class:`Attack` — one module per attack, registered by name with
  :func:`register`; it returns an :class:`AttackResult` aligned with the
  observation. Scoring against ground truth happens elsewhere
  (:mod:`attacks.metrics`, :mod:`attacks.report`), never in an attack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn

__all__ = [
    "AUXILIARY_KINDS",
    "REGISTRY",
    "Attack",
    "AttackResult",
    "Observation",
    "Progress",
    "ThreatModel",
    "get_attack",
    "register",
    "sample_keys",
]

Auxiliary = Literal["none", "same-set", "same-distribution", "other"]
AUXILIARY_KINDS: tuple[str, ...] = ("none", "same-set", "same-distribution", "other")

# progress(done, total, text): attacks call it as they iterate; the CLI draws a bar from it
Progress = Callable[[int, int, str], None]


def _no_progress(done: int, total: int, text: str) -> None:
    return None


@dataclass(frozen=True)
class Observation:
    """What the split server saw (never the ground-truth inputs: those are kept apart for scoring)."""

    activations: torch.Tensor  # (N, ...) smashed activations at the cut, as received
    model: str  # architecture name (fsl.models zoo or attacks.models reference models)
    cut: str
    input_shape: tuple[int, ...]  # (C, H, W) of one input
    num_classes: int = 10
    norm: str = ""  # normalisation layers of the architecture ("" = the model's default)
    labels: torch.Tensor | None = None  # (N,) when the split sends labels
    gradients: torch.Tensor | None = None  # (N, ...) gradients the server received (U-shaped: dL/d its output)
    server_outputs: torch.Tensor | None = None  # (N, ...) what the server sent on (U-shaped)
    client_segment: dict[str, torch.Tensor] | None = None  # weights, unless secure aggregation hides them
    server_segment: dict[str, torch.Tensor] | None = None  # the server's own weights
    keys: tuple[str, ...] = ()  # one id per sample, "round/client/step/index", to match ground truth
    # gradient inversion (attacks/gradient_inversion.py); all optional, None when not observed
    cut_gradients: torch.Tensor | None = None  # (N, ...) dL/dh the split server sent back for these rows
    client_update: dict[str, torch.Tensor] | None = None  # the segment one client returned after its step(s)
    weight_gradient: dict[str, torch.Tensor] | None = None  # that client's segment gradient, when known directly

    def __post_init__(self) -> None:
        n = self.activations.shape[0]
        for name in ("labels", "gradients", "server_outputs", "cut_gradients"):
            t = getattr(self, name)
            if t is not None and t.shape[0] != n:
                raise ValueError(f"observation: {name} has {t.shape[0]} rows for {n} activations")
        if self.keys and len(self.keys) != n:
            raise ValueError(f"observation: {len(self.keys)} keys for {n} activations")

    def __len__(self) -> int:
        return int(self.activations.shape[0])

    def subset(self, index: torch.Tensor | slice) -> Observation:
        """The same observation restricted to rows ``index`` (segments and architecture kept).

        ``client_update`` and ``weight_gradient`` belong to the whole batch they were computed
        on: they are kept only when ``index`` selects every row, and dropped otherwise.
        """
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        n = len(self)
        rows = list(range(n)[index]) if isinstance(index, slice) else torch.arange(n)[index].flatten().tolist()
        whole = sorted(rows) == list(range(n))
        keys = self.keys
        if keys:
            keys = tuple(keys[i] for i in rows)
        return Observation(
            activations=self.activations[index],
            model=self.model,
            cut=self.cut,
            input_shape=self.input_shape,
            num_classes=self.num_classes,
            norm=self.norm,
            labels=pick(self.labels),
            gradients=pick(self.gradients),
            server_outputs=pick(self.server_outputs),
            client_segment=self.client_segment,
            server_segment=self.server_segment,
            keys=keys,
            cut_gradients=pick(self.cut_gradients),
            client_update=self.client_update if whole else None,
            weight_gradient=self.weight_gradient if whole else None,
        )


@dataclass(frozen=True)
class ThreatModel:
    """What the attacker knows besides the observation.

    ``auxiliary`` says how ``auxiliary_data`` relates to the private data: ``same-set``
    (some of the very samples), ``same-distribution`` (other samples of the same
    dataset), ``other`` (a different dataset of the same shape), ``none``.
    ``known_labels`` maps observation rows to labels the attacker knows (e.g. its
    own samples as a colluding client); label attacks may use them as anchors and
    the scorer leaves them out.
    """

    knows_client_weights: bool = True
    auxiliary: Auxiliary = "none"
    auxiliary_data: torch.Tensor | None = field(default=None, repr=False)  # (M, C, H, W) in [0, 1]
    auxiliary_labels: torch.Tensor | None = field(default=None, repr=False)  # (M,)
    known_labels: dict[int, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.auxiliary not in AUXILIARY_KINDS:
            raise ValueError(f"auxiliary must be one of {AUXILIARY_KINDS}, not {self.auxiliary!r}")
        if self.auxiliary != "none" and self.auxiliary_data is None:
            raise ValueError(f"auxiliary={self.auxiliary!r} needs auxiliary_data")

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary (what ``attack.json`` records as ``threat_model``)."""
        return {
            "knows_client_weights": self.knows_client_weights,
            "auxiliary": self.auxiliary,
            "auxiliary_samples": 0 if self.auxiliary_data is None else int(self.auxiliary_data.shape[0]),
            "known_labels": len(self.known_labels),
        }


@dataclass(frozen=True)
class AttackResult:
    reconstructed: torch.Tensor | None = None  # (N, C, H, W) in [0, 1], aligned with the observation
    labels: torch.Tensor | None = None  # (N,) inferred labels, for label attacks
    scores: torch.Tensor | None = None  # (N, num_classes) label scores (higher = more likely), for AUC
    extra: dict[str, Any] = field(default_factory=dict)  # attack-specific figures (e.g. a curve), JSON-ready


class Attack(Protocol):
    """One attack: reconstruct inputs (or labels) from an observation under a threat model."""

    name: str
    needs: tuple[str, ...]  # what it needs from the threat model / observation, for clear errors

    def run(self, observation: Observation, threat: ThreatModel, progress: Progress | None = None) -> AttackResult: ...


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
    import attacks  # noqa: F401 - importing the package registers every attack module

    try:
        factory = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; registered: {sorted(REGISTRY) or 'none yet'}") from None
    try:
        return factory(**options)
    except TypeError as e:
        raise ValueError(f"attack {name!r}: {e}") from None


def sample_keys(rnd: int, client: str, step: int, n: int) -> list[str]:
    """The per-sample keys shared by observations and ground truth: ``round/client/step/index``."""
    return [f"{rnd}/{client}/{step}/{i}" for i in range(n)]


def progress_or_silent(progress: Progress | None) -> Progress:
    return progress or _no_progress


def freeze(module: nn.Module) -> nn.Module:
    """``module`` in eval mode with gradients off for its parameters (attacks optimise inputs, not it)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module
