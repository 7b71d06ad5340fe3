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

import math

import torch
from torch import nn

__all__ = ["IGNORE", "TASKS", "correct", "loss", "perplexity", "targets", "unigram_perplexity"]

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


def perplexity(mean_nll: float) -> float:
    """A language model's perplexity from its mean negative log-likelihood per target token (nats):
    ``exp`` of the token-weighted mean, so a caller must average over tokens, not over batches."""
    return math.exp(mean_nll) if mean_nll < 700 else math.inf  # exp overflows a float past ~709


def unigram_perplexity(train: torch.Tensor, test: torch.Tensor, vocab_size: int, alpha: float = 1.0) -> float:
    """Perplexity on ``test`` of a unigram model counted from ``train``: the baseline a causal language
    model must beat (one that learnt only how often each token occurs, not from its context).

    ``train`` and ``test`` are next-token labels of any shape; positions holding :data:`IGNORE` are
    left out of both, exactly as the model's loss leaves them out. Additive (Lidstone) smoothing:
    ``p(w) = (count(w) + alpha) / (N + alpha * vocab_size)``, so a token never seen in ``train`` keeps
    a finite probability (``alpha = 1``: add-one, Laplace).
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0 (a token unseen in training would get probability 0), got {alpha}")
    tr, te = train[train != IGNORE].long(), test[test != IGNORE].long()
    if not te.numel():
        raise ValueError("the test labels hold no target token")
    for name, t in (("train", tr), ("test", te)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab_size):
            raise ValueError(f"{name} labels hold ids outside the vocabulary [0, {vocab_size})")
    counts = torch.bincount(tr, minlength=vocab_size).double()
    log_p = torch.log(counts + alpha) - math.log(float(counts.sum()) + alpha * vocab_size)
    return math.exp(-float(log_p[te].mean()))
