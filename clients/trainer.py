"""The client's side of split training and split inference.

Short enough to read in one sitting: the client runs its lower segment, sends
the smashed activations through a :class:`fsl.channel.SplitChannel`, and
finishes backprop with the gradient the server returns. Nothing here imports
``grpc``; the channel decides how bytes travel.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from fsl.channel import SplitChannel, StepResult
from fsl.exits import exit_loss
from fsl.fastmath import flush_denormals
from fsl.optim import SGD, Stepper
from fsl.training import (
    EvalStats,
    Record,
    TrainStats,
    _add_proximal,
    _evaluate,
    _p_true,
    _plus,
    _shuffled,
    evaluate_model,
    train_local,
)

__all__ = [
    "EvalStats",
    "TrainStats",
    "evaluate_model",
    "evaluate_split",
    "evaluate_split_u",
    "train_local",
    "train_segment",
    "train_segment_u",
]


def train_segment(
    segment: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    channel: SplitChannel,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    proximal_mu: float = 0.0,
    seed: int = 0,
    release: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_batch: Callable[[int], None] | None = None,
    optimizer: Stepper | None = None,  # privacy: e.g. Opacus' DPOptimizer (fsl/privacy/dp.py)
    batches: Callable[[], Iterable[torch.Tensor]] | None = None,  # privacy: index batches per epoch (Poisson)
    penalty: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,  # privacy: NoPeek(x, h)
    exit_weight: float = 0.5,  # multi-exit segments: weight of each exit's loss
    cartography: Record | None = None,  # record(indices, p_true, epoch): data cartography (issue 9)
) -> TrainStats:
    """Train the client segment on (x, y) through the split server for ``epochs`` passes.

    ``proximal_mu > 0`` adds FedProx's proximal term ``mu/2 * ||w - w_start||^2``.
    ``release`` transforms the activations just before they leave the client (a defense such
    as clipping + noise); the server's gradient is applied to the untransformed activations.
    ``optimizer``, ``batches`` and ``penalty`` (a client-side loss term on (x, h)) come from
    :mod:`fsl.privacy` (DP-SGD, NoPeek); by default plain SGD over shuffled batches.
    """
    flush_denormals()  # perf (issue 8): decayed momentum holds denormals, slow on CPUs
    segment.train()
    opt = optimizer or SGD(segment.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    start = [p.detach().clone() for p in segment.parameters()] if proximal_mu > 0 else []
    gen = torch.Generator().manual_seed(seed)
    stats = TrainStats()
    up0, down0 = channel.bytes_up, channel.bytes_down
    loss_sum = 0.0
    correct = 0
    n = len(y)
    for epoch in range(epochs):
        for idx in batches() if batches is not None else _shuffled(n, batch_size, gen):  # privacy: batches
            t0 = time.perf_counter()
            h = segment(x[idx])  # (B, ...) smashed activations at the cut
            t1 = time.perf_counter()
            sent = h.detach() if release is None else release(h.detach())
            # privacy: a Poisson batch may be empty; nothing travels, DP-SGD still takes its noise-only step
            step = (
                channel.train_step(sent, y[idx], want_confidence=cartography is not None)
                if len(idx)
                else StepResult(torch.zeros_like(h), 0.0, 0)
            )
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            _backward(h, step.grad, penalty, x[idx], exit_loss(segment, y[idx], exit_weight))  # finish backprop
            _add_proximal(segment.parameters(), start, proximal_mu)
            opt.step()
            t3 = time.perf_counter()
            stats.compute_s += (t1 - t0) + (t3 - t2)
            stats.wire_s += t2 - t1
            stats.batches += 1
            stats.examples += len(idx)
            loss_sum += step.loss * len(idx)
            correct += step.correct
            if cartography is not None and step.confidence is not None:
                cartography(idx, step.confidence, epoch)
            if on_batch is not None:
                on_batch(len(idx))
    stats.bytes_up = channel.bytes_up - up0
    stats.bytes_down = channel.bytes_down - down0
    return stats.finish(loss_sum, correct)


def _backward(
    h: torch.Tensor,
    grad: torch.Tensor,
    penalty: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    xb: torch.Tensor,
    local_loss: torch.Tensor | None = None,
) -> None:
    """``h.backward(grad)``, plus the gradients of client-side losses: a ``penalty(x, h)`` (privacy)
    and ``local_loss`` (the exits of a multi-exit client segment).

    The server's gradient enters through the scalar ``sum(h * grad)``, whose gradient at ``h`` is
    exactly ``grad`` (``1 * grad``, no rounding): a ``backward`` given a gradient tensor makes torch
    import ``torch.fx``'s symbolic shapes and sympy, about 70 MB of resident memory on a client."""
    total = (h * grad.to(h.dtype)).sum()  # d total / dh = grad
    extra = local_loss
    if penalty is not None and h.shape[0] >= 2:
        extra = _plus(penalty(xb, h), extra)
    _plus(total, extra).backward()


