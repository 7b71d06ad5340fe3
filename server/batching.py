"""Batching concurrent training requests into one forward/backward on the server segment.

Several clients train against one server segment at the same time (the shared ``fsl`` mode).
Served one by one, every request pays a forward, a backward and an optimizer step of its own,
and all but one of them wait for the segment's lock. :class:`RequestBatcher` collects the
requests that arrive together for the same copy of the segment (up to ``max_requests``
requests or ``max_samples`` samples, waiting at most ``max_wait_ms`` for stragglers), runs them
as one batch through the split server's own training step (:func:`server.step.train_step`, the
same function that serves a lone request) and answers each client with its own part.

Semantics (what a client gets and what the model does)
------------------------------------------------------
For a batch of requests ``i = 1..K`` with ``B_i`` samples each, all from the same weights ``w``:

* The server minimises ``L(w) = sum_i mean_{s in i} CE(f_w(h_s), y_s)``: every sample's loss is
  weighted by ``1/B_i`` of *its own* request. Since ``dL/dh_s`` only involves request ``i``'s
  term, **each client's gradient at the cut is exactly the gradient it would get unbatched from
  the same weights** (``mean`` loss over its own batch), up to float reduction order. Its
  ``loss`` and ``correct`` are its own batch's, too.
* One optimizer step on ``dL/dw = sum_i g_i``: the clients' gradients are **summed**, not
  averaged. An unbatched server takes K steps of ``lr * g_i``; the batched one takes one step of
  ``lr * sum_i g_i``, the same total displacement to first order (the difference is
  ``O(lr^2)``: the later requests' gradients are evaluated at ``w`` instead of the already
  updated weights). So **the learning rate keeps its meaning per request** and needs no change
  when batching is switched on; averaging would silently divide it by K. What does change:
  the server counts one optimizer step per batch (``server_step``), SGD momentum is applied
  once per batch rather than once per request (the momentum buffer sees the summed gradient),
  and weight decay is applied once per batch (``lr * wd * w`` instead of K times).
* Only requests whose cut values have the same per-sample shapes share a batch (a cut of named
  tensors with a symbolic sequence length: one batch per length); the others wait for the next.
  With ``pad_lengths`` (``server.pad_lengths``) requests of different lengths share one: each is
  padded to the longest with positions its masks mark absent (:func:`fsl.cutvalues.pad_value`)
  and gets its gradients back at its own length. Exact for segments that mix positions only
  through attention under the masks that cross the cut (BERT, GPT-2); costlier in compute by the
  padding, cheaper in steps when lengths vary from request to request.
* Exactness needs samples that do not interact inside the server segment. BatchNorm in
  training mode mixes the statistics of all clients in the batch, so a segment with BatchNorm
  is refused (use ``norm = "group"``, per-sample GroupNorm, or serve it unbatched). Dropout
  draws different masks than K separate passes would: equal in distribution, not bitwise.

Isolation
---------
Every request is admitted by the split server (``state.admit_train``: authentication, the
retry cache, dtype, shape, finiteness, labels) in the caller's thread *before* it joins a
batch, so bad input fails only its own call, with the usual status, and never reaches the
model. A request whose loss turns out non-finite inside the batch (finite but huge
activations) is dropped from the batch, which is recomputed without it before any weight
moves. A retried ``(round, step)`` is answered from the server's cache, or joins the identical
request still in flight; it never trains twice.

Concurrency: the first request for an idle segment copy becomes the batch's *leader*: it waits
for more requests, runs the batch (``state.run_train``, under the copy's lock), commits every
request's result (``state.commit``) and hands leadership to a request that arrived meanwhile, so
there is no background thread to start or stop. The leader stops waiting as soon as every
client that trained on this copy in the last ``active_window_s`` seconds has a request in the
batch, so a lone client never pays ``max_wait_ms``. Time is read from an injectable :class:`server.timeline.Timeline`.

CUDA: activations are gathered into a pinned host buffer per segment copy and copied to the
device with ``non_blocking=True``; gradients come back the same way, one synchronisation per
batch (:class:`server.step.Staging`).
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from dataclasses import dataclass, field

from torch import nn

from fsl.cutvalues import pad_key
from fsl.wire import codec
from fsl.wire import dataplane_pb2 as pb
from fsl.wire.frame import Framed
from server.jobs import TrainJob
from server.replicas import Replica
from server.state import SplitServerState
from server.step import Staging
from server.timeline import Timeline

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


@dataclass(eq=False)
class _Entry:
    """An admitted job waiting in a lane."""

    job: TrainJob
    done: threading.Event = field(default_factory=threading.Event)
    lead: bool = False  # set instead of a result: this entry's thread runs the next batch


@dataclass
class _Lane:
    """The queue of one segment copy (replica)."""

    cond: threading.Condition = field(default_factory=threading.Condition)
    entries: list[_Entry] = field(default_factory=list)
    leader: bool = False
    inflight: dict[tuple[str, int, int], _Entry] = field(default_factory=dict)  # (client, round, step)
    seen: dict[str, float] = field(default_factory=dict)  # client -> last arrival (on the batcher's clock)
    round: int = 0  # the newest round a request came from: clients of older rounds are forgotten
    staging: Staging = field(default_factory=Staging)


class RequestBatcher:
    """Serves :meth:`SplitServerState.train` requests in batches; a drop-in for ``state.train``.

    Parameters
    ----------
    state:
        The split server's state: requests are admitted, stepped and committed by its public calls.
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
    timeline:
        The clock every wait is planned on, and a tracer of the planned holds
        (:class:`server.timeline.Timeline`; tests pass a clock they move).
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
        timeline: Timeline = Timeline(),  # noqa: B008 - frozen, so one default is safely shared
        pad_lengths: bool = False,
    ) -> None:
        if max_requests < 1:
            raise BatchingError(f"max_requests must be >= 1, got {max_requests}")
        if not 0 <= max_wait_ms < math.inf:  # an endless wait would leave the leader's condition wait failing
            raise BatchingError(f"max_wait_ms must be finite and >= 0, got {max_wait_ms}")
        problem = batchnorm_problem(state.segment)
        if problem is not None:
            raise BatchingError(problem)
        self.state = state
        self.max_requests = max_requests
        self.max_samples = max_samples or state.max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.active_window_s = active_window_s
        self.adaptive = adaptive
        self.timeline = timeline
        # requests of different sequence lengths share a batch, padded to the longest (exact for
        # segments that honour the masks crossing the cut; fsl.cutvalues.pad_value)
        self.pad_lengths = pad_lengths and not state.sig.positional
        # one lane per segment copy; a past round's copies drop out with their last job
        self._lanes: weakref.WeakKeyDictionary[Replica, _Lane] = weakref.WeakKeyDictionary()
        self._lanes_lock = threading.Lock()
        self.batches = 0  # batches run (for benchmarks and tests)
        self.batched_requests = 0
        codec.tune_allocator()

    # ------------------------------------------------------------------ entry point
    def train(self, request: pb.TrainRequest | Framed) -> pb.TrainReply | Framed:
        """Admit ``request`` like :meth:`SplitServerState.train`, then train it in a batch.

        A framed request (:mod:`fsl.wire.frame`) is read without copying its tensors and answered
        with a frame whose gradient is a view of the batch's.
        """
        st = self.state
        job = st.admit_train(request)
        if job.retry:  # a retry of a step we took
            st.commit(job)
            return job.result()  # type: ignore[no-any-return]
        lane = self._lane(job.replica)
        entry = _Entry(job)
        client = job.header.client_id
        with lane.cond:
            twin = lane.inflight.get(job.key) if client else None
            if twin is None:
                if client:
                    lane.inflight[job.key] = entry
                now = self.timeline.clock()
                if job.header.round > lane.round:  # a new round: the last one's clients cannot send again
                    lane.round = job.header.round
                    lane.seen.clear()
                self._forget_idle(lane, now)
                lane.seen[client] = now
                lane.entries.append(entry)
                lead = not lane.leader
                lane.leader = True
                lane.cond.notify_all()
        if twin is not None:  # the same step is already queued or running: share its answer
            twin.done.wait()
            job.answered_like(twin.job)
            st.commit(job)
            return job.result()  # type: ignore[no-any-return]
        if not lead:
            entry.done.wait()
            if not entry.lead:
                return job.result()  # type: ignore[no-any-return]
        self._lead(lane)
        return job.result()  # type: ignore[no-any-return]

    def wake(self) -> None:
        """Make waiting leaders read the clock again (for a clock that was moved by hand)."""
        with self._lanes_lock:
            lanes = list(self._lanes.values())
        for lane in lanes:
            with lane.cond:
                lane.cond.notify_all()

    def _lane(self, replica: Replica) -> _Lane:
        with self._lanes_lock:
            lane = self._lanes.get(replica)
            if lane is None:
                lane = self._lanes[replica] = _Lane()
            return lane

    def _forget_idle(self, lane: _Lane, now: float) -> None:
        """Drop (lane.cond held) the clients that have not trained within ``active_window_s``: they no
        longer count as active, and the global segment's lane outlives every round, so keeping them
        would hold every client ever seen."""
        for c in [c for c, t in lane.seen.items() if now - t > self.active_window_s]:
            del lane.seen[c]

    def held_clients(self) -> int:
        """Clients the lanes remember now (recently active or with a request in flight)."""
        with self._lanes_lock:
            lanes = list(self._lanes.values())
        held = 0
        for lane in lanes:
            with lane.cond:
                held += len(lane.seen) + len(lane.inflight)
        return held

    # ------------------------------------------------------------------ leader
    def _take(self, lane: _Lane) -> list[_Entry]:
        """Wait (lane.cond held) for a full batch or the deadline; take the batch."""
        deadline = self.timeline.clock() + self.max_wait_s
        while True:
            now = self.timeline.clock()
            self._forget_idle(lane, now)
            active = set(lane.seen)
            queued = {e.job.header.client_id for e in lane.entries}
            samples = sum(e.job.samples for e in lane.entries)
            full = len(lane.entries) >= self.max_requests or samples >= self.max_samples
            if full or (self.adaptive and active <= queued) or now >= deadline:
                break
            self.timeline.hold(lane.cond, deadline, now)
        batch: list[_Entry] = []
        samples = 0
        key = self._key(lane.entries[0].job)
        for entry in lane.entries:
            if self._key(entry.job) != key:  # other per-sample shapes (another sequence length): a later batch
                continue
            n = entry.job.samples
            if len(batch) == self.max_requests or (batch and samples + n > self.max_samples):
                break
            batch.append(entry)
            samples += n
        if len(batch) == len(lane.entries):
            lane.entries.clear()
        else:
            taken = set(map(id, batch))
            lane.entries[:] = [e for e in lane.entries if id(e) not in taken]
        return batch

    def _key(self, job: TrainJob) -> object:
        """What requests must share to run in one batch: their per-sample shapes, or with
        ``pad_lengths`` those shapes up to the sequence lengths, and the kind of targets."""
        if not self.pad_lengths:
            return job.shape_key
        return (pad_key(job.h, self.state.sig), job.y.ndim)

    def _lead(self, lane: _Lane) -> None:
        st = self.state
        with lane.cond:
            batch = self._take(lane)
        jobs = [e.job for e in batch]
        try:
            trained = st.run_train(jobs, staging=lane.staging, pad=self.pad_lengths)
            if trained:
                self.batches += 1
                self.batched_requests += len(trained)
            for job in jobs:
                st.commit(job)
        except BaseException as e:  # noqa: BLE001 - a failed batch fails its own requests, nobody else's
            log.exception("batched training step failed")
            for job in jobs:
                if job.reply is None and job.error is None:
                    job.error = e
        finally:
            with lane.cond:
                for entry in batch:
                    lane.inflight.pop(entry.job.key, None)
                if lane.entries:  # hand over: the oldest waiting request leads the next batch
                    nxt = lane.entries[0]
                    nxt.lead = True
                    nxt.done.set()
                else:
                    lane.leader = False
            for entry in batch:
                entry.done.set()
