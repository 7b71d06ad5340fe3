"""``gradient-inversion`` — inputs from one client's update (Zhu et al. 2019; Geiping et al. 2020).

When aggregation is not secure the server sees each client's returned segment. After one
local step of plain SGD, ``W_before - W_after = lr * dL/dW``: the update *is* the gradient
(up to a scale, which cosine matching ignores). The attack optimises dummy inputs ``x'`` so
that the gradient they induce matches the observed one (Geiping et al.'s "Inverting
Gradients"): ``1 - cos(g(x'), g_obs) + tv * TV(x')``, Adam with step decay at 3/8, 5/8 and
7/8 of the iterations, signed input gradients, ``x'`` projected onto [0, 1] after every step,
a few random restarts keeping the one whose gradient matches best.

Two settings (``mode``):

* ``split`` — the honest-but-curious split server of this framework. It knows the client
  segment before the step (it aggregates it), the gradient ``dL/dh`` it sent back for every
  row of the batch (``Observation.cut_gradients``) and the returned segment. With ``dL/dh``
  fixed, the client's gradient is ``g(x) = (dh/dW)^T dL/dh``, a function of ``x`` alone: no
  labels to guess, and row ``i`` of the result belongs to row ``i`` of ``dL/dh`` (ordered).
  ``use_activations=False`` (default) ignores the activations the server also received,
  so the figure is what the *update* leaks; ``True`` adds rMLE's feature term.
* ``fl`` — classic federated learning: the update is the whole model's. Labels come first
  from the last layer's gradient (:func:`infer_labels`: iDLG's sign rule, Zhao et al. 2020,
  in the per-row form of Yin et al. 2021 that stays exact for a batch of distinct labels),
  then the inputs by gradient matching with those labels fixed. The batch order is not recoverable:
  reconstructions are scored after matching (``extra["unordered"]``).

How much the update determines depends on its size: the ``cnn`` client segment at cut
``conv1`` has 160 parameters against 784 pixels per MNIST image, so the update alone pins
down little there (README, "Gradient inversion"); at ``conv2`` it has 4,800.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F  # noqa: N812

from attacks._optim import feature_loss, total_variation
from attacks.base import AttackResult, Observation, Progress, ThreatModel, progress_or_silent, register
from attacks.models import build_architecture, segments

__all__ = ["GradientInversion", "cosine_distance", "infer_labels", "observed_gradient"]

MODES = ("split", "fl")


def cosine_distance(grads: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
    """``1 - cos`` between two gradients given as matching lists of tensors (all layers as one vector).

    (A mean of per-layer cosine distances was tried too: SSIM 0.65 / 0.43 against 0.74 / 0.59 over
    two seeds at cut conv2, so the single vector stays.)

    Parameters
    ----------
    grads, target
        Tensors of the same shapes, pairwise (one per parameter).

    Returns
    -------
    torch.Tensor
        A scalar in [0, 2]; 0 when the gradients point the same way.
    """
    dot = sum((g * t).sum() for g, t in zip(grads, target, strict=True))
    g_norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    t_norm = torch.sqrt(sum(t.pow(2).sum() for t in target))
    return 1.0 - dot / (g_norm * t_norm).clamp_min(1e-12)  # type: ignore[operator]


def observed_gradient(obs: Observation, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The client's gradient for parameters ``names``: ``weight_gradient``, else ``before - after``.

    ``before - after`` is ``lr * gradient`` for one step of plain SGD (also for the first step
    with momentum, whose buffer starts at the gradient); only its direction is used.

    Parameters
    ----------
    obs
        An observation of one client's step (``weight_gradient``, or ``client_segment`` and
        ``client_update``).
    names
        Parameter names of the attacked module, in its order.

    Returns
    -------
    dict[str, torch.Tensor]
        ``name -> gradient`` (shaped like the parameter) for the names the update covers.

    Raises
    ------
    ValueError
        When the observation holds no individual update, or none of ``names``.
    """
    if obs.weight_gradient is not None:
        source = {k: v.float() for k, v in obs.weight_gradient.items()}
    elif obs.client_segment is not None and obs.client_update is not None:
        source = {
            k: obs.client_segment[k].float() - obs.client_update[k].float()
            for k in obs.client_segment
            if k in obs.client_update
        }
    else:
        raise ValueError(
            "gradient-inversion needs one client's update: weight_gradient, or client_segment and "
            "client_update (record an unsecured round with attacks.harness.record_gradient_step; "
            "with secure aggregation the server never sees an individual update)"
        )
    grad = {k: source[k] for k in names if k in source}
    if not grad:
        raise ValueError(f"the observed update has none of the model's parameters {list(names)[:4]}...")
    return grad


