"""A discrete-event simulation of split inference: many devices, their networks, one batching server.

Each simulated device (:class:`SimDevice`) has a :class:`~experiments.inference.profiles.DeviceProfile`,
a :class:`~experiments.inference.profiles.NetworkProfile`, a latency target and an arrival process
(Poisson at ``rate_hz``, or explicit arrival times such as a :func:`bursty_trace`). For every
request a policy picks the cut: :class:`FixedCut`, :func:`all_cloud`, or :class:`SchedulerPolicy`,
which plans with a :class:`~experiments.inference.scheduler.Scheduler` and feeds back measured latencies.

A device runs one request at a time (later ones queue on it), then sends the cut's activations
up; the server (:class:`SimServerConfig`) has ``workers`` parallel lanes and batches requests of
the same cut, most urgent first, up to ``max_batch``: it waits for a fuller batch only as long
as the tightest deadline in it allows (:func:`~fsl.deadlines.deadline_wait_ms`) and
never more than ``max_wait_ms``, and it does not grow a batch past the size whose service time
would make its most urgent request late (unless that request is late anyway). A batch's service time is the model profile's latency of the server segment at
that batch size and the server's speed. Times are in milliseconds on one simulated clock; the
event queue is a heap ordered by (time, sequence number), so a run is deterministic given its
seed.
"""

from __future__ import annotations

import heapq
import math
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from experiments.inference.profiles import INPUT, DeviceProfile, ModelProfile, NetworkProfile
from experiments.inference.scheduler import Scheduler, predict
from fsl.deadlines import deadline_wait_ms

__all__ = [
    "FixedCut",
    "Policy",
    "RequestRecord",
    "SchedulerPolicy",
    "SimServerConfig",
    "SimDevice",
    "SimResult",
    "all_cloud",
    "bursty_trace",
    "poisson_trace",
    "simulate",
    "summarize_simulation",
    "validate",
]


@dataclass(frozen=True)
class SimDevice:
    """One simulated device."""

    name: str  # unique identifier, e.g. "pi4-3"
    device: DeviceProfile  # its declared profile (what a planner believes)
    network: NetworkProfile  # its link to the server
    target_ms: float  # end-to-end latency target of each request
    rate_hz: float = 0.0  # Poisson arrival rate (requests per second), used when arrivals_ms is None
    arrivals_ms: tuple[float, ...] | None = None  # explicit arrival times (ms), e.g. from bursty_trace
    # true compute time / declared compute time from slowdown_from_ms on (thermal throttling, a
    # background job): 1 = as declared
    slowdown: float = 1.0
    slowdown_from_ms: float = 0.0  # when slowdown starts (ms)

    @property
    def kind(self) -> str:
        """The device type (its profile's name), the key of per-type summaries."""
        return self.device.name


@dataclass(frozen=True)
class SimServerConfig:
    """The batching server."""

    device: DeviceProfile  # the machine (its speed scales the profile's latencies)
    workers: int = 1  # parallel lanes, each running one batch at a time
    max_batch: int = 8  # largest batch
    max_wait_ms: float = 5.0  # longest a request waits for its batch to fill (deadlines may shorten it)

    def __post_init__(self) -> None:
        if self.workers < 1 or self.max_batch < 1 or self.max_wait_ms < 0:
            raise ValueError("need workers >= 1, max_batch >= 1 and max_wait_ms >= 0")


@dataclass
class RequestRecord:
    """What happened to one request (times in ms)."""

    request: int
    device: str
    kind: str
    tier: str
    cut: str
    arrival_ms: float
    finish_ms: float
    latency_ms: float
    target_ms: float
    met_target: bool
    device_ms: float  # compute on the device
    device_queue_ms: float  # waiting for the device's own earlier requests
    network_ms: float  # uplink + downlink
    server_ms: float  # this request's share of its batch's service time
    wait_ms: float  # at the server, from arrival there to the start of its batch
    queue_ms: float  # the part of wait_ms when every lane was busy (the rest: waiting for a batch)
    batch: int  # size of its server batch; 0 when it never reached the server
    exited: bool  # left through an early exit on the device
    predicted_ms: float  # the latency model's prediction (declared profiles, no wait, batch 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SimResult:
    """A simulation's output: per-request records and the server batches it ran."""

    records: list[RequestRecord]
    batch_sizes: list[int] = field(default_factory=list)
    server_busy_ms: float = 0.0  # sum of batch service times

    def summary(self) -> dict[str, Any]:
        """See :func:`summarize_simulation`."""
        return summarize_simulation(self)


