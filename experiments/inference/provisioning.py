"""Stage-wise provisioning of a multi-exit model on always-on and on-demand servers.

The idea follows SERFLOW (Zhang & Matta, arXiv 2510.27182): a request passes a sequence of
stages, each ending in an exit classifier, and only the requests that do not exit go on. A
deep stage therefore sees a fraction of the load, and a burst reaching it is short-lived, so
each stage is provisioned on its own: always-on servers (VM-like: paid by the hour whether
busy or not) for the load it sees most of the time, on-demand workers (serverless-like: paid
per second of execution, with a cold start when a new one is needed) for the bursts above it.
This module is our own model of that trade-off, with pure functions and dataclasses:

* :func:`stage_demand`: requests/s reaching each stage in each window of a load trace;
* :func:`provision_stage` / :func:`provision`: how many always-on servers each stage gets
  (for a percentile of its per-window need, or the cost-optimal count) and what the
  overflow costs on demand;
* :func:`compare`: exit-aware provisioning against sizing every stage for the full load,
  both evaluated on the traffic that really reaches each stage.

Capacity follows from service time: one server with ``lanes`` executors kept below
``max_utilization`` serves ``lanes * max_utilization / service_s`` requests/s. An on-demand
worker serves one request at a time; the number needed in a window follows Little's law
(``rate * service_s``). Queueing within a window is not modelled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "FixedServers",
    "OnDemandWorkers",
    "ProvisioningResult",
    "Stage",
    "StagePlan",
    "compare",
    "load_from_trace",
    "provision",
    "provision_stage",
    "reach_fractions",
    "stage_demand",
    "stages_from_exit_fractions",
]


@dataclass(frozen=True)
class Stage:
    """One stage of a multi-exit model."""

    name: str  # identifier, e.g. the block its exit classifier follows
    service_ms: float  # service time of one request on one server lane (ms)
    # fraction of the requests *reaching* this stage that leave at its exit classifier (the last
    # stage's own value is ignored: whatever reaches it ends there)
    exit_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.service_ms <= 0 or not 0.0 <= self.exit_rate <= 1.0:
            raise ValueError(f"stage {self.name!r}: need service_ms > 0 and 0 <= exit_rate <= 1")


@dataclass(frozen=True)
class FixedServers:
    """Always-on servers (VM-like)."""

    cost_per_hour: float = 1.0  # price of one server for one hour, busy or idle
    lanes: int = 1  # requests one server runs at once
    # load a server is planned for, as a fraction of its capacity (headroom for queueing)
    max_utilization: float = 0.8

    def __post_init__(self) -> None:
        if self.cost_per_hour < 0 or self.lanes < 1 or not 0.0 < self.max_utilization <= 1.0:
            raise ValueError("need cost_per_hour >= 0, lanes >= 1 and 0 < max_utilization <= 1")

    def capacity_rps(self, service_ms: float) -> float:
        """Requests/s one server is planned to serve at ``service_ms`` per request."""
        return self.lanes * self.max_utilization * 1e3 / service_ms


@dataclass(frozen=True)
class OnDemandWorkers:
    """On-demand workers (serverless-like)."""

    # price of one second of execution (a "request-second"): by default three times the always-on
    # price per busy second
    cost_per_second: float = 1.0 / 3600 * 3
    cost_per_request: float = 0.0  # price per invocation
    # time a new worker takes to start (ms); billed, and added to the latency of the request that waits for it
    cold_start_ms: float = 500.0
    keep_alive_s: float = 600.0  # how long an idle worker stays warm (s)

    def __post_init__(self) -> None:
        if min(self.cost_per_second, self.cost_per_request, self.cold_start_ms, self.keep_alive_s) < 0:
            raise ValueError("on-demand prices and times must be non-negative")


@dataclass
class StagePlan:
    """Provisioning of one stage over a trace, and what it costs."""

    stage: str
    reach: float  # fraction of all requests that reach the stage, as planned for
    mean_rps: float  # requests/s that really reach it, averaged over the trace
    peak_rps: float
    fixed_servers: int
    fixed_cost: float
    on_demand_requests: float
    on_demand_seconds: float  # execution seconds billed, cold starts included
    cold_starts: int
    on_demand_cost: float
    fixed_utilization: float  # busy fraction of the always-on capacity (at 100% of it)
    need: list[float] = field(default_factory=list)  # servers needed per window, as planned for

    @property
    def cost(self) -> float:
        return self.fixed_cost + self.on_demand_cost

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cost"] = self.cost
        return d


@dataclass
class ProvisioningResult:
    """Provisioning of every stage."""

    policy: str
    exit_aware: bool
    stages: list[StagePlan]
    duration_s: float

    @property
    def cost(self) -> float:
        return sum(s.cost for s in self.stages)

    @property
    def fixed_cost(self) -> float:
        return sum(s.fixed_cost for s in self.stages)

    @property
    def on_demand_cost(self) -> float:
        return sum(s.on_demand_cost for s in self.stages)

    @property
    def fixed_servers(self) -> int:
        return sum(s.fixed_servers for s in self.stages)

    @property
    def cold_starts(self) -> int:
        return sum(s.cold_starts for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "exit_aware": self.exit_aware,
            "duration_s": self.duration_s,
            "cost": self.cost,
            "fixed_cost": self.fixed_cost,
            "on_demand_cost": self.on_demand_cost,
            "fixed_servers": self.fixed_servers,
            "cold_starts": self.cold_starts,
            "stages": [s.to_dict() for s in self.stages],
        }


# ---------------------------------------------------------------------- load


def reach_fractions(stages: Sequence[Stage]) -> list[float]:
    """Fraction of all requests that reach each stage: the product of earlier non-exit rates."""
    out, alive = [], 1.0
    for s in stages:
        out.append(alive)
        alive *= 1.0 - s.exit_rate
    return out


def stages_from_exit_fractions(
    names: Sequence[str], service_ms: Sequence[float], exit_fractions: Sequence[float]
) -> list[Stage]:
    """Stages from the fraction of *all* requests that exit at each stage.

    ``exit_fractions[i]`` is the share of every request that leaves at stage ``i``; the shares
    must add up to at most 1 (what is left ends at the last stage).
    """
    if not len(names) == len(service_ms) == len(exit_fractions):
        raise ValueError("names, service_ms and exit_fractions must have the same length")
    if any(f < 0 for f in exit_fractions) or sum(exit_fractions) > 1 + 1e-9:
        raise ValueError("exit fractions must be non-negative and add up to at most 1")
    stages, alive = [], 1.0
    for name, ms, f in zip(names, service_ms, exit_fractions, strict=True):
        rate = min(1.0, f / alive) if alive > 1e-12 else 1.0
        stages.append(Stage(name, ms, rate))
        alive -= f
    return stages


def load_from_trace(arrivals_ms: Sequence[float], window_s: float, duration_ms: float | None = None) -> list[float]:
    """Requests/s in consecutive windows of ``window_s`` seconds of an arrival trace."""
    if window_s <= 0:
        raise ValueError("window_s must be positive")
    end = duration_ms if duration_ms is not None else (max(arrivals_ms) if arrivals_ms else 0.0)
    n = max(1, math.ceil(end / (window_s * 1e3)))
    counts = [0] * n
    for t in arrivals_ms:
        k = int(t // (window_s * 1e3))
        if 0 <= k < n:
            counts[k] += 1
    return [c / window_s for c in counts]


def stage_demand(stages: Sequence[Stage], load_rps: Sequence[float], exit_aware: bool = True) -> list[list[float]]:
    """Requests/s reaching each stage in each window (``[stage][window]``).

    Without ``exit_aware`` every stage sees the full load (how a provisioner that ignores the
    exits sizes the stages).
    """
    reach = reach_fractions(stages) if exit_aware else [1.0] * len(stages)
    return [[r * rate for rate in load_rps] for r in reach]


# ---------------------------------------------------------------------- cost of one stage


def _evaluate(
    stage: Stage,
    actual_rps: Sequence[float],
    n_fixed: int,
    window_s: float,
    fixed: FixedServers,
    on_demand: OnDemandWorkers,
) -> tuple[float, float, float, int, float, float]:
    """Cost of ``n_fixed`` always-on servers plus on-demand overflow on the real traffic.

    Returns fixed cost, on-demand requests, on-demand billed seconds, cold starts, on-demand
    cost and the always-on utilization.
    """
    duration_s = window_s * len(actual_rps)
    service_s = stage.service_ms / 1e3
    capacity = n_fixed * fixed.capacity_rps(stage.service_ms)
    keep = max(1, math.ceil(on_demand.keep_alive_s / window_s))  # windows a worker stays warm
    od_requests = od_seconds = 0.0
    cold = 0
    history: list[int] = []  # on-demand workers busy in each window
    served_fixed = 0.0
    for rate in actual_rps:
        overflow = max(0.0, rate - capacity)
        served_fixed += (rate - overflow) * window_s
        workers = math.ceil(overflow * service_s - 1e-9) if overflow > 0 else 0  # Little's law
        warm = max(history[-keep:], default=0)
        cold += max(0, workers - warm)
        history.append(workers)
        od_requests += overflow * window_s
        od_seconds += overflow * window_s * service_s
    od_seconds += cold * on_demand.cold_start_ms / 1e3
    od_cost = od_seconds * on_demand.cost_per_second + od_requests * on_demand.cost_per_request
    fixed_cost = n_fixed * fixed.cost_per_hour * duration_s / 3600
    full_capacity = n_fixed * fixed.lanes * duration_s / service_s  # requests at 100% busy
    utilization = served_fixed / full_capacity if full_capacity > 0 else 0.0
    return fixed_cost, od_requests, od_seconds, cold, od_cost, utilization


def provision_stage(
    stage: Stage,
    planned_rps: Sequence[float],
    actual_rps: Sequence[float],
    window_s: float,
    fixed: FixedServers,
    on_demand: OnDemandWorkers,
    percentile: float | None = 50.0,
    reach: float = 1.0,
) -> StagePlan:
    """Provision one stage: always-on servers sized from ``planned_rps``, costed on ``actual_rps``.

    Parameters
    ----------
    stage : Stage
    planned_rps : sequence of float
        Requests/s per window the provisioner believes reach the stage.
    actual_rps : sequence of float
        Requests/s per window that really reach it (the overflow above the always-on capacity
        goes to on-demand workers).
    window_s : float
        Length of a window (s).
    fixed, on_demand
        The two resource kinds and their prices.
    percentile : float or None
        Always-on servers cover this percentile of the per-window need (0: none, on-demand
        only; 100: the peak, always-on only). ``None``: the count that minimizes the cost on
        ``planned_rps`` (a server is kept on while it would be busy long enough to be cheaper
        than the same work on demand).
    reach : float
        Fraction of all requests the plan assumes reach the stage (reported only).

    Returns
    -------
    StagePlan
    """
    if len(planned_rps) != len(actual_rps) or not planned_rps:
        raise ValueError("planned_rps and actual_rps must be non-empty and of the same length")
    per_server = fixed.capacity_rps(stage.service_ms)
    need = [rate / per_server for rate in planned_rps]  # servers per window, fractional
    if percentile is None:

        def planned_cost(n: int) -> tuple[float, int]:
            fixed_cost, _, _, _, od_cost, _ = _evaluate(stage, planned_rps, n, window_s, fixed, on_demand)
            return fixed_cost + od_cost, n  # ties: fewer servers

        n_fixed = min(range(0, math.ceil(max(need) - 1e-9) + 1), key=planned_cost)
    else:
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {percentile}")
        n_fixed = math.ceil(float(np.percentile(need, percentile)) - 1e-9) if percentile > 0 else 0
    fixed_cost, od_req, od_s, cold, od_cost, util = _evaluate(stage, actual_rps, n_fixed, window_s, fixed, on_demand)
    return StagePlan(
        stage=stage.name,
        reach=reach,
        mean_rps=sum(actual_rps) / len(actual_rps),
        peak_rps=max(actual_rps),
        fixed_servers=n_fixed,
        fixed_cost=fixed_cost,
        on_demand_requests=od_req,
        on_demand_seconds=od_s,
        cold_starts=cold,
        on_demand_cost=od_cost,
        fixed_utilization=util,
        need=need,
    )


def provision(
    stages: Sequence[Stage],
    load_rps: Sequence[float],
    window_s: float,
    fixed: FixedServers | None = None,
    on_demand: OnDemandWorkers | None = None,
    percentile: float | None = 50.0,
    exit_aware: bool = True,
) -> ProvisioningResult:
    """Provision every stage for a load trace.

    Parameters
    ----------
    stages : sequence of Stage
        The model's stages, in order.
    load_rps : sequence of float
        Requests/s entering the first stage, per window.
    window_s : float
        Window length (s).
    fixed, on_demand : optional
        Resource kinds (defaults: :class:`FixedServers` and :class:`OnDemandWorkers`).
    percentile : float or None
        See :func:`provision_stage`: 0 is on-demand only, 100 always-on only, values between
        mix them (always-on for the base load, on-demand for bursts), None cost-optimal.
    exit_aware : bool
        Size each stage for the traffic that reaches it; False sizes every stage for the full
        load. Either way the cost is evaluated on the traffic that really reaches each stage.

    Returns
    -------
    ProvisioningResult
    """
    if not stages or not load_rps:
        raise ValueError("need at least one stage and one window of load")
    fixed = fixed or FixedServers()
    on_demand = on_demand or OnDemandWorkers()
    actual = stage_demand(stages, load_rps, exit_aware=True)
    planned = stage_demand(stages, load_rps, exit_aware=exit_aware)
    reach = reach_fractions(stages) if exit_aware else [1.0] * len(stages)
    plans = [
        provision_stage(s, planned[i], actual[i], window_s, fixed, on_demand, percentile, reach[i])
        for i, s in enumerate(stages)
    ]
    name = (
        "cost-optimal"
        if percentile is None
        else "on-demand only"
        if percentile == 0
        else "always-on only"
        if percentile == 100
        else f"mixed p{percentile:g}"
    )
    return ProvisioningResult(name, exit_aware, plans, window_s * len(load_rps))


def compare(
    stages: Sequence[Stage],
    load_rps: Sequence[float],
    window_s: float,
    fixed: FixedServers | None = None,
    on_demand: OnDemandWorkers | None = None,
    percentiles: Sequence[float | None] = (0.0, 50.0, 90.0, 100.0, None),
) -> dict[str, Any]:
    """Exit-aware against full-load provisioning, for several mixing policies.

    Returns
    -------
    dict
        ``policies``: for every policy name, ``exit_aware`` and ``full`` results (as dicts) and
        ``reduction`` = 1 - exit-aware cost / full cost; ``best``: the cheapest exit-aware
        policy; ``reach``: the fraction of requests reaching each stage.
    """
    out: dict[str, Any] = {"reach": reach_fractions(stages), "policies": {}}
    best_name, best_cost = "", math.inf
    for q in percentiles:
        aware = provision(stages, load_rps, window_s, fixed, on_demand, q, exit_aware=True)
        full = provision(stages, load_rps, window_s, fixed, on_demand, q, exit_aware=False)
        out["policies"][aware.policy] = {
            "exit_aware": aware.to_dict(),
            "full": full.to_dict(),
            "reduction": 1.0 - aware.cost / full.cost if full.cost > 0 else 0.0,
        }
        if aware.cost < best_cost:
            best_name, best_cost = aware.policy, aware.cost
    out["best"] = best_name
    return out
