"""The one client training loop, shared by every role, and model-level evaluation.

A client trains its part of the model the same way whatever the architecture: shuffle the local
data into batches, for each batch clear the gradients, run a *step* (forward, loss, backward),
add FedProx's proximal term, take an optimizer step, and keep the running statistics. Only the
step differs between architectures: the whole model here for the ``fl`` and ``central`` baselines
(:func:`train_local`); the client segment through a split channel, or the bottom and top segments
of a U-shaped split (``clients/trainer.py``). :func:`train_loop` is that loop; it takes the step
as a function.

What a run is asked to do comes in two typed objects:

* :class:`TrainOptions`: the numbers (epochs, batch size, learning rate, ...), frozen;
* :class:`TrainHooks`: the optional pieces that plug into the loop: another optimizer and other
  batches (DP-SGD), a transform on the activations that leave the client (activation noise), a
  client-side loss term (NoPeek), per-sample confidences (data cartography), the inputs of every
  batch (ground-truth capture for attack evaluation), and callbacks per batch and at the end.

Example
-------
>>> stats = train_local(model, x, y, TrainOptions(epochs=2, lr=0.1))
>>> stats.loss, stats.accuracy
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fsl import tasks
from fsl.data import Inputs, take, trim_padding
from fsl.exits import exit_logits, exit_loss, has_exits
from fsl.fastmath import flush_denormals
from fsl.models import model_spec, run_model
from fsl.optim import SGD, Stepper, clip_grad_norm

__all__ = [
    "BatchResult",
    "EvalStats",
    "Record",
    "Step",
    "TrainHooks",
    "TrainOptions",
    "TrainStats",
    "evaluate_model",
    "label_log_prior",
    "lengths",
    "p_true",
    "plus",
    "train_local",
    "train_loop",
]


# record(indices into the local data (B,), p(true label) (B,), epoch): data cartography's per-sample confidence
Record = Callable[[torch.Tensor, torch.Tensor, int], None]


@dataclass(frozen=True)
class TrainOptions:
    """The numbers of one client's local training."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    proximal_mu: float = 0.0  # FedProx: adds mu/2 * ||w - w_start||^2 to the loss (0 = off)
    seed: int = 0  # seeds the shuffling of the local data
    exit_weight: float = 0.5  # multi-exit models: weight of each exit's loss (fsl.exits)
    logit_adjust: bool = False  # U-shaped: the loss on logits + log(the local label prior) (train.logit_adjust)
    clip_norm: float = 0.0  # each step's gradient norm bound on the client's parameters (0: none): cfg.clip_norm
    task: str = "classify"  # what the labels are and how the loss reads them (fsl.tasks)
    length_buckets: int = 0  # token inputs: batches from pools of this many batches sorted by length (0: off)

    @classmethod
    def from_config(cls, cfg: Any, *, seed: int, rnd: int = 1, proximal_mu: float = 0.0) -> TrainOptions:
        """The options an ``ExperimentConfig``'s ``[train]`` and ``[model]`` sections give for round ``rnd``
        (its learning rate under ``train.lr_schedule``), with this run's seed."""
        t = cfg.train
        return cls(
            epochs=t.local_epochs,
            batch_size=t.batch_size,
            lr=t.lr * t.lr_factor(rnd),
            momentum=t.momentum,
            weight_decay=t.weight_decay,
            proximal_mu=proximal_mu,
            seed=seed,
            exit_weight=cfg.model.exit_weight,
            logit_adjust=cfg.train.logit_adjust,
            clip_norm=cfg.clip_norm,
            task=model_spec(cfg.model.name).task,
            length_buckets=t.length_buckets,
        )


