"""Batching concurrent training requests on the split server (server/batching.py).

Oracle: a batch of requests from several clients gives every client exactly the gradient at the
cut it would get unbatched from the same weights, and the weights move by one SGD step on the sum
of the clients' gradients. Plus concurrency over real gRPC, isolation of bad input, retries.

Which requests share a batch is fixed by the batcher's schedule, not by how fast the host is: the
batchers read an injected clock that stands still unless the test moves it, so a leader holds its
batch until it is full (or the test moves the clock past the deadline the leader planned).
"""

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from clocks import Holds, ManualClock
from fsl.channel import ChannelIdentity
from fsl.grpc_channel import DataPlaneError, GrpcChannel
from fsl.models import build_model, cut_shape, split_model
from fsl.wire import codec, frame
from fsl.wire import dataplane_pb2 as pb
from fsl.wire.frame import Framed
from helpers import make_state, params
from server.batching import BatchingError, RequestBatcher
from server.split_server import InvalidRequest, SplitServer, SplitServerState
from server.timeline import Timeline


def _request(client, h, y, step=1, round_=1, wire=None):
    req = pb.TrainRequest(header=pb.Header(client_id=client, round=round_, step=step))
    codec.encode_into(req.activations, h, wire)
    codec.encode_into(req.labels, y)
    return req


def _as_frame(req):
    out = Framed(pb.TrainRequest())
    out.msg.CopyFrom(req)
    out.set("activations", codec.decode(req.activations))
    return out


def _unbatched(state, h, y):
    """The gradient at the cut and the loss a fresh copy of the segment gives for (h, y) alone."""
    seg = copy.deepcopy(state.segment)
    hh = h.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(seg(hh), y)
    loss.backward()
    return hh.grad, float(loss.detach()), {n: p.grad.clone() for n, p in seg.named_parameters()}


