"""The client's optimizer: plain SGD with momentum, without ``torch.optim``.

Every ``torch.optim`` optimizer imports ``torch._dynamo`` (and with it sympy) the first time one
is built: torch wraps ``Optimizer.add_param_group`` in ``torch._disable_dynamo``, which imports
the compiler lazily, about 70 MB of resident memory that a Raspberry Pi with 1-2 GB does not have
to spare (a client's ``backward`` with a gradient tensor imports the same; the trainer avoids
both: peak RSS of a conv1 client 395 -> 326 MB, ``benchmarks/bench_client.py``). :class:`SGD`
applies exactly ``torch.optim.SGD``'s update (``dampening=0``, no Nesterov; the same operations in
the same order, so the same bits) and has the two methods the trainers call. The split server and DP-SGD (Opacus wraps a
``torch.optim`` optimizer) keep using ``torch.optim``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch

__all__ = ["SGD", "Stepper", "clip_grad_norm"]


class Stepper(Protocol):
    """What a trainer needs of an optimizer: :class:`SGD`, any ``torch.optim`` one, Opacus' DPOptimizer."""

    def zero_grad(self, set_to_none: bool = ...) -> None: ...

    def step(self) -> Any: ...


class SGD:
    """``torch.optim.SGD(params, lr, momentum, weight_decay)`` for the client segment.

    Parameters
    ----------
    params : iterable of torch.Tensor
        The parameters to update (those without a gradient after backward are skipped).
    lr : float
        Learning rate.
    momentum : float
        Momentum factor (0: none). The first step's buffer is the gradient itself, as in torch.
    weight_decay : float
        L2 penalty added to the gradient before momentum.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}")
        self.params = list(params)
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.momentum_buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            if self.weight_decay:
                g = g.add(p, alpha=self.weight_decay)
            if self.momentum:
                buf = self.momentum_buffers[i]
                if buf is None:
                    buf = self.momentum_buffers[i] = torch.clone(g).detach()
                else:
                    buf.mul_(self.momentum).add_(g, alpha=1.0)
                g = buf
            p.add_(g, alpha=-self.lr)


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """Scale the gradients of ``params`` down so that their joint L2 norm is at most ``max_norm``.

    Returns the norm before clipping; ``max_norm <= 0`` leaves the gradients alone. The same rule as
    ``torch.nn.utils.clip_grad_norm_`` (scale ``max_norm / (norm + 1e-6)``), written out so that the
    client imports nothing more for it.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = float(torch.sqrt(sum((g.detach().float().pow(2).sum() for g in grads), torch.zeros(()))))
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads:
            g.detach().mul_(scale)
    return norm
