"""The client's side of split inference: its segment here, the rest on the split server.

With a multi-exit client segment (:mod:`fsl.exits`) a request can stop on the
device: when the exit at the cut is at least ``exit_threshold`` sure, the device answers
and nothing travels; the other rows of the batch go to the server. Labels never leave.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from fsl.channel import SplitChannel
from fsl.cutvalues import select_rows
from fsl.data import Inputs, num_samples
from fsl.exits import exit_logits

__all__ = ["Prediction", "SplitPredictor"]


@dataclass
class Prediction:
    logits: torch.Tensor  # (B, num_classes): from the device's exit where it exited, else the server's
    exited: torch.Tensor  # (B,) bool: answered on the device
    device_ms: float  # client segment (and exit) compute
    wire_ms: float  # waiting on the data plane (network, queueing, server compute); 0 when all exited
    server_queue_ms: float = 0.0
    server_compute_ms: float = 0.0
    server_batch: int = 0

    @property
    def latency_ms(self) -> float:
        return self.device_ms + self.wire_ms


class SplitPredictor:
    """Split inference for one client.

    Parameters
    ----------
    segment:
        The client segment (from the run's checkpoint or the last round).
    channel:
        The data-plane channel (gRPC to ``fsl serve`` or the training split server).
    exit_threshold:
        Answer on the device when the deepest exit of ``segment`` gives a max softmax probability
        at least this high (``None``: never; the segment then needs no exits).
    """

    def __init__(self, segment: nn.Module, channel: SplitChannel, exit_threshold: float | None = None) -> None:
        self.segment = segment.eval()
        self.channel = channel
        self.exit_threshold = exit_threshold

    @torch.no_grad()
    def predict(self, x: Inputs, budget_ms: float = 0.0) -> Prediction:
        """Predict a batch ``x`` ((B, C, H, W), or named tensors such as token ids and their attention
        mask) within ``budget_ms`` end to end (0: no target)."""
        t0 = time.perf_counter()
        h = self.segment(x)  # (B, ...) smashed activations at the cut, or the cut's named tensors
        logits = torch.empty(0)
        exited = torch.zeros(num_samples(x), dtype=torch.bool)
        if self.exit_threshold is not None:
            exits = exit_logits(self.segment)
            if not exits:
                raise ValueError("exit_threshold is set but the client segment has no exits (model.exits=true)")
            local = list(exits.values())[-1]  # (B, num_classes) the exit at the cut
            exited = torch.softmax(local, 1).amax(1) >= self.exit_threshold
            logits = local.clone()
        t1 = time.perf_counter()
        device_ms = (t1 - t0) * 1000.0
        rest = (~exited).nonzero().view(-1)
        if len(rest) == 0:
            return Prediction(logits=logits, exited=exited, device_ms=device_ms, wire_ms=0.0)
        budget = max(1e-3, budget_ms - device_ms) if budget_ms > 0 else 0.0
        remote = self.channel.infer(select_rows(h, rest) if self.exit_threshold is not None else h, budget_ms=budget)
        assert isinstance(remote, torch.Tensor), "the server segment returns logits"
        wire_ms = (time.perf_counter() - t1) * 1000.0
        if self.exit_threshold is None:
            logits = remote
        else:
            logits[rest] = remote
        info = self.channel.last_infer
        return Prediction(
            logits=logits,
            exited=exited,
            device_ms=device_ms,
            wire_ms=wire_ms,
            server_queue_ms=info.queue_ms,
            server_compute_ms=info.compute_ms,
            server_batch=info.batch,
        )
