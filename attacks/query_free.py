"""``query-free`` — the attacker knows only the architecture (no client weights, no queries).

Two methods:

* ``shadow`` (He, Zhang, Lee, ACSAC 2019, query-free attack): the server owns the
  server segment. It trains a *shadow* client segment of the same architecture on
  labelled auxiliary data, with its own server segment frozen, so that the shadow
  speaks the feature language the server segment understands — which forces it
  close to the real client segment. Then it runs rMLE through the shadow.
* ``unsplit`` (Erdogan, Küpçü, Çiçek, WPES 2022, UnSplit): alternate gradient steps
  on a randomly initialised clone segment and on the inputs, minimising
  ``||clone(x) - h||^2 + tv * TV(x)``; no auxiliary data at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F  # noqa: N812

from attacks._optim import feature_loss, total_variation
from attacks.base import AttackResult, Observation, Progress, ThreatModel, freeze, progress_or_silent, register
from attacks.models import segments
from attacks.rmle import RMLE

__all__ = ["QueryFree"]


@register("query-free")
@dataclass
class QueryFree:
    method: str = "unsplit"  # "unsplit" | "shadow"
    shadow_epochs: int = 5  # shadow: passes over the auxiliary data
    shadow_lr: float = 1e-3
    iters: int = 600  # input optimisation steps (rMLE through the shadow; UnSplit's outer steps)
    lr: float = 0.05
    tv: float = 0.005
    inner: int = 5  # unsplit: clone steps per input step
    restarts: int = 1  # unsplit: independent clone initialisations; per image, the lowest feature loss wins
    seed: int = 0
    name: str = "query-free"
    needs: tuple[str, ...] = ("server_segment", "auxiliary_data")

    def __post_init__(self) -> None:
        if self.method not in ("shadow", "unsplit"):
            raise ValueError(f"query-free method must be 'shadow' or 'unsplit', not {self.method!r}")
        if self.restarts < 1:
            raise ValueError(f"restarts must be >= 1, got {self.restarts}")

    def run(self, observation: Observation, threat: ThreatModel, progress: Progress | None = None) -> AttackResult:
        if self.method == "unsplit":
            return self._unsplit(observation, progress)
        return self._shadow(observation, threat, progress)

    def _shadow(self, obs: Observation, threat: ThreatModel, progress: Progress | None) -> AttackResult:
        if obs.server_segment is None:
            raise ValueError("query-free (shadow) needs the server's own segment (recorded server_segment)")
        if threat.auxiliary_data is None or threat.auxiliary_labels is None:
            raise ValueError("query-free (shadow) needs labelled auxiliary data")
        report = progress_or_silent(progress)
        shadow, server = segments(obs.model, obs.cut, obs.input_shape, obs.num_classes, obs.norm, seed=self.seed + 1)
        server.load_state_dict(obs.server_segment)
        freeze(server)
        x_aux, y_aux = threat.auxiliary_data.float(), threat.auxiliary_labels.long()
        opt = torch.optim.Adam(shadow.parameters(), lr=self.shadow_lr)
        gen = torch.Generator().manual_seed(self.seed)
        shadow.train()
        for ep in range(self.shadow_epochs):
            perm = torch.randperm(len(y_aux), generator=gen)
            correct = 0
            for i in range(0, len(y_aux), 64):
                idx = perm[i : i + 64]
                logits = server(shadow(x_aux[idx]))
                loss = F.cross_entropy(logits, y_aux[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                correct += int((logits.argmax(1) == y_aux[idx]).sum())
            report(ep + 1, self.shadow_epochs + 1, f"query-free: shadow epoch {ep + 1}, acc {correct / len(y_aux):.3f}")
        x = RMLE(iters=self.iters, lr=self.lr, tv=self.tv).invert(shadow, obs, progress, label="query-free rmle")
        return AttackResult(reconstructed=x, extra={"shadow_train_accuracy": correct / len(y_aux)})

    def _unsplit(self, obs: Observation, progress: Progress | None) -> AttackResult:
        """UnSplit; with ``restarts`` > 1 the attacker keeps, per image, the attempt whose clone
        explains the observed activation best (its own objective: no ground truth involved)."""
        report = progress_or_silent(progress)
        target = obs.activations.float()
        best_x, best_loss = None, None
        for r in range(self.restarts):
            x, loss = self._unsplit_once(obs, target, self.seed + 2 + 1000 * r, report, r)
            if best_x is None or best_loss is None:
                best_x, best_loss = x, loss
                continue
            better = loss < best_loss  # (N,)
            best_x[better] = x[better]
            best_loss = torch.minimum(best_loss, loss)
        assert best_x is not None
        return AttackResult(reconstructed=best_x)

    def _unsplit_once(
        self, obs: Observation, target: torch.Tensor, seed: int, report: Any, attempt: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        clone, _ = segments(obs.model, obs.cut, obs.input_shape, obs.num_classes, obs.norm, seed=seed)
        clone.eval()
        n = target.shape[0]
        x = torch.full((n, *obs.input_shape), 0.5, requires_grad=True)
        opt_x = torch.optim.Adam([x], lr=self.lr)
        opt_w = torch.optim.Adam(clone.parameters(), lr=1e-3)
        total = self.iters * self.restarts
        for it in range(self.iters):
            for _ in range(self.inner):  # clone steps with x fixed
                opt_w.zero_grad(set_to_none=True)
                feature_loss(clone(x.detach()), target).sum().backward()
                opt_w.step()
            opt_x.zero_grad(set_to_none=True)  # input step with the clone fixed
            loss = (feature_loss(clone(x), target) + self.tv * total_variation(x)).sum()
            loss.backward()
            opt_x.step()
            with torch.no_grad():
                x.clamp_(0, 1)
            done = attempt * self.iters + it + 1
            if it % max(1, self.iters // 50) == 0 or it == self.iters - 1:
                report(done, total, f"query-free (unsplit): loss {float(loss.detach()) / n:.4f}")
        with torch.no_grad():
            final = feature_loss(clone(x), target)  # (N,) how well this attempt explains each activation
        return x.detach(), final
