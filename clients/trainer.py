"""The client's side of split training and split inference.

Short enough to read in one sitting: the client runs its lower segment, sends
the smashed activations through a :class:`fsl.channel.SplitChannel`, and
finishes backprop with the gradient the server returns. The loop around the
step (batches, optimizer, FedProx, hooks) is :func:`fsl.training.train_loop`,
the same loop the whole-model baselines run; this module provides the split
steps. Nothing here imports ``grpc``; the channel decides how bytes travel.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from fsl import tasks
from fsl.channel import SplitChannel, StepResult
from fsl.cutvalues import Activations, as_dict, detached, map_floats, map_hidden
from fsl.data import Inputs
from fsl.exits import exit_loss
from fsl.training import (
    BatchResult,
    EvalStats,
    Step,
    TrainHooks,
    TrainOptions,
    TrainStats,
    evaluate_logits,
    evaluate_model,
    head_result,
    label_log_prior,
    plus,
    train_local,
    train_loop,
)

if TYPE_CHECKING:
    from clients.splitguard import SplitGuard

__all__ = [
    "EvalStats",
    "TrainHooks",
    "TrainOptions",
    "TrainStats",
    "evaluate_model",
    "evaluate_split",
    "evaluate_split_u",
    "hidden_names",
    "released",
    "split_step",
    "train_local",
    "train_segment",
    "train_segment_u",
    "ushaped_step",
]


def train_segment(
    segment: nn.Module,
    x: Inputs,
    y: torch.Tensor,
    channel: SplitChannel,
    options: TrainOptions | None = None,
    hooks: TrainHooks | None = None,
    guard: SplitGuard | None = None,
) -> TrainStats:
    """Train the client segment on (x, y) through the split server (:func:`fsl.training.train_loop`).

    The server computes the loss and returns the gradient at the cut; the client finishes backprop.
    ``guard``: SplitGuard's fake batches among the regular ones (:mod:`clients.splitguard`); raises
    :class:`clients.splitguard.HijackingDetected` when the server looks like it hijacks training.
    """
    # a logit-adjusting server gets this client's exact label prior with every request
    adjust = options is not None and options.logit_adjust and options.task == "classify" and len(y)
    counts = torch.bincount(y).tolist() if adjust else None
    step: Callable[[TrainOptions, TrainHooks], Step] = partial(split_step, segment, channel, label_counts=counts)
    if guard is not None:
        from clients.splitguard import guarded  # it builds on this module's split step

        if hooks is not None and hooks.optimizer is not None:
            raise ValueError("SplitGuard observes plain gradients; it does not run under DP-SGD's optimizer")
        step = guarded(step, segment, guard)
    return _train_split([segment], step, channel, x, y, options, hooks)


def train_segment_u(
    bottom: nn.Module,
    top: nn.Module,
    x: Inputs,
    y: torch.Tensor,
    channel: SplitChannel,
    options: TrainOptions | None = None,
    hooks: TrainHooks | None = None,
) -> TrainStats:
    """Label-private U-shaped training: bottom and top segments here, the middle on the server.

    Per batch: ``h1 = bottom(x)`` up, ``h2 = middle(h1)`` down, ``loss(top(h2), y)`` here,
    ``dL/dh2`` up, ``dL/dh1`` down, finish backprop through ``bottom``. Labels never leave.
    """
    adjust = options is not None and options.logit_adjust and options.task == "classify"
    counts = torch.bincount(y) if adjust and len(y) else None
    step = partial(ushaped_step, bottom, top, channel, label_counts=counts)
    return _train_split([bottom, top], step, channel, x, y, options, hooks)


def _train_split(
    modules: list[nn.Module],
    make_step: Callable[[TrainOptions, TrainHooks], Step],
    channel: SplitChannel,
    x: Inputs,
    y: torch.Tensor,
    options: TrainOptions | None,
    hooks: TrainHooks | None,
) -> TrainStats:
    """:func:`fsl.training.train_loop` over the parameters of the client's ``modules``, with the bytes
    ``channel`` moved meanwhile in the stats."""
    options = options or TrainOptions()
    hooks = hooks or TrainHooks()
    for m in modules:
        m.train()
    step = make_step(options, hooks)
    up0, down0 = channel.bytes_up, channel.bytes_down
    # a weight both segments hold (a U-shaped model's tied input embedding and output layer) is one
    # parameter: listed twice, the optimizer would step it twice, at double the learning rate
    unique = list({id(p): p for m in modules for p in m.parameters()}.values())
    stats = train_loop(step, unique, x, y, options, hooks)
    stats.bytes_up = channel.bytes_up - up0
    stats.bytes_down = channel.bytes_down - down0
    return stats


def split_step(
    segment: nn.Module,
    channel: SplitChannel,
    options: TrainOptions,
    hooks: TrainHooks,
    label_counts: list[int] | None = None,
) -> Step:
    """The step of split training: segment forward, the server's step through ``channel``, finish backprop.

    ``label_counts`` (per class, over the local data) travel with each request for the server's
    logit adjustment."""
    release, penalty = hooks.release, hooks.penalty
    want_confidence = hooks.cartography is not None  # the server computes confidences only when asked
    hidden = hidden_names(segment)

    def step(xb: torch.Tensor, yb: torch.Tensor) -> BatchResult:
        h = segment(xb)  # (B, ...) smashed activations at the cut, or the cut's named tensors
        sent = released(h, release, hidden)
        t0 = time.perf_counter()
        if len(yb):
            res = channel.train_step(sent, yb, want_confidence=want_confidence, label_counts=label_counts)
        else:  # an empty Poisson batch: nothing travels, DP-SGD still takes its noise-only step
            res = StepResult(map_floats(h, torch.zeros_like), 0.0, 0)
        wire_s = time.perf_counter() - t0
        _backward(h, res.grad, penalty, xb, exit_loss(segment, yb, options.exit_weight), hidden)
        return BatchResult(res.loss, res.correct, res.confidence, wire_s)

    return step


def ushaped_step(
    bottom: nn.Module,
    top: nn.Module,
    channel: SplitChannel,
    options: TrainOptions,
    hooks: TrainHooks,
    label_counts: torch.Tensor | None = None,
) -> Step:
    """The step of U-shaped training: bottom forward, the middle's forward on the server, the top and the
    loss here, the top's gradient back through the middle, finish backprop through ``bottom``.

    With ``label_counts`` (the local data's labels per class) the loss is on the logits plus the log
    label prior (logit adjustment): the label-private counterpart of the split server's adjustment."""
    release, penalty = hooks.release, hooks.penalty
    want_confidence = hooks.cartography is not None
    hidden = hidden_names(bottom)
    mid: list[tuple[int, ...]] = []  # the middle's output shape per sample, known after the first batch
    prior: list[torch.Tensor] = []  # (num_classes,) log label prior, once the number of classes is known

    def step(xb: torch.Tensor, yb: torch.Tensor) -> BatchResult | None:
        if not len(yb):  # an empty Poisson batch: no traffic, a noise-only DP-SGD step
            if not mid:  # the shape the top expects is unknown before the first real batch: skipped
                return None
            h1 = bottom(xb)  # (0, ...)
            out = top(torch.zeros((0, *mid[0]), dtype=h1.dtype))  # (0, num_classes)
            torch.autograd.backward([h1, out], [torch.zeros_like(h1), torch.zeros_like(out)])
            return BatchResult(0.0, 0)
        h1, carry = _route(bottom, bottom(xb))  # (B, ...) at the first cut
        t0 = time.perf_counter()
        sent = released(h1, release, hidden)
        h2, fwd_step = channel.forward(sent)
        wire_s = time.perf_counter() - t0
        if not isinstance(h2, torch.Tensor):  # named tensors at the second cut: the floats take gradients
            bottom_exits = exit_loss(bottom, yb, options.exit_weight)
            return _named_u_step(
                top,
                channel,
                h1,
                sent,
                h2,
                fwd_step,
                xb,
                yb,
                options,
                penalty,
                want_confidence,
                wire_s,
                carry,
                hidden,
                bottom_exits,
            )
        h2 = h2.detach().requires_grad_(True)  # (B, ...) at the second cut
        mid[:] = [tuple(h2.shape[1:])]
        logits = top(h2)  # (B, num_classes)
        if label_counts is not None and not prior:
            n = logits.shape[1]
            prior.append(label_log_prior(nn.functional.pad(label_counts, (0, n - len(label_counts)))))
        if options.task == "classify":
            loss = nn.functional.cross_entropy(logits + prior[0] if prior else logits, yb)
        else:
            loss = tasks.loss(options.task, logits, yb)
        plus(loss, exit_loss(top, yb, options.exit_weight)).backward()
        assert h2.grad is not None
        t1 = time.perf_counter()
        g1 = channel.backward(h2.grad, fwd_step, sent)  # dL/dh1 from the server
        wire_s += time.perf_counter() - t1
        _backward(h1, g1, penalty, xb, exit_loss(bottom, yb, options.exit_weight), hidden)
        res = head_result(logits, loss, yb, want_confidence, options.task)
        res.wire_s = wire_s
        return res

    return step


def _route(bottom: nn.Module, h1: Activations) -> tuple[Activations, dict[str, torch.Tensor]]:
    """The bottom's output split into what goes to the server's middle and what a traced bottom
    computed for the top, which stays here (its ``sends`` says which segments read each value; one
    that both read, such as an attention mask, goes up and stays here too)."""
    sends = getattr(bottom, "sends", None)
    if not sends or not isinstance(h1, dict):
        return h1, {}
    carry = {k: v for k, v in h1.items() if 2 in sends.get(k, (1,))}
    return {k: v for k, v in h1.items() if 1 in sends.get(k, (1,))}, carry


def hidden_names(segment: nn.Module) -> tuple[str, ...] | None:
    """The names of the hidden states a client segment sends (a traced segment's ``hidden``); ``None``
    for a segment that sends one tensor, which is its hidden state."""
    names = getattr(segment, "hidden", None)
    return tuple(names) if names is not None else None


def released(
    h: Activations, release: Callable[[torch.Tensor], torch.Tensor] | None, hidden: tuple[str, ...] | None = None
) -> Activations:
    """What leaves the client: ``h`` detached, each hidden state through ``release`` (activation noise).

    ``hidden``: :func:`hidden_names` of the segment that computed ``h``. Attention masks and other
    values derived from the raw inputs travel as they are (:func:`fsl.cutvalues.map_hidden`)."""
    sent = detached(h)
    return sent if release is None else map_hidden(sent, release, hidden)


def _named_u_step(
    top: nn.Module,
    channel: SplitChannel,
    h1: Activations,
    sent: Activations,
    h2: dict[str, torch.Tensor],
    fwd_step: int,
    xb: torch.Tensor,
    yb: torch.Tensor,
    options: TrainOptions,
    penalty: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    want_confidence: bool,
    wire_s: float,
    carry: dict[str, torch.Tensor] | None = None,
    hidden: tuple[str, ...] | None = None,
    bottom_exits: torch.Tensor | None = None,
) -> BatchResult:
    """The rest of a U-shaped step whose middle returns named tensors: the top on their dict (and on
    the values the bottom computed for it, ``carry``), the loss, their float tensors' gradients up,
    the first cut's gradients down, joined by the loss of the bottom's exits (``bottom_exits``)."""
    mid = {n: t.detach().requires_grad_(True) if t.is_floating_point() else t for n, t in h2.items()}
    kept = {n: t.detach().requires_grad_(t.requires_grad) for n, t in (carry or {}).items()}
    logits = top({**kept, **mid})
    loss = tasks.loss(options.task, logits, yb)
    plus(loss, exit_loss(top, yb, options.exit_weight)).backward()
    g2 = {n: t.grad if t.grad is not None else torch.zeros_like(t) for n, t in mid.items() if t.is_floating_point()}
    t1 = time.perf_counter()
    g1 = channel.backward(g2, fwd_step, sent)
    wire_s += time.perf_counter() - t1
    # the carried values' gradients join the server's in one backward pass through the bottom; a
    # value that both the middle and the top read gets the sum of the two
    g_kept = {n: t.grad for n, t in kept.items() if t.grad is not None}
    if g_kept:
        h1 = {**as_dict(h1), **{n: (carry or {})[n] for n in g_kept}}
        g_up = as_dict(g1)
        g1 = {**g_up, **{n: g + g_up[n] if n in g_up else g for n, g in g_kept.items()}}
    _backward(h1, g1, penalty, xb, bottom_exits, hidden)
    res = head_result(logits, loss, yb, want_confidence, options.task)
    res.wire_s = wire_s
    return res


def _backward(
    h: Activations,
    grad: Activations,
    penalty: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    xb: torch.Tensor,
    local_loss: torch.Tensor | None = None,
    hidden: tuple[str, ...] | None = None,
) -> None:
    """Backprop the server's gradients into every tensor at the cut that has one, plus the gradients
    of client-side losses: a ``penalty(x, h)`` (NoPeek, on the hidden states flattened side by side:
    ``hidden`` names them, ``None`` means every float tensor) and ``local_loss`` (the exits of a
    multi-exit client segment).

    The server's gradients enter through the scalar ``sum_n sum(h_n * grad_n)``, whose gradient at
    each ``h_n`` is exactly ``grad_n`` (``1 * grad``, no rounding) — the same as
    ``torch.autograd.backward(tensors, grads)``: a ``backward`` given gradient tensors makes torch
    import ``torch.fx``'s symbolic shapes and sympy, about 70 MB of resident memory on a client."""
    if isinstance(h, torch.Tensor) and isinstance(grad, torch.Tensor):
        total = (h * grad.to(h.dtype)).sum()  # d total / dh = grad
        flat = h
    else:
        hd, gd = as_dict(h), as_dict(grad)
        terms = [(hd[n] * g.to(hd[n].dtype)).sum() for n, g in gd.items() if hd[n].requires_grad]
        # not the attention mask: its float32 minimum makes every distance between samples overflow
        floats = [t.flatten(1) for n, t in hd.items() if t.is_floating_point() and (hidden is None or n in hidden)]
        flat = torch.cat(floats, 1) if floats else next(iter(hd.values()))
        if not terms:  # nothing at the cut depends on the client's parameters
            terms = [flat.sum() * 0] if flat.requires_grad else []
        if not terms and local_loss is None:
            return
        total = torch.stack(terms).sum() if terms else torch.zeros(())
    extra = local_loss
    if penalty is not None and flat.shape[0] >= 2:  # a distance correlation needs two samples
        extra = plus(penalty(xb, flat), extra)
    plus(total, extra).backward()


@torch.no_grad()
def evaluate_split(
    segment: nn.Module,
    x: Inputs,
    y: torch.Tensor,
    channel: SplitChannel,
    batch_size: int = 512,
    release: Callable[[torch.Tensor], torch.Tensor] | None = None,
    task: str = "classify",
) -> EvalStats:
    """Split inference on (x, y): lower segment here, the rest on the split server.

    Labels never leave the client: the server returns logits and the loss is
    computed here.
    """
    segment.eval()
    hidden = hidden_names(segment)

    def logits_of(xb: Inputs) -> torch.Tensor:
        h = segment(xb)
        out = channel.infer(h if release is None else map_hidden(h, release, hidden))
        assert isinstance(out, torch.Tensor), "the server segment returns logits"
        return out

    return evaluate_logits(logits_of, x, y, batch_size, task)


@torch.no_grad()
def evaluate_split_u(
    bottom: nn.Module,
    top: nn.Module,
    x: Inputs,
    y: torch.Tensor,
    channel: SplitChannel,
    batch_size: int = 512,
    task: str = "classify",
) -> EvalStats:
    """U-shaped split inference: the server returns the middle output, the top runs here."""
    bottom.eval()
    top.eval()

    def logits_of(xb: Inputs) -> torch.Tensor:
        h1, carry = _route(bottom, bottom(xb))
        h2 = channel.infer(h1)
        out: torch.Tensor = top({**carry, **h2} if isinstance(h2, dict) else h2)
        return out

    return evaluate_logits(logits_of, x, y, batch_size, task)
