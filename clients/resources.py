"""Resource controls of a client device: threads, batch size, a memory budget, peak memory.

A SuperNode's node config may set ``threads``, ``batch-size`` and ``memory-mb``
(``fsl supernode --threads 4 --batch-size 16 --memory-mb 1500``). Before training,
the ClientApp estimates what this round will need at its peak (what the process
already holds, plus the client segment's weights, gradients and optimizer state,
plus the activations autograd keeps for one batch) and refuses with a
:class:`MemoryBudgetError` that says what to change when that would not fit. The
round's metrics carry the process's peak resident memory (``peak_rss_mb``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fsl.memory import peak_rss_mb, rss_mb

__all__ = [
    "MemoryBudgetError",
    "MemoryEstimate",
    "check_memory_budget",
    "estimate_training_memory",
    "node_batch_size",
    "peak_rss_mb",
    "rss_mb",
]

MB = 1024 * 1024
# Measured against peak RSS (clients/pi/memory_table.py, torch 2.13 x86_64; README there): the first
# forward/backward costs a fixed ~80-90 MB (torch's lazy kernels, autograd and thread pools), and
# autograd temporaries, the allocator's slack and the data-plane buffers of a batch come to about as
# much again as what is counted exactly. Both are set so the estimate errs on the high side.
OVERHEAD = 2.0
FIRST_STEP_MB = 96.0


class MemoryBudgetError(RuntimeError):
    """The chosen model, cut and batch size would not fit the device's memory budget."""


@dataclass(frozen=True)
class MemoryEstimate:
    resident_mb: float  # what the process holds already (interpreter, torch, the local data)
    params_mb: float  # weights, and gradients + SGD momentum of those that train (a frozen LoRA base has none)
    activations_mb: float  # saved for backward over one batch, plus the batch and its smashed output
    batch_size: int

    @property
    def training_mb(self) -> float:
        return FIRST_STEP_MB + (self.params_mb + self.activations_mb) * OVERHEAD

    @property
    def total_mb(self) -> float:
        return self.resident_mb + self.training_mb


def _saved_bytes(module: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes autograd saves running ``module`` on ``x`` (deduplicated by storage), and the output."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    modes = {m: m.training for m in module.modules()}
    try:
        module.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = module(x)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return sum(seen.values()), out.detach()


def estimate_training_memory(
    segments: list[nn.Module], input_shape: tuple[int, ...], batch_size: int, *, between: list[nn.Module] | None = None
) -> MemoryEstimate:
    """What training ``segments`` (run in order on inputs of ``input_shape``) needs at its peak.

    Measured on a probe batch of 2 samples and scaled to ``batch_size`` (activations grow
    linearly with the batch). ``between[i]`` runs (not trained, not counted) after
    ``segments[i]``: the server's middle segment of a U-shaped split.
    """
    probe = 2
    x = torch.zeros(probe, *input_shape)
    act = x.numel() * x.element_size()
    params = 0
    for i, seg in enumerate(segments):
        params += sum(p.numel() * p.element_size() * (3 if p.requires_grad else 1) for p in seg.parameters())
        x = x.clone().requires_grad_(i > 0)
        saved, out = _saved_bytes(seg, x)
        act += saved + 2 * out.numel() * out.element_size()  # the smashed output and its gradient
        if between is not None and i < len(between):
            with torch.no_grad():
                out = between[i](out)
        x = out
    return MemoryEstimate(
        resident_mb=rss_mb(),
        params_mb=params / MB,
        activations_mb=act / probe * batch_size / MB,
        batch_size=batch_size,
    )


def check_memory_budget(est: MemoryEstimate, budget_mb: float, what: str) -> None:
    """Raise :class:`MemoryBudgetError` when ``est`` exceeds ``budget_mb`` (0: no budget)."""
    if budget_mb <= 0 or est.total_mb <= budget_mb:
        return
    per_sample = est.activations_mb / est.batch_size * OVERHEAD
    fixed = est.resident_mb + FIRST_STEP_MB + est.params_mb * OVERHEAD
    fit = int((budget_mb - fixed) / per_sample) if per_sample > 0 else 0
    hint = (
        f"a batch size of at most {fit} (node config batch-size={fit}) would fit"
        if fit >= 1
        else "no batch size fits: raise memory-mb, choose a shallower cut (model.cut), or free memory on the device"
    )
    raise MemoryBudgetError(
        f"memory budget {budget_mb:.0f} MB exceeded: {what} with batch size {est.batch_size} needs about "
        f"{est.total_mb:.0f} MB ({est.resident_mb:.0f} MB already resident + {est.training_mb:.0f} MB for training: "
        f"{FIRST_STEP_MB:.0f} MB torch runtime, {est.params_mb:.1f} MB weights/grads/momentum and "
        f"{est.activations_mb:.1f} MB activations, these two x{OVERHEAD}); "
        f"{hint}. Nothing was trained."
    )


def node_batch_size(node_config: Mapping[str, Any], default: int) -> int:
    """The node's ``batch-size`` (a smaller device trains smaller batches), else ``default``."""
    bs = int(node_config.get("batch-size", 0) or 0)
    if bs < 0:
        raise ValueError(f"node config batch-size must be >= 0, got {bs}")
    return bs or default


def client_memory_check(
    cfg: Any,
    detail: Any,
    module: nn.Module,
    input_shape: tuple[int, ...],
    node_config: Mapping[str, Any],
    batch_size: int,
) -> MemoryEstimate | None:
    """The ClientApp's check before training: estimate this round's peak and enforce ``memory-mb``."""
    budget = float(node_config.get("memory-mb", 0) or 0)
    if budget <= 0:
        return None
    if len(input_shape) != 3:
        raise ValueError(
            f"memory-mb: the training-memory estimate probes image inputs (C, H, W); this model takes {input_shape}. "
            "Leave memory-mb unset on this node for token models."
        )
    if cfg.mode in ("fl", "central"):
        est = estimate_training_memory([module], input_shape, batch_size)
        what = f"the whole {cfg.model.name} model"
    elif cfg.model.ushaped:
        est = estimate_training_memory([detail.bottom, detail.top], input_shape, batch_size, between=[detail.middle])
        what = f"{cfg.model.name} cut at {cfg.model.cut} and {cfg.model.top_cut} (U-shaped)"
    else:
        est = estimate_training_memory([module], input_shape, batch_size)
        what = f"{cfg.model.name} cut at {cfg.model.cut}"
    check_memory_budget(est, budget, what)
    return est
