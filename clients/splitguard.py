"""SplitGuard: a split-learning client that notices a training-hijacking server (Erdogan, Kupcu, Cicek, WPES 2022).

An honest split server learns the task from the labels the client sends; a hijacking server
(feature-space hijacking, :mod:`attacks.fsha`) ignores them and returns the gradient of its own
objective. SplitGuard tells the two apart from what the client sees anyway, the gradients that
come back for its activations. Now and then (probability ``p_fake`` once ``warmup`` batches have
gone) the client sends a *fake batch*: the same kind of batch with every label shifted by a random
nonzero amount modulo the number of classes. It backpropagates the returned gradient into its
segment but takes no optimizer step on it. The gradients of the first client layer are kept in
three sets: ``F`` (fake batches) and, for regular batches, ``R1`` or ``R2`` by a fair coin. After
each fake batch the SplitGuard score is

    x  = angle(mean F, mean R) * |‖F‖ - ‖R‖| / m  -  angle(mean R1, mean R2) * |‖R1‖ - ‖R2‖| / m
    SG = sigmoid(mult * x) ** exp

with ``mean R = (mean R1 + mean R2) / 2``, ``‖S‖`` the mean gradient norm of a set and
``m = |‖F‖ - ‖R‖| + |‖R1‖ - ‖R2‖|``. Under an honest server fake gradients point elsewhere than
regular ones (large first term, score near 1); under a server that ignores the labels both sets
come from one distribution (score near ``sigmoid(0) ** exp``, 0.25 for the default ``exp = 2``).

Faithfulness: the score, its constants (``mult = 5``, ``exp = 2``), ``p_fake = 0.1``, the warm-up
of 20 batches, whole fake batches, the first layer's weight gradient, the R1/R2 coin and not
applying fake gradients follow the authors' public implementation. The decision rule, the mean of
the last ``window`` scores below ``threshold``, is ours: the paper leaves the policy to the client
and we could not read its exact choice.

:func:`train_segment_guarded` is the framework's client loop (:func:`clients.trainer.train_segment`)
with :func:`guarded` around the split step; when the detector fires it raises
:class:`HijackingDetected`, which stops local training. The ClientApp runs it when the experiment
sets ``privacy.splitguard``, keeps the detector's state in the node's context from round to
round (:meth:`SplitGuard.state` / :meth:`SplitGuard.restore`), fails the round with the reason
when it fires, and refuses every later round of the run without contacting the server again.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fsl.channel import SplitChannel
from fsl.training import BatchResult, Step, TrainHooks, TrainOptions, TrainStats

__all__ = ["HijackingDetected", "SplitGuard", "guarded", "sg_score", "train_segment_guarded"]


class HijackingDetected(RuntimeError):
    """The client's detector judged the split server to be hijacking training; local training stops."""


@dataclass
class _GradSet:
    """Running mean of a set of gradient vectors and of their norms (all a score needs)."""

    total: torch.Tensor | None = None
    norm_sum: float = 0.0
    n: int = 0

    def add(self, g: torch.Tensor) -> None:
        self.total = g.clone() if self.total is None else self.total + g
        self.norm_sum += float(g.norm())
        self.n += 1

    @property
    def mean(self) -> torch.Tensor:
        assert self.total is not None
        return self.total / self.n

    @property
    def mag(self) -> float:
        return self.norm_sum / self.n


def _angle(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-30))
    return math.acos(max(-1.0, min(1.0, cos)))


def sg_score(
    fake: tuple[torch.Tensor, float],
    r1: tuple[torch.Tensor, float],
    r2: tuple[torch.Tensor, float],
    *,
    mult: float = 5.0,
    exp: float = 2.0,
) -> float:
    """The SplitGuard score from (mean gradient, mean gradient norm) of the fake set and the two regular sets."""
    (f, f_mag), (a, a_mag), (b, b_mag) = fake, r1, r2
    r, r_mag = (a + b) / 2, (a_mag + b_mag) / 2
    m = abs(f_mag - r_mag) + abs(a_mag - b_mag)
    if m == 0.0:
        return 0.0
    x = _angle(f, r) * abs(f_mag - r_mag) / m - _angle(a, b) * abs(a_mag - b_mag) / m
    return float((1.0 / (1.0 + math.exp(-mult * x))) ** exp)