class Policy(Protocol):
    """Decides the cut of each request and may learn from its outcome."""

    def choose(self, device: SimDevice, now_ms: float, backlog_ms: float) -> str:
        """The cut for a request of ``device`` arriving at ``now_ms``.

        ``backlog_ms`` is how long the device is still busy with its earlier requests.
        """
        ...

    def feedback(self, device: SimDevice, record: RequestRecord) -> None:
        """Called when a request of ``device`` finishes."""
        ...


@dataclass
class FixedCut:
    """Every request at the same cut."""

    cut: str

    def choose(self, device: SimDevice, now_ms: float, backlog_ms: float) -> str:
        return self.cut

    def feedback(self, device: SimDevice, record: RequestRecord) -> None:
        return None


def all_cloud() -> FixedCut:
    """The policy that sends every raw input to the server."""
    return FixedCut(INPUT)


@dataclass
class SchedulerPolicy:
    """Plan every request with a :class:`Scheduler` and feed measured latencies back.

    The device's backlog (how long it is still busy) is planned for explicitly. The feedback
    is what a real device can know: its own compute time, the network time (from server
    timestamps in the reply) and the end-to-end latency less its own backlog and less the time
    the server deliberately held the request to fill a batch (the batcher keeps that within
    the deadline, so it is not a cost to plan around). Each simulated device is planned under its own name,
    so one throttled Pi does not slow down the plans of the others.
    """

    scheduler: Scheduler
    server_wait_ms: float = 0.0
    learn: bool = True

    def choose(self, device: SimDevice, now_ms: float, backlog_ms: float) -> str:
        me = replace(device.device, name=device.name)
        return self.scheduler.plan(me, device.network, device.target_ms, self.server_wait_ms, backlog_ms).cut

    def feedback(self, device: SimDevice, record: RequestRecord) -> None:
        if not self.learn or record.exited:
            return
        held = record.wait_ms - record.queue_ms  # waiting for a fuller batch
        self.scheduler.observe(
            device.name,
            record.cut,
            record.latency_ms - held - record.device_queue_ms,
            device_ms=record.device_ms,
            network_ms=record.network_ms if record.batch else None,
            server_wait_ms=self.server_wait_ms,
        )


# ---------------------------------------------------------------------- arrival processes


def poisson_trace(rate_hz: float, duration_ms: float, seed: int = 0, start_ms: float = 0.0) -> list[float]:
    """Arrival times (ms) of a Poisson process of ``rate_hz`` requests/s over ``duration_ms``."""
    rng = random.Random(seed)
    out: list[float] = []
    if rate_hz <= 0:
        return out
    t = start_ms
    while True:
        t += rng.expovariate(rate_hz / 1e3)
        if t >= start_ms + duration_ms:
            return out
        out.append(t)


def bursty_trace(
    duration_ms: float,
    base_rate_hz: float,
    burst_rate_hz: float,
    mean_burst_ms: float,
    mean_calm_ms: float,
    seed: int = 0,
) -> list[float]:
    """A bursty arrival trace: an on-off Markov-modulated Poisson process.

    The process alternates between a calm state (Poisson at ``base_rate_hz``) and a burst
    state (Poisson at ``burst_rate_hz``); each state lasts an exponential time with mean
    ``mean_calm_ms`` or ``mean_burst_ms``. It starts calm.

    Returns
    -------
    list of float
        Sorted arrival times in ``[0, duration_ms)``.
    """
    if min(mean_burst_ms, mean_calm_ms) <= 0 or min(base_rate_hz, burst_rate_hz) < 0:
        raise ValueError("state durations must be positive and rates non-negative")
    rng = random.Random(seed)
    out: list[float] = []
    t, burst = 0.0, False
    while t < duration_ms:
        length = rng.expovariate(1.0 / (mean_burst_ms if burst else mean_calm_ms))
        end = min(t + length, duration_ms)
        rate = (burst_rate_hz if burst else base_rate_hz) / 1e3  # per ms
        s = t
        while rate > 0:
            s += rng.expovariate(rate)
            if s >= end:
                break
            out.append(s)
        t, burst = end, not burst
    return out


