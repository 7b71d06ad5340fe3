"""The split server's compute: one training step over a batch of admitted requests, and inference.

:func:`train_step` is *the* training step of the server segment, for one request (the plain
``Train`` call) and for many (:class:`server.batching.RequestBatcher`). For requests ``i = 1..K``
with ``B_i`` samples each it minimises ``L = sum_i L_i``, ``L_i`` the mean cross entropy of
request ``i``'s own samples (plus the weighted losses of exits inside the segment). Since
``dL/dh_s`` involves only its own request's term, every client gets the gradient at the cut it
would get alone from the same weights, and its own loss and hit count. With one request
``L = L_1`` is computed exactly as a lone step computes it, so batching off gives the same bits.

Under logit adjustment (a job with ``log_prior``) ``L_i`` is the cross entropy of
``logits + log_prior_i``, the prior of request ``i``'s own client (balanced softmax): a client
that holds one or two classes then stops pushing the shared segment towards predicting only
those, while the raw logits (what inference and the hit count use) estimate the class posterior
under balanced classes. With a uniform prior (IID data) the shift is a constant and changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fsl.cutvalues import (
    SINGLE,
    Activations,
    Signature,
    batch_size,
    concat,
    gradients,
    leaves,
    map_floats,
    pad_to,
    symbol_sizes,
    trim_to,
)
from fsl.exits import exit_logits
from fsl.fastmath import flush_denormals
from fsl.wire import codec
from fsl.wire import dataplane_pb2 as pb
from fsl.wire.frame import Framed
from server.jobs import InferJob, TrainJob
from server.replicas import Replica

__all__ = ["IGNORE_INDEX", "LossFn", "Staging", "infer_step", "train_step", "true_label_probability"]

IGNORE_INDEX = -100  # token targets the causal-LM loss skips (server.validation accepts them)

# (logits of one request, its labels) -> its mean loss: the task's loss (None: classification's
# cross entropy, with the exits and logit adjustment below)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def true_label_probability(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) float32 softmax probability of each sample's label: data cartography's confidence."""
    return torch.softmax(logits.float(), dim=1).gather(1, y.view(-1, 1)).view(-1)


