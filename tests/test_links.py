"""Clients behind emulated Wi-Fi / 4G / lossy 3G links and a dead link (issue 7).

The links are :class:`fsl.links.EmulatedLink` TCP proxies (delay, bandwidth, TCP-style loss
stalls, random resets) between real clients and a real split server on 127.0.0.1: ``tc netem``
needs a kernel module these machines lack. A round of the real client trainer runs over each
link at once: every client finishes its epoch, resets are retried and never train a step twice,
and the client on the dead link fails on its deadline while the others complete.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from clients.trainer import TrainOptions, train_segment
from fsl.channel import ChannelIdentity
from fsl.grpc_channel import DataPlaneError, GrpcChannel
from fsl.links import LOSSY_3G, LTE, WIFI, EmulatedLink
from fsl.models import build_model, split_model
from helpers import authority_and_identity, make_state
from server.split_server import SplitServer

pytestmark = pytest.mark.integration


def _identity(auth, name: str) -> ChannelIdentity:
    return ChannelIdentity(run_id="run-test", round=1, client_id=name, token=auth.issue(1, name))


def test_emulated_link_adds_its_delay_and_serializes_at_its_bandwidth():
    auth, _ = authority_and_identity()
    _, _, state = make_state("cnn", "conv1", authority=auth, max_batch=64)
    server = SplitServer(state, "127.0.0.1:0").start()
    try:
        x, y = torch.rand(32, 16, 14, 14), torch.randint(0, 10, (32,))  # 401 KB up, 401 KB down
        with GrpcChannel(address=server.address, identity=_identity(auth, "direct")) as ch:
            ch.train_step(x, y)
            t0 = time.perf_counter()
            ch.train_step(x, y)
            direct = time.perf_counter() - t0
        with EmulatedLink(server.address, rtt_ms=80.0, bandwidth_mbps=20.0) as link:
            with GrpcChannel(address=link.address, identity=_identity(auth, "slow")) as ch:
                ch.train_step(x, y)  # connection set-up
                t0 = time.perf_counter()
                ch.train_step(x, y)
                slow = time.perf_counter() - t0
        # 80 ms RTT + 2 x 401 KB at 20 Mbit/s = 80 + 321 ms on top of the direct step
        expected = 0.080 + 2 * 32 * 16 * 14 * 14 * 4 * 8 / 20e6
        assert slow - direct > 0.85 * expected, (slow, direct, expected)
        assert slow - direct < 2.0 * expected + 0.3, (slow, direct, expected)
        assert link.stats.bytes_up > 2 * 400_000 and link.stats.bytes_down > 2 * 400_000
    finally:
        server.stop(grace=None)


def test_a_round_over_wifi_4g_and_lossy_3g_completes_and_a_dead_link_times_out():
    auth, _ = authority_and_identity()
    _, _, state = make_state("cnn", "conv1", input_shape=(1, 8, 8), authority=auth, max_batch=64)  # digits
    server = SplitServer(state, "127.0.0.1:0").start()
    links = {
        "wifi": EmulatedLink(server.address, **WIFI, seed=1),
        "4g": EmulatedLink(server.address, **LTE, seed=2),
        "3g-resets": EmulatedLink(server.address, **LOSSY_3G, reset_rate_hz=1.0, seed=3),
        "dead": EmulatedLink(server.address, blackhole=True),
    }
    n, batch = 256, 32
    results: dict[str, object] = {}

    def client(name: str, link: EmulatedLink) -> None:
        torch.manual_seed(0)
        seg = split_model(build_model("cnn", input_shape=(1, 8, 8), seed=0), "conv1").client
        x, y = torch.rand(n, 1, 8, 8), torch.randint(0, 10, (n,))
        dead = name == "dead"
        ch = GrpcChannel(
            address=link.address,
            identity=_identity(auth, name),
            timeout_s=2.0 if dead else 30.0,
            retries=0 if dead else 10,
        )
        t0 = time.perf_counter()
        try:
            stats = train_segment(seg, x, y, ch, TrainOptions(epochs=1, batch_size=batch, lr=0.05))
            results[name] = (stats, time.perf_counter() - t0)
        except DataPlaneError as e:
            results[name] = (e, time.perf_counter() - t0)
        finally:
            ch.close()

    try:
        for link in links.values():
            link.start()
        threads = [threading.Thread(target=client, args=kv) for kv in links.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=240)
        assert not any(t.is_alive() for t in threads)
        err, dead_s = results["dead"]
        assert isinstance(err, DataPlaneError) and err.code.name == "DEADLINE_EXCEEDED", err
        assert dead_s < 10  # the deadline ended it, not the test's timeout
        per_batch = {}
        for name in ("wifi", "4g", "3g-resets"):
            stats, secs = results[name]
            assert not isinstance(stats, Exception), (name, stats)
            assert stats.batches == n // batch and stats.examples == n, name
            per_batch[name] = secs / stats.batches
        # retried steps were answered from the server's record, never trained twice
        assert state.steps == 3 * (n // batch)
        assert links["3g-resets"].stats.resets >= 1
        assert all(torch.isfinite(p).all() for p in state.segment.parameters())
        # each link costs at least its round trip per batch, and the slower link is slower
        assert per_batch["4g"] > 0.05 and per_batch["3g-resets"] > 0.15
        assert per_batch["wifi"] < per_batch["4g"] < per_batch["3g-resets"]
        print(
            "\nseconds per batch: "
            + ", ".join(f"{k} {v:.3f}" for k, v in per_batch.items())
            + f"; 3g resets {links['3g-resets'].stats.resets}, stalls {links['3g-resets'].stats.stalls}"
        )
    finally:
        for link in links.values():
            link.close()
        server.stop(grace=None)
