"""U-shaped splits: the server runs the middle segment in two calls and never sees labels.

``Forward`` runs the middle on the bottom's activations and keeps the graph; ``Backward``
takes the gradient at the second cut, backpropagates it through the kept graph, steps the
optimizer and returns the gradient at the first cut. A client has at most one forward waiting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fsl.fastmath import flush_denormals
from fsl.wire import codec
from fsl.wire import dataplane_pb2 as pb
from server.jobs import BackwardJob, ForwardJob

__all__ = ["Pending", "backward_step", "forward_step"]


@dataclass
class Pending:
    """A U-shaped forward pass waiting for its backward."""

    round: int
    step: int
    h: torch.Tensor  # (B, ...) leaf at the first cut, requires grad
    out: torch.Tensor  # (B, ...) middle output, with its graph
    version: int  # replica.steps when the graph was built


def forward_step(job: ForwardJob, device: torch.device) -> Pending:
    """Run the middle on ``job``'s activations (caller holds the replica's lock); sets the reply."""
    rep = job.replica
    h = job.h.to(device, dtype=torch.float32).requires_grad_(True)
    rep.segment.train()
    out = rep.segment(h)  # (B, ...) at the second cut
    fmt = codec.wire_format(codec.format_of(job.request.activations))  # back in the sender's format
    job.reply = pb.ForwardReply(activations=codec.encode(out, fmt))
    return Pending(job.header.round, job.header.step, h, out, rep.steps)


def backward_step(job: BackwardJob, device: torch.device) -> None:
    """Backpropagate ``job``'s gradient through its kept forward and step (caller holds the lock).

    Sets the reply without ``server_step`` (the caller fills it in).
    """
    flush_denormals()  # this thread's float unit, as in the training step
    rep, p = job.replica, job.pending
    out = p.out
    if p.version != rep.steps:
        # another client stepped this segment since our forward: rebuild the graph with the
        # current weights (restoring BatchNorm statistics so they are updated only once)
        buffers = {k: b.clone() for k, b in rep.segment.named_buffers()}
        h = p.h.detach().requires_grad_(True)
        out = rep.segment(h)
        with torch.no_grad():
            for k, b in rep.segment.named_buffers():
                b.copy_(buffers[k])
        p = Pending(p.round, p.step, h, out, rep.steps)
    assert job.grad is not None  # admission set it
    rep.optimizer.zero_grad(set_to_none=True)
    out.backward(job.grad.to(device, dtype=torch.float32))
    rep.optimizer.step()
    rep.steps += 1
    rep.samples += p.h.shape[0]
    assert p.h.grad is not None
    fmt = codec.wire_format(codec.format_of(job.request.grad))  # back in the sender's format
    job.reply = pb.BackwardReply(grad=codec.encode(p.h.grad, fmt))