@dataclass(frozen=True)
class TrainHooks:
    """Optional pieces that plug into :func:`train_loop`; every one is off when ``None``.

    ``optimizer`` and ``batches`` replace plain SGD over shuffled batches (DP-SGD's optimizer and
    Poisson sampling, :mod:`fsl.privacy.dp`; a Poisson batch may be empty). ``release`` transforms
    the activations just before they leave the client (clipping, noise: :mod:`fsl.privacy.activation`),
    each hidden state at a traced cut on its own and never an attention mask that travels beside it;
    the returned gradient is applied to the untransformed activations. ``penalty(x, h)`` is a
    client-side loss term on the inputs and the activations at the cut (NoPeek). ``release`` and
    ``penalty`` need a cut, so whole-model training refuses them. The rest only observe:
    ``cartography(indices, p_true, epoch)``, ``inputs(x)`` (the inputs of every non-empty batch, in
    the order the batches go on the wire), ``on_batch(batch size)`` and ``on_end(stats)``.
    """

    optimizer: Stepper | None = None
    batches: Callable[[], Iterable[torch.Tensor]] | None = None
    release: Callable[[torch.Tensor], torch.Tensor] | None = None
    penalty: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    cartography: Record | None = None
    inputs: Callable[[Any], None] | None = None
    on_batch: Callable[[int], None] | None = None
    on_end: Callable[[TrainStats], None] | None = None

    def merged(self, other: TrainHooks | None) -> TrainHooks:
        """Both sets of hooks: observers are chained; a hook that changes training may be set by one side only."""
        if other is None:
            return self
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a is None or b is None:
                kw[f.name] = b if a is None else a
            elif f.name in _OBSERVERS:
                kw[f.name] = _chain(a, b)
            else:
                raise ValueError(f"two hooks set {f.name!r}: only one may change how the client trains")
        return TrainHooks(**kw)


_OBSERVERS = ("cartography", "inputs", "on_batch", "on_end")


def _chain(a: Callable[..., None], b: Callable[..., None]) -> Callable[..., None]:
    def both(*args: Any) -> None:
        a(*args)
        b(*args)

    return both


@dataclass
class TrainStats:
    """What one client's local training did, for the round's metrics."""

    examples: int = 0
    batches: int = 0
    loss: float = 0.0  # mean training loss over the samples (as computed where the loss is: server or here)
    accuracy: float = 0.0
    compute_s: float = 0.0  # client-side forward/backward/optimizer time
    wire_s: float = 0.0  # time spent waiting on the data plane (network + server compute)
    bytes_up: int = 0
    bytes_down: int = 0

    def finish(self, loss_sum: float, correct: int, targets: int | None = None) -> TrainStats:
        """Turn the running sums into means (accuracy over ``targets`` predictions, samples by default)."""
        self.loss = loss_sum / max(1, self.examples)
        self.accuracy = correct / max(1, self.examples if targets is None else targets)
        return self


@dataclass
class EvalStats:
    examples: int = 0
    loss: float = 0.0  # mean over the targets
    accuracy: float = 0.0
    targets: int = 0  # predictions scored: the samples, or a language model's non-ignored tokens
    exit_accuracies: dict[str, float] = dataclasses.field(default_factory=dict)  # a multi-exit model's, by exit


@dataclass
class BatchResult:
    """What one step on one batch gave the loop."""

    loss: float  # mean loss over the batch
    correct: int  # samples whose prediction is the label
    confidence: torch.Tensor | None = None  # (B,) p(true label), when cartography asked for it
    wire_s: float = 0.0  # the part of the step spent waiting on the data plane
    targets: int | None = None  # predictions ``correct`` counts from (None: the batch's samples)


# step(x (B, ...), y (B,)) -> the batch's result, with the gradients of the trained parameters set; the
# loop has cleared them and takes the optimizer step. None: the step did nothing (no optimizer step).
Step = Callable[[Any, torch.Tensor], "BatchResult | None"]