def infer_labels(model: nn.Module, grad: dict[str, torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (n,) and class scores (n, K) from the gradient of the model's last linear layer.

    With softmax cross-entropy, row ``j`` of the last weight's gradient is
    ``mean_i (p_ij - [y_i = j]) a_i`` with post-ReLU features ``a_i >= 0``: every entry is
    >= 0 for a class no sample has, and the row has negative entries for a class some sample
    has (Yin et al. 2021's rule; for one sample it is iDLG's sign rule, Zhao et al. 2020). The
    ``n`` classes with the most negative row minimum are the labels: exact for a batch of
    distinct labels whatever the model predicts; repeated labels are found once, the rest are
    guesses. Without a weight gradient the bias gradient's sign is used (iDLG), which a batch
    misclassified into its own labels can fool.

    Parameters
    ----------
    model
        The architecture (its last ``nn.Linear`` names the layer to read).
    grad
        ``name -> gradient`` (or ``lr * gradient``: only signs and order are used).
    n
        The batch size.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        Labels (n,) int64 and scores (n, K), the same row for every sample (the batch order is lost).
    """
    last = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError("label inference needs a final nn.Linear layer")
    prefix = f"{last[-1]}." if last[-1] else ""
    if f"{prefix}weight" in grad:
        coeff = grad[f"{prefix}weight"].flatten(1).min(1).values  # (K,) most negative entry per class
    elif f"{prefix}bias" in grad:
        coeff = grad[f"{prefix}bias"]  # (K,)
    else:
        raise ValueError(f"the update has no gradient for the last layer {last[-1]!r}")
    order = torch.argsort(coeff)  # most negative first
    labels = order[torch.arange(n) % len(order)]
    scores = (-coeff).expand(n, -1).clone()
    return labels, scores


@register("gradient-inversion")
@dataclass
class GradientInversion:
    """Gradient matching on one client's update; see the module docstring for ``mode``.

    ``run`` returns reconstructions (N, C, H, W) in [0, 1], inferred labels in ``fl`` mode, and in
    ``extra``: ``gradient_match`` (best ``1 - cos``), ``restart_matches``, ``parameters`` (size of
    the matched gradient), ``update_relative_size`` and ``unchanged_fraction`` (how much of the
    update survived float32 rounding), ``steps`` (split) or ``unordered`` (fl).
    """

    mode: str = "split"  # "split": client segment + dL/dh · "fl": whole model, labels inferred
    iters: int = 3000  # Adam steps per restart (README: 3000 split, 2000 fl)
    lr: float = 0.1  # on the pixels; x0.1 at 3/8, 5/8, 7/8 of iters
    tv: float = 0.05  # total-variation weight
    restarts: int = 2  # random initialisations; the best gradient match is kept
    signed: bool = True  # Adam on the sign of the input gradient (Geiping et al.)
    use_activations: bool = False  # split: also match the received activations (rMLE term)
    activation_weight: float = 1.0
    seed: int = 0
    name: str = "gradient-inversion"
    needs: tuple[str, ...] = ("client_segment", "client_update")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"gradient-inversion mode must be one of {MODES}, not {self.mode!r}")
        if self.iters < 1 or self.restarts < 1:
            raise ValueError(f"iters and restarts must be >= 1, got {self.iters} and {self.restarts}")

    def run(self, observation: Observation, threat: ThreatModel, progress: Progress | None = None) -> AttackResult:
        obs = observation
        if obs.client_segment is None or not threat.knows_client_weights:
            raise ValueError("gradient-inversion is white-box: it needs the client weights before the step")
        n = len(obs)
        if self.mode == "split":
            if obs.cut_gradients is None:
                raise ValueError("gradient-inversion (split) needs the dL/dh the server sent (cut_gradients)")
            model, _ = segments(obs.model, obs.cut, obs.input_shape, obs.num_classes, obs.norm)
        else:
            model = build_architecture(obs.model, obs.input_shape, obs.num_classes, obs.norm)
        names = [k for k, _ in model.named_parameters()]
        params = {k: v.detach().float() for k, v in obs.client_segment.items() if k in dict(model.named_parameters())}
        target_dict = observed_gradient(obs, names)
        names = [k for k in names if k in target_dict]
        target = [target_dict[k] for k in names]
        model.load_state_dict(obs.client_segment, strict=False)  # buffers (norm statistics) too
        model.train()  # the client's step ran in training mode
        weights = {k: params[k].clone().requires_grad_(True) for k in names}
        frozen = {k: v for k, v in params.items() if k not in weights}
        extra: dict[str, object] = {"mode": self.mode, "parameters": int(sum(t.numel() for t in target))}
        if obs.weight_gradient is None and obs.client_update is not None:
            # float32 weights: an update far below the weights' own rounding (a confidently classified
            # batch, ||dW|| / ||W|| ~ 1e-7) is mostly rounding noise, and no optimiser gets it back
            before = torch.cat([params[k].flatten() for k in names])
            extra["update_relative_size"] = float(torch.cat([t.flatten() for t in target]).norm() / before.norm())
            extra["unchanged_fraction"] = float(
                torch.cat([(obs.client_update[k].float() == params[k]).flatten() for k in names]).float().mean()
            )
        labels: torch.Tensor | None = None
        scores: torch.Tensor | None = None
        if self.mode == "split":
            delta = obs.cut_gradients.detach().float()  # type: ignore[union-attr]  # (N, ...) dL/dh

            def surrogate(x: torch.Tensor) -> torch.Tensor:
                h = functional_call(model, {**frozen, **weights}, (x,))  # (N, ...) smashed
                return (h * delta).sum()  # its gradient in W is (dh/dW)^T dL/dh

            steps = len({k.rsplit("/", 1)[0] for k in obs.keys}) if obs.keys else 1
            extra["steps"] = steps  # > 1: several local steps, matched as one batch at W_before
        else:
            labels, scores = infer_labels(model, target_dict, n)
            extra["unordered"] = True

            def surrogate(x: torch.Tensor) -> torch.Tensor:
                logits = functional_call(model, {**frozen, **weights}, (x,))  # (N, K)
                return F.cross_entropy(logits, labels)

        def induced(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return torch.autograd.grad(surrogate(x), list(weights.values()), create_graph=True)

        feature_term: Callable[[torch.Tensor], torch.Tensor] | None = None
        if self.use_activations and self.mode == "split":
            h_obs = obs.activations.detach().float()
            feature_term = lambda x: feature_loss(functional_call(model, params, (x,)), h_obs).mean()  # noqa: E731
        x, match, per_restart = self._optimise(induced, target, (n, *obs.input_shape), feature_term, progress)
        extra.update({"gradient_match": match, "restart_matches": per_restart})
        return AttackResult(reconstructed=x, labels=labels, scores=scores, extra=extra)

    def _optimise(
        self,
        induced: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
        target: list[torch.Tensor],
        shape: tuple[int, ...],
        feature_term: Callable[[torch.Tensor], torch.Tensor] | None,
        progress: Progress | None,
    ) -> tuple[torch.Tensor, float, list[float]]:
        """Best of ``restarts`` projected-Adam runs: (x (N, C, H, W) in [0, 1], its 1 - cos, all 1 - cos)."""
        report = progress_or_silent(progress)
        total = self.iters * self.restarts
        every = max(1, total // 50)
        milestones = [int(self.iters * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        best: tuple[float, torch.Tensor] | None = None
        matches: list[float] = []
        for r in range(self.restarts):
            gen = torch.Generator().manual_seed(self.seed * 1000 + r)
            x = torch.rand(shape, generator=gen).requires_grad_(True)  # (N, C, H, W) dummy inputs
            opt = torch.optim.Adam([x], lr=self.lr)
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
            for it in range(self.iters):
                match = cosine_distance(induced(x), target)
                loss = match + self.tv * total_variation(x).mean()
                if feature_term is not None:
                    loss = loss + self.activation_weight * feature_term(x)
                (g,) = torch.autograd.grad(loss, x)
                x.grad = g.sign() if self.signed else g
                opt.step()
                sched.step()
                with torch.no_grad():
                    x.clamp_(0, 1)
                done = r * self.iters + it + 1
                if done % every == 0 or done == total:
                    report(done, total, f"gradient-inversion: restart {r + 1}, 1 - cos {float(match.detach()):.4f}")
            final = float(cosine_distance(induced(x), target).detach())
            matches.append(final)
            if best is None or final < best[0]:
                best = (final, x.detach().clone())
        assert best is not None
        return best[1], best[0], matches