def _run_concurrently(batcher, requests):
    """Submit all requests from their own threads; the batcher sees them at once."""
    replies, errors = [None] * len(requests), [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def go(i):
        barrier.wait()
        try:
            replies[i] = batcher.train(requests[i])
        except Exception as e:  # noqa: BLE001
            errors[i] = e

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return replies, errors


@pytest.mark.parametrize("framed", [False, True])
@pytest.mark.parametrize("cut", ["conv1", "fc1"])
@pytest.mark.parametrize("sizes", [(1, 5, 3), (4, 4, 4, 4)])
def test_batched_gradients_equal_unbatched_from_same_weights(cut, sizes, framed):
    torch.manual_seed(0)
    _, split, state = make_state("cnn", cut, lr=0.1, momentum=0.0)
    batcher = RequestBatcher(
        state, max_requests=len(sizes), adaptive=False, timeline=Timeline(ManualClock())
    )  # until full
    shape = state.sample_shape
    data = [(torch.randn(b, *shape), torch.randint(0, 10, (b,))) for b in sizes]
    before = params(state.segment)
    oracle = [_unbatched(state, h, y) for h, y in data]
    reqs = [_request(f"c{i}", h, y) for i, (h, y) in enumerate(data)]
    if framed:  # as TrainFrame delivers them: activations beside the message (fsl/wire/frame.py)
        reqs = [frame.parse(pb.TrainRequest, frame.frame_bytes(_as_frame(r))) for r in reqs]
    replies, errors = _run_concurrently(batcher, reqs)
    assert errors == [None] * len(sizes)
    assert batcher.batches == 1 and batcher.batched_requests == len(sizes)  # all in one pass
    if framed:  # framed replies: each gradient is sent from the batch's gradient tensor, no copy
        assert all(isinstance(r, Framed) and "grad" in r.payloads for r in replies)
        grads = [r.tensor("grad") for r in replies]
        replies = [frame.parse(pb.TrainReply, frame.frame_bytes(r)).message() for r in replies]
        for g, r in zip(grads, replies, strict=True):
            assert torch.equal(g, codec.decode(r.grad))
    for rep, (g, loss, _) in zip(replies, oracle, strict=True):
        assert torch.allclose(codec.decode(rep.grad), g, atol=1e-6, rtol=1e-5)
        assert rep.loss == pytest.approx(loss, rel=1e-5)
        assert rep.server_step == 1
    # one SGD step (lr 0.1, no momentum) on the SUM of the clients' parameter gradients
    summed = {n: sum(o[2][n] for o in oracle) for n in oracle[0][2]}
    for n, p in state.segment.named_parameters():
        assert torch.allclose(p.detach(), before[n] - 0.1 * summed[n], atol=1e-6), n


def test_single_request_matches_the_unbatched_server_step_for_step():
    torch.manual_seed(1)
    _, _, batched = make_state("cnn", "conv2", lr=0.05, momentum=0.9)
    _, _, plain = make_state("cnn", "conv2", lr=0.05, momentum=0.9)
    batcher = RequestBatcher(batched, max_wait_ms=0)
    for step in range(1, 4):
        h, y = torch.randn(6, *plain.sample_shape), torch.randint(0, 10, (6,))
        a = batcher.train(_request("c", h, y, step=step))
        b = plain.train(_request("c", h, y, step=step))
        assert torch.allclose(codec.decode(a.grad), codec.decode(b.grad), atol=1e-6)
        assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.correct == b.correct
    for (n, p), q in zip(batched.segment.named_parameters(), plain.segment.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), n
    assert batched.traffic()["c"].train_requests == 3 and batched.traffic()["c"].samples == 18


def test_float16_and_bfloat16_requests_share_a_batch_and_get_their_own_dtype_back():
    _, _, state = make_state("cnn", "conv1")
    batcher = RequestBatcher(state, max_requests=3, adaptive=False, timeline=Timeline(ManualClock()))
    dtypes = [None, torch.float16, torch.bfloat16]
    reqs = [
        _request(f"c{i}", torch.rand(2, *state.sample_shape), torch.tensor([1, 2]), wire=d)
        for i, d in enumerate(dtypes)
    ]
    replies, errors = _run_concurrently(batcher, reqs)
    assert errors == [None] * 3 and batcher.batches == 1
    assert [r.grad.dtype for r in replies] == ["float32", "float16", "bfloat16"]


def test_bad_input_fails_only_its_own_request_and_never_touches_the_model():
    torch.manual_seed(2)
    _, _, state = make_state("cnn", "conv1", lr=0.1, momentum=0.0)
    # the NaN request fails admission and never joins: the other three fill the batch
    batcher = RequestBatcher(state, max_requests=3, adaptive=False, timeline=Timeline(ManualClock()))
    good = [(torch.randn(3, *state.sample_shape), torch.randint(0, 10, (3,))) for _ in range(2)]
    oracle = [_unbatched(state, h, y) for h, y in good]
    nan = torch.randn(3, *state.sample_shape)
    nan[0, 0, 0, 0] = float("nan")
    huge = torch.full((3, *state.sample_shape), -3e38)  # finite on the wire, non-finite loss in the batch
    reqs = [
        _request("g0", *good[0]),
        _request("bad-nan", nan, torch.tensor([0, 1, 2])),
        _request("g1", *good[1]),
        _request("bad-huge", huge, torch.tensor([0, 1, 2])),
    ]
    before = params(state.segment)
    replies, errors = _run_concurrently(batcher, reqs)
    assert isinstance(errors[1], InvalidRequest) and "NaN" in str(errors[1])
    assert isinstance(errors[3], InvalidRequest) and "non-finite loss" in str(errors[3])
    assert errors[0] is None and errors[2] is None
    for rep, (g, _, _) in zip([replies[0], replies[2]], oracle, strict=True):
        assert torch.allclose(codec.decode(rep.grad), g, atol=1e-6)
    summed = {n: oracle[0][2][n] + oracle[1][2][n] for n in oracle[0][2]}  # the bad ones left no trace
    for n, p in state.segment.named_parameters():
        assert torch.allclose(p.detach(), before[n] - 0.1 * summed[n], atol=1e-6), n
    assert set(state.traffic()) == {"g0", "g1"}


def test_a_batch_of_only_bad_requests_changes_nothing():
    _, _, state = make_state("cnn", "conv1")
    batcher = RequestBatcher(state)
    before = params(state.segment)
    with pytest.raises(InvalidRequest, match="non-finite loss"):
        batcher.train(_request("x", torch.full((2, *state.sample_shape), -3e38), torch.tensor([0, 1])))
    with pytest.raises(InvalidRequest, match="labels"):
        batcher.train(_request("x", torch.rand(2, *state.sample_shape), torch.tensor([0, 10]), step=2))
    assert all(torch.equal(v, before[k]) for k, v in params(state.segment).items())
    assert state.steps == 0


def test_a_retried_step_is_not_trained_twice():
    _, _, state = make_state("cnn", "conv1")
    batcher = RequestBatcher(state, max_wait_ms=0)
    req = _request("c", torch.rand(4, *state.sample_shape), torch.tensor([0, 1, 2, 3]))
    first = batcher.train(req)
    again = batcher.train(req)
    assert again.server_step == first.server_step == 1 and state.steps == 1


def test_batchnorm_segment_is_refused_with_a_reason():
    model = build_model("resnet", seed=0)
    split = split_model(model, "layer1")
    state = SplitServerState(split.server, cut_shape(split.client, (3, 32, 32)), 10, device="cpu")
    with pytest.raises(BatchingError, match="BatchNorm.*norm='group'"):
        RequestBatcher(state)


def test_a_held_batch_takes_what_arrives_and_is_released_at_the_planned_deadline():
    _, _, state = make_state("cnn", "conv1")
    clock, holds = ManualClock(100.0), Holds()
    # a minute on the clock: the leader wakes only when a request arrives or the test moves the clock
    batcher = RequestBatcher(state, max_requests=8, max_wait_ms=60_000, adaptive=False, timeline=Timeline(clock, holds))
    shape = state.sample_shape
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(batcher.train, _request("a", torch.rand(2, *shape), torch.tensor([0, 1])))
        assert holds.next() == pytest.approx(160.0)  # the leader holds until arrival + max_wait
        second = pool.submit(batcher.train, _request("b", torch.rand(3, *shape), torch.tensor([2, 3, 4])))
        assert holds.next() == pytest.approx(160.0)  # b arrived and joined; the deadline stays the first's
        clock.set(159.999)
        batcher.wake()
        assert holds.next() == pytest.approx(160.0)  # not yet
        assert not first.done() and state.steps == 0
        clock.set(160.0)
        batcher.wake()
        a, b = first.result(timeout=30), second.result(timeout=30)
    assert a.server_step == b.server_step == 1 and batcher.batches == 1 and batcher.batched_requests == 2
    assert state.traffic()["a"].samples == 2 and state.traffic()["b"].samples == 3


def test_the_leader_stops_waiting_once_every_active_client_has_a_request():
    _, _, state = make_state("cnn", "conv1")
    holds = Holds()
    batcher = RequestBatcher(
        state, max_wait_ms=60_000, active_window_s=10.0, timeline=Timeline(ManualClock(), holds)
    )  # adaptive
    shape = state.sample_shape

    def req(client, step):
        return _request(client, torch.rand(2, *shape), torch.tensor([0, 1]), step=step)

    assert batcher.train(req("a", 1)).server_step == 1  # alone and the only active client: no wait
    with ThreadPoolExecutor(2) as pool:
        b = pool.submit(batcher.train, req("b", 1))
        holds.next()  # b waits for a, active a moment ago
        a = pool.submit(batcher.train, req("a", 2))
        assert a.result(timeout=30).server_step == b.result(timeout=30).server_step == 2  # one batch, no clock moved
    assert batcher.batches == 2


@pytest.mark.parametrize("batched", [False, True])
def test_confidence_is_computed_and_sent_only_when_asked(batched):
    torch.manual_seed(4)
    _, _, state = make_state("cnn", "conv1")
    data = [(torch.randn(3, *state.sample_shape), torch.tensor([1, 5, 7])) for _ in range(2)]
    reqs = [_request(f"c{i}", h, y) for i, (h, y) in enumerate(data)]
    reqs[1].want_confidence = True
    if batched:  # in the same batch, from the same weights: one asks, one does not
        seg = copy.deepcopy(state.segment)
        batcher = RequestBatcher(state, max_requests=2, adaptive=False, timeline=Timeline(ManualClock()))
        replies, errors = _run_concurrently(batcher, reqs)
        assert errors == [None, None] and batcher.batches == 1
    else:
        replies = [state.train(reqs[0])]
        seg = copy.deepcopy(state.segment)  # the weights the second request meets
        replies.append(state.train(reqs[1]))
    assert not replies[0].HasField("confidence")
    h, y = data[1]
    with torch.no_grad():
        expected = torch.softmax(seg(h), dim=1)[torch.arange(3), y]  # p(true label): data cartography's confidence
    assert torch.allclose(codec.decode(replies[1].confidence), expected, atol=1e-6)


@pytest.mark.integration
def test_eight_grpc_clients_concurrently_through_a_batching_server():
    torch.manual_seed(3)
    _, _, state = make_state("cnn", "conv1", lr=0.05)
    batcher = RequestBatcher(state, max_requests=8, max_wait_ms=20)
    server = SplitServer(state, "127.0.0.1:0", batcher=batcher).start()
    steps, errors = 5, []

    def client(i):
        ch = GrpcChannel(address=server.address, identity=ChannelIdentity(client_id=f"c{i}", round=1))
        try:
            for _ in range(steps):
                h = torch.rand(4, *state.sample_shape)
                out = ch.train_step(h, torch.randint(0, 10, (4,)))
                assert out.grad.shape == h.shape and torch.isfinite(out.grad).all()
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        finally:
            ch.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == []
        traffic = state.traffic()
        assert sorted(traffic) == [f"c{i}" for i in range(8)]
        assert all(s.train_requests == steps and s.samples == 4 * steps for s in traffic.values())
        assert batcher.batched_requests == 8 * steps
        assert state.steps == batcher.batches < 8 * steps  # requests really were batched
        # bad input over the wire: INVALID_ARGUMENT for that client only
        ch = GrpcChannel(address=server.address, identity=ChannelIdentity(client_id="bad", round=1))
        with pytest.raises(DataPlaneError, match="INVALID_ARGUMENT"):
            ch.train_step(torch.full((2, *state.sample_shape), float("inf")), torch.tensor([0, 1]))
        ch.close()
    finally:
        server.stop(grace=None)
