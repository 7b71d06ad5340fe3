"""U-shaped splits: the server runs the middle segment in two calls and never sees labels.

``Forward`` runs the middle on the bottom's activations and keeps the graph; ``Backward``
takes the gradient at the second cut, backpropagates it through the kept graph, steps the
optimizer and returns the gradient at the first cut. A client has at most one forward waiting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fsl.cutvalues import SINGLE, Activations, as_dict, gradients, leaves, like
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
    inputs: Activations  # the middle's inputs at the first cut (the gradient-taking floats are leaves)
    leaf: dict[str, torch.Tensor]  # those leaves by name
    out: Activations  # the middle's output, with its graph
    version: int  # replica.steps when the graph was built
    formats: dict[str, str] | None = None  # the named inputs' wire formats (None: one `activations` field)
    rows: int = field(default=0)
    input_format: str = "float32"  # a one-tensor request's activations format

    @property
    def named(self) -> bool:
        return self.formats is not None

    def needs_grad(self) -> dict[str, torch.Tensor]:
        """The outputs a gradient must come back for (by name; a tensor output is :data:`SINGLE`)."""
        return {n: t for n, t in as_dict(self.out).items() if t.requires_grad}


def _float_format(formats: dict[str, str], names: Sequence[str]) -> str:
    """The format the client sent its gradient-taking floats in: the middle's float outputs travel so too."""
    return next((formats[n] for n in names if n in formats), "float32")


def forward_step(job: ForwardJob, device: torch.device, grad_names: Sequence[str] = (SINGLE,)) -> Pending:
    """Run the middle on ``job``'s activations (caller holds the replica's lock); sets the reply."""
    rep = job.replica
    inputs: Activations
    if isinstance(job.h, torch.Tensor):
        h = job.h.to(device, dtype=torch.float32).requires_grad_(True)
        inputs, leaf = h, {SINGLE: h}
    else:
        inputs, leaf = leaves(job.h, grad_names, device=device)
    rep.segment.train()
    out = rep.segment(inputs)  # at the second cut
    if job.formats is None and isinstance(out, torch.Tensor):
        fmt = codec.wire_format(codec.format_of(job.request.activations))  # back in the sender's format
        job.reply = pb.ForwardReply(activations=codec.encode(out, fmt))
    else:
        fmt = codec.wire_format(_float_format(job.formats or {}, list(leaf)))
        job.reply = pb.ForwardReply()
        codec.encode_named(job.reply.tensors, as_dict(out), fmt)
    one = "float32" if job.formats is not None else codec.format_of(job.request.activations)
    return Pending(job.header.round, job.header.step, inputs, leaf, out, rep.steps, job.formats, job.samples, one)


def backward_step(job: BackwardJob, device: torch.device) -> None:
    """Backpropagate ``job``'s gradient through its kept forward and step (caller holds the lock).

    Sets the reply without ``server_step`` (the caller fills it in).
    """
    flush_denormals()  # this thread's float unit, as in the training step
    rep, p = job.replica, job.pending
    if p.version != rep.steps:
        # another client stepped this segment since our forward: rebuild the graph with the
        # current weights (restoring BatchNorm statistics so they are updated only once)
        buffers = {k: b.clone() for k, b in rep.segment.named_buffers()}
        leaf = {n: t.detach().requires_grad_(True) for n, t in p.leaf.items()}
        inputs = like(p.inputs, as_dict(p.inputs) | leaf)
        out = rep.segment(inputs)
        with torch.no_grad():
            for k, b in rep.segment.named_buffers():
                b.copy_(buffers[k])
        p = Pending(p.round, p.step, inputs, leaf, out, rep.steps, p.formats, p.rows, p.input_format)
    assert job.grad is not None  # admission set it
    need = p.needs_grad()
    grad = as_dict(job.grad)
    rep.optimizer.zero_grad(set_to_none=True)
    outs = list(need.values())
    gs = [grad[n].to(device, dtype=t.dtype) for n, t in need.items()]
    if len(outs) == 1:
        outs[0].backward(gs[0])
    else:
        torch.autograd.backward(outs, gs)
    rep.step()  # clipped (train.clip_norm)
    rep.steps += 1
    rep.samples += p.rows
    back = gradients(p.leaf)
    if p.formats is None:
        sent = codec.format_of(job.request.grad) if job.request.HasField("grad") else p.input_format
        fmt = codec.wire_format(sent)  # back in the sender's format
        job.reply = pb.BackwardReply(grad=codec.encode(back[SINGLE], fmt))
    else:
        job.reply = pb.BackwardReply()
        for n, g in back.items():
            codec.encode_into(job.reply.grads.add(name=n).tensor, g, codec.wire_format(p.formats[n]))
