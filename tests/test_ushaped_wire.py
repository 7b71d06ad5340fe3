"""In a U-shaped split labels never cross the wire: inspect every message the server receives."""

import grpc
import pytest
import torch

from clients.trainer import TrainOptions, evaluate_split_u, train_segment_u
from fsl.auth import AuthError
from fsl.grpc_channel import DataPlaneError, GrpcChannel
from fsl.models import build_model, cut_shape, split_model_u
from fsl.wire import codec, frame
from fsl.wire import dataplane_pb2 as pb
from helpers import RequestRecorder as Recorder
from helpers import authority_and_identity
from server.split_server import InvalidRequest, SplitServer, SplitServerState

pytestmark = pytest.mark.integration


def test_ushaped_training_sends_no_labels():
    torch.manual_seed(0)
    u = split_model_u(build_model("cnn", seed=0), "conv1", "fc1")
    state = SplitServerState(u.middle, cut_shape(u.bottom, (1, 28, 28)), 10, device="cpu", ushaped=True)
    rec = Recorder()
    server = SplitServer(state, "127.0.0.1:0", interceptors=[rec]).start()
    # labels with a recognisable byte pattern, so any leak would be visible in the raw bytes
    y = torch.tensor([7, 3, 9, 1, 8, 2, 6, 0] * 4)
    x = torch.rand(len(y), 1, 28, 28)
    try:
        with GrpcChannel(address=server.address) as ch:
            stats = train_segment_u(u.bottom, u.top, x, y, ch, TrainOptions(epochs=2, batch_size=8))
            evaluate_split_u(u.bottom, u.top, x, y, ch)
            with pytest.raises(DataPlaneError) as err:  # the label-carrying RPC is refused outright
                ch.train_step(u.bottom(x[:2]).detach(), y[:2])
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop(grace=None)
    assert stats.examples == 64 and state.steps == 8
    methods = [m.rsplit("/", 1)[1] for m, _ in rec.requests]
    assert methods.count("Forward") == 8 and methods.count("Backward") == 8 and "InferFrame" in methods
    label_bytes = codec.encode(y[:8]).data
    for method, raw in rec.requests:
        if method.endswith(("Train", "TrainFrame")):
            continue  # the refused probe above
        assert label_bytes not in raw, method
        name = method.rsplit("/", 1)[1]
        if name == "InferFrame":  # a frame (fsl/wire/frame.py): the message and its activations' bytes
            parsed = frame.parse(pb.InferRequest, raw).msg
        else:
            parsed = {"Forward": pb.ForwardRequest, "Backward": pb.BackwardRequest}[name].FromString(raw)
        tensors = [f for f, _ in parsed.ListFields() if f.message_type is not None and f.message_type.name == "Tensor"]
        assert all(f.name in ("activations", "grad") for f in tensors), (method, [f.name for f in tensors])


def test_forward_and_backward_are_admitted_like_train():
    """Credentials, tensor checks and the retry cache hold for the U-shaped calls as for Train."""
    auth, ident = authority_and_identity(client="u")
    u = split_model_u(build_model("cnn", seed=0), "conv1", "fc1")
    state = SplitServerState(u.middle, cut_shape(u.bottom, (1, 28, 28)), 10, device="cpu", ushaped=True, authority=auth)

    def header(step, token=ident.token):
        return pb.Header(run_id=ident.run_id, round=1, client_id="u", step=step, token=token)

    h = u.bottom(torch.rand(4, 1, 28, 28)).detach()
    with pytest.raises(AuthError):
        state.forward(pb.ForwardRequest(header=header(1, token="00"), activations=codec.encode(h)))
    with pytest.raises(InvalidRequest, match="NaN"):
        state.forward(pb.ForwardRequest(header=header(1), activations=codec.encode(h * float("nan"))))
    fwd = pb.ForwardRequest(header=header(1), activations=codec.encode(h))
    first = state.forward(fwd)
    assert state.forward(fwd) == first  # a retried forward: the same answer, not run again
    assert state.traffic()["u"].train_requests == 1
    g = torch.ones_like(codec.decode(first.activations))
    with pytest.raises(InvalidRequest, match="batch of 2"):
        state.backward(pb.BackwardRequest(header=header(2), grad=codec.encode(g[:2]), forward_step=1))
    with pytest.raises(InvalidRequest, match="no pending forward step 7"):
        state.backward(pb.BackwardRequest(header=header(2), grad=codec.encode(g), forward_step=7))
    bwd = pb.BackwardRequest(header=header(2), grad=codec.encode(g), forward_step=1)
    done = state.backward(bwd)
    assert state.backward(bwd) == done and done.server_step == state.steps == 1  # a retried backward: no second step
    assert state.traffic()["u"].train_requests == 2
