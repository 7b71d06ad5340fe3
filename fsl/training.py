"""Model-level training and evaluation shared by every role: the whole-model loop of the ``fl``
and ``central`` baselines, evaluation of a joined model, and the pieces the split loops reuse
(batching of local data, FedProx, per-sample confidence)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fsl.exits import exit_loss
from fsl.fastmath import flush_denormals
from fsl.optim import SGD

__all__ = ["EvalStats", "TrainStats", "evaluate_model", "train_local"]


# record(indices into the local data (B,), p(true label) (B,), epoch): data cartography (issue 9)
Record = Callable[[torch.Tensor, torch.Tensor, int], None]


@dataclass
class TrainStats:
    """What one client's local training did, for the round's metrics."""

    examples: int = 0
    batches: int = 0
    loss: float = 0.0  # mean training loss over the samples (as computed by the server)
    accuracy: float = 0.0
    compute_s: float = 0.0  # client-side forward/backward/optimizer time
    wire_s: float = 0.0  # time spent waiting on the data plane (network + server compute)
    bytes_up: int = 0
    bytes_down: int = 0

    def finish(self, loss_sum: float, correct: int) -> TrainStats:
        """Turn the running sums into per-sample means."""
        self.loss = loss_sum / max(1, self.examples)
        self.accuracy = correct / max(1, self.examples)
        return self


@dataclass
class EvalStats:
    examples: int = 0
    loss: float = 0.0
    accuracy: float = 0.0


def _shuffled(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n, batch_size):
        yield perm[i : i + batch_size]


def _add_proximal(params: Iterable[torch.Tensor], start: list[torch.Tensor], mu: float) -> None:
    """FedProx: add ``mu * (w - w_start)`` to each gradient (no-op when ``start`` is empty)."""
    for p, p0 in zip(params, start, strict=False):
        if p.grad is not None:
            p.grad.add_(p.detach() - p0, alpha=mu)


def _evaluate(
    logits_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> EvalStats:
    """Loss and accuracy of ``logits_of`` over (x, y) in batches; the labels stay here."""
    loss_sum, correct = 0.0, 0
    for i in range(0, len(y), batch_size):
        logits = logits_of(x[i : i + batch_size])  # (B, num_classes)
        yb = y[i : i + batch_size]
        loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    n = len(y)
    return EvalStats(examples=n, loss=loss_sum / max(1, n), accuracy=correct / max(1, n))


def _p_true(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) probability of the true label (data cartography's confidence)."""
    return torch.softmax(logits.detach().float(), dim=1).gather(1, y.view(-1, 1)).view(-1)


def _plus(loss: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    return loss if extra is None else loss + extra


@torch.no_grad()
def evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> EvalStats:
    """Evaluate a whole (joined) model locally."""
    model.eval()
    return _evaluate(model, x, y, batch_size)


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    proximal_mu: float = 0.0,
    seed: int = 0,
    exit_weight: float = 0.5,  # multi-exit models: weight of each exit's loss
    cartography: Record | None = None,  # record(indices, p_true, epoch): data cartography (issue 9)
) -> TrainStats:
    """Train a whole model on local data (the `fl` and `central` baselines)."""
    flush_denormals()  # perf (issue 8): as in train_segment, so the baselines get it too
    model.train()
    opt = SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    start = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    gen = torch.Generator().manual_seed(seed)
    stats = TrainStats()
    loss_sum, correct, n = 0.0, 0, len(y)
    for epoch in range(epochs):
        for idx in _shuffled(n, batch_size, gen):
            t0 = time.perf_counter()
            logits = model(x[idx])
            loss = nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            _plus(loss, exit_loss(model, y[idx], exit_weight)).backward()  # multi-exit: every exit here
            _add_proximal(model.parameters(), start, proximal_mu)
            opt.step()
            stats.compute_s += time.perf_counter() - t0
            stats.batches += 1
            stats.examples += len(idx)
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
            if cartography is not None:
                cartography(idx, _p_true(logits, y[idx]), epoch)
    return stats.finish(loss_sum, correct)
