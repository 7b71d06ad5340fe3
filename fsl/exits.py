"""Multi-exit models: an exit classifier after each cut point, trained jointly with the model.

An exit turns a cut point into a place where a request may *stop*: the device runs its
segment, looks at the exit's confidence and answers locally when it is sure enough, and
only otherwise sends the smashed activations on. ``add_exits`` wraps each block at a cut
in an :class:`ExitBlock`, which returns the block's output unchanged (so splitting, the
wire and the server segment work as before) and keeps the logits of its exit head from
the last forward. Whoever holds the labels next to a segment adds :func:`exit_loss`:

* the client, for the exits in its own segment (every mode except where labels never
  reach the client, which does not happen here: clients always own their labels);
* the split server, for exits in the server segment (it receives labels in every mode but
  the U-shaped one, where the middle's exits stay untrained: the server has no labels);
* ``fl`` and ``central`` train the whole multi-exit model in one place.

The final classifier is the model's own last block; exits are named by their cut.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = [
    "ExitBlock",
    "add_exits",
    "all_exit_logits",
    "exit_head",
    "exit_logits",
    "exit_loss",
    "exit_loss_per_sample",
    "exit_names",
    "has_exits",
]

FINAL = "final"


def exit_head(sample_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A small classifier on a block's output of per-sample shape ``sample_shape``.

    Feature maps (C, H, W) get a 3x3 conv, a 4x4 average pool and a linear layer (a few
    thousand multiply-adds per sample: cheap next to the blocks themselves); flat features
    (D,) a linear layer.
    """
    if len(sample_shape) == 3:
        c = sample_shape[0]
        width = max(16, c)
        return nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1),  # (B, width, H, W)
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),  # (B, width, 4, 4)
            nn.Flatten(),
            nn.Linear(width * 16, num_classes),  # (B, num_classes)
        )
    if len(sample_shape) == 1:
        return nn.Linear(sample_shape[0], num_classes)
    raise ValueError(f"no exit head for block outputs of per-sample shape {sample_shape}")


class ExitBlock(nn.Module):
    """``body`` followed by a side exit ``head``; forward returns ``body(x)`` and keeps the exit's logits."""

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = head
        self.logits: torch.Tensor | None = None  # (B, num_classes) from the last forward

    def __getstate__(self) -> dict[str, object]:
        # copies (server replicas, checkpoints) never carry the last batch's logits and their graph
        state = dict(super().__getstate__())  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        state["logits"] = None
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x)  # (B, ...) the block's output, what travels if this is the cut
        self.logits = self.head(out)  # (B, num_classes)
        return out


def add_exits(
    model: nn.Sequential,
    input_shape: tuple[int, ...],
    num_classes: int,
    at: tuple[str, ...],
    seed: int | None = None,
) -> nn.Sequential:
    """``model`` with an exit head after each block named in ``at`` (the blocks are shared, not copied).

    Every name must be a block of ``model`` other than the last (the last block is the
    final classifier). With ``seed`` the heads' initial weights are reproducible.
    """
    names = [n for n, _ in model.named_children()]
    bad = [a for a in at if a not in names[:-1]]
    if bad:
        raise ValueError(f"exits at {bad}: exits go after one of the blocks {names[:-1]}")
    blocks: list[tuple[str, nn.Module]] = []
    x = torch.zeros(1, *input_shape)
    was = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed + 7919)
        with torch.no_grad():
            for name, block in model.named_children():
                x = block(x)
                if name in at:
                    blocks.append((name, ExitBlock(block, exit_head(tuple(x.shape[1:]), num_classes))))
                else:
                    blocks.append((name, block))
    out = nn.Sequential(OrderedDict(blocks))
    out.train(was)
    model.train(was)
    return out


def has_exits(module: nn.Module) -> bool:
    return any(isinstance(m, ExitBlock) for m in module.modules())


def exit_names(module: nn.Module) -> list[str]:
    """Names of the exits in ``module`` (a model or a segment), shallow to deep."""
    return [n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, ExitBlock)]


def exit_logits(module: nn.Module) -> dict[str, torch.Tensor]:
    """The exit logits of ``module``'s last forward, by exit name."""
    out: dict[str, torch.Tensor] = {}
    for n, m in module.named_modules():  # (wrappers such as Opacus' GradSampleModule nest the blocks)
        if isinstance(m, ExitBlock) and m.logits is not None:
            out[n.rsplit(".", 1)[-1]] = m.logits
    return out


def exit_loss(module: nn.Module, y: torch.Tensor, weight: float = 1.0) -> torch.Tensor | None:
    """``weight`` times the summed mean cross entropy of ``module``'s exits after its last forward.

    ``None`` when the segment has no exits, so callers add nothing (and change nothing) then.
    """
    logits = exit_logits(module)
    if not logits:
        return None
    total = sum(nn.functional.cross_entropy(z, y) for z in logits.values())
    return weight * total  # type: ignore[return-value]


def exit_loss_per_sample(module: nn.Module, y: torch.Tensor, weight: float = 1.0) -> torch.Tensor | None:
    """Per-sample form of :func:`exit_loss`: ``(N,)`` weighted summed cross entropies, or ``None``."""
    logits = exit_logits(module)
    if not logits:
        return None
    total = sum(nn.functional.cross_entropy(z, y, reduction="none") for z in logits.values())
    return weight * total  # type: ignore[return-value]


@torch.no_grad()
def all_exit_logits(model: nn.Sequential, x: torch.Tensor, batch_size: int = 1024) -> dict[str, torch.Tensor]:
    """Logits of every exit and of the final classifier (key ``"final"``) on ``x``, in eval mode."""
    was = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    try:
        for i in range(0, len(x), batch_size):
            final = model(x[i : i + batch_size])  # (B, num_classes)
            for n, z in exit_logits(model).items():
                parts.setdefault(n, []).append(z)
            parts.setdefault(FINAL, []).append(final)
    finally:
        model.train(was)
    return {n: torch.cat(v) for n, v in parts.items()}
