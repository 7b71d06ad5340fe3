"""Copies of the server segment: one per client (SplitFed v1) or per group (hybrid) for a round.

``fsl`` trains the global segment itself; the other modes give each replica id its own deep copy
(with the optimizer's momentum carried over) and average the copies back after the round,
weighted by the samples each trained on.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

import torch
from torch import nn

from fsl.lora import frozen_names
from fsl.optim import clip_grad_norm

__all__ = ["Replica", "ReplicaSet"]


class Replica:
    """One copy of the server segment with its own optimizer and lock.

    The lock serialises every use of the copy (a training step, a forward kept for its backward,
    an inference pass): the segment and its optimizer are never touched by two threads at once.
    """

    def __init__(
        self, segment: nn.Module, lr: float, momentum: float, weight_decay: float, clip_norm: float = 0.0
    ) -> None:
        self.segment = segment
        # only what trains: a frozen base (LoRA) gets no optimizer state and is never averaged
        trained = [p for p in segment.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(trained, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.clip_norm = clip_norm  # largest L2 norm of one step's gradient (0: unclipped): cfg.clip_norm
        self.lock = threading.Lock()
        self.steps = 0  # optimizer steps taken by this copy
        self.samples = 0  # samples trained on by this copy since it was made

    def set_lr(self, lr: float) -> None:
        """Train with learning rate ``lr`` from the next step (the round's rate under train.lr_schedule)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        """The optimizer step on the gradients backward left, their joint norm clipped to ``clip_norm``."""
        if self.clip_norm > 0:
            clip_grad_norm([p for p in self.segment.parameters() if p.requires_grad], self.clip_norm)
        self.optimizer.step()


class ReplicaSet:
    """The global segment's :class:`Replica` and the round's copies, with the client -> copy assignment."""

    def __init__(
        self, global_replica: Replica, lr: float, momentum: float, weight_decay: float, clip_norm: float = 0.0
    ) -> None:
        self.global_replica = global_replica
        self._hyper = (lr, momentum, weight_decay, clip_norm)
        self._lock = threading.Lock()  # guards the tables below, never held during compute
        self._copies: dict[str, Replica] = {}
        self._assignment: dict[str, str] = {}  # client -> replica id
        self.retired_steps = 0  # optimizer steps of copies already merged

    def set_lr(self, lr: float) -> None:
        """Train the global segment and every copy opened from now on with learning rate ``lr``."""
        with self._lock:
            self._hyper = (lr, *self._hyper[1:])
            live = list(self._copies.values())
        for r in [self.global_replica, *live]:
            r.set_lr(lr)

    @property
    def steps(self) -> int:
        """Optimizer steps over the global segment, the live copies and the merged ones."""
        with self._lock:
            live = sum(r.steps for r in self._copies.values())
        return self.global_replica.steps + self.retired_steps + live

    def copies(self) -> dict[str, Replica]:
        """This round's copies by replica id (empty when everyone trains the global segment)."""
        with self._lock:
            return dict(self._copies)

    def held(self) -> dict[str, int]:
        """Sizes of the per-round tables: clients assigned, copies alive (both emptied by :meth:`merge`)."""
        with self._lock:
            return {"assignment": len(self._assignment), "replicas": len(self._copies)}

    def for_client(self, client_id: str) -> Replica:
        """The copy ``client_id`` trains this round (the global segment if it has none)."""
        with self._lock:
            rid = self._assignment.get(client_id)
            return self._copies.get(rid, self.global_replica) if rid is not None else self.global_replica

    def open(self, assignment: dict[str, str]) -> None:
        """Give each replica id in ``assignment`` (client -> replica) its own copy of the global segment.

        A single replica id means: everyone trains the global segment.
        """
        ids = sorted(set(assignment.values()))
        g = self.global_replica
        with self._lock:
            self._assignment = dict(assignment)
            self._copies = {}
            if len(ids) > 1:
                for rid in ids:
                    rep = Replica(copy.deepcopy(g.segment), *self._hyper)
                    rep.optimizer.load_state_dict(_remap_optimizer_state(g.optimizer, rep.optimizer))
                    self._copies[rid] = rep

    def merge(self) -> dict[str, int]:
        """FedAvg the copies into the global segment, weighted by the samples each trained on
        (optimizer momentum averaged the same way); returns the weights. No-op with no copies."""
        with self._lock:
            reps, self._copies, self._assignment = self._copies, {}, {}
        weights = {rid: r.samples for rid, r in reps.items()}
        total = sum(weights.values())
        if not reps or total == 0:
            return weights
        g = self.global_replica
        frozen = frozen_names(g.segment)  # identical in every copy: averaging would only round them
        with g.lock, torch.no_grad():
            for key, val in g.segment.state_dict().items():
                if key in frozen:
                    continue
                if val.is_floating_point():
                    val.copy_(sum(r.segment.state_dict()[key] * (weights[rid] / total) for rid, r in reps.items()))
                else:  # integer buffers (BatchNorm's batch counter): take the largest
                    val.copy_(max(r.segment.state_dict()[key] for r in reps.values()))
            per_rep = {rid: [p for p in r.segment.parameters() if p.requires_grad] for rid, r in reps.items()}
            for i, gp in enumerate(p for p in g.segment.parameters() if p.requires_grad):
                bufs = [
                    (rid, r.optimizer.state.get(per_rep[rid][i], {}).get("momentum_buffer")) for rid, r in reps.items()
                ]
                if all(b is not None for _, b in bufs):
                    g.optimizer.state[gp]["momentum_buffer"] = sum(b * (weights[rid] / total) for rid, b in bufs)
        self.retired_steps += sum(r.steps for r in reps.values())
        return weights


def _remap_optimizer_state(src: torch.optim.Optimizer, dst: torch.optim.Optimizer) -> dict[str, Any]:
    """``src``'s state dict (momentum buffers copied) for an optimizer over a deep copy of its params."""
    sd = copy.deepcopy(src.state_dict())
    sd["param_groups"] = [
        {**g_src, "params": g_dst["params"]}
        for g_src, g_dst in zip(sd["param_groups"], dst.state_dict()["param_groups"], strict=True)
    ]
    return sd