# ---------------------------------------------------------------------- the simulation


@dataclass
class _Request:
    rid: int
    dev: int  # index into the fleet
    cut: str
    arrival: float
    device_ms: float
    up_ms: float
    down_ms: float
    device_queue: float = 0.0
    server_in: float = 0.0
    deadline: float = 0.0  # when it must leave the server
    blocked_at_in: float = 0.0  # the server's cumulative all-lanes-busy time when it arrived there
    wait: float = 0.0
    queue: float = 0.0
    server_ms: float = 0.0
    batch: int = 0
    exited: bool = False


def simulate(
    profile: ModelProfile,
    fleet: Sequence[SimDevice],
    policy: Policy,
    server: SimServerConfig,
    duration_ms: float,
    seed: int = 0,
    jitter: float = 0.0,
    exit_probability: Mapping[str, float] | None = None,
) -> SimResult:
    """Run the fleet's requests through devices, networks and the batching server.

    Parameters
    ----------
    profile : ModelProfile
        Per-block costs of the model on the profiling host.
    fleet : sequence of SimDevice
        The devices; each generates requests over ``[0, duration_ms)``.
    policy : Policy
        Chooses each request's cut; receives every finished request's record.
    server : SimServerConfig
        Lanes, batching limits and the server machine.
    duration_ms : float
        Length of the arrival window; the run continues until every request has finished.
    seed : int
        Seeds Poisson arrivals, jitter and early exits.
    jitter : float
        Sigma of a log-normal factor applied to every compute and transfer time (0: none).
    exit_probability : mapping, optional
        Fraction of the requests served at a cut that exit on the device there.

    Returns
    -------
    SimResult
    """
    rng = random.Random(seed)
    exits = dict(exit_probability or {})
    names = [d.name for d in fleet]
    if len(set(names)) != len(names):
        raise ValueError("device names in a fleet must be unique")

    def noise() -> float:
        return math.exp(rng.gauss(0.0, jitter)) if jitter > 0 else 1.0

    events: list[tuple[float, int, str, Any]] = []
    seq = 0

    def push(t: float, kind: str, payload: Any = None) -> None:
        nonlocal seq
        heapq.heappush(events, (t, seq, kind, payload))
        seq += 1

    rid = 0
    for i, d in enumerate(fleet):
        times = (
            list(d.arrivals_ms)
            if d.arrivals_ms is not None
            else poisson_trace(d.rate_hz, duration_ms, seed=seed * 1_000_003 + i)
        )
        for t in sorted(times):
            if 0 <= t < duration_ms:
                push(t, "arrive", (i, rid))
                rid += 1

    device_free = [0.0] * len(fleet)
    queues: dict[str, list[tuple[float, int, _Request]]] = {}  # per cut, a heap by deadline
    free_lanes = server.workers
    blocked_total, blocked_since = 0.0, None  # cumulative time with every lane busy
    timer_at: float | None = None
    records: list[RequestRecord] = []
    batch_sizes: list[int] = []
    busy_ms = 0.0

    def blocked(now: float) -> float:
        return blocked_total + (now - blocked_since if blocked_since is not None else 0.0)

    def service_ms(cut: str, batch: int) -> float:
        return server.device.compute_ms(profile, profile.server_blocks(cut), batch)

    def dispatch(now: float, cut: str, batch: list[_Request]) -> None:
        nonlocal free_lanes, blocked_since, busy_ms
        service = service_ms(cut, len(batch)) * noise()
        busy_ms += service
        batch_sizes.append(len(batch))
        b_now = blocked(now)
        for r in batch:
            r.wait, r.queue = now - r.server_in, b_now - r.blocked_at_in
            r.server_ms, r.batch = service / len(batch), len(batch)
            push(now + service + r.down_ms, "finish", r)
        free_lanes -= 1
        if free_lanes == 0:
            blocked_since = now
        push(now + service, "lane_free")

    def try_dispatch(now: float) -> None:
        nonlocal timer_at
        progressed = True
        while progressed and free_lanes > 0:
            progressed = False
            # the cut whose most urgent request is the most urgent of all goes first
            for cut in sorted((c for c in queues if queues[c]), key=lambda c: queues[c][0][:2]):
                heap = queues[cut]
                # the most urgent requests of this cut, up to a full batch, in deadline order
                pending = [heapq.heappop(heap)[2] for _ in range(min(len(heap), server.max_batch))]
                # the largest batch that still meets the most urgent deadline
                fit = 0
                while fit < len(pending) and now + service_ms(cut, fit + 1) <= pending[0].deadline + 1e-9:
                    fit += 1
                if fit == len(pending) < server.max_batch:  # all of them fit: may wait for more
                    held_for = now - min(r.server_in for r in pending)
                    wait = deadline_wait_ms(
                        [r.deadline for r in pending],
                        now,
                        service_ms(cut, len(pending)),
                        max_wait_ms=max(0.0, server.max_wait_ms - held_for),
                    )
                else:  # a full batch; or a bigger one would be late; or the most urgent is late anyway
                    wait = 0.0
                take = pending[: fit or len(pending)] if wait <= 1e-9 else []
                for r in pending[len(take) :]:
                    heapq.heappush(heap, (r.deadline, r.rid, r))
                if take:
                    dispatch(now, cut, take)
                    progressed = True
                    break
                if timer_at is None or now + wait < timer_at - 1e-9:
                    timer_at = now + wait
                    push(timer_at, "timer")

    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            i, r_id = payload
            d = fleet[i]
            cut = policy.choose(d, now, max(0.0, device_free[i] - now))
            slow = d.slowdown if now >= d.slowdown_from_ms else 1.0
            dev_ms = d.device.compute_ms(profile, profile.client_blocks(cut), 1) * slow * noise()
            remote = bool(profile.server_blocks(cut))
            up = d.network.transfer_ms(profile.cut_bytes(cut), "up") * noise() if remote else 0.0
            down = d.network.transfer_ms(profile.logits_bytes, "down") * noise() if remote else 0.0
            req = _Request(r_id, i, cut, now, dev_ms, up, down)
            start = max(now, device_free[i]) if dev_ms > 0 else now  # sending raw input needs no compute
            done = start + dev_ms
            if dev_ms > 0:
                device_free[i] = done
            req.device_queue = start - now
            p_exit = exits.get(cut, 0.0) if cut != INPUT else 0.0
            if not remote or (p_exit > 0 and rng.random() < p_exit):
                req.exited = remote
                push(done, "finish", req)
            else:
                req.server_in = done + up
                req.deadline = now + d.target_ms - down
                push(req.server_in, "server_in", req)
        elif kind == "server_in":
            payload.blocked_at_in = blocked(now)
            heapq.heappush(queues.setdefault(payload.cut, []), (payload.deadline, payload.rid, payload))
            try_dispatch(now)
        elif kind == "lane_free":
            if free_lanes == 0 and blocked_since is not None:
                blocked_total += now - blocked_since
                blocked_since = None
            free_lanes += 1
            try_dispatch(now)
        elif kind == "timer":
            if timer_at is not None and abs(now - timer_at) <= 1e-9:
                timer_at = None
            try_dispatch(now)
        elif kind == "finish":
            r: _Request = payload
            d = fleet[r.dev]
            latency = now - r.arrival
            reached = r.batch > 0
            pred = predict(profile, d.device, d.network, server.device, r.cut).tail_ms
            rec = RequestRecord(
                request=r.rid,
                device=d.name,
                kind=d.kind,
                tier=d.device.tier,
                cut=r.cut,
                arrival_ms=r.arrival,
                finish_ms=now,
                latency_ms=latency,
                target_ms=d.target_ms,
                met_target=latency <= d.target_ms + 1e-9,
                device_ms=r.device_ms,
                device_queue_ms=r.device_queue,
                network_ms=(r.up_ms + r.down_ms) if reached else 0.0,
                server_ms=r.server_ms,
                wait_ms=r.wait,
                queue_ms=r.queue,
                batch=r.batch,
                exited=r.exited,
                predicted_ms=pred,
            )
            records.append(rec)
            policy.feedback(d, rec)
    records.sort(key=lambda rec: rec.request)
    return SimResult(records=records, batch_sizes=batch_sizes, server_busy_ms=busy_ms)


