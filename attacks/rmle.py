"""``rmle`` — white-box regularised maximum-likelihood inversion (He, Zhang, Lee, ACSAC 2019).

Threat model: the attacker holds the client segment's weights (in FSL the server
aggregates them every round) and the smashed activations ``h``. It finds the input
that the client segment maps closest to ``h``, with a total-variation prior:
``x* = argmin_x ||f(x) - h||^2 / ||h||^2 + tv * TV(x)``, x in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attacks._optim import invert_features
from attacks.base import AttackResult, Observation, Progress, ThreatModel, freeze, register
from attacks.models import segments

__all__ = ["RMLE"]


@register("rmle")
@dataclass
class RMLE:
    """White-box rMLE. ``iters`` Adam steps at ``lr`` on the input, TV weight ``tv``."""

    iters: int = 600
    lr: float = 0.05
    tv: float = 0.02
    name: str = "rmle"
    needs: tuple[str, ...] = ("client_segment",)

    def run(self, observation: Observation, threat: ThreatModel, progress: Progress | None = None) -> AttackResult:
        if observation.client_segment is None or not threat.knows_client_weights:
            raise ValueError("rmle is white-box: it needs the client segment's weights (threat.knows_client_weights)")
        client, _ = segments(
            observation.model, observation.cut, observation.input_shape, observation.num_classes, observation.norm
        )
        client.load_state_dict(observation.client_segment)
        return AttackResult(reconstructed=self.invert(client, observation, progress))

    def invert(
        self, segment: nn.Module, observation: Observation, progress: Progress | None = None, label: str = "rmle"
    ) -> torch.Tensor:
        """The inputs that ``segment`` (frozen here) maps closest to the observed activations (N, C, H, W)."""
        freeze(segment)
        return invert_features(
            segment,
            observation.activations,
            observation.input_shape,
            iters=self.iters,
            lr=self.lr,
            tv=self.tv,
            progress=progress,
            label=label,
        )