def train_loop(
    step: Step,
    params: Iterable[torch.Tensor],
    x: Inputs,
    y: torch.Tensor,
    options: TrainOptions,
    hooks: TrainHooks,
) -> TrainStats:
    """Train ``params`` on (x, y) for ``options.epochs`` passes, ``step`` computing each batch's gradients."""
    flush_denormals()  # decayed momentum holds denormal floats, which are slow on CPUs (fsl/fastmath.py)
    params = [p for p in params if p.requires_grad]  # a frozen base (LoRA) never gets a gradient
    o = options
    opt = hooks.optimizer or SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    start = [p.detach().clone() for p in params] if o.proximal_mu > 0 else []
    gen = torch.Generator().manual_seed(o.seed)
    stats = TrainStats()
    loss_sum, correct, targets = 0.0, 0, 0
    for epoch in range(o.epochs):
        if hooks.batches is not None:
            batches: Iterable[torch.Tensor] = hooks.batches()
        elif o.length_buckets > 0 and lengths(x) is not None:
            batches = _bucketed(lengths(x), o.batch_size, o.length_buckets, gen)  # type: ignore[arg-type]
        else:
            batches = _shuffled(len(y), o.batch_size, gen)
        for idx in batches:
            t0 = time.perf_counter()
            xb, yb = trim_padding(take(x, idx), y.index_select(0, idx))
            if hooks.inputs is not None and len(idx):
                hooks.inputs(xb)
            opt.zero_grad(set_to_none=True)
            out = step(xb, yb)
            if out is None:
                continue
            _add_proximal(params, start, o.proximal_mu)
            if o.clip_norm > 0 and hooks.optimizer is None:  # DP-SGD clips per sample itself
                clip_grad_norm(params, o.clip_norm)
            opt.step()
            stats.compute_s += time.perf_counter() - t0 - out.wire_s
            stats.wire_s += out.wire_s
            stats.batches += 1
            stats.examples += len(idx)
            loss_sum += out.loss * len(idx)
            correct += out.correct
            targets += len(idx) if out.targets is None else out.targets
            if hooks.cartography is not None and out.confidence is not None:
                hooks.cartography(idx, out.confidence, epoch)
            if hooks.on_batch is not None:
                hooks.on_batch(len(idx))
    stats.finish(loss_sum, correct, targets)
    if hooks.on_end is not None:
        hooks.on_end(stats)
    return stats


def _shuffled(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n, batch_size):
        yield perm[i : i + batch_size]


def lengths(x: Inputs) -> torch.Tensor | None:
    """(N,) the real length of every text of token inputs (their attention mask's sum); None for
    inputs without a mask (images)."""
    if isinstance(x, torch.Tensor) or "attention_mask" not in x:
        return None
    return x["attention_mask"].sum(1)


