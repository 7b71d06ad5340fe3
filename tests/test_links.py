"""Clients behind emulated Wi-Fi / 4G / lossy 3G links and a dead link.

The links are :class:`link_emulator.EmulatedLink` TCP proxies (delay, bandwidth, TCP-style loss
stalls, random resets) between real clients and a real split server on 127.0.0.1: ``tc netem``
needs a kernel module these machines lack. The delays are checked on the schedule the link
computed, never on elapsed time. A round of the real client trainer runs over each link at
once: every client finishes its epoch, resets are retried and never train a step twice, and the
client on the dead link fails on its deadline while the others complete.
"""

from __future__ import annotations

import statistics
import threading

import pytest
import torch

from clients.trainer import TrainOptions, train_segment
from fsl.channel import ChannelIdentity
from fsl.grpc_channel import DataPlaneError, GrpcChannel
from fsl.models import build_model, split_model
from helpers import authority_and_identity, make_state
from link_emulator import LOSSY_3G, LTE, WIFI, EmulatedLink
from server.split_server import SplitServer

pytestmark = pytest.mark.integration

ACTIVATIONS = 32 * 16 * 14 * 14 * 4  # bytes of a (32, 16, 14, 14) float32 batch at cnn's conv1


def _identity(auth, name: str) -> ChannelIdentity:
    return ChannelIdentity(run_id="run-test", round=1, client_id=name, token=auth.issue(1, name))


def test_a_chunk_leaves_half_the_rtt_after_the_wire_has_serialized_it():
    link = EmulatedLink("127.0.0.1:9", rtt_ms=80.0, bandwidth_mbps=20.0)  # never started: its schedule only
    try:
        a, b = link.plan([ACTIVATIONS, ACTIVATIONS], at=10.0)
        serial = ACTIVATIONS * 8 / 20e6  # 160 ms at 20 Mbit/s
        assert a.serialize_s == pytest.approx(serial) and not a.lost
        assert a.release_at == pytest.approx(10.0 + serial + 0.040)
        assert b.release_at == pytest.approx(10.0 + 2 * serial + 0.040)  # the second waits for the wire
        (c,) = link.plan([100], at=20.0)  # an idle wire: only the propagation delay
        assert c.delay_s == pytest.approx(100 * 8 / 20e6 + 0.040)
    finally:
        link.close()


def test_jitter_stays_within_its_bound_and_a_lost_segment_stalls_the_chunks_behind_it():
    link = EmulatedLink("127.0.0.1:9", rtt_ms=50.0, jitter_ms=10.0, seed=4)
    try:
        delays = [link.plan([1000], at=0.0)[0].delay_s for _ in range(200)]  # a fresh pipe each
        assert min(delays) >= 0.025 - 0.005 - 1e-12 and max(delays) <= 0.025 + 0.005 + 1e-12
        assert max(delays) - min(delays) > 0.005  # it does jitter
    finally:
        link.close()
    lossy = EmulatedLink("127.0.0.1:9", rtt_ms=20.0, loss=0.5, rto_ms=200.0, seed=1)
    try:
        plan = lossy.plan([1448] * 50, at=0.0)  # one TCP segment each
        lost = [i for i, r in enumerate(plan) if r.lost]
        assert lost and lossy.stats.stalls == len(lost)
        first = lost[0]
        assert plan[first].delay_s == pytest.approx(0.010 + 0.200)
        # in order: every chunk after a stall leaves no earlier than the stalled one
        assert all(r.release_at >= plan[first].release_at for r in plan[first:])
    finally:
        lossy.close()


def test_real_traffic_is_scheduled_at_the_links_delay_and_bandwidth():
    auth, _ = authority_and_identity()
    _, _, state = make_state("cnn", "conv1", authority=auth, max_batch=64)
    server = SplitServer(state, "127.0.0.1:0").start()
    waits: list[float] = []
    try:
        x, y = torch.rand(32, 16, 14, 14), torch.randint(0, 10, (32,))  # 401 KB up, 401 KB down
        # the link computes its schedule on the real clock but does not sleep it: the test checks
        # the schedule, not how long the machine took
        with EmulatedLink(server.address, rtt_ms=80.0, bandwidth_mbps=20.0, sleep=waits.append) as link:
            with GrpcChannel(address=link.address, identity=_identity(auth, "slow")) as ch:
                ch.train_step(x, y)
                ch.train_step(x, y)
        up = [r for r in link.schedule if r.up]
        down = [r for r in link.schedule if not r.up]
        assert sum(r.nbytes for r in up) == link.stats.bytes_up > 2 * ACTIVATIONS
        assert sum(r.nbytes for r in down) == link.stats.bytes_down > 2 * ACTIVATIONS
        # every byte is charged its serialization at 20 Mbit/s, every chunk at least half the RTT on top
        assert sum(r.serialize_s for r in up) == pytest.approx(link.stats.bytes_up * 8 / 20e6)
        assert all(r.delay_s >= r.serialize_s + 0.040 - 1e-9 for r in link.schedule)
        # the sender waited for the scheduled releases, never longer than a chunk's delay
        assert waits and max(waits) <= max(r.delay_s for r in link.schedule)
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
        try:
            results[name] = train_segment(seg, x, y, ch, TrainOptions(epochs=1, batch_size=batch, lr=0.05))
        except DataPlaneError as e:
            results[name] = e
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
        err = results["dead"]  # its deadline ended it, not the test's timeout
        assert isinstance(err, DataPlaneError) and err.code.name == "DEADLINE_EXCEEDED", err
        assert not links["dead"].schedule  # a dead link delivers nothing
        delay = {}
        for name in ("wifi", "4g", "3g-resets"):
            stats = results[name]
            assert not isinstance(stats, Exception), (name, stats)
            assert stats.batches == n // batch and stats.examples == n, name
            delay[name] = statistics.mean(r.delay_s for r in links[name].schedule)
        # retried steps were answered from the server's record, never trained twice
        assert state.steps == 3 * (n // batch)
        assert links["3g-resets"].stats.resets >= 1
        assert all(torch.isfinite(p).all() for p in state.segment.parameters())
        # every chunk is held at least half its link's round trip less the jitter, and the
        # slower link schedules longer delays
        for name, figures in (("wifi", WIFI), ("4g", LTE), ("3g-resets", LOSSY_3G)):
            least = (figures["rtt_ms"] - figures["jitter_ms"]) / 2000.0
            assert min(r.delay_s for r in links[name].schedule) >= least - 1e-9, name
        assert delay["wifi"] < delay["4g"] < delay["3g-resets"]
        print(
            "\nmean scheduled delay per chunk (s): "
            + ", ".join(f"{k} {v:.3f}" for k, v in delay.items())
            + f"; 3g resets {links['3g-resets'].stats.resets}, stalls {links['3g-resets'].stats.stalls}"
        )
    finally:
        for link in links.values():
            link.close()
        server.stop(grace=None)
