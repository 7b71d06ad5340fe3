"""``query-free`` — the attacker knows only the architecture (no client weights, no queries).

Two methods:

* ``shadow`` (He, Zhang, Lee, ACSAC 2019, query-free attack): the server owns the
  server segment. It trains a *shadow* client segment of the same architecture on
  labelled auxiliary data, with its own server segment frozen, so that the shadow
  speaks the feature language the server segment understands — which pulls it
  towards the real client segment. Then it runs rMLE through the shadow. Three
  additions, each optional, none of which needs more than the server sees: several
  shadows from independent initialisations fitted at once (``shadows``: the input must
  explain the activation under every one, which averages out each shadow's own
  distortion), the shadows' per-channel activation mean and spread matched to those
  of the observed activations (``moment``: the task loss alone leaves each channel's
  offset and scale free), and UnSplit's alternation started from the shadows and
  the rMLE result (``refine`` steps: shadows and inputs fitted together to the
  observed activations).
* ``unsplit`` (Erdogan, Küpçü, Çiçek, WPES 2022, UnSplit): alternate gradient steps
  on a randomly initialised clone segment and on the inputs, minimising
  ``||clone(x) - h||^2 + tv * TV(x)``; no auxiliary data at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from attacks._optim import feature_loss, invert_features, total_variation
from attacks.base import AttackResult, Observation, Progress, ThreatModel, freeze, progress_or_silent, register
from attacks.models import segments

__all__ = ["QueryFree"]


@register("query-free")
@dataclass
class QueryFree:
    method: str = "unsplit"  # "unsplit" | "shadow"
    shadow_epochs: int = 3  # shadow: passes over the auxiliary data (longer drifts further from the client at relu2)
    shadow_lr: float = 1e-3
    shadows: int = 4  # shadow: independent shadows the input is fitted through at once
    moment: float = 1.0  # shadow: weight of matching the observed activations' per-channel mean and std
    refine: int = 0  # shadow: UnSplit steps after rMLE, fitting shadows and inputs to the activations
    iters: int = 600  # input optimisation steps (rMLE through the shadow; UnSplit's outer steps)
    lr: float = 0.05
    tv: float | None = None  # TV weight; None: 1.0 for shadow's rMLE, 0.005 for UnSplit (and shadow's refine)
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
        if self.shadows < 1:
            raise ValueError(f"shadows must be >= 1, got {self.shadows}")

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
        _, server = segments(obs.model, obs.cut, obs.input_shape, obs.num_classes, obs.norm)
        server.load_state_dict(obs.server_segment)
        freeze(server)
        target = obs.activations.float()
        shadows, accuracies = [], []
        for k in range(self.shadows):
            shadow, acc = self._train_shadow(obs, threat, server, target, self.seed + 10 * k, report, k)
            shadows.append(freeze(shadow))
            accuracies.append(acc)
        k = len(shadows)

        def through_all(x: torch.Tensor) -> torch.Tensor:  # the relative feature loss then averages over shadows
            return torch.cat([s(x) for s in shadows], 1)

        tv = 1.0 if self.tv is None else self.tv
        x = invert_features(
            through_all,
            target.repeat(1, k, *([1] * (target.dim() - 2))),
            obs.input_shape,
            iters=self.iters,
            lr=self.lr,
            tv=tv,
            progress=progress,
            label="query-free rmle",
        )
        if self.refine:
            x = self._refine(shadows, x, target, report)
        return AttackResult(reconstructed=x, extra={"shadow_train_accuracy": sum(accuracies) / len(accuracies)})

    def _train_shadow(
        self,
        obs: Observation,
        threat: ThreatModel,
        server: nn.Module,
        target: torch.Tensor,
        seed: int,
        report: Any,
        k: int,
    ) -> tuple[nn.Module, float]:
        """One shadow: [shadow -> frozen server segment] trained on the labelled auxiliary data."""
        assert threat.auxiliary_data is not None and threat.auxiliary_labels is not None
        shadow, _ = segments(obs.model, obs.cut, obs.input_shape, obs.num_classes, obs.norm, seed=seed + 1)
        x_aux, y_aux = threat.auxiliary_data.float(), threat.auxiliary_labels.long()
        dims = (0, *range(2, target.dim()))  # per channel (per feature for flat activations)
        mu, sd = target.mean(dims), target.std(dims)
        scale = (sd**2).sum().clamp_min(1e-8)
        opt = torch.optim.Adam(shadow.parameters(), lr=self.shadow_lr)
        gen = torch.Generator().manual_seed(seed)
        shadow.train()
        correct = 0
        for ep in range(self.shadow_epochs):
            perm = torch.randperm(len(y_aux), generator=gen)
            correct = 0
            for i in range(0, len(y_aux), 64):
                idx = perm[i : i + 64]
                z = shadow(x_aux[idx])
                logits = server(z)
                loss = F.cross_entropy(logits, y_aux[idx])
                if self.moment:
                    stats = ((z.mean(dims) - mu) ** 2).sum() + ((z.std(dims) - sd) ** 2).sum()
                    loss = loss + self.moment * stats / scale
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                correct += int((logits.argmax(1) == y_aux[idx]).sum())
            done = k * self.shadow_epochs + ep + 1
            msg = f"query-free: shadow {k + 1} epoch {ep + 1}, acc {correct / len(y_aux):.3f}"
            report(done, self.shadows * self.shadow_epochs + 1, msg)
        return shadow, correct / len(y_aux)

    def _refine(self, shadows: list[nn.Module], x0: torch.Tensor, target: torch.Tensor, report: Any) -> torch.Tensor:
        """UnSplit's alternation from the shadows and the rMLE result instead of a random clone and grey."""
        for s in shadows:
            for p in s.parameters():
                p.requires_grad_(True)
        x = x0.clone().requires_grad_(True)
        opt_x = torch.optim.Adam([x], lr=self.lr)
        opt_w = torch.optim.Adam([p for s in shadows for p in s.parameters()], lr=1e-3)

        def loss_of(inp: torch.Tensor) -> torch.Tensor:
            return torch.stack([feature_loss(s(inp), target) for s in shadows]).mean(0)

        for it in range(self.refine):
            for _ in range(self.inner):
                opt_w.zero_grad(set_to_none=True)
                loss_of(x.detach()).sum().backward()
                opt_w.step()
            opt_x.zero_grad(set_to_none=True)
            loss = (loss_of(x) + 0.005 * total_variation(x)).sum()
            loss.backward()
            opt_x.step()
            with torch.no_grad():
                x.clamp_(0, 1)
            if it % max(1, self.refine // 50) == 0 or it == self.refine - 1:
                report(it + 1, self.refine, f"query-free (refine): loss {float(loss.detach()) / len(x):.4f}")
        return x.detach()

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
        tv = 0.005 if self.tv is None else self.tv
        for it in range(self.iters):
            for _ in range(self.inner):  # clone steps with x fixed
                opt_w.zero_grad(set_to_none=True)
                feature_loss(clone(x.detach()), target).sum().backward()
                opt_w.step()
            opt_x.zero_grad(set_to_none=True)  # input step with the clone fixed
            loss = (feature_loss(clone(x), target) + tv * total_variation(x)).sum()
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
