import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fsl.wire import codec
from fsl.wire import dataplane_pb2 as pb

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.uint8]


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_roundtrip_is_exact_for_every_dtype_and_shape(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 50).to(dtype)
    msg = pb.Tensor.FromString(codec.encode(x).SerializeToString())  # through real protobuf bytes
    y = codec.decode(msg)
    assert y.dtype == dtype and tuple(y.shape) == tuple(shape)
    assert torch.equal(x, y)
    assert len(msg.data) == x.numel() * x.element_size()


def test_bytes_are_little_endian_raw_values():
    msg = codec.encode(torch.tensor([1.0, -2.5], dtype=torch.float32))
    assert msg.data == np.array([1.0, -2.5], dtype="<f4").tobytes()
    assert msg.dtype == "float32" and list(msg.shape) == [2]


def test_encode_casts_to_the_wire_dtype():
    msg = codec.encode(torch.ones(4), torch.float16)
    assert msg.dtype == "float16" and len(msg.data) == 8


@pytest.mark.parametrize("dtype", DTYPES)
def test_view_shares_memory_with_the_received_bytes(dtype):
    data = codec.encode(torch.arange(1000).to(dtype)).data
    y = codec.view(codec.encode(torch.zeros(1, dtype=dtype)).dtype, (10, 100), data)
    raw = y.view(torch.int16) if dtype == torch.bfloat16 else y
    assert np.shares_memory(raw.numpy(), np.frombuffer(data, dtype=np.uint8))


@pytest.mark.parametrize(
    "tensor,pattern",
    [
        (pb.Tensor(dtype="float64", shape=[1], data=b"\0" * 8), "unknown dtype 'float64'"),
        (pb.Tensor(dtype="pickle", shape=[1], data=b"x"), "unknown dtype"),
        (pb.Tensor(dtype="float32", shape=[2, 3], data=b"\0" * 23), "buffer holds 23 bytes but shape \\[2, 3\\]"),
        (pb.Tensor(dtype="float32", shape=[-1, 3], data=b""), "invalid shape"),
        (pb.Tensor(dtype="float32", shape=[1] * 9, data=b"\0" * 4), "invalid shape"),
    ],
)
def test_malformed_tensors_raise_clear_errors(tensor, pattern):
    with pytest.raises(codec.WireError, match=pattern):
        codec.decode(tensor)


def test_element_limit_is_checked_before_the_buffer():
    t = pb.Tensor(dtype="float32", shape=[10**6, 10**6], data=b"")
    with pytest.raises(codec.WireError, match="exceed the limit"):
        codec.decode(t, max_elements=10**6)


def test_unsupported_dtype_cannot_be_encoded():
    with pytest.raises(codec.WireError, match="cannot travel"):
        codec.encode(torch.zeros(2, dtype=torch.complex64))
