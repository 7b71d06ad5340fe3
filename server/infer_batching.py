"""Split inference served in batches that wait only as long as the tightest latency target allows.

Concurrent :class:`InferRequest`\\ s are stacked into one forward pass of the server segment
(samples per second rise with the batch on both CPU and GPU). Waiting for company costs
latency, so every request carries the budget it has left (``budget_ms``, sent by the client)
and the batcher holds a batch only while *every* request in it can still make its deadline:

    wait until  min_i(deadline_i) - predicted_service(batch + 1) - margin

where the service time of a batch of ``n`` samples is learned online (a running fit of
``a + b * n`` from the batches served so far). Requests without a budget wait at most
``max_wait_ms``. One worker thread runs the batches; gRPC threads only admit their request
(``state.admit_infer``: credential and tensor checks) and wait, and the worker computes
(``state.run_infer``) and commits (``state.commit``) through the split server's public calls.
Time is read from an injectable :class:`server.timeline.Timeline`, on which every wait is planned.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field

from fsl.deadlines import deadline_wait_ms
from fsl.wire import dataplane_pb2 as pb
from fsl.wire.frame import Framed
from server.jobs import InferJob
from server.state import SplitServerState
from server.timeline import Timeline

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


@dataclass(eq=False)
class _Entry:
    job: InferJob
    arrival: float  # on the batcher's clock
    deadline: float  # arrival + budget (or + max_wait when the request has no budget)
    done: threading.Event = field(default_factory=threading.Event)


class InferBatcher:
    """Serves :meth:`SplitServerState.infer` requests in deadline-aware batches; a drop-in for ``state.infer``.

    Parameters
    ----------
    state:
        The split server's state: requests are admitted, run and committed by its public calls.
    max_samples:
        Most samples in one batch.
    max_wait_ms:
        Longest wait for requests that carry no latency budget.
    margin_ms:
        Safety margin kept below every deadline (network jitter on the way back).
    timeline:
        The clock every wait is planned on, and a tracer of the planned holds
        (:class:`server.timeline.Timeline`; tests pass a clock they move).
    """

    accepts_frames = True  # infer() reads fsl.wire.frame.Framed requests in place

    def __init__(
        self,
        state: SplitServerState,
        *,
        max_samples: int = 256,
        max_wait_ms: float = 5.0,
        margin_ms: float = 1.0,
        timeline: Timeline = Timeline(),  # noqa: B008 - frozen, so one default is safely shared
    ) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        if max_wait_ms < 0 or margin_ms < 0:
            raise ValueError("max_wait_ms and margin_ms must be >= 0")
        self.state = state
        self.max_samples = max_samples
        self.max_wait_s = max_wait_ms / 1000.0
        self.margin_s = margin_ms / 1000.0
        self.timeline = timeline
        self.service = ServiceModel()
        self.batches = 0
        self.requests = 0
        self._queue: deque[_Entry] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="infer-batcher", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ entry point
    def infer(self, request: pb.InferRequest | Framed) -> pb.InferReply | Framed:
        job = self.state.admit_infer(request)  # checked before it joins a batch
        now = self.timeline.clock()
        budget = job.budget_ms / 1000.0 if job.budget_ms > 0 else self.max_wait_s
        entry = _Entry(job, now, now + budget)
        with self._cond:
            if self._closed:
                raise RuntimeError("the inference batcher is closed")
            self._queue.append(entry)
            self._cond.notify_all()
        entry.done.wait()
        return job.result()  # type: ignore[no-any-return]

    def wake(self) -> None:
        """Make the worker read the clock again (for a clock that was moved by hand)."""
        with self._cond:
            self._cond.notify_all()

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

    def _collect(self) -> list[_Entry]:
        """Take a batch off the queue (lock held): wait for more while every deadline allows it.

        A batch runs on one segment copy, with one per-sample shape: a request for another copy
        (another sequence length) waits for the next batch.
        """
        batch: list[_Entry] = []
        n = 0
        while True:
            q = self._queue
            while (
                q
                and n + q[0].job.rows <= self.max_samples
                and (
                    not batch
                    or (q[0].job.replica is batch[0].job.replica and q[0].job.shape_key == batch[0].job.shape_key)
                )
            ):
                entry = q.popleft()
                batch.append(entry)
                n += entry.job.rows
            if not batch:  # a single request larger than max_samples runs alone
                return [q.popleft()]
            if n >= self.max_samples or q or self._closed:
                return batch
            now = self.timeline.clock()
            oldest = min(e.arrival for e in batch)
            wait_s = (
                deadline_wait_ms(
                    [e.deadline * 1000.0 for e in batch],
                    now * 1000.0,
                    self.service.predict(n + 1) + self.margin_s * 1000.0,  # if one more request joins
                    max_wait_ms=max(0.0, oldest + self.max_wait_s - now) * 1000.0,
                )
                / 1000.0
            )
            if wait_s <= 0:
                return batch
            self.timeline.hold(self._cond, now + wait_s, now)

    def _run(self, batch: list[_Entry]) -> None:
        st = self.state
        jobs = [e.job for e in batch]
        t0 = self.timeline.clock()
        try:
            compute_ms = st.run_infer(jobs, clock=self.timeline.clock)
        except BaseException as e:  # noqa: BLE001 - every waiting request gets the error, the server lives
            log.exception("inference batch failed")
            for entry in batch:
                entry.job.error = e
                entry.done.set()
            return
        n = sum(j.rows for j in jobs)
        self.service.update(n, compute_ms)
        self.batches += 1
        self.requests += len(batch)
        for entry in batch:
            entry.job.reply.queue_ms = (t0 - entry.arrival) * 1000.0
            try:
                st.commit(entry.job)
            except BaseException as e:  # noqa: BLE001 - as above: this request fails, the worker lives
                entry.job.error = e
            entry.done.set()