def _empty_step(opt: Stepper, bottom: nn.Module, top: nn.Module, x: torch.Tensor, mid: tuple[int, ...]) -> None:
    """A U-shaped step on an empty batch (privacy): no traffic; both segments see zero samples, DP-SGD adds noise."""
    h1 = bottom(x[:0])  # (0, ...)
    out = top(torch.zeros((0, *mid), dtype=h1.dtype))  # (0, num_classes)
    opt.zero_grad(set_to_none=True)
    torch.autograd.backward([h1, out], [torch.zeros_like(h1), torch.zeros_like(out)])
    opt.step()


@torch.no_grad()
def evaluate_split(
    segment: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    channel: SplitChannel,
    batch_size: int = 512,
    release: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> EvalStats:
    """Split inference on (x, y): lower segment here, the rest on the split server.

    Labels never leave the client: the server returns logits and the loss is
    computed here.
    """
    segment.eval()

    def logits_of(xb: torch.Tensor) -> torch.Tensor:
        h = segment(xb)
        return channel.infer(h if release is None else release(h))

    return _evaluate(logits_of, x, y, batch_size)


def train_segment_u(
    bottom: nn.Module,
    top: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    channel: SplitChannel,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    proximal_mu: float = 0.0,
    seed: int = 0,
    release: Callable[[torch.Tensor], torch.Tensor] | None = None,
    optimizer: Stepper | None = None,  # privacy: as in train_segment
    batches: Callable[[], Iterable[torch.Tensor]] | None = None,  # privacy
    penalty: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,  # privacy: NoPeek(x, h1)
    exit_weight: float = 0.5,  # multi-exit segments: weight of each exit's loss
    cartography: Record | None = None,  # record(indices, p_true, epoch): data cartography (issue 9)
) -> TrainStats:
    """Label-private U-shaped training: bottom and top segments here, the middle on the server.

    Per batch: ``h1 = bottom(x)`` up, ``h2 = middle(h1)`` down, ``loss(top(h2), y)`` here,
    ``dL/dh2`` up, ``dL/dh1`` down, finish backprop through ``bottom``. Labels never leave.
    """
    flush_denormals()  # perf (issue 8): as in train_segment
    params = [*bottom.parameters(), *top.parameters()]
    bottom.train()
    top.train()
    opt = optimizer or SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)  # privacy: or DP-SGD's
    start = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    gen = torch.Generator().manual_seed(seed)
    stats = TrainStats()
    up0, down0 = channel.bytes_up, channel.bytes_down
    loss_sum, correct, n = 0.0, 0, len(y)
    mid: tuple[int, ...] | None = None
    for epoch in range(epochs):
        for idx in batches() if batches is not None else _shuffled(n, batch_size, gen):  # privacy: batches
            if not len(idx):  # privacy: an empty Poisson batch: no traffic, a noise-only DP-SGD step
                if mid is not None:  # (before the first real batch the middle's output shape is unknown: skipped)
                    _empty_step(opt, bottom, top, x, mid)
                continue
            t0 = time.perf_counter()
            h1 = bottom(x[idx])  # (B, ...) at the first cut
            t1 = time.perf_counter()
            h2, fwd_step = channel.forward(h1.detach() if release is None else release(h1.detach()))
            t2 = time.perf_counter()
            h2 = h2.detach().requires_grad_(True)  # (B, ...) at the second cut
            mid = tuple(h2.shape[1:])  # privacy: for empty batches
            logits = top(h2)  # (B, num_classes)
            loss = nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            _plus(loss, exit_loss(top, y[idx], exit_weight)).backward()
            assert h2.grad is not None
            t3 = time.perf_counter()
            g1 = channel.backward(h2.grad, fwd_step)  # dL/dh1 from the server
            t4 = time.perf_counter()
            _backward(h1, g1, penalty, x[idx], exit_loss(bottom, y[idx], exit_weight))  # privacy: + NoPeek
            _add_proximal(params, start, proximal_mu)
            opt.step()
            t5 = time.perf_counter()
            stats.compute_s += (t1 - t0) + (t3 - t2) + (t5 - t4)
            stats.wire_s += (t2 - t1) + (t4 - t3)
            stats.batches += 1
            stats.examples += len(idx)
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
            if cartography is not None:
                cartography(idx, _p_true(logits, y[idx]), epoch)
    stats.bytes_up = channel.bytes_up - up0
    stats.bytes_down = channel.bytes_down - down0
    return stats.finish(loss_sum, correct)


@torch.no_grad()
def evaluate_split_u(
    bottom: nn.Module, top: nn.Module, x: torch.Tensor, y: torch.Tensor, channel: SplitChannel, batch_size: int = 512
) -> EvalStats:
    """U-shaped split inference: the server returns the middle output, the top runs here."""
    bottom.eval()
    top.eval()
    return _evaluate(lambda xb: top(channel.infer(bottom(xb))), x, y, batch_size)