def _bucketed(lengths: torch.Tensor, batch_size: int, pool: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One epoch's batches, each of texts of about one length: the samples shuffled, cut into pools
    of ``pool`` batches, each pool sorted by length (ties in shuffled order) and cut into batches,
    and all the batches shuffled. Every sample is in exactly one batch, as with plain shuffling;
    a pool spans many batches, so which texts meet in a batch still changes from epoch to epoch."""
    perm = torch.randperm(len(lengths), generator=gen)
    size = batch_size * pool
    out: list[torch.Tensor] = []
    for i in range(0, len(perm), size):
        chunk = perm[i : i + size]
        chunk = chunk[torch.sort(lengths[chunk], stable=True).indices]
        out.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
    order = torch.randperm(len(out), generator=gen).tolist()
    return [out[k] for k in order]


def _add_proximal(params: Iterable[torch.Tensor], start: list[torch.Tensor], mu: float) -> None:
    """FedProx: add ``mu * (w - w_start)`` to each gradient (no-op when ``start`` is empty)."""
    for p, p0 in zip(params, start, strict=False):
        if p.grad is not None:
            p.grad.add_(p.detach() - p0, alpha=mu)


@torch.no_grad()
def evaluate_logits(
    logits_of: Callable[[Any], torch.Tensor],
    x: Inputs,
    y: torch.Tensor,
    batch_size: int,
    task: str = "classify",
    exits_of: Callable[[], dict[str, torch.Tensor]] | None = None,
) -> EvalStats:
    """Loss and accuracy of ``logits_of`` over (x, y) in batches; the labels stay here.

    Loss and accuracy are means over the task's targets (samples; tokens for a language model).
    Texts go in order of length, so that each batch, trimmed to its longest text, carries little
    padding (sums over samples do not depend on the order). ``exits_of`` gives the exit logits of
    the batch just run (a multi-exit model's, by exit name): their accuracies come from the same pass."""
    loss_sum, correct, targets = 0.0, 0, 0
    exit_correct: dict[str, int] = {}
    n = lengths(x)
    order = torch.arange(len(y)) if n is None else torch.sort(n, stable=True).indices
    for i in range(0, len(y), batch_size):
        idx = order[i : i + batch_size]
        xb, yb = trim_padding(take(x, idx), y.index_select(0, idx))
        logits = logits_of(xb)  # (B, num_classes), or (B, T, vocab)
        loss_sum += float(tasks.loss(task, logits, yb, reduction="sum"))
        correct += tasks.correct(task, logits, yb)
        targets += tasks.targets(task, yb)
        for name, z in (exits_of() if exits_of is not None else {}).items():
            exit_correct[name] = exit_correct.get(name, 0) + tasks.correct(task, z, yb)
    return EvalStats(
        examples=len(y),
        loss=loss_sum / max(1, targets),
        accuracy=correct / max(1, targets),
        targets=targets,
        exit_accuracies={name: c / max(1, targets) for name, c in exit_correct.items()},
    )


def label_log_prior(counts: torch.Tensor) -> torch.Tensor:
    """(C,) float32 log of the label prior that class ``counts`` (C,) give, add-one smoothed: a class
    never seen keeps a finite shift, about -log(samples), in the logit-adjusted loss."""
    c = counts.double()
    return torch.log((c + 1.0) / (c.sum() + c.numel())).float()


def p_true(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) probability of the true label (data cartography's confidence)."""
    return torch.softmax(logits.detach().float(), dim=1).gather(1, y.view(-1, 1)).view(-1)


def plus(loss: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """``loss + extra``, or ``loss`` when there is no extra term."""
    return loss if extra is None else loss + extra


def head_result(
    logits: torch.Tensor, loss: torch.Tensor, y: torch.Tensor, want_confidence: bool, task: str = "classify"
) -> BatchResult:
    """The result of a step whose loss is computed here, from the logits (B, num_classes)."""
    if task != "classify":
        return BatchResult(float(loss.detach()), tasks.correct(task, logits, y), targets=tasks.targets(task, y))
    return BatchResult(
        loss=float(loss.detach()),
        correct=int((logits.argmax(1) == y).sum()),
        confidence=p_true(logits, y) if want_confidence else None,
    )


@torch.no_grad()
def evaluate_model(
    model: nn.Module, x: Inputs, y: torch.Tensor, batch_size: int = 512, task: str = "classify"
) -> EvalStats:
    """Evaluate a whole (joined) model locally, and each of its exits if it has some."""
    model.eval()
    exits_of = (lambda: exit_logits(model)) if has_exits(model) else None
    return evaluate_logits(lambda xb: run_model(model, xb), x, y, batch_size, task, exits_of)


def train_local(
    model: nn.Module,
    x: Inputs,
    y: torch.Tensor,
    options: TrainOptions | None = None,
    hooks: TrainHooks | None = None,
) -> TrainStats:
    """Train a whole model on local data (the ``fl`` and ``central`` baselines): the loss is computed here."""
    options = options or TrainOptions()
    hooks = hooks or TrainHooks()
    if hooks.release is not None or hooks.penalty is not None:
        raise ValueError("release and penalty act on the activations at a cut; a whole model has none")
    want_confidence = hooks.cartography is not None
    model.train()

    def step(xb: Inputs, yb: torch.Tensor) -> BatchResult:
        logits = run_model(model, xb)  # (B, num_classes), or (B, T, vocab)
        if not len(yb):  # an empty Poisson batch: a zero gradient, so DP-SGD still takes its noise-only step
            torch.autograd.backward([logits], [torch.zeros_like(logits)])
            return BatchResult(0.0, 0)
        loss = tasks.loss(options.task, logits, yb)
        plus(loss, exit_loss(model, yb, options.exit_weight)).backward()  # multi-exit: every exit is here
        return head_result(logits, loss, yb, want_confidence, options.task)

    return train_loop(step, model.parameters(), x, y, options, hooks)
