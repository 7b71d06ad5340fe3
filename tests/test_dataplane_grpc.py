"""The data plane over real gRPC on 127.0.0.1: concurrency, bad input, authentication."""

import threading

import grpc
import pytest
import torch

from fsl.channel import ChannelIdentity
from fsl.grpc_channel import DataPlaneError, GrpcChannel
from fsl.wire import codec
from fsl.wire import dataplane_pb2 as pb
from fsl.wire import dataplane_pb2_grpc as pb_grpc
from helpers import authority_and_identity, make_state, params
from server.split_server import SplitServer

pytestmark = pytest.mark.integration


@pytest.fixture
def served():
    """A split server with authentication on, for round 1, and a raw stub to it."""
    auth, _ = authority_and_identity()
    _, split, state = make_state("cnn", "conv1", authority=auth, max_batch=64)
    server = SplitServer(state, "127.0.0.1:0").start()
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 256 * 1024 * 1024)])
    yield auth, split, state, server, pb_grpc.SplitDataPlaneStub(channel)
    channel.close()
    server.stop(grace=None)


def _header(auth, client="7", round_=1, step=1, run_id="run-test"):
    return pb.Header(run_id=run_id, round=round_, client_id=client, step=step, token=auth.issue(round_, client))


def _good(auth, batch=4, **hdr):
    return pb.TrainRequest(
        header=_header(auth, **hdr),
        activations=codec.encode(torch.rand(batch, 16, 14, 14)),
        labels=codec.encode(torch.randint(0, 10, (batch,))),
    )


def test_concurrent_clients_all_train_and_are_counted(served):
    auth, split, state, server, _ = served
    n_clients, steps, batch = 6, 5, 8
    errors = []

    def client(i):
        try:
            ident = ChannelIdentity(run_id="run-test", round=1, client_id=f"c{i}", token=auth.issue(1, f"c{i}"))
            with GrpcChannel(address=server.address, identity=ident) as ch:
                for _ in range(steps):
                    h = torch.rand(batch, 16, 14, 14)
                    r = ch.train_step(h, torch.randint(0, 10, (batch,)))
                    assert r.grad.shape == h.shape and torch.isfinite(r.grad).all()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert state.steps == n_clients * steps  # every step applied exactly once
    traffic = state.traffic()
    assert sorted(traffic) == [f"c{i}" for i in range(n_clients)]
    assert all(t.samples == steps * batch and t.train_requests == steps for t in traffic.values())


