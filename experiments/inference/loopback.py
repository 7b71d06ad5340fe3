"""Real split inference on loopback with emulated devices and links, to validate the simulator.

Everything that can be real here is: the client segments run in torch on this host, the
activations travel over the gRPC data plane to real split servers (one per cut point, all
sharing the one model's weights) that batch under the requests' latency budgets
(:class:`server.infer_batching.InferBatcher`). What this host cannot be is emulated the way
``tc netem`` would: a device slower than the host sleeps for the difference after its real
compute, and each transfer waits for the time its :class:`NetworkProfile` gives before the
bytes are sent (uplink) and after they arrive (downlink).

The arrivals are the simulator's own (:func:`experiments.inference.simulate.poisson_trace` with the
same seeds), so :func:`run_loopback` and :func:`experiments.inference.simulate.simulate` see the same
requests and their latencies can be compared one by one (:func:`experiments.inference.simulate.validate`).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from experiments.inference.profiles import INPUT, ModelProfile
from experiments.inference.simulate import Policy, RequestRecord, SimDevice, SimServerConfig, poisson_trace

__all__ = ["LoopbackServers", "PerDevice", "run_loopback"]


@dataclass
class _Cut:
    client: nn.Module  # blocks up to the cut (empty for INPUT)
    server: nn.Module  # the rest
    address: str


class LoopbackServers:
    """One split server per cut point of ``model`` on 127.0.0.1, each with its own batcher."""

    def __init__(
        self, model: nn.Sequential, input_shape: tuple[int, ...], cuts: Sequence[str], server: SimServerConfig
    ) -> None:
        from fsl.models import cut_shape
        from server.infer_batching import InferBatcher
        from server.split_server import SplitServer, SplitServerState

        model.eval()
        blocks = list(model.named_children())
        names = [n for n, _ in blocks]
        self.cuts: dict[str, _Cut] = {}
        self._servers: list[SplitServer] = []
        self._batchers: list[InferBatcher] = []
        for cut in cuts:
            k = 0 if cut == INPUT else names.index(cut) + 1
            client = nn.Sequential(OrderedDict(blocks[:k])).eval()
            rest = nn.Sequential(OrderedDict(blocks[k:])).eval()
            shape = tuple(input_shape) if k == 0 else cut_shape(client, input_shape)
            state = SplitServerState(
                rest, sample_shape=shape, num_classes=10, device="cpu", inference_only=True, model_name="", cut=cut
            )
            batcher = InferBatcher(state, max_samples=server.max_batch, max_wait_ms=server.max_wait_ms)
            srv = SplitServer(state, "127.0.0.1:0", infer_batcher=batcher, max_workers=32).start()
            self._servers.append(srv)
            self._batchers.append(batcher)
            self.cuts[cut] = _Cut(client, rest, srv.address)

    def close(self) -> None:
        for s in self._servers:
            s.stop(grace=None)
        for b in self._batchers:
            b.close()


def run_loopback(
    model: nn.Sequential,
    input_shape: tuple[int, ...],
    profile: ModelProfile,
    fleet: Sequence[SimDevice],
    policy: Policy,
    server: SimServerConfig,
    duration_ms: float,
    x_pool: torch.Tensor,
    seed: int = 0,
) -> list[RequestRecord]:
    """Run ``fleet``'s requests for real (see the module docstring); one :class:`RequestRecord` per request.

    ``server.device.speed`` is taken as 1 (the split servers run on this host); per-device speeds
    below 1 are emulated by sleeping. ``x_pool`` (N, C, H, W) supplies the inputs, in turn.
    """
    from fsl.channel import ChannelIdentity
    from fsl.grpc_channel import GrpcChannel

    cuts = sorted({*profile.cuts, INPUT} - {profile.last_block})
    servers = LoopbackServers(model, input_shape, cuts, server)
    records: list[RequestRecord] = []
    lock = threading.Lock()
    t_start = time.perf_counter() + 0.5  # every device starts its clock here

    pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="loopback-link")

    def finish(d: SimDevice, meta: tuple, end_ms: float, net: float, wait: float, server_ms: float, batch: int) -> None:
        rid, t, now_ms, cut, dev_ms = meta
        rec = RequestRecord(
            request=rid,
            device=d.name,
            kind=d.kind,
            tier=d.device.tier,
            cut=cut,
            arrival_ms=t,
            finish_ms=end_ms,
            latency_ms=end_ms - t,
            target_ms=d.target_ms,
            met_target=end_ms - t <= d.target_ms,
            device_ms=dev_ms,
            device_queue_ms=max(0.0, now_ms - t),
            network_ms=net,
            server_ms=server_ms,
            wait_ms=wait,
            queue_ms=0.0,
            batch=batch,
            exited=False,
            predicted_ms=0.0,
        )
        with lock:
            records.append(rec)
            policy.feedback(d, rec)

    def remote_part(d: SimDevice, ch: Any, h: torch.Tensor, meta: tuple) -> None:
        t = meta[1]
        up = d.network.transfer_ms(h[0].numel() * 4, "up")
        down = d.network.transfer_ms(profile.logits_bytes, "down")
        time.sleep(up / 1000.0)  # uplink
        spent = (time.perf_counter() - t_start) * 1000.0 - t
        ch.infer(h, budget_ms=max(0.1, d.target_ms - spent - down))
        info = ch.last_infer
        time.sleep(down / 1000.0)  # downlink
        end = (time.perf_counter() - t_start) * 1000.0
        finish(d, meta, end, up + down, info.queue_ms, info.compute_ms / max(1, info.batch), info.batch)

    def device_loop(i: int, d: SimDevice) -> None:
        pending: list[Any] = []
        times = (
            sorted(d.arrivals_ms)
            if d.arrivals_ms is not None
            else poisson_trace(d.rate_hz, duration_ms, seed=seed * 1_000_003 + i)
        )
        channels = {
            cut: GrpcChannel(address=c.address, identity=ChannelIdentity(client_id=d.name))
            for cut, c in servers.cuts.items()
        }
        free_at = 0.0
        try:
            for rid, t in enumerate(times):
                if not 0 <= t < duration_ms:
                    continue
                _sleep_until(t_start + t / 1000.0)
                now_ms = (time.perf_counter() - t_start) * 1000.0
                with lock:
                    cut = policy.choose(d, now_ms, max(0.0, free_at - now_ms))
                x = x_pool[(i * 7919 + rid) % len(x_pool)].unsqueeze(0)  # (1, C, H, W)
                c0 = time.perf_counter()
                with torch.no_grad():
                    if cut == profile.last_block:
                        h = model(x)
                    else:
                        h = servers.cuts[cut].client(x)  # (1, ...) at the cut; x itself for INPUT
                real_ms = (time.perf_counter() - c0) * 1000.0
                dev_ms = 0.0
                if cut != INPUT:
                    dev_ms = real_ms / d.device.speed
                    _sleep_until(c0 + dev_ms / 1000.0)  # a slower device: the rest of its compute time
                remote = cut != profile.last_block
                free_at = (time.perf_counter() - t_start) * 1000.0  # the device is free again; transfers overlap
                meta = (rid, t, now_ms, cut, dev_ms)
                if remote:
                    pending.append(pool.submit(remote_part, d, channels[cut], h, meta))
                else:
                    finish(d, meta, free_at, 0.0, 0.0, 0.0, 0)
            for f in pending:
                f.result()
        finally:
            for ch in channels.values():
                ch.close()

    threads = [threading.Thread(target=device_loop, args=(i, d), daemon=True) for i, d in enumerate(fleet)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        pool.shutdown(wait=True)
        servers.close()
    return sorted(records, key=lambda r: (r.device, r.arrival_ms))


@dataclass
class PerDevice:
    """A fixed cut per device (by name): the policy a validation run replays in both worlds."""

    cuts: dict[str, str]

    def choose(self, device: SimDevice, now_ms: float, backlog_ms: float) -> str:
        return self.cuts[device.name]

    def feedback(self, device: SimDevice, record: RequestRecord) -> None:
        return None


def _sleep_until(t: float) -> None:
    left = t - time.perf_counter()
    if left > 0:
        time.sleep(left)
