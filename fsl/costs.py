"""What a split costs each side: FLOPs, parameters, activation memory, bytes per sample.

FLOPs are counted by torch's own ``FlopCounterMode`` over one forward and backward
pass (so they cover convolutions and matrix products, the bulk of the work);
activation memory is the bytes autograd saves for the backward pass, captured
with ``saved_tensors_hooks``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fsl.config import ExperimentConfig
from fsl.models import build_model, cut_shape, split_model, split_model_u

__all__ = ["SplitCosts", "count_flops", "saved_activation_bytes", "split_costs"]


def count_flops(fn: Any) -> int:
    """FLOPs torch counts while running ``fn()``."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def saved_activation_bytes(fn: Any) -> int:
    """Bytes of tensors autograd saves for backward while running ``fn()`` (deduplicated)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _train_flops(module: nn.Module, x: torch.Tensor, grad_out: bool = True) -> int:
    """FLOPs of forward + backward of ``module`` on ``x`` (input gradient included when asked)."""
    x = x.clone().requires_grad_(grad_out)

    def step() -> None:
        module.zero_grad(set_to_none=True)
        out = module(x)
        out.backward(torch.ones_like(out))

    return count_flops(step)


@dataclass(frozen=True)
class SplitCosts:
    client_flops_per_sample: float  # forward + backward of what the client runs, per training sample
    server_flops_per_sample: float
    full_model_flops_per_sample: float
    client_params: int
    server_params: int
    client_activation_bytes_per_sample: float  # saved for backward on the client
    smashed_bytes_per_sample: int  # float32 activations crossing the cut (each way)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_costs(cfg: ExperimentConfig, input_shape: tuple[int, ...], num_classes: int, batch: int = 32) -> SplitCosts:
    """Costs of ``cfg``'s model and split (the whole model on the client for ``fl``/``central``)."""
    torch.manual_seed(0)
    model = build_model(
        cfg.model.name, input_shape, num_classes, norm=cfg.model.norm, seed=cfg.seed, options=cfg.model.options
    ).train()
    x = torch.rand(batch, *input_shape)
    full = _train_flops(model, x, grad_out=False)
    params: Callable[[nn.Module], int] = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    if cfg.mode in ("fl", "central"):
        act = saved_activation_bytes(lambda: model(x).sum().backward())
        return SplitCosts(full / batch, 0.0, full / batch, params(model), 0, act / batch, 0)
    if cfg.model.ushaped:
        u = split_model_u(model, cfg.model.cut, cfg.model.top_cut)
        h1 = u.bottom(x).detach()
        h2 = u.middle(h1).detach()
        client = _train_flops(u.bottom, x, grad_out=False) + _train_flops(u.top, h2)
        server = _train_flops(u.middle, h1)
        act = saved_activation_bytes(lambda: u.bottom(x).sum().backward()) + saved_activation_bytes(
            lambda: u.top(h2.clone().requires_grad_(True)).sum().backward()
        )
        smashed = (h1[0].numel() + h2[0].numel()) * 4
        return SplitCosts(
            client / batch,
            server / batch,
            full / batch,
            params(u.bottom) + params(u.top),
            params(u.middle),
            act / batch,
            smashed,
        )
    s = split_model(model, cfg.model.cut)
    h = s.client(x).detach()
    client = _train_flops(s.client, x, grad_out=False)
    server = _train_flops(s.server, h)
    act = saved_activation_bytes(lambda: s.client(x).sum().backward())
    smashed = int(torch.tensor(cut_shape(s.client, input_shape)).prod()) * 4
    return SplitCosts(
        client / batch, server / batch, full / batch, params(s.client), params(s.server), act / batch, smashed
    )
