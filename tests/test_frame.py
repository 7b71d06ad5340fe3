"""Framed messages (fsl/wire/frame.py): tensors beside the protobuf message, received without a copy."""

from concurrent import futures

import grpc
import numpy as np
import pytest
import torch

from fsl.grpc_channel import GrpcChannel
from fsl.wire import codec, frame
from fsl.wire import dataplane_pb2 as pb
from fsl.wire import dataplane_pb2_grpc as pb_grpc
from fsl.wire.compress import WireFormat
from fsl.wire.frame import Framed
from helpers import make_state, params
from server.split_server import SplitServicer, add_servicer

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.uint8]


def _request(x, dtype=None, y=None):
    req = Framed(pb.TrainRequest(header=pb.Header(client_id="c", round=1, step=1)))
    req.set("activations", x, dtype)
    codec.encode_into(req.msg.labels, torch.arange(x.shape[0]) if y is None else y)
    return req


def _inside(t: torch.Tensor, buf: bytes) -> bool:
    """Whether ``t``'s memory lies inside the bytes object ``buf`` (a view, not a copy)."""
    start = np.frombuffer(buf, dtype=np.uint8).ctypes.data
    return start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= start + len(buf)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_frame_round_trips_every_dtype_and_the_receiver_views_the_bytes(dtype):
    x = (torch.randn(5, 3, 7) * 50).to(dtype)
    req = _request(x)
    data = frame.frame_bytes(req)
    assert len(data) == req.nbytes()
    got = frame.parse(pb.TrainRequest, data)
    assert got.msg.activations.data == b""  # the payload is not inside the message
    h = got.tensor("activations")
    assert h.dtype == dtype and torch.equal(h, x)
    assert _inside(h, data)  # zero copy: the tensor views the received bytes
    assert got.msg.header.client_id == "c" and torch.equal(got.tensor("labels"), torch.arange(5))
    # the message with its payload put back is the plain protobuf message
    plain = pb.TrainRequest(header=req.msg.header)
    codec.encode_into(plain.activations, x)
    codec.encode_into(plain.labels, torch.arange(5))
    assert got.message().SerializeToString() == plain.SerializeToString()


def test_the_sender_frames_the_tensor_from_its_own_memory():
    x = torch.randn(4, 16)
    raw = codec.encode_payload(pb.Tensor(), x)
    assert raw is not None and np.shares_memory(raw, x.numpy())


@pytest.mark.parametrize("fmt", [None, torch.float16, torch.bfloat16, WireFormat("int8"), WireFormat("float32", 0.1)])
def test_compressed_formats_travel_inline_and_every_size_is_exact(fmt):
    x = torch.randn(8, 16, 14, 14)
    req = _request(x, fmt)
    assert ("activations" in req.payloads) == (fmt is None or isinstance(fmt, torch.dtype))
    data = frame.frame_bytes(req)
    assert req.nbytes() == len(data)
    fresh = _request(x, fmt)
    assert fresh.nbytes() == len(data)  # counted without building the frame
    back = frame.parse(pb.TrainRequest, data).tensor("activations").float()
    assert torch.allclose(back, codec.decode(codec.encode(x, fmt)).float(), atol=0, rtol=0)


def test_a_plain_message_is_a_frame_without_payloads():
    rep = pb.TrainReply(loss=0.5, correct=3, server_step=9)
    codec.encode_into(rep.grad, torch.ones(2, 3))
    got = frame.parse(pb.TrainReply, frame.frame_bytes(rep))
    assert got.payloads == {} and got.msg == rep
    assert torch.equal(got.tensor("grad"), torch.ones(2, 3))


def _table(data: bytes) -> tuple[int, int, int]:
    magic, head_len, count = frame._PREFIX.unpack_from(data, 0)
    return head_len, count, frame._PREFIX.size