@dataclass
class SplitGuard:
    """The detector's settings and state for one client (one local training run or several)."""

    num_classes: int
    p_fake: float = 0.1
    warmup: int = 20  # regular batches before the first fake one (and before R1/R2 fill)
    mult: float = 5.0
    exp: float = 2.0
    threshold: float = 0.5  # flag when the mean of the last `window` scores is below this
    window: int = 5
    seed: int = 0
    batches: int = 0
    scores: list[float] = field(default_factory=list)
    flagged_at: int | None = None  # the batch the detector fired on
    _f: _GradSet = field(default_factory=_GradSet)
    _r1: _GradSet = field(default_factory=_GradSet)
    _r2: _GradSet = field(default_factory=_GradSet)

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError("SplitGuard needs at least two classes to randomize labels")
        self._rng = random.Random(self.seed)

    def plan(self, y: torch.Tensor) -> tuple[bool, torch.Tensor]:
        """Whether this batch goes out fake, and the labels to send with it."""
        self.batches += 1
        if self.batches <= self.warmup or self._rng.random() >= self.p_fake:
            return False, y
        shift = self._rng.randint(1, self.num_classes - 1)  # never the true label
        return True, (y + shift) % self.num_classes

    def observe(self, grad: torch.Tensor, fake: bool) -> None:
        """The first client layer's gradient for this batch; after a fake batch, a new score."""
        g = grad.detach().flatten().double()
        if fake:
            self._f.add(g)
            if self._r1.n and self._r2.n:
                self.scores.append(
                    sg_score(
                        (self._f.mean, self._f.mag),
                        (self._r1.mean, self._r1.mag),
                        (self._r2.mean, self._r2.mag),
                        mult=self.mult,
                        exp=self.exp,
                    )
                )
        elif self.batches > self.warmup:
            (self._r1 if self._rng.random() < 0.5 else self._r2).add(g)

    def verdict(self) -> str | None:
        """Why the server looks malicious, or None while it does not."""
        if len(self.scores) < self.window:
            return None
        recent = sum(self.scores[-self.window :]) / self.window
        if recent >= self.threshold:
            return None
        return (
            f"SplitGuard: the split server looks like it is hijacking training (mean score {recent:.3f} of the "
            f"last {self.window} fake batches < {self.threshold}; labels do not steer its gradients)"
        )

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, int | float]]:
        """What the detector has learnt, to keep from one round to the next: tensors (the three
        sets' gradient sums, the scores) and numbers (counts, norm sums, batches, the batch it fired
        on or -1). A node's ClientApp keeps them in its context."""
        tensors: dict[str, torch.Tensor] = {"scores": torch.tensor(self.scores, dtype=torch.float64)}
        numbers: dict[str, int | float] = {
            "batches": self.batches,
            "flagged_at": -1 if self.flagged_at is None else self.flagged_at,
        }
        for name, gs in self._sets().items():
            if gs.total is not None:
                tensors[f"{name}.total"] = gs.total
            numbers[f"{name}.n"], numbers[f"{name}.norm_sum"] = gs.n, gs.norm_sum
        return tensors, numbers

    def restore(self, tensors: dict[str, torch.Tensor], numbers: dict[str, Any]) -> SplitGuard:
        """Take back what :meth:`state` gave; the fake batches' draws go on from a seed of their own."""
        self.batches = int(numbers["batches"])
        self.flagged_at = None if int(numbers["flagged_at"]) < 0 else int(numbers["flagged_at"])
        self.scores = [float(v) for v in tensors["scores"].tolist()]
        for name, gs in self._sets().items():
            gs.total = tensors[f"{name}.total"].double() if f"{name}.total" in tensors else None
            gs.n, gs.norm_sum = int(numbers[f"{name}.n"]), float(numbers[f"{name}.norm_sum"])
        self._rng = random.Random(self.seed * 1_000_003 + self.batches)
        return self

    def _sets(self) -> dict[str, _GradSet]:
        return {"fake": self._f, "r1": self._r1, "r2": self._r2}

    def check(self) -> None:
        """Raise :class:`HijackingDetected` when the verdict is in."""
        reason = self.verdict()
        if reason is not None:
            if self.flagged_at is None:
                self.flagged_at = self.batches
            raise HijackingDetected(reason)


def _first_weight(segment: nn.Module) -> torch.Tensor:
    for p in segment.parameters():
        if p.requires_grad:
            return p
    raise ValueError("SplitGuard needs a client segment with trainable parameters")


def guarded(
    make_step: Callable[[TrainOptions, TrainHooks], Step], segment: nn.Module, guard: SplitGuard
) -> Callable[[TrainOptions, TrainHooks], Step]:
    """``make_step`` (the split step's maker, :func:`clients.trainer.split_step` bound to a segment
    and a channel) with SplitGuard's fake batches.

    A fake batch goes through the same step with shifted labels; its gradient is observed and then
    dropped (the step returns None, so the loop takes no optimizer step on it)."""
    first = _first_weight(segment)

    def make(options: TrainOptions, hooks: TrainHooks) -> Step:
        inner = make_step(options, hooks)

        def step(xb: torch.Tensor, yb: torch.Tensor) -> BatchResult | None:
            fake, sent = guard.plan(yb)
            res = inner(xb, sent)
            g = first.grad if first.grad is not None else torch.zeros_like(first)
            guard.observe(g, fake)
            if fake:
                guard.check()
                return None
            return res

        return step

    return make


def train_segment_guarded(
    segment: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    channel: SplitChannel,
    guard: SplitGuard,
    options: TrainOptions | None = None,
    hooks: TrainHooks | None = None,
) -> TrainStats:
    """:func:`clients.trainer.train_segment` under SplitGuard; raises :class:`HijackingDetected` when it fires."""
    from clients.trainer import train_segment

    return train_segment(segment, x, y, channel, options, hooks, guard=guard)
