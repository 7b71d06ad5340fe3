"""Admitted data-plane requests (jobs): what the split server's admission hands to its steps.

A job is made by one of :class:`server.state.SplitServerState`'s ``admit_*`` calls once the
request passed every check, carries the validated tensors and the segment copy it runs on,
receives its reply (or error) from the step, and is finished by ``state.commit(job)``. The
batchers queue jobs; they never look inside the server state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fsl.cutvalues import Activations, batch_size, sample_key
from fsl.wire import dataplane_pb2 as pb
from fsl.wire.frame import Framed, as_sent
from server.replicas import Replica

__all__ = ["BackwardJob", "ForwardJob", "InferJob", "Job", "TrainJob"]


@dataclass(eq=False)
class Job:
    """One admitted request and, once it ran, its reply or its error."""

    header: pb.Header
    request: Any  # as it came: a protobuf message or a fsl.wire.frame.Framed (answered with a frame)
    replica: Replica  # the segment copy it runs on
    reply: Any = None  # set by the step, or from the retry cache
    error: BaseException | None = None
    retry: bool = False  # a retry of a step already taken: answered from the cache, not run or counted again
    sent: Any = None  # the reply in the form the request came in (set by commit)

    @property
    def framed(self) -> bool:
        return isinstance(self.request, Framed)

    @property
    def key(self) -> tuple[str, int, int]:
        """(client, round, step): the identity of a step, the same for all its retries."""
        return (self.header.client_id, self.header.round, self.header.step)

    @property
    def samples(self) -> int:
        return 0

    @property
    def shape_key(self) -> object:
        """What jobs must share to run in one batch (the per-sample shapes of a multi-tensor cut)."""
        h = getattr(self, "h", None)
        return None if h is None else sample_key(h)

    def answered_like(self, other: Job) -> None:
        """Take ``other``'s outcome: this request is a retry of the same step, which ``other`` ran."""
        self.reply, self.error, self.retry = other.reply, other.error, True

    def result(self) -> Any:
        """The reply as sent back, or the job's error raised."""
        if self.error is not None:
            raise self.error
        if self.sent is None:
            self.sent = as_sent(self.reply, self.framed)
        return self.sent


@dataclass(eq=False, kw_only=True)
class TrainJob(Job):
    """An admitted ``Train`` request: activations and labels, checked."""

    h: Activations  # (B, ...) validated activations, or the cut's named tensors (read-only views of the request)
    y: torch.Tensor  # (B,) validated labels, or (B, T) token targets (causal-lm)
    wire_format: str = "float32"  # the activations' format: the gradient goes back in the same one
    # the named tensors' formats, when the request sent its cut as named tensors (the gradients go
    # back by name, each in its tensor's format); None: the one `activations` field
    formats: dict[str, str] | None = None
    want_confidence: bool = False  # the client asked for p(true label) per sample (data cartography)
    # (num_classes,) log of the client's label prior, added to the logits in the loss (logit
    # adjustment, server.state.SplitServerState.logit_adjust); None: plain cross entropy
    log_prior: torch.Tensor | None = None

    @property
    def samples(self) -> int:
        return batch_size(self.h)

    @property
    def shape_key(self) -> object:
        k = sample_key(self.h)
        return k if self.y.ndim == 1 else (k, tuple(self.y.shape[1:]))  # token targets of one length


@dataclass(eq=False, kw_only=True)
class InferJob(Job):
    """An admitted ``Infer`` request."""

    h: Activations  # (B, ...) validated activations, or the cut's named tensors
    budget_ms: float = 0.0  # latency the client may still spend (0: none)
    named: bool = False  # the request sent named tensors

    @property
    def rows(self) -> int:
        return batch_size(self.h)


@dataclass(eq=False, kw_only=True)
class ForwardJob(Job):
    """An admitted U-shaped ``Forward`` request (activations at the first cut, no labels)."""

    h: Activations  # (B, ...) validated activations at the first cut, or its named tensors
    formats: dict[str, str] | None = None  # per named tensor, as TrainJob's

    @property
    def samples(self) -> int:
        return batch_size(self.h)


@dataclass(eq=False, kw_only=True)
class BackwardJob(Job):
    """An admitted U-shaped ``Backward`` request: the gradient at the second cut, for a kept forward."""

    grad: Activations | None = (
        None  # (B, ...) validated (by name for named outputs), set once the kept forward is found
    )
    pending: Any = None  # the server.ushaped.Pending forward it belongs to
