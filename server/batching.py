"""Batching concurrent training requests into one forward/backward on the server segment.

Several clients train against one server segment at the same time (the shared ``fsl`` mode).
Served one by one, every request pays a forward, a backward and an optimizer step of its own,
and all but one of them wait for the segment's lock. :class:`RequestBatcher` collects the
requests that arrive together for the same copy of the segment (up to ``max_requests``
requests or ``max_samples`` samples, waiting at most ``max_wait_ms`` for stragglers), runs them
as one batch and answers each client with its own part.

Semantics (what a client gets and what the model does)
------------------------------------------------------
For a batch of requests ``i = 1..K`` with ``B_i`` samples each, all from the same weights ``w``:

* The server minimises ``L(w) = sum_i mean_{s in i} CE(f_w(h_s), y_s)``: every sample's loss is
  weighted by ``1/B_i`` of *its own* request. Since ``dL/dh_s`` only involves request ``i``'s
  term, **each client's gradient at the cut is exactly the gradient it would get unbatched from
  the same weights** (``mean`` loss over its own batch, as :class:`SplitServerState` computes),
  up to float reduction order. Its ``loss`` and ``correct`` are its own batch's, too.
* One optimizer step on ``dL/dw = sum_i g_i``: the clients' gradients are **summed**, not
  averaged. An unbatched server takes K steps of ``lr * g_i``; the batched one takes one step of
  ``lr * sum_i g_i``, the same total displacement to first order (the difference is
  ``O(lr^2)``: the later requests' gradients are evaluated at ``w`` instead of the already
  updated weights). So **the learning rate keeps its meaning per request** and needs no change
  when batching is switched on; averaging would silently divide it by K. What does change:
  the server counts one optimizer step per batch (``server_step``), SGD momentum is applied
  once per batch rather than once per request (the momentum buffer sees the summed gradient),
  and weight decay is applied once per batch (``lr * wd * w`` instead of K times).
* Exactness needs samples that do not interact inside the server segment. BatchNorm in
  training mode mixes the statistics of all clients in the batch, so a segment with BatchNorm
  is refused (use ``norm = "group"``, per-sample GroupNorm, or serve it unbatched). Dropout
  draws different masks than K separate passes would: equal in distribution, not bitwise.

Isolation
---------
Every request is authenticated and validated (dtype, shape, finiteness, labels) by the split
server's own checks in the caller's thread *before* it joins a batch, so bad input fails only
its own call, with the usual status, and never reaches the model. A request whose loss turns
out non-finite inside the batch (finite but huge activations) is dropped from the batch, which
is recomputed without it before any weight moves. A retried ``(round, step)`` is answered from
the server's cache, or joins the identical request still in flight; it never trains twice.

Concurrency: the first request for an idle segment copy becomes the batch's *leader*: it waits
for more requests, runs the batch under the copy's lock and hands leadership to a request that
arrived meanwhile, so there is no background thread to start or stop. The leader stops waiting
as soon as every client that trained on this copy in the last ``active_window_s`` seconds has
a request in the batch, so a lone client never pays ``max_wait_ms``.

CUDA: activations are gathered into a pinned host buffer and copied to the device with
``non_blocking=True``; gradients come back the same way, one synchronisation per batch.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fsl.exits import exit_loss_per_sample
from fsl.fastmath import flush_denormals
from fsl.wire import codec
from fsl.wire import dataplane_pb2 as pb
from fsl.wire.frame import Framed, as_framed, as_sent, wire_size
from server.split_server import InvalidRequest, SplitServerState, true_label_probability

__all__ = ["BatchingError", "RequestBatcher", "batchnorm_problem"]

log = logging.getLogger(__name__)


class BatchingError(ValueError):
    """A server segment that cannot be batched exactly; the text says why and what to do."""


def batchnorm_problem(segment: nn.Module) -> str | None:
    """Why ``segment`` cannot be batched across clients exactly, or ``None`` if it can."""
    bns = [name for name, m in segment.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return None
    return (
        f"the server segment has BatchNorm layers ({', '.join(bns[:3])}{', ...' if len(bns) > 3 else ''}): "
        "in training mode they normalise with statistics of the whole batch, so batching requests of "
        "several clients would change every client's gradient. Build the model with norm='group' "
        "(per-sample GroupNorm) or serve this segment unbatched (server.batching = false)."
    )


@dataclass
class _Job:
    header: pb.Header
    request: pb.TrainRequest | Framed  # as it came (a frame is answered with a frame)
    h: torch.Tensor  # (B, ...) validated activations (read-only view of the request)
    y: torch.Tensor  # (B,) validated labels
    wire_dtype: str
    done: threading.Event = field(default_factory=threading.Event)
    lead: bool = False  # set instead of a result: this job's thread runs the next batch
    reply: Framed | None = None
    error: BaseException | None = None

    @property
    def framed(self) -> bool:
        return isinstance(self.request, Framed)


@dataclass
class _Lane:
    """The queue of one segment copy (replica)."""

    cond: threading.Condition = field(default_factory=threading.Condition)
    jobs: list[_Job] = field(default_factory=list)
    leader: bool = False
    inflight: dict[tuple[str, int, int], _Job] = field(default_factory=dict)  # (client, round, step)
    seen: dict[str, float] = field(default_factory=dict)  # client -> last arrival (monotonic)
    pinned_in: torch.Tensor | None = None
    pinned_out: torch.Tensor | None = None


class RequestBatcher:
    """Serves :meth:`SplitServerState.train` requests in batches; a drop-in for ``state.train``.

    Parameters
    ----------
    state:
        The split server's state: its checks, cache, counters, observer and segment copies are used
        as they are.
    max_requests:
        Most requests in one batch (8 serves 8 concurrent clients in one pass).
    max_samples:
        Most samples in one batch (default: the state's ``max_batch``); a request that would exceed
        it waits for the next batch.
    max_wait_ms:
        Longest a batch's leader waits for more requests after the first one arrived.
    active_window_s:
        A client counts as active (worth waiting for) if it trained in the last this many seconds.
    adaptive:
        Stop waiting once every active client has a request in the batch (default). ``False``: wait
        until the batch is full or ``max_wait_ms`` has passed.
    """

    accepts_frames = True  # train() reads fsl.wire.frame.Framed requests in place

    def __init__(
        self,
        state: SplitServerState,
        *,
        max_requests: int = 8,
        max_samples: int | None = None,
        max_wait_ms: float = 20.0,
        active_window_s: float = 0.25,
        adaptive: bool = True,
    ) -> None:
        if max_requests < 1:
            raise BatchingError(f"max_requests must be >= 1, got {max_requests}")
        if max_wait_ms < 0:
            raise BatchingError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        problem = batchnorm_problem(state.segment)
        if problem is not None:
            raise BatchingError(problem)
        self.state = state
        self.max_requests = max_requests
        self.max_samples = max_samples or state.max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.active_window_s = active_window_s
        self.adaptive = adaptive
        self._lanes: dict[int, _Lane] = {}
        self._lanes_lock = threading.Lock()
        self.batches = 0  # batches run (for benchmarks and tests)
        self.batched_requests = 0
        self.cuda = state.torch_device.type == "cuda"
        codec.tune_allocator()

    # ------------------------------------------------------------------ entry point
    def train(self, request: pb.TrainRequest | Framed) -> pb.TrainReply:
        """Validate ``request`` like :meth:`SplitServerState.train`, then train it in a batch.

        A framed request (:mod:`fsl.wire.frame`) is read without copying its tensors; replies
        are protobuf messages (a gRPC frame of one is a frame without payloads).
        """
        st = self.state
        st._check_trainable()
        if st.ushaped:
            raise InvalidRequest("this split is U-shaped: labels must not be sent; use Forward/Backward")
        req = as_framed(request)
        hdr = req.msg.header
        st._authenticate(hdr)
        h = st._activations(req.msg.activations, req.payloads.get("activations"))
        y = st._labels(req.msg.labels, h.shape[0], req.payloads.get("labels"))
        cached = st._cached(hdr)
        if cached is not None:
            return as_sent(cached, req is request)  # type: ignore[no-any-return]  # a retry of a step we took
        replica = st._replica_for(hdr.client_id)
        lane = self._lane(replica)
        key = (hdr.client_id, hdr.round, hdr.step)
        job = _Job(hdr, request, h, y, codec.format_of(req.msg.activations))  # privacy: + compression
        with lane.cond:
            twin = lane.inflight.get(key) if hdr.client_id else None
            if twin is None:
                if hdr.client_id:
                    lane.inflight[key] = job
                lane.seen[hdr.client_id] = time.monotonic()
                lane.jobs.append(job)
                lead = not lane.leader
                lane.leader = True
                lane.cond.notify_all()
        if twin is not None:  # the same step is already queued or running: share its answer
            twin.done.wait()
            return self._result(twin)
        if not lead:
            job.done.wait()
            if not job.lead:
                return self._result(job)
        self._lead(lane, replica)
        return self._result(job)

    @staticmethod
    def _result(job: _Job) -> pb.TrainReply | Framed:
        """The job's reply, framed if its request was (its gradient a view of the batch's)."""
        if job.error is not None:
            raise job.error
        assert job.reply is not None
        return as_sent(job.reply, job.framed)  # type: ignore[no-any-return]

    def _lane(self, replica: Any) -> _Lane:
        with self._lanes_lock:
            lane = self._lanes.get(id(replica))
            if lane is None or getattr(lane, "_replica", None) is not replica:
                lane = _Lane()
                lane._replica = replica  # type: ignore[attr-defined]  # keeps id() unique while in use
                self._lanes[id(replica)] = lane
                live = {id(r) for r in [self.state.global_replica, *self.state._replicas.values()]}
                for k in [k for k in self._lanes if k not in live and k != id(replica)]:
                    del self._lanes[k]  # copies of past rounds
            return lane

    # ------------------------------------------------------------------ leader
    def _take(self, lane: _Lane) -> list[_Job]:
        """Wait (lane.cond held) for a full batch or the deadline; take the batch."""
        deadline = time.monotonic() + self.max_wait_s
        while True:
            now = time.monotonic()
            active = {c for c, t in lane.seen.items() if now - t <= self.active_window_s}
            queued = {j.header.client_id for j in lane.jobs}
            samples = sum(j.h.shape[0] for j in lane.jobs)
            full = len(lane.jobs) >= self.max_requests or samples >= self.max_samples
            if full or (self.adaptive and active <= queued) or now >= deadline:
                break
            lane.cond.wait(deadline - now)
        batch, samples = [], 0
        for job in list(lane.jobs):
            if len(batch) == self.max_requests or (batch and samples + job.h.shape[0] > self.max_samples):
                break
            batch.append(job)
            samples += job.h.shape[0]
        del lane.jobs[: len(batch)]
        return batch

    def _lead(self, lane: _Lane, replica: Any) -> None:
        with lane.cond:
            batch = self._take(lane)
        try:
            self._run(replica, lane, batch)
        except BaseException as e:  # noqa: BLE001 - a failed batch fails its own requests, nobody else's
            log.exception("batched training step failed")
            for job in batch:
                if job.reply is None and job.error is None:
                    job.error = e
        finally:
            with lane.cond:
                for job in batch:
                    lane.inflight.pop((job.header.client_id, job.header.round, job.header.step), None)
                if lane.jobs:  # hand over: the oldest waiting request leads the next batch
                    nxt = lane.jobs[0]
                    nxt.lead = True
                    nxt.done.set()
                else:
                    lane.leader = False
            for job in batch:
                job.done.set()

    # ------------------------------------------------------------------ compute
    def _run(self, replica: Any, lane: _Lane, batch: list[_Job]) -> None:
        st = self.state
        with replica.lock:
            live = []
            for job in batch:
                try:
                    if st.observer is not None:
                        st.observer(job.header, job.h, job.y)
                    live.append(job)
                except Exception as e:  # noqa: BLE001 - as unbatched: this request fails, the others go on
                    job.error = e
            while live:
                bad = self._step(replica, lane, live)
                if not bad:
                    break
                for job in bad:
                    job.error = InvalidRequest("the batch gives a non-finite loss; the server segment was not updated")
                live = [j for j in live if j not in bad]  # nothing moved yet: recompute without them
        for job in batch:
            if job.reply is not None:
                st._remember(job.header, job.reply)
                if st.exchange_observer is not None:  # attacks: the exchange with its dL/dh
                    st.exchange_observer(job.header, job.h, job.y, job.reply.tensor("grad").float())
                st._count(
                    job.header.client_id,
                    wire_size(job.request),
                    wire_size(as_sent(job.reply, job.framed)),
                    train=True,
                    samples=job.h.shape[0],
                )

    def _gather(self, lane: _Lane, jobs: list[_Job]) -> torch.Tensor:
        """(N, ...) float32 activations of all jobs on the segment's device."""
        dev = self.state.torch_device
        n = sum(j.h.shape[0] for j in jobs)
        shape = (n, *jobs[0].h.shape[1:])
        if not self.cuda:
            if len(jobs) == 1:
                return jobs[0].h.float()
            return torch.cat([j.h.float() for j in jobs])  # (N, ...) one copy out of the messages
        buf = lane.pinned_in
        need = n * jobs[0].h[0].numel()
        if buf is None or buf.numel() < need:
            buf = lane.pinned_in = torch.empty(need, dtype=torch.float32, pin_memory=True)
        host = buf[:need].view(shape)
        a = 0
        for j in jobs:
            b = a + j.h.shape[0]
            host[a:b].copy_(j.h)  # into page-locked memory (casts float16/bfloat16 on the way)
            a = b
        return host.to(dev, non_blocking=True)

    def _scatter(self, lane: _Lane, grad: torch.Tensor) -> torch.Tensor:
        """The gradient at the cut on the host (pinned staging and one sync on CUDA)."""
        if not self.cuda:
            return grad
        buf = lane.pinned_out
        if buf is None or buf.numel() < grad.numel():
            buf = lane.pinned_out = torch.empty(grad.numel(), dtype=grad.dtype, pin_memory=True)
        host = buf[: grad.numel()].view(grad.shape)
        host.copy_(grad, non_blocking=True)
        torch.cuda.current_stream(grad.device).synchronize()
        return host

    def _step(self, replica: Any, lane: _Lane, jobs: list[_Job]) -> list[_Job]:
        """One forward/backward/step over ``jobs``; returns the jobs with a non-finite loss (and then
        changes nothing), else fills every job's reply."""
        flush_denormals()  # perf (issue 8): this thread's float unit (fsl/fastmath.py)
        st = self.state
        dev = st.torch_device
        sizes = [j.h.shape[0] for j in jobs]
        h = self._gather(lane, jobs).requires_grad_(True)  # (N, ...) smashed, all clients
        y = torch.cat([j.y for j in jobs]).to(dev, non_blocking=True)  # (N,)
        owner = torch.repeat_interleave(torch.arange(len(jobs)), torch.tensor(sizes)).to(dev, non_blocking=True)
        weight = (1.0 / torch.tensor(sizes, dtype=torch.float32)).to(dev, non_blocking=True)[owner]  # (N,) 1/B_i
        seg = replica.segment
        seg.train()
        replica.optimizer.zero_grad(set_to_none=True)
        logits = seg(h)  # (N, num_classes)
        per_sample = nn.functional.cross_entropy(logits, y, reduction="none")  # (N,)
        extra = exit_loss_per_sample(seg, y, st.exit_weight)  # exits in the server segment, if any
        if extra is not None:
            per_sample = per_sample + extra
        per_client = torch.zeros(len(jobs), device=dev).index_add_(0, owner, per_sample.detach() * weight)  # (K,)
        hits = torch.zeros(len(jobs), device=dev).index_add_(0, owner, (logits.detach().argmax(1) == y).float())
        losses, correct = per_client.cpu().tolist(), hits.cpu().tolist()
        confidence = true_label_probability(logits.detach(), y).cpu()  # (N,) for data cartography
        bad = [j for j, v in zip(jobs, losses, strict=True) if not math.isfinite(v)]
        if bad:
            return bad
        (per_sample * weight).sum().backward()  # = sum_i mean loss of request i
        assert h.grad is not None
        replica.optimizer.step()
        replica.steps += 1
        replica.samples += sum(sizes)
        self.batches += 1
        self.batched_requests += len(jobs)
        grad = self._scatter(lane, h.grad)  # (N, ...) dL/dh on the host
        server_step = st.steps
        a = 0
        for job, loss, hit in zip(jobs, losses, correct, strict=True):
            b = a + job.h.shape[0]
            reply = Framed(pb.TrainReply(loss=loss, correct=int(hit), server_step=server_step))
            fmt = codec.wire_format(job.wire_dtype)  # in the sender's format
            if job.framed:  # a view of the batch's gradient, sent from there (the pinned CUDA staging is reused)
                reply.set("grad", grad[a:b].clone() if self.cuda else grad[a:b], fmt)
            else:
                codec.encode_into(reply.msg.grad, grad[a:b], fmt)
            codec.encode_into(reply.msg.confidence, confidence[a:b])
            job.reply = reply
            a = b
        return []
