"""Per-client state on the split server lives for one round (real gRPC on 127.0.0.1).

Runs of hundreds or thousands of clients, a few per round, must not keep every client ever seen:
several rounds train with different clients each, and after each round's ``end_round`` the retry
cache, the pending forwards, the per-client traffic table, the replica assignment and the batcher's
lanes hold nothing (at most the last round's clients), while a retry inside a round is still
answered from the cache and the run's traffic totals still give each round's numbers.
"""

from __future__ import annotations

import grpc
import pytest
import torch

from clocks import ManualClock
from fsl.auth import RoundAuthority
from fsl.channel import ChannelIdentity
from fsl.grpc_channel import GrpcChannel
from fsl.wire import codec
from fsl.wire import dataplane_pb2 as pb
from fsl.wire import dataplane_pb2_grpc as pb_grpc
from helpers import make_state
from server.batching import RequestBatcher
from server.split_server import SplitServer
from server.timeline import Timeline

pytestmark = pytest.mark.integration

SHAPE = (16, 14, 14)  # cnn at cut conv1
RUN = "run-rounds"
EMPTY = {"retry_cache": 0, "pending": 0, "traffic": 0, "label_counts": 0, "assignment": 0, "replicas": 0}


def _request(auth: RoundAuthority, rnd: int, client: str, step: int, seed: int) -> pb.TrainRequest:
    g = torch.Generator().manual_seed(seed)
    return pb.TrainRequest(
        header=pb.Header(run_id=RUN, round=rnd, client_id=client, step=step, token=auth.issue(rnd, client)),
        activations=codec.encode(torch.rand(4, *SHAPE, generator=g)),
        labels=codec.encode(torch.randint(0, 10, (4,), generator=g)),
    )


@pytest.mark.parametrize(("mode", "batching"), [("fsl", False), ("fsl", True), ("sflv1", False)])
def test_per_client_state_is_released_after_each_round(mode, batching):
    auth = RoundAuthority(RUN)
    _, _, state = make_state("cnn", "conv1", authority=auth, max_batch=64, mode=mode)
    batcher = RequestBatcher(state, max_requests=4, max_wait_ms=0) if batching else None
    server = SplitServer(state, "127.0.0.1:0", batcher=batcher).start()
    stub_channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.SplitDataPlaneStub(stub_channel)
    try:
        steps_before = 0
        for rnd in (1, 2, 3):
            clients = [f"r{rnd}-c{i}" for i in range(3)]  # nobody trains in two rounds
            auth.open_round(rnd)
            # fsl: everyone on the global segment; sflv1: a copy per client
            state.open_replicas({c: ("g0" if mode == "fsl" else f"g{i}") for i, c in enumerate(clients)})
            total0 = state.traffic_total()
            for i, c in enumerate(clients):
                ident = ChannelIdentity(run_id=RUN, round=rnd, client_id=c, token=auth.issue(rnd, c))
                with GrpcChannel(address=server.address, identity=ident) as ch:
                    for _ in range(2):
                        ch.train_step(torch.rand(4, *SHAPE), torch.randint(0, 10, (4,)))
                # a step sent twice (a lost reply): trained once, the retry answered from the cache
                req = _request(auth, rnd, c, step=3, seed=10 * rnd + i)
                first = stub.Train(req, timeout=30)
                steps = state.steps
                again = stub.Train(req, timeout=30)
                assert state.steps == steps and again.server_step == first.server_step
                assert torch.equal(codec.decode(again.grad), codec.decode(first.grad))
            assert state.steps == steps_before + 3 * len(clients)
            held = state.held_clients()
            assert held["retry_cache"] == held["traffic"] == held["assignment"] == len(clients)
            assert sorted(state.traffic()) == clients
            assert all(s.train_requests == 3 for s in state.traffic().values())  # the retry counted once
            # the round's numbers (metrics.jsonl's dataplane_bytes_*) from the run's totals
            total1 = state.traffic_total()
            per_client = state.traffic().values()
            assert total1.bytes_up - total0.bytes_up == sum(s.bytes_up for s in per_client) > 0
            assert total1.bytes_down - total0.bytes_down == sum(s.bytes_down for s in per_client) > 0
            assert total1.samples - total0.samples == 3 * 4 * len(clients)
            # the round ends as the ServerApp ends it
            state.merge_replicas()
            auth.close_all()
            state.end_round()
            assert state.held_clients() == EMPTY
            assert state.traffic() == {}
            assert state.traffic_total() == total1  # the run's totals outlive the round
            if batcher is not None:  # lanes remember at most the clients that were just active
                assert batcher.held_clients() <= len(clients)
            # the closed round's retry is refused, not answered from a cache that is gone
            with pytest.raises(grpc.RpcError) as err:
                stub.Train(_request(auth, rnd, clients[0], step=3, seed=10 * rnd), timeout=30)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            steps_before = state.steps
    finally:
        stub_channel.close()
        server.stop(grace=None)


def test_the_batcher_forgets_clients_idle_past_its_window():
    """The global segment's lane outlives every round: clients that went quiet drop out of it, so
    a thousand clients over a run leave only the recently active ones behind (clock moved by hand)."""
    clock = ManualClock(100.0)
    _, _, state = make_state("cnn", "conv1", max_batch=64)
    batcher = RequestBatcher(state, max_wait_ms=0, active_window_s=1.0, timeline=Timeline(clock))
    h, y = torch.rand(4, *SHAPE), torch.randint(0, 10, (4,))

    def train(client: str) -> None:
        req = pb.TrainRequest(header=pb.Header(client_id=client, round=1, step=1))
        codec.encode_into(req.activations, h)
        codec.encode_into(req.labels, y)
        batcher.train(req)

    for i in range(50):  # one client after another, each idle once its step is done
        train(f"c{i}")
        clock.advance(2.0)
        assert batcher.held_clients() <= 2  # the one just served (and, until the next arrival, the one before)
    train("c-last")
    assert batcher.held_clients() == 1