class Staging:
    """Page-locked host buffers for one segment copy's batches on CUDA.

    Activations are gathered into pinned memory and copied to the device with
    ``non_blocking=True``; gradients come back the same way, one synchronisation per batch.
    The buffers are reused, so whatever must outlive the next batch is cloned out of them.
    """

    def __init__(self) -> None:
        self.pinned_in: torch.Tensor | None = None
        self.pinned_out: torch.Tensor | None = None

    def to_device(self, hs: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
        n = sum(h.shape[0] for h in hs)
        need = n * hs[0][0].numel()
        if self.pinned_in is None or self.pinned_in.numel() < need:
            self.pinned_in = torch.empty(need, dtype=torch.float32, pin_memory=True)
        host = self.pinned_in[:need].view(n, *hs[0].shape[1:])
        a = 0
        for h in hs:
            host[a : a + h.shape[0]].copy_(h)  # into page-locked memory (casts float16/bfloat16 on the way)
            a += h.shape[0]
        return host.to(device, non_blocking=True)

    def to_host(self, grad: torch.Tensor) -> torch.Tensor:
        if self.pinned_out is None or self.pinned_out.numel() < grad.numel():
            self.pinned_out = torch.empty(grad.numel(), dtype=grad.dtype, pin_memory=True)
        host = self.pinned_out[: grad.numel()].view(grad.shape)
        host.copy_(grad, non_blocking=True)
        torch.cuda.current_stream(grad.device).synchronize()
        return host


def _gather(hs: Sequence[torch.Tensor], device: torch.device, staging: Staging | None) -> torch.Tensor:
    """(N, ...) float32 activations of all requests on ``device``."""
    if staging is not None and device.type == "cuda":
        return staging.to_device(hs, device)
    if len(hs) == 1:
        return hs[0].to(device, dtype=torch.float32, non_blocking=True)
    return torch.cat([h.float() for h in hs]).to(device, non_blocking=True)  # one copy out of the messages


def _slices(sizes: Sequence[int]) -> list[slice]:
    out, a = [], 0
    for b in sizes:
        out.append(slice(a, a + b))
        a += b
    return out


def _mean_loss(
    logits: torch.Tensor, y: torch.Tensor, exits: list[torch.Tensor], exit_weight: float, loss_fn: LossFn | None = None
) -> torch.Tensor:
    """Mean loss (``loss_fn``, cross entropy by default) plus ``exit_weight`` times the exits'
    summed mean losses (the formula of :func:`fsl.exits.exit_loss`, here on any slice of the batch)."""
    fn = nn.functional.cross_entropy if loss_fn is None else loss_fn
    loss = fn(logits, y)
    if exits:
        loss = loss + exit_weight * sum(fn(z, y) for z in exits)
    return loss


def train_step(
    replica: Replica,
    jobs: Sequence[TrainJob],
    *,
    device: torch.device,
    exit_weight: float,
    staging: Staging | None = None,
    grad_names: Sequence[str] = (SINGLE,),
    loss_fn: LossFn | None = None,
    pad: Signature | None = None,
) -> list[TrainJob]:
    """One forward, loss, backward and optimizer step of ``replica`` over the samples of ``jobs``.

    The jobs' cut values are one tensor each (the segment is called with it) or dicts of named
    tensors of equal per-sample shapes (called with their concatenation, the float tensors named in
    ``grad_names`` as leaves whose gradients go back). ``loss_fn`` is the task's loss of one
    request's logits and labels (None: cross entropy of class indices).

    ``pad``: the cut's signature, when jobs of different sequence lengths may share the step: each
    job's tensors are padded to the longest (:func:`fsl.cutvalues.pad_to`, masks marking the padded
    positions absent), token targets with :data:`IGNORE_INDEX`, and each job's gradients are cut
    back to its own lengths.

    The caller holds ``replica.lock``. Returns the jobs whose loss is not finite: then nothing
    was changed (no gradient applied, no step counted) and the caller may run the rest again.
    Otherwise every job gets its reply (``server_step`` left for the caller to fill in).
    """
    flush_denormals()  # this thread's float unit (fsl/fastmath.py): gRPC worker threads start without it
    one = len(jobs) == 1
    hs = [j.h for j in jobs]
    sizes = [batch_size(h) for h in hs]
    ys = [j.y for j in jobs]
    lengths: list[dict[str, int]] | None = None
    if pad is not None and not one and not isinstance(hs[0], torch.Tensor):
        lengths = [symbol_sizes(h, pad) for h in hs]
        longest = {k: max(n[k] for n in lengths) for k in lengths[0]}
        if any(n != longest for n in lengths):
            hs = [pad_to(h, pad, longest) for h in hs]
            width = max(int(y.shape[1]) if y.ndim > 1 else 0 for y in ys)
            ys = [
                nn.functional.pad(y, (0, width - int(y.shape[1])), value=IGNORE_INDEX) if y.ndim > 1 else y for y in ys
            ]
        else:
            lengths = None
    inputs: Activations
    if isinstance(hs[0], torch.Tensor):  # one float tensor: gathered (pinned on CUDA) as it always was
        h = _gather(hs, device, staging).requires_grad_(True)  # type: ignore[arg-type]  # (N, ...) smashed
        inputs, leaf = h, {SINGLE: h}
    else:
        inputs, leaf = leaves(concat(hs), grad_names, device=device)
    y = (ys[0] if one else torch.cat(ys)).to(device, non_blocking=True)
    seg = replica.segment
    seg.train()
    replica.optimizer.zero_grad(set_to_none=True)
    logits = seg(inputs)  # (N, num_classes), or (N, T, vocab) for token targets
    exits = list(exit_logits(seg).values())  # exits inside the server segment, if any
    parts = [slice(None)] if one else _slices(sizes)
    trained = logits
    if any(j.log_prior is not None for j in jobs):  # logit adjustment: each request's own client prior
        zero = torch.zeros(logits.shape[1])
        shift = torch.cat(
            [(zero if j.log_prior is None else j.log_prior).expand(b, -1) for j, b in zip(jobs, sizes, strict=True)]
        )
        shift = shift.to(device, non_blocking=True)  # (N, num_classes)
        trained = logits + shift
        exits = [z + shift for z in exits]
    if one:
        losses = [_mean_loss(trained, y, exits, exit_weight, loss_fn)]
    else:
        losses = [_mean_loss(trained[s], y[s], [z[s] for z in exits], exit_weight, loss_fn) for s in parts]
    values = torch.stack([v.detach() for v in losses]).cpu().tolist()  # one synchronisation
    bad = [j for j, v in zip(jobs, values, strict=True) if not math.isfinite(v)]
    if bad:
        return bad
    (losses[0] if one else torch.stack(losses).sum()).backward()
    replica.step()  # clipped (train.clip_norm)
    replica.steps += 1
    replica.samples += sum(sizes)
    hits = logits.detach().argmax(-1) == y  # token targets: a hit per predicted token that is not ignored
    if y.ndim > 1:
        hits &= y != IGNORE_INDEX
    correct = torch.stack([hits[s].sum() for s in parts]).cpu().tolist()
    confidence = None
    if y.ndim == 1 and any(j.want_confidence for j in jobs):  # only data cartography reads it
        confidence = true_label_probability(logits.detach(), y).cpu()  # (N,)
    staged = staging is not None and device.type == "cuda" and isinstance(inputs, torch.Tensor)
    grads = {n: staging.to_host(g) if staging is not None and staged else g.cpu() for n, g in gradients(leaf).items()}
    for i, (job, s, loss, hit) in enumerate(zip(jobs, parts, values, correct, strict=True)):
        reply = Framed(pb.TrainReply(loss=loss, correct=int(hit)))
        if lengths is not None:  # padded: each job's gradients at its own lengths
            assert pad is not None
            own = {n: trim_to(g[s], pad.spec(n), lengths[i]) for n, g in grads.items()}
        else:
            own = {n: g[s] for n, g in grads.items()}
        if job.formats is None:
            grad, fmt = own[SINGLE], codec.wire_format(job.wire_format)  # in the sender's format
            if job.framed:  # sent from the batch's gradient itself (the pinned staging is reused: a copy)
                reply.set("grad", grad.clone() if staged else grad, fmt)
            else:
                codec.encode_into(reply.msg.grad, grad, fmt)
        else:  # by name, each in its tensor's format; none for integer and bool tensors
            for n, grad in own.items():
                fmt = codec.wire_format(job.formats[n])
                if job.framed:
                    reply.add("grads", n, grad.clone() if staged else grad, fmt)
                else:
                    codec.encode_into(reply.msg.grads.add(name=n).tensor, grad, fmt)
        if job.want_confidence:
            assert confidence is not None
            codec.encode_into(reply.msg.confidence, confidence[s])
        job.reply = reply
    return []


def infer_step(replica: Replica, jobs: Sequence[InferJob], *, device: torch.device) -> Activations:
    """Logits ``(N, num_classes)`` on the CPU of the segment copy in eval mode for all jobs' rows
    (a U-shaped middle that returns named tensors: those).

    The caller holds ``replica.lock``; the segment's training mode is restored afterwards.
    """
    h = concat([j.h for j in jobs])  # (N, ...)
    seg = replica.segment
    was = seg.training
    seg.eval()
    try:
        with torch.no_grad():
            if isinstance(h, torch.Tensor):
                out: Activations = seg(h.to(device, dtype=torch.float32)).float()
            else:
                out = map_floats(seg(leaves(h, (), device=device)[0]), lambda t: t.float())
    finally:
        seg.train(was)
    if isinstance(out, torch.Tensor):
        return out.cpu()  # waits for the device
    return {n: t.cpu() for n, t in out.items()}
