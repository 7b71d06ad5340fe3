"""Split inference served in batches that wait only as long as the tightest latency target allows.

Concurrent :class:`InferRequest`\\ s are stacked into one forward pass of the server segment
(samples per second rise with the batch on both CPU and GPU). Waiting for company costs
latency, so every request carries the budget it has left (``budget_ms``, sent by the client)
and the batcher holds a batch only while *every* request in it can still make its deadline:

    wait until  min_i(deadline_i) - predicted_service(batch + 1) - margin

where the service time of a batch of ``n`` samples is learned online (a running fit of
``a + b * n`` from the batches served so far). Requests without a budget wait at most
``max_wait_ms``. One worker thread per lane runs the batches; gRPC threads only enqueue
and wait, so the server segment is never touched by two threads at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from fsl.deadlines import deadline_wait_ms
from fsl.wire import codec
from fsl.wire import dataplane_pb2 as pb
from fsl.wire.frame import Framed, as_framed, as_sent, wire_size
from server.split_server import SplitServerState

__all__ = ["InferBatcher", "ServiceModel"]

log = logging.getLogger(__name__)


@dataclass
class ServiceModel:
    """Online least-squares fit of batch service time: ``ms(n) = a + b * n`` (exponentially weighted)."""

    a: float = 1.0  # ms, fixed cost of one batch (prior until measured)
    b: float = 0.1  # ms per sample
    decay: float = 0.95
    _s: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0, 0.0])  # w, wn, wnn, wt, wnt

    def update(self, n: int, ms: float) -> None:
        s = self._s
        for i in range(5):
            s[i] *= self.decay
        s[0] += 1.0
        s[1] += n
        s[2] += n * n
        s[3] += ms
        s[4] += n * ms
        det = s[0] * s[2] - s[1] * s[1]
        if s[0] >= 2 and det > 1e-9:
            b = (s[0] * s[4] - s[1] * s[3]) / det
            a = (s[3] - b * s[1]) / s[0]
            if b >= 0 and a >= 0:
                self.a, self.b = a, b
                return
        self.b = max(0.0, (s[3] / s[0] - self.a) / max(1.0, s[1] / s[0]))  # too few points: keep a, fit b

    def predict(self, n: int) -> float:
        return self.a + self.b * n


@dataclass
class _Job:
    request: pb.InferRequest | Framed  # as it came (a frame is answered with a frame)
    client_id: str
    h: torch.Tensor  # (B, ...) validated activations
    arrival: float  # time.monotonic()
    deadline: float  # arrival + budget (or + max_wait when the request has no budget)
    done: threading.Event = field(default_factory=threading.Event)
    reply: pb.InferReply | None = None
    error: BaseException | None = None


class InferBatcher:
    """Serves :meth:`SplitServerState.infer` requests in deadline-aware batches; a drop-in for ``state.infer``.

    Parameters
    ----------
    state:
        The split server's state (checks, credentials, counters and the global server segment).
    max_samples:
        Most samples in one batch.
    max_wait_ms:
        Longest wait for requests that carry no latency budget.
    margin_ms:
        Safety margin kept below every deadline (network jitter on the way back).
    """

    def __init__(
        self, state: SplitServerState, *, max_samples: int = 256, max_wait_ms: float = 5.0, margin_ms: float = 1.0
    ) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        if max_wait_ms < 0 or margin_ms < 0:
            raise ValueError("max_wait_ms and margin_ms must be >= 0")
        self.state = state
        self.max_samples = max_samples
        self.max_wait_s = max_wait_ms / 1000.0
        self.margin_s = margin_ms / 1000.0
        self.service = ServiceModel()
        self.batches = 0
        self.requests = 0
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="infer-batcher", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ entry point
    accepts_frames = True  # infer() reads fsl.wire.frame.Framed requests in place

    def infer(self, request: pb.InferRequest | Framed) -> pb.InferReply | Framed:
        st = self.state
        req = as_framed(request)
        st._authenticate(req.msg.header)
        h = st._activations(req.msg.activations, req.payloads.get("activations"))  # validated before it joins a batch
        now = time.monotonic()
        budget = req.msg.budget_ms / 1000.0 if req.msg.budget_ms > 0 else self.max_wait_s
        job = _Job(request, req.msg.header.client_id, h, now, now + budget)
        with self._cond:
            if self._closed:
                raise RuntimeError("the inference batcher is closed")
            self._queue.append(job)
            self._cond.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.reply is not None
        return as_sent(job.reply, isinstance(request, Framed))  # type: ignore[no-any-return]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout=5)

    # ------------------------------------------------------------------ the worker
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed and not self._queue:
                    return
                batch = self._collect()
            self._run(batch)

    def _collect(self) -> list[_Job]:
        """Take a batch off the queue (lock held): wait for more while every deadline allows it."""
        batch: list[_Job] = []
        n = 0
        while True:
            while self._queue and n + self._queue[0].h.shape[0] <= self.max_samples:
                job = self._queue.popleft()
                batch.append(job)
                n += job.h.shape[0]
            if not batch:  # a single request larger than max_samples runs alone
                job = self._queue.popleft()
                return [job]
            if n >= self.max_samples or self._queue or self._closed:
                return batch
            now = time.monotonic()
            oldest = min(j.arrival for j in batch)
            wait_s = (
                deadline_wait_ms(
                    [j.deadline * 1000.0 for j in batch],
                    now * 1000.0,
                    self.service.predict(n + 1) + self.margin_s * 1000.0,  # if one more request joins
                    max_wait_ms=max(0.0, oldest + self.max_wait_s - now) * 1000.0,
                )
                / 1000.0
            )
            if wait_s <= 0:
                return batch
            self._cond.wait(timeout=wait_s)

    def _run(self, batch: list[_Job]) -> None:
        st = self.state
        rep = st.global_replica
        t0 = time.monotonic()
        try:
            h = torch.cat([j.h for j in batch]).to(st.torch_device, dtype=torch.float32)  # (N, ...)
            with rep.lock:
                was = rep.segment.training
                rep.segment.eval()
                with torch.no_grad():
                    out = rep.segment(h).float()  # (N, num_classes)
                rep.segment.train(was)
            if out.is_cuda:
                torch.cuda.synchronize(out.device)
            out = out.cpu()
        except BaseException as e:  # noqa: BLE001 - every waiting request gets the error, the server lives
            log.exception("inference batch failed")
            for j in batch:
                j.error = e
                j.done.set()
            return
        t1 = time.monotonic()
        compute_ms = (t1 - t0) * 1000.0
        self.service.update(h.shape[0], compute_ms)
        self.batches += 1
        self.requests += len(batch)
        a = 0
        for j in batch:
            b = a + j.h.shape[0]
            reply = pb.InferReply(queue_ms=(t0 - j.arrival) * 1000.0, compute_ms=compute_ms, batch=int(h.shape[0]))
            codec.encode_into(reply.logits, out[a:b])
            j.reply = reply
            down = wire_size(as_sent(reply, isinstance(j.request, Framed)))
            st._count(j.client_id, wire_size(j.request), down, train=False)
            a = b
            j.done.set()