def _bad_requests(auth):
    good = _good(auth)
    wrong_shape = _good(auth)
    wrong_shape.activations.CopyFrom(codec.encode(torch.rand(4, 16, 7, 7)))
    wrong_dtype = _good(auth)
    wrong_dtype.activations.CopyFrom(codec.encode(torch.randint(0, 5, (4, 16, 14, 14))))
    truncated = _good(auth)
    truncated.activations.data = truncated.activations.data[:-3]
    bad_labels = _good(auth)
    bad_labels.labels.CopyFrom(codec.encode(torch.tensor([0, 1, 2, 99])))
    float_labels = _good(auth)
    float_labels.labels.CopyFrom(codec.encode(torch.zeros(4)))
    short_labels = _good(auth)
    short_labels.labels.CopyFrom(codec.encode(torch.zeros(3, dtype=torch.int64)))
    nan = _good(auth)
    x = torch.rand(4, 16, 14, 14)
    x[0, 0, 0, 0] = float("nan")
    nan.activations.CopyFrom(codec.encode(x))
    too_big_batch = _good(auth, batch=65)
    unknown_dtype = _good(auth)
    unknown_dtype.activations.dtype = "object"
    return {
        "wrong shape": (wrong_shape, grpc.StatusCode.INVALID_ARGUMENT, "do not fit the server segment"),
        "wrong dtype": (wrong_dtype, grpc.StatusCode.INVALID_ARGUMENT, "activations must be one of"),
        "truncated buffer": (truncated, grpc.StatusCode.INVALID_ARGUMENT, "buffer holds"),
        "label out of range": (bad_labels, grpc.StatusCode.INVALID_ARGUMENT, "labels must lie in"),
        "float labels": (float_labels, grpc.StatusCode.INVALID_ARGUMENT, "labels must be int64"),
        "label count": (short_labels, grpc.StatusCode.INVALID_ARGUMENT, "for a batch of 4"),
        "nan": (nan, grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"),
        "batch over limit": (too_big_batch, grpc.StatusCode.INVALID_ARGUMENT, "batch size 65"),
        "unknown dtype": (unknown_dtype, grpc.StatusCode.INVALID_ARGUMENT, "activations must be one of"),
        "_good": (good, None, None),
    }


def test_bad_input_gets_a_clear_status_and_leaves_the_model_unchanged(served):
    auth, _, state, _, stub = served
    before = params(state.segment)
    cases = _bad_requests(auth)
    for name, (req, code, text) in cases.items():
        if code is None:
            continue
        with pytest.raises(grpc.RpcError) as err:
            stub.Train(req, timeout=10)
        assert err.value.code() == code, name
        assert text in err.value.details(), (name, err.value.details())
        for k, v in params(state.segment).items():
            assert torch.equal(v, before[k]), f"{name} changed {k}"
    assert state.steps == 0
    # the server is still healthy and trains on a good request
    reply = stub.Train(cases["_good"][0], timeout=10)
    assert reply.server_step == 1 and reply.grad.dtype == "float32"
    assert any(not torch.equal(v, before[k]) for k, v in params(state.segment).items())


def test_oversized_message_is_refused_by_the_transport(served):
    auth, _, state, _, stub = served
    req = _good(auth)
    req.activations.data = b"\0" * (state.max_message_bytes + 1024)
    with pytest.raises(grpc.RpcError) as err:
        stub.Train(req, timeout=20)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert state.steps == 0


def test_credentials_are_bound_to_run_round_and_client(served):
    auth, _, state, _, stub = served
    before = params(state.segment)
    no_token = _good(auth)
    no_token.header.token = ""
    other_client = _good(auth)
    other_client.header.client_id = "8"  # token issued to client 7
    other_run = _good(auth, run_id="another-run")
    future_round = _good(auth, round_=2)  # genuine token, but round 2 is not open
    for req, code in [
        (no_token, grpc.StatusCode.UNAUTHENTICATED),
        (other_client, grpc.StatusCode.UNAUTHENTICATED),
        (other_run, grpc.StatusCode.UNAUTHENTICATED),
        (future_round, grpc.StatusCode.PERMISSION_DENIED),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            stub.Train(req, timeout=10)
        assert err.value.code() == code, req.header
    assert stub.Train(_good(auth), timeout=10).server_step == 1
    # after the round closes, replaying the round-1 credential is refused
    auth.open_round(2)
    with pytest.raises(grpc.RpcError) as err:
        stub.Train(_good(auth, step=2), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert state.steps == 1
    assert len([k for k, v in params(state.segment).items() if not torch.equal(v, before[k])]) > 0


def test_a_retried_step_is_answered_without_training_twice(served):
    auth, _, state, _, stub = served
    req = _good(auth, step=5)
    first = stub.Train(req, timeout=10)
    after_first = params(state.segment)
    again = stub.Train(req, timeout=10)
    assert again == first and state.steps == 1
    for k, v in params(state.segment).items():
        assert torch.equal(v, after_first[k])
    assert stub.Train(_good(auth, step=6), timeout=10).server_step == 2


def test_channel_raises_data_plane_error_with_the_status(served):
    auth, _, _, server, _ = served
    ident = ChannelIdentity(run_id="run-test", round=1, client_id="7", token="forged")
    with GrpcChannel(address=server.address, identity=ident) as ch:
        with pytest.raises(DataPlaneError) as err:
            ch.train_step(torch.rand(2, 16, 14, 14), torch.zeros(2, dtype=torch.int64))
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "invalid credential" in str(err.value)


def test_info_and_inference(served):
    auth, split, state, server, _ = served
    _, ident = authority_and_identity()
    ident.token = auth.issue(1, ident.client_id)
    with GrpcChannel(address=server.address, identity=ident) as ch:
        info = ch.info()
        assert list(info.sample_shape) == [16, 14, 14] and info.device == "cpu" and info.cut == "conv1"
        x = torch.rand(5, 1, 28, 28)
        logits = ch.infer(split.client(x).detach())
    with torch.no_grad():
        expected = state.segment.eval()(split.client(x))
    torch.testing.assert_close(logits, expected)
    assert state.steps == 0  # inference never trains
