"""Compressed data plane: int8 quantization and top-k, both directions, bytes on the wire, validation."""

from __future__ import annotations

import pytest
import torch

from clients.trainer import TrainOptions, train_segment, train_segment_u
from fsl.channel import InMemoryChannel
from fsl.models import build_model, cut_shape, split_model_u
from fsl.wire import codec
from fsl.wire import dataplane_pb2 as pb
from fsl.wire.compress import WireFormat, format_of
from server.split_server import SplitServerState
from tests.helpers import make_state


def _x(seed=0, shape=(4, 16, 14, 14)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_int8_roundtrip_error_is_within_half_a_step_and_bytes_quarter():
    x = _x()
    t = codec.encode(x, WireFormat("int8"))
    y = codec.decode(codec.pb.Tensor.FromString(t.SerializeToString()))
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert float((y - x).abs().max()) <= t.scale / 2 + 1e-6
    dense = codec.encode(x)
    assert len(t.data) * 4 == len(dense.data)


def test_topk_keeps_each_samples_largest_entries_exactly():
    x = _x(1, (3, 100))
    t = codec.encode(x, WireFormat("float32", 0.1))
    y = codec.decode(t)
    for i in range(3):
        keep = x[i].abs().topk(10).indices
        assert torch.equal(y[i, keep], x[i, keep])
        assert int((y[i] != 0).sum()) == 10
    assert format_of(t) == "float32+topk:0.1"
    assert len(t.data) + len(t.indices) == 30 * 8  # 10 % of the entries at 4 + 4 bytes


def test_bad_sparse_payloads_are_refused():
    t = codec.encode(_x(2, (2, 10)), WireFormat("float32", 0.3))
    bad = pb.Tensor()
    bad.CopyFrom(t)
    bad.indices = t.indices[:-1]
    with pytest.raises(codec.WireError, match="multiple of 4"):
        codec.decode(bad)
    bad.CopyFrom(t)
    bad.indices = (10**6).to_bytes(4, "little") * (len(t.indices) // 4)
    with pytest.raises(codec.WireError, match="ascending and below"):
        codec.decode(bad)


@pytest.mark.parametrize(("fmt", "ratio"), [(torch.float16, 0.5), (torch.bfloat16, 0.5), (WireFormat("int8"), 0.25)])
def test_bytes_up_fall_with_the_format_and_the_gradient_comes_back_in_it(fmt, ratio):
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    sizes = {}
    for key, wire in (("f32", torch.float32), ("c", fmt)):
        _, split, state = make_state("cnn", cut="conv1")
        ch = InMemoryChannel(server=state, wire_dtype=wire)
        stats = train_segment(split.client, x, y, ch, TrainOptions(batch_size=16, epochs=1))
        sizes[key] = stats.bytes_up, stats.bytes_down
    up_ratio = sizes["c"][0] / sizes["f32"][0]
    down_ratio = sizes["c"][1] / sizes["f32"][1]
    assert up_ratio == pytest.approx(ratio, abs=0.01)  # labels and headers are a tiny share
    assert down_ratio == pytest.approx(ratio, abs=0.01)  # the gradient travels in the same format


def test_topk_training_through_the_split_and_ushaped():
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    _, split, state = make_state("cnn", cut="conv1")
    before = [p.detach().clone() for p in split.client.parameters()]
    stats = train_segment(split.client, x, y, InMemoryChannel(server=state, wire_dtype=WireFormat("float16", 0.1)))
    assert stats.examples == 32 and all(
        not torch.equal(a, b) for a, b in zip(before, split.client.parameters(), strict=True)
    )
    model = build_model("cnn", (1, 28, 28), 10, seed=0)
    u = split_model_u(model, "conv1", "fc1")
    ustate = SplitServerState(
        u.middle, sample_shape=cut_shape(u.bottom, (1, 28, 28)), num_classes=10, lr=0.1, device="cpu", ushaped=True
    )
    s = train_segment_u(u.bottom, u.top, x, y, InMemoryChannel(server=ustate, wire_dtype=WireFormat("int8")))
    assert s.examples == 32 and s.bytes_up > 0
