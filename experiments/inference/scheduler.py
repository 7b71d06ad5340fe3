"""Choose where to cut each inference request: a latency model and a least-server-cost planner.

For one request (batch 1 on the device) and a cut, the predicted latency is::

    device compute of blocks up to the cut      (host ms / device speed)
  + uplink of the cut's bytes                   (NetworkProfile.transfer_ms)
  + server queue / batching wait                (given, plus what observations learned)
  + server compute of the remaining blocks      (at the server's speed and batch)
  + downlink of the logits

and its server cost is the server compute it takes: the batch's service time divided by the
batch size. The cut ``"input"`` is all-cloud; the model's last block is all-on-device, which
needs no network and no server.

With early exits, ``exit_probability[cut]`` is the fraction of requests whose exit classifier
at ``cut`` is confident enough to stop on the device: those never reach the server, so the
expected server cost is ``(1 - p)`` times the full one and the expected latency is
``p * device_ms + (1 - p) * full``. The exit head's own compute is not modelled (it is small
next to a block). By default a plan must meet the target on the slow path (a request that
does not exit); ``meet_on="expected"`` plans on the mean instead.

:class:`Scheduler` keeps, per device, EWMA corrections learned from measured latencies (the
device's effective speed, a factor on its network times, an extra wait on the server path)
so that :meth:`Scheduler.plan` re-plans when a device gets slower or its network changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from experiments.inference.profiles import INPUT, DeviceProfile, ModelProfile, NetworkProfile

__all__ = ["Plan", "Scheduler", "predict"]


@dataclass(frozen=True)
class Plan:
    """The predicted cost of serving one request at one cut.

    Attributes
    ----------
    cut : str
        Last block run on the device (``"input"``: none; the last block: all).
    predicted_ms : float
        Expected end-to-end latency (ms), early exits included.
    server_ms : float
        Expected server compute spent on the request (ms at the server).
    device_ms : float
        Device compute (ms).
    bytes_up : int
        Bytes sent to the server (0 for all-on-device).
    feasible : bool
        Whether the plan meets the latency target and fits the device's memory.
    tail_ms : float
        Latency of a request that does not exit early (equal to ``predicted_ms`` without exits).
    network_ms : float
        Uplink + downlink time of a request that reaches the server.
    wait_ms : float
        Server queue / batching wait assumed.
    server_flops : float
        Expected server FLOPs for the request.
    exit_probability : float
        Fraction of requests assumed to exit on the device at ``cut``.
    """

    cut: str
    predicted_ms: float
    server_ms: float
    device_ms: float
    bytes_up: int
    feasible: bool
    tail_ms: float = 0.0
    network_ms: float = 0.0
    wait_ms: float = 0.0
    server_flops: float = 0.0
    exit_probability: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def predict(
    profile: ModelProfile,
    device: DeviceProfile,
    network: NetworkProfile,
    server: DeviceProfile,
    cut: str,
    server_wait_ms: float = 0.0,
    server_batch: int = 1,
    exit_probability: float = 0.0,
    network_factor: float = 1.0,
    device_wait_ms: float = 0.0,
) -> Plan:
    """Predicted latency and server cost of one request (batch 1 on the device) at ``cut``.

    Parameters
    ----------
    profile : ModelProfile
        The model's per-block costs on the profiling host.
    device, server : DeviceProfile
        Where the two segments run (``speed`` relative to the profiling host).
    network : NetworkProfile
        The device's link to the server.
    cut : str
        ``"input"``, or a block name (the last block: all on the device).
    server_wait_ms : float
        Time the request waits at the server for a lane and for its batch to fill.
    server_batch : int
        Batch the server segment runs at: the request waits for the whole batch's service time
        and is charged ``1 / server_batch`` of it.
    exit_probability : float
        Fraction of requests that exit on the device at ``cut``.
    network_factor : float
        Multiplier on transfer times (a learned correction; 1 = as the profile says).
    device_wait_ms : float
        Time until the device is free to compute (its backlog); only cuts that compute on the
        device wait for it.

    Returns
    -------
    Plan
        ``feasible`` is left True; :class:`Scheduler` decides it against a target.
    """
    if not 0.0 <= exit_probability <= 1.0:
        raise ValueError(f"exit probability at {cut!r} must be in [0, 1], got {exit_probability}")
    device_ms = device.compute_ms(profile, profile.client_blocks(cut), 1)
    local_ms = device_ms + (device_wait_ms if device_ms > 0 else 0.0)  # until the device is done
    remote = profile.server_blocks(cut)
    if not remote:  # all on the device: no network, no server
        return Plan(cut, local_ms, 0.0, device_ms, 0, True, tail_ms=local_ms, exit_probability=exit_probability)
    bytes_up = profile.cut_bytes(cut)
    network_ms = network_factor * (
        network.transfer_ms(bytes_up, "up") + network.transfer_ms(profile.logits_bytes, "down")
    )
    service_ms = server.compute_ms(profile, remote, server_batch)  # the whole batch's service time
    tail = local_ms + network_ms + server_wait_ms + service_ms
    p = 0.0 if cut == INPUT else exit_probability  # nothing runs on the device to exit from
    return Plan(
        cut=cut,
        predicted_ms=p * local_ms + (1 - p) * tail,
        server_ms=(1 - p) * service_ms / server_batch,
        device_ms=device_ms,
        bytes_up=bytes_up,
        feasible=True,
        tail_ms=tail,
        network_ms=network_ms,
        wait_ms=server_wait_ms,
        server_flops=(1 - p) * profile.flops(remote),
        exit_probability=p,
    )


@dataclass
class _Learned:
    """What observations taught about one device (EWMA)."""

    device: DeviceProfile | None = None  # declared profile of the last plan
    network: NetworkProfile | None = None  # declared network of the last plan
    speed: float | None = None  # effective compute speed
    network_factor: float = 1.0  # multiplier on transfer times
    extra_wait_ms: float = 0.0  # unexplained time on the server path
    observations: int = 0


class Scheduler:
    """Per-request cut selection: the cheapest plan for the server that meets the target.

    Parameters
    ----------
    model_profile : ModelProfile
        Per-block costs of the model on the profiling host.
    server : DeviceProfile
        The machine running server segments.
    cuts : sequence of str, optional
        Cuts to consider; default every cut from ``"input"`` to the last block.
    exit_probability : mapping, optional
        ``exit_probability[cut]``: fraction of requests that exit on the device at ``cut``.
    server_batch : int
        Batch size the server is expected to run at.
    alpha : float
        EWMA weight of a new observation.
    meet_on : str
        ``"tail"``: a plan meets the target when a request that does not exit does;
        ``"expected"``: when the expected latency does.
    networks : mapping, optional
        Current figures of named networks (updated by :meth:`observe_network`).
    forget : float
        Fraction of the learned corrections forgotten at every plan for a device (in log space
        for speed and network factor, towards the declared values). A device moved off a cut
        is no longer observed there; forgetting makes the planner try it again now and then
        instead of trusting a stale measurement forever. 0 keeps corrections until observed.
    headroom : float
        Fraction of the target kept free for what the latency model does not predict (jitter
        of compute and links, a batch that fills later than assumed): a plan is feasible when
        its latency is at most ``(1 - headroom) * target``. 0 plans to the edge of the target,
        where any variation misses it.
    """

    def __init__(
        self,
        model_profile: ModelProfile,
        server: DeviceProfile,
        cuts: Sequence[str] | None = None,
        exit_probability: Mapping[str, float] | None = None,
        server_batch: int = 1,
        alpha: float = 0.3,
        meet_on: str = "tail",
        networks: Mapping[str, NetworkProfile] | None = None,
        forget: float = 0.02,
        headroom: float = 0.0,
    ) -> None:
        if meet_on not in ("tail", "expected"):
            raise ValueError(f"meet_on must be 'tail' or 'expected', not {meet_on!r}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if server_batch < 1:
            raise ValueError(f"server_batch must be >= 1, got {server_batch}")
        self.profile = model_profile
        self.server = server
        self.cuts = list(model_profile.cuts if cuts is None else cuts)
        for c in self.cuts:
            model_profile.client_blocks(c)  # raises on an unknown cut
        self.exit_probability = dict(exit_probability or {})
        for c, p in self.exit_probability.items():
            if c not in model_profile.cuts or not 0.0 <= p <= 1.0:
                raise ValueError(f"exit probability {p} at {c!r}: need a known cut and 0 <= p <= 1")
        self.server_batch = server_batch
        self.alpha = alpha
        if not 0.0 <= forget < 1.0:
            raise ValueError(f"forget must be in [0, 1), got {forget}")
        self.forget = forget
        if not 0.0 <= headroom < 1.0:
            raise ValueError(f"headroom must be in [0, 1), got {headroom}")
        self.headroom = headroom
        self.meet_on = meet_on
        self.networks: dict[str, NetworkProfile] = dict(networks or {})
        self._learned: dict[str, _Learned] = {}

    # ------------------------------------------------------------------ what the scheduler believes
    def effective_device(self, device: DeviceProfile) -> DeviceProfile:
        """``device`` with the speed learned from observations (as declared before any)."""
        speed = self._learned.get(device.name, _Learned()).speed
        return device if speed is None else replace(device, speed=speed)

    def effective_network(self, network: NetworkProfile) -> NetworkProfile:
        """``network`` with the figures last reported by :meth:`observe_network`."""
        return self.networks.get(network.name, network)

    def plans(
        self,
        device: DeviceProfile,
        network: NetworkProfile,
        target_ms: float,
        server_wait_ms: float = 0.0,
        device_wait_ms: float = 0.0,
    ) -> list[Plan]:
        """Every candidate cut's plan, feasibility decided against ``target_ms`` less the headroom."""
        learned = self._learned.setdefault(device.name, _Learned())
        learned.device, learned.network = device, network
        if self.forget and learned.observations:
            keep = 1.0 - self.forget
            if learned.speed is not None:
                learned.speed = device.speed * (learned.speed / device.speed) ** keep
            learned.network_factor **= keep
            learned.extra_wait_ms *= keep
        dev, net = self.effective_device(device), self.effective_network(network)
        budget = target_ms * (1.0 - self.headroom)
        out = []
        for cut in self.cuts:
            plan = predict(
                self.profile,
                dev,
                net,
                self.server,
                cut,
                server_wait_ms=server_wait_ms + learned.extra_wait_ms,
                server_batch=self.server_batch,
                exit_probability=self.exit_probability.get(cut, 0.0),
                network_factor=learned.network_factor,
                device_wait_ms=device_wait_ms,
            )
            if not self.profile.server_blocks(cut):  # all local: nothing waits at the server
                plan = replace(plan, wait_ms=0.0)
            latency = plan.tail_ms if self.meet_on == "tail" else plan.predicted_ms
            fits = device.fits(self.profile, self.profile.client_blocks(cut))
            out.append(replace(plan, feasible=fits and latency <= budget))
        return out

    def plan(
        self,
        device: DeviceProfile,
        network: NetworkProfile,
        target_ms: float,
        server_wait_ms: float = 0.0,
        device_wait_ms: float = 0.0,
    ) -> Plan:
        """The plan for one request of ``device`` over ``network`` with a latency target.

        ``server_wait_ms`` is the queue / batching wait expected at the server (what
        observations taught is added to it); ``device_wait_ms`` is the device's own backlog,
        which delays every cut that computes on the device.

        Among cuts that meet ``target_ms`` (less the headroom) and whose device segment fits the
        device's memory, the one with the least expected server compute (ties: the lowest
        latency). When none meets the target, the lowest-latency plan that fits in memory, marked
        infeasible.
        """
        plans = self.plans(device, network, target_ms, server_wait_ms, device_wait_ms)
        feasible = [p for p in plans if p.feasible]
        if feasible:
            return min(feasible, key=lambda p: (round(p.server_ms, 9), p.predicted_ms))
        fitting = [p for p in plans if device.fits(self.profile, self.profile.client_blocks(p.cut))]
        return min(fitting or plans, key=lambda p: p.predicted_ms)

    # ------------------------------------------------------------------ learning from measurements
    def _ewma(self, old: float, new: float) -> float:
        return (1 - self.alpha) * old + self.alpha * new

    def observe(
        self,
        device_name: str,
        cut: str,
        measured_ms: float,
        device_ms: float | None = None,
        network_ms: float | None = None,
        server_wait_ms: float = 0.0,
        device: DeviceProfile | None = None,
        network: NetworkProfile | None = None,
    ) -> None:
        """Learn from the measured end-to-end latency of one request served at ``cut``.

        Parameters
        ----------
        device_name : str
            The device that sent the request (the key of what is learned).
        cut : str
            The cut it was served at.
        measured_ms : float
            Its end-to-end latency, less any wait for the device's own backlog.
        device_ms, network_ms : float, optional
            The device's own compute time and the uplink + downlink time, when known (a device
            times its own segment; the network time follows from server timestamps in the reply).
        server_wait_ms : float
            The server wait assumed when planning.
        device, network : optional
            The declared profiles, for a device never planned for (otherwise those of its last
            :meth:`plan` are used).

        Notes
        -----
        What the parts the caller measured do not explain is put, in this order, on the
        device's speed (if it computed anything and ``device_ms`` is unknown), on its network
        (if the request crossed it and ``network_ms`` is unknown), else on an extra wait on the
        server path. Each correction is an EWMA with weight ``alpha``.
        """
        learned = self._learned.setdefault(device_name, _Learned())
        if device is not None:
            learned.device = device
        if network is not None:
            learned.network = network
        if learned.device is None or learned.network is None:
            raise ValueError(f"device {device_name!r} was never planned for; pass device= and network=")
        dev = self.effective_device(learned.device)
        pred = predict(
            self.profile,
            dev,
            self.effective_network(learned.network),
            self.server,
            cut,
            server_wait_ms=server_wait_ms + learned.extra_wait_ms,
            server_batch=self.server_batch,
            network_factor=learned.network_factor,
        )
        dev_part, net_part = pred.device_ms, pred.network_ms
        server_part = pred.tail_ms - dev_part - net_part  # wait + service (0 when all local)
        residual = (
            measured_ms
            - (dev_part if device_ms is None else device_ms)
            - (net_part if network_ms is None else network_ms)
            - server_part
        )
        implied_dev, implied_net = device_ms, network_ms
        if device_ms is None and dev_part > 0:
            implied_dev, residual = dev_part + residual, 0.0
        elif network_ms is None and net_part > 0:
            implied_net, residual = net_part + residual, 0.0
        if implied_dev is not None and dev_part > 0:
            # compute time scales as 1 / speed
            implied_speed = dev.speed * dev_part / max(implied_dev, 1e-3 * dev_part)
            learned.speed = self._ewma(dev.speed, implied_speed)
        if implied_net is not None and net_part > 0:
            raw_net = net_part / learned.network_factor
            learned.network_factor = self._ewma(learned.network_factor, max(implied_net, 0.0) / raw_net)
        if server_part > 0 and residual != 0.0:
            learned.extra_wait_ms = max(0.0, learned.extra_wait_ms + self.alpha * residual)
        learned.observations += 1

    def observe_network(self, name: str, bandwidth_mbps: float | None = None, rtt_ms: float | None = None) -> None:
        """Report new figures for network ``name`` (from a probe, or the OS's link estimate).

        The next plans over that network use them. Learned per-device network factors are reset
        to 1 for devices on it, since the new figures replace what they corrected for.
        """
        base = self.networks.get(name) or next(
            (e.network for e in self._learned.values() if e.network is not None and e.network.name == name), None
        )
        if base is None:
            if bandwidth_mbps is None or rtt_ms is None:
                raise ValueError(f"network {name!r} is unknown here; give both bandwidth_mbps and rtt_ms")
            base = NetworkProfile(name, bandwidth_mbps, rtt_ms)
        self.networks[name] = base.with_(bandwidth_mbps=bandwidth_mbps, rtt_ms=rtt_ms)
        for learned in self._learned.values():
            if learned.network is not None and learned.network.name == name:
                learned.network_factor = 1.0

    def learned(self, device_name: str) -> dict[str, Any]:
        """What observations taught about ``device_name``: speed, network factor, extra wait."""
        learned = self._learned.get(device_name, _Learned())
        return {
            "speed": learned.speed,
            "network_factor": learned.network_factor,
            "extra_wait_ms": learned.extra_wait_ms,
            "observations": learned.observations,
        }