# ---------------------------------------------------------------------- summaries


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated ``q``-th percentile (0..100); NaN for no values."""
    return float(np.percentile(values, q)) if len(values) else math.nan


def _stats(records: Sequence[RequestRecord]) -> dict[str, Any]:
    lat = [r.latency_ms for r in records]
    cuts: dict[str, int] = {}
    for r in records:
        cuts[r.cut] = cuts.get(r.cut, 0) + 1
    return {
        "requests": len(records),
        "attainment": sum(r.met_target for r in records) / len(records) if records else math.nan,
        "p50_ms": _percentile(lat, 50),
        "p95_ms": _percentile(lat, 95),
        "p99_ms": _percentile(lat, 99),
        "server_ms": sum(r.server_ms for r in records),
        "cuts": cuts,
    }


def summarize_simulation(result: SimResult) -> dict[str, Any]:
    """Target attainment, latency percentiles per device type, server compute and batching.

    Returns
    -------
    dict
        ``requests``, ``attainment`` (fraction that met their target), ``p50_ms`` /
        ``p95_ms`` / ``p99_ms``, ``server_ms_total`` (sum of batch service times),
        ``server_ms_per_request``, ``mean_batch`` (mean server batch size), ``batches``,
        ``local_fraction`` (requests that never reached the server), ``cuts`` (requests per
        cut) and ``per_kind``: the same statistics for every device type.
    """
    recs = result.records
    kinds: dict[str, list[RequestRecord]] = {}
    for r in recs:
        kinds.setdefault(r.kind, []).append(r)
    overall = _stats(recs)
    overall.pop("server_ms")
    return {
        **overall,
        "server_ms_total": result.server_busy_ms,
        "server_ms_per_request": result.server_busy_ms / len(recs) if recs else math.nan,
        "mean_batch": statistics.fmean(result.batch_sizes) if result.batch_sizes else 0.0,
        "batches": len(result.batch_sizes),
        "local_fraction": sum(r.batch == 0 for r in recs) / len(recs) if recs else math.nan,
        "per_kind": {k: _stats(v) for k, v in sorted(kinds.items())},
    }


def validate(predicted_ms: Sequence[float], measured_ms: Sequence[float]) -> dict[str, float]:
    """How well predicted latencies match measured ones, request by request.

    Parameters
    ----------
    predicted_ms, measured_ms : sequence of float
        The same requests, in the same order (measured values must be positive).

    Returns
    -------
    dict
        ``n``; ``median_rel_error`` and ``p90_rel_error`` of ``|predicted - measured| / measured``;
        ``within_20pct``: the fraction with a relative error of at most 0.2; ``median_bias``:
        the median of ``(predicted - measured) / measured`` (negative: the model is optimistic).
    """
    if len(predicted_ms) != len(measured_ms):
        raise ValueError(f"{len(predicted_ms)} predictions for {len(measured_ms)} measurements")
    if any(m <= 0 for m in measured_ms):
        raise ValueError("measured latencies must be positive")
    signed = [(p - m) / m for p, m in zip(predicted_ms, measured_ms, strict=True)]
    rel = [abs(e) for e in signed]
    return {
        "n": float(len(rel)),
        "median_rel_error": _percentile(rel, 50),
        "p90_rel_error": _percentile(rel, 90),
        "within_20pct": sum(e <= 0.2 for e in rel) / len(rel) if rel else math.nan,
        "median_bias": _percentile(signed, 50),
    }
