"""What a model is trained to do: the loss and the accuracy of each task, in one place.

``classify``: logits ``(B, C)``, labels ``(B,)`` class indices; accuracy over samples.
``causal-lm``: logits ``(B, T, V)``, labels ``(B, T)``: the token each position must predict (the
next input token), ``-100`` where there is none (padding, the last position). The labels come
shifted from the data (:func:`fsl.textdata.next_token_labels`), so every role scores position ``t``
against ``labels[:, t]`` without knowing the inputs; accuracy over predicted tokens.

Every role (a client's whole model, the split server, a U-shaped client's top segment, central
evaluation) computes its loss through :func:`loss` and counts through :func:`correct`, so a task
means the same everywhere.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["IGNORE", "TASKS", "correct", "loss", "targets"]

TASKS = ("classify", "causal-lm")
IGNORE = -100  # a label position without a target (Hugging Face's convention)


def _flat(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.dim() != 3 or y.shape != logits.shape[:2]:
        raise ValueError(
            f"causal-lm needs logits (B, T, V) and labels (B, T); got {list(logits.shape)}, {list(y.shape)}"
        )
    return logits.flatten(0, 1), y.flatten()


def loss(task: str, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The task's cross entropy (``reduction``: ``mean`` over targets, or ``sum``)."""
    if task == "classify":
        return nn.functional.cross_entropy(logits, y, reduction=reduction)
    if task == "causal-lm":
        lg, tg = _flat(logits, y)
        return nn.functional.cross_entropy(lg, tg, ignore_index=IGNORE, reduction=reduction)
    raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}")


def targets(task: str, y: torch.Tensor) -> int:
    """How many predictions the labels ``y`` score (samples, or target tokens)."""
    if task == "causal-lm":
        return int((y != IGNORE).sum())
    return int(y.shape[0])


@torch.no_grad()
def correct(task: str, logits: torch.Tensor, y: torch.Tensor) -> int:
    """How many of :func:`targets` the logits get right."""
    if task == "causal-lm":
        lg, tg = _flat(logits, y)
        keep = tg != IGNORE
        return int((lg.argmax(-1)[keep] == tg[keep]).sum())
    return int((logits.argmax(-1) == y).sum())
