"""``label-inference`` — labels from the gradients a U-shaped split server receives (Li et al., ICLR 2022).

In a U-shaped split the client keeps the last segment and the loss, so labels never
travel; but the server receives ``g_i = dL/dz_i`` for each of its outputs ``z_i``. With a
softmax cross-entropy head, ``g_i = W^T (p_i - e_{y_i}) / B``: its direction is dominated
by the label.

* ``direction`` (Li et al.'s cosine attack, extended to many classes): the attacker knows
  the labels of a few samples (``threat.known_labels``, e.g. its own as a colluding
  client); each sample gets the class whose known gradients are most cosine-similar.
  Scores are the per-class cosine similarities (for AUC).
* ``norm`` (Li et al.'s norm attack, binary tasks only): the gradient norm is larger for the
  positive (minority) class the model is less sure of; the score is the norm, the prediction
  thresholds it at the median.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attacks.base import AttackResult, Observation, Progress, ThreatModel, progress_or_silent, register

__all__ = ["LabelInference"]


@register("label-inference")
@dataclass
class LabelInference:
    method: str = "direction"  # "direction" | "norm"
    name: str = "label-inference"
    needs: tuple[str, ...] = ("gradients",)

    def __post_init__(self) -> None:
        if self.method not in ("direction", "norm"):
            raise ValueError(f"label-inference method must be 'direction' or 'norm', not {self.method!r}")

    def run(self, observation: Observation, threat: ThreatModel, progress: Progress | None = None) -> AttackResult:
        if observation.gradients is None:
            raise ValueError("label-inference needs the gradients the server received (a U-shaped split)")
        report = progress_or_silent(progress)
        g = observation.gradients.float().flatten(1)  # (N, D)
        k = observation.num_classes
        if self.method == "norm":
            if k != 2:
                raise ValueError("the norm attack is for binary tasks; use method='direction' for more classes")
            norms = g.norm(dim=1)
            pred = (norms > norms.median()).long()
            report(1, 1, "label-inference (norm)")
            return AttackResult(labels=pred, scores=norms)
        if not threat.known_labels:
            raise ValueError("the direction attack needs a few known labels (threat.known_labels)")
        unit = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
        scores = torch.full((len(g), k), -2.0)
        for c in range(k):
            rows = [i for i, y in threat.known_labels.items() if y == c]
            if rows:
                scores[:, c] = (unit @ unit[rows].T).max(dim=1).values  # (N,) best cosine to a known sample
        report(1, 1, "label-inference (direction)")
        return AttackResult(labels=scores.argmax(1), scores=scores)