def _malformed(good: bytes) -> dict[str, bytes]:
    head_len, count, p = _table(good)
    assert count == 1
    number, _, length = frame._ENTRY.unpack_from(good, p)
    entry = lambda n=number, r=0, ln=length: frame._ENTRY.pack(n, r, ln)  # noqa: E731
    body = good[p + frame._ENTRY.size :]
    both = pb.TrainRequest.FromString(body[:head_len])
    both.activations.data = b"\0" * length
    both_head = both.SerializeToString()
    absent = pb.TrainRequest.FromString(body[:head_len])
    absent.ClearField("activations")
    absent_head = absent.SerializeToString()
    return {
        "empty": b"",
        "short prefix": good[:7],
        "bad magic": b"XXXX" + good[4:],
        "truncated": good[:-5],
        "stray bytes": good + b"\0" * 16,
        "payload too long": good[:p] + entry(ln=length + 8) + good[p + frame._ENTRY.size :],
        "payload too short": good[:p] + entry(ln=length - 8) + good[p + frame._ENTRY.size :],
        "not a tensor field": good[:p] + entry(n=1) + good[p + frame._ENTRY.size :],
        "unknown field": good[:p] + entry(n=99) + good[p + frame._ENTRY.size :],
        "reserved set": good[:p] + entry(r=7) + good[p + frame._ENTRY.size :],
        "framed twice": frame._PREFIX.pack(frame.MAGIC, head_len, 2) + entry() + entry() + body,
        "too many payloads": frame._PREFIX.pack(frame.MAGIC, head_len, 1000) + good[p:],
        "head past the end": frame._PREFIX.pack(frame.MAGIC, len(good), 1) + good[p:],
        "head not protobuf": frame._PREFIX.pack(frame.MAGIC, 3, 0) + b"\xff\xff\xff",
        "inline and framed": frame._PREFIX.pack(frame.MAGIC, len(both_head), 1) + entry() + both_head + body[head_len:],
        "payload for an absent field": frame._PREFIX.pack(frame.MAGIC, len(absent_head), 1)
        + entry()
        + absent_head
        + body[head_len:],
    }


def test_malformed_frames_raise_clear_errors():
    good = frame.frame_bytes(_request(torch.rand(4, 16, 14, 14)))
    frame.parse(pb.TrainRequest, good)  # the base case is fine
    for kind, data in _malformed(good).items():
        with pytest.raises(codec.WireError, match="frame|TrainRequest") as err:
            got = frame.parse(pb.TrainRequest, data)
            got.tensor("activations")  # a length that passed the frame's checks fails the tensor's
        assert str(err.value), kind


def test_malformed_frames_over_grpc_get_invalid_argument_and_change_nothing():
    _, split, state = make_state("cnn", "conv1")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    add_servicer(SplitServicer(state), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_unary("/fsl.dataplane.v1.SplitDataPlane/TrainFrame")
    before = params(state.segment)
    try:
        good = frame.frame_bytes(_request(torch.rand(4, 16, 14, 14)))
        for kind, data in _malformed(good).items():
            with pytest.raises(grpc.RpcError) as err:
                call(data, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (kind, err.value.details())
            assert "frame" in err.value.details() or "TrainRequest" in err.value.details(), kind
        for k, v in params(state.segment).items():
            assert torch.equal(v, before[k]), k
        assert state.steps == 0
        reply = frame.parse(pb.TrainReply, call(good, timeout=10))  # and a good frame trains
        assert reply.msg.server_step == 1 and "grad" in reply.payloads
        assert reply.tensor("grad").shape == (4, 16, 14, 14)
    finally:
        channel.close()
        server.stop(None)


def test_inference_is_framed_and_answers_like_the_plain_call():
    from helpers import channel_to

    _, split, state = make_state("cnn", "conv1")
    h = split.client(torch.rand(6, 1, 28, 28)).detach()
    with channel_to(state, "grpc") as ch:
        framed = ch.infer(h)
        assert ch._frames is True
        req = pb.InferRequest(header=pb.Header(client_id="p", step=1))
        codec.encode_into(req.activations, h)
        plain = codec.decode(state.infer(req).logits)
    assert torch.equal(framed, plain)
    stats = state.traffic()
    assert sum(s.infer_requests for s in stats.values()) == 2


def test_a_client_falls_back_to_protobuf_against_a_server_without_frames():
    """A split server without frames answers TrainFrame with UNIMPLEMENTED; the client switches to Train."""
    _, split, state = make_state("cnn", "conv1")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_SplitDataPlaneServicer_to_server(SplitServicer(state), server)  # the .proto methods only
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with GrpcChannel(address=f"127.0.0.1:{port}") as ch:
            x = torch.rand(4, 1, 28, 28)
            for _ in range(2):
                r = ch.train_step(split.client(x).detach(), torch.arange(4))
                assert r.grad.shape == (4, 16, 14, 14)
            assert ch._frames is False and state.steps == 2
            assert ch.infer(split.client(x).detach()).shape == (4, 10)
    finally:
        server.stop(None)
