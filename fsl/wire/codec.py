"""Tensors <-> wire ``Tensor`` messages: raw little-endian bytes, explicit dtype and shape.

Decoding never unpickles: it checks the dtype name against an allow-list, the
shape against the size limit and the buffer length against ``prod(shape) *
itemsize`` before it builds a tensor, and raises :class:`WireError` with a text
that says what was wrong. Decoded tensors view the bytes read out of the message (protobuf's
getter copies them once; the tensor does not copy again);
they are read-only by contract, so callers that write in place must clone.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import warnings
from typing import Any

import numpy as np
import torch

from fsl.wire import dataplane_pb2 as pb

__all__ = [
    "DTYPES",
    "WireError",
    "all_finite",
    "decode",
    "decode_named",
    "decode_signature",
    "encode",
    "encode_into",
    "encode_named",
    "encode_signature",
    "format_of",
    "message_size",
    "tensor_nbytes",
    "tune_allocator",
    "view",
    "wire_format",
]

# wire name -> torch dtype. bfloat16 has no numpy twin; it travels as its raw 2-byte words.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,  # attention masks; every byte must be 0 or 1 (checked by decode)
}
_NAMES = {v: k for k, v in DTYPES.items()}
_ITEMSIZE = {name: torch.empty((), dtype=dt).element_size() for name, dt in DTYPES.items()}
_MAX_DIMS = 8
_F32_MAX = float(torch.finfo(torch.float32).max)


class WireError(ValueError):
    """A wire tensor that cannot be decoded or does not match what is expected."""


def tensor_nbytes(t: pb.Tensor) -> int:
    """Bytes of raw tensor payload in a wire tensor (not counting dtype/shape)."""
    return len(t.data)


def encode(x: torch.Tensor, dtype: torch.dtype | Any = None) -> pb.Tensor:
    """Encode ``x`` (cast to ``dtype`` if given) as a wire ``Tensor``."""
    return encode_into(pb.Tensor(), x, dtype)


def encode_into(out: pb.Tensor, x: torch.Tensor, dtype: torch.dtype | Any = None) -> pb.Tensor:
    """Encode ``x`` into ``out`` in place (e.g. ``encode_into(reply.grad, g)``) and return ``out``.

    Prefer this to ``Reply(grad=encode(g))``: protobuf copies a sub-message passed to a
    constructor by serializing and parsing it again, a second pass over the payload.
    ``dtype`` may be a :class:`fsl.wire.compress.WireFormat` (int8 quantization, top-k).
    """
    raw = encode_payload(out, x, dtype)
    if raw is not None:
        out.data = raw.tobytes()  # the one copy: tensor memory -> the message's buffer
    return out


def encode_payload(out: pb.Tensor, x: torch.Tensor, dtype: torch.dtype | Any = None) -> np.ndarray | None:
    """Fill ``out``'s dtype, shape and scale for ``x`` and return its raw little-endian elements.

    The array views ``x``'s memory when no conversion is needed (a contiguous CPU tensor of the
    wire dtype), so a frame (:mod:`fsl.wire.frame`) can send it without copying it into the
    message. Compressed formats are encoded into ``out`` whole and return ``None``.
    """
    if dtype is not None and not isinstance(dtype, torch.dtype):  # a compressed format
        from fsl.wire.compress import encode_compressed

        encode_compressed(out, x, dtype)
        return None
    x = x.detach()
    scale = 0.0
    if dtype == torch.float16 and x.is_floating_point() and x.dtype != torch.float16 and x.numel():
        # float16 holds 2^-24 .. 65504: scale by a power of two so the largest magnitude sits
        # near 2^15 and small values (gradients of a mean loss) keep their precision
        if x.device.type == "cpu" and x.dtype == torch.float32:  # perf: numpy, no thread-pool dispatch
            arr = x.contiguous().numpy()
            amax = float(np.abs(arr).max())
            if math.isfinite(amax) and amax > 0:
                scale = 2.0 ** (math.ceil(math.log2(amax)) - 15)
                arr = arr * np.float32(1.0 / scale)  # exact: a power of two
            x = torch.from_numpy(arr.astype(np.float16))
        else:
            amax = float(x.abs().max())
            if math.isfinite(amax) and amax > 0:
                scale = 2.0 ** (math.ceil(math.log2(amax)) - 15)
                x = x / scale
    if dtype == torch.bfloat16 and x.dtype in (torch.float32, torch.float64):
        x = _saturated(x, torch.bfloat16)
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    if x.dtype not in _NAMES:
        raise WireError(f"dtype {x.dtype} cannot travel on the wire; use one of {sorted(DTYPES)}")
    x = x.cpu().contiguous()
    if x.dtype == torch.bfloat16:
        raw = x.view(torch.int16).numpy()
    else:
        raw = x.numpy()
    if sys.byteorder != "little":  # pragma: no cover - no big-endian hosts in CI
        raw = raw.byteswap()
    out.dtype = _NAMES[x.dtype]
    del out.shape[:]
    out.shape.extend(x.shape)
    out.ClearField("data")
    out.ClearField("indices")
    out.scale = scale
    return raw


def decode(
    t: pb.Tensor,
    *,
    name: str = "tensor",
    max_elements: int | None = None,
    data: Any = None,
) -> torch.Tensor:
    """Decode a wire ``Tensor`` into a torch tensor that views its bytes.

    ``data``: the tensor's raw bytes when they travelled beside the message (a framed payload,
    :mod:`fsl.wire.frame`) instead of in ``t.data``.
    Raises :class:`WireError` for an unknown dtype, a negative or oversized shape,
    or a buffer whose length does not match the shape.
    """
    if t.dtype not in DTYPES:
        raise WireError(f"{name}: unknown dtype {t.dtype!r}; accepted: {sorted(DTYPES)}")
    shape = tuple(int(d) for d in t.shape)
    if len(shape) > _MAX_DIMS or any(d < 0 for d in shape):
        raise WireError(f"{name}: invalid shape {list(shape)}")
    count = math.prod(shape)
    if max_elements is not None and count > max_elements:
        raise WireError(f"{name}: {count} elements exceed the limit of {max_elements}")
    if t.indices:  # a top-k sparse payload (fsl/wire/compress.py)
        if data is not None:
            raise WireError(f"{name}: a sparse tensor travels inside its message, not framed")
        from fsl.wire.compress import decode_sparse

        return decode_sparse(t, name, count)
    if data is None:
        data = t.data  # read the field once: each access copies the payload out of protobuf
    expected = count * _ITEMSIZE[t.dtype]
    if len(data) != expected:
        raise WireError(f"{name}: buffer holds {len(data)} bytes but shape {list(shape)} of {t.dtype} needs {expected}")
    if t.dtype == "bool" and count and int(np.frombuffer(data, dtype=np.uint8).max()) > 1:
        raise WireError(f"{name}: a bool tensor holds bytes other than 0 and 1")  # torch assumes 0/1
    out = view(t.dtype, shape, data)
    if t.scale not in (0.0, 1.0):
        if not math.isfinite(t.scale) or t.scale < 0:
            raise WireError(f"{name}: invalid scale {t.scale}")
        if t.scale * _largest(t.dtype) >= 0.5 * _F32_MAX:  # rare: only tensors near float32's range
            out = _scaled_saturating(out, t.scale)
        elif t.dtype == "float16" and t.scale >= 2.0**-126:  # perf: numpy; the scale is a normal float32
            arr = out.numpy().astype(np.float32)
            arr *= np.float32(t.scale)
            out = torch.from_numpy(arr)
        else:
            out = out.float() * t.scale  # a scaled float16 payload decodes to float32
    return out


def _largest(dtype: str) -> float:
    """The largest magnitude a payload of wire dtype ``dtype`` holds."""
    torch_dtype = DTYPES[dtype]
    if torch_dtype.is_floating_point:
        return float(torch.finfo(torch_dtype).max)
    return float(torch.iinfo(torch_dtype).max) if torch_dtype != torch.bool else 1.0


def _scaled_saturating(payload: torch.Tensor, scale: float) -> torch.Tensor:
    """``payload * scale`` in float32, its finite values kept finite.

    A sender scales (float16) or quantizes (int8) only tensors whose values are all finite; values
    near float32's extremes (an attention mask's minimum, -3.4e38) round up on the way and their
    product would overflow to infinity, which the split server refuses. They saturate instead."""
    out = payload.float() * scale
    return torch.where(torch.isinf(payload), out, out.clamp(-_F32_MAX, _F32_MAX))


def _saturated(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` with its finite values clamped to ``dtype``'s range before a cast: rounding would turn
    float32's extremes (an attention mask's minimum) into infinities. Infinities and NaN stay."""
    big = float(torch.finfo(dtype).max)
    if not x.numel():
        return x
    if x.device.type == "cpu" and x.dtype == torch.float32:  # perf: numpy reductions, no thread-pool dispatch
        arr = x.detach().contiguous().numpy()
        if -big <= float(arr.min()) and float(arr.max()) <= big:  # also False for NaN: clamped below, unchanged
            return x
    return torch.where(torch.isinf(x), x, x.clamp(-big, big))


def encode_named(out: Any, values: dict[str, torch.Tensor], dtype: torch.dtype | Any = None) -> Any:
    """Append ``values`` to the repeated ``NamedTensor`` field ``out``, inline (the plain-protobuf calls).

    ``dtype`` (a float dtype or a compressed format) applies to the float tensors only: integer and
    bool tensors travel exact.
    """
    for n, x in values.items():
        encode_into(out.add(name=n).tensor, x, dtype if x.is_floating_point() else None)
    return out


def decode_named(items: Any, *, what: str = "tensors") -> dict[str, torch.Tensor]:
    """A repeated ``NamedTensor`` field decoded into an ordered dict (names must not repeat)."""
    out: dict[str, torch.Tensor] = {}
    for nt in items:
        if nt.name in out:
            raise WireError(f"{what}: {nt.name!r} appears twice")
        out[nt.name] = decode(nt.tensor, name=f"{what}[{nt.name!r}]")
    return out


def encode_signature(sig: Any, out: pb.InfoReply) -> pb.InfoReply:
    """Put a :class:`fsl.cutvalues.Signature` into ``out`` (an ``InfoReply``)."""
    for t in sig.tensors:
        out.signature.add(name=t.name, dtype=t.dtype, dims=[str(d) for d in t.dims], grad=t.grad)
    for sym, (lo, hi) in sig.bounds.items():
        out.bounds.add(name=sym, low=lo, high=hi)
    return out


def decode_signature(reply: pb.InfoReply) -> Any:
    """The :class:`fsl.cutvalues.Signature` an ``InfoReply`` carries (a single-tensor cut from a
    server that reports none: from its ``sample_shape``)."""
    from fsl.cutvalues import Signature, TensorSpec

    if not reply.signature:
        return Signature.single(tuple(reply.sample_shape))
    specs = tuple(
        TensorSpec(t.name, t.dtype, tuple(int(d) if d.lstrip("-").isdigit() else d for d in t.dims), t.grad)
        for t in reply.signature
    )
    return Signature(specs, {b.name: (int(b.low), int(b.high)) for b in reply.bounds})


def wire_format(name: str) -> torch.dtype | Any:
    """What to encode with for a format name from :func:`format_of` (a dtype, or a compressed format)."""
    if name in DTYPES and name != "int8":
        return DTYPES[name]
    from fsl.wire.compress import parse_format  # int8 quantization, top-k

    return parse_format(name)


def format_of(t: pb.Tensor) -> str:
    """The format a received tensor travelled in, so the reply can travel the same way."""
    from fsl.wire.compress import format_of as _format_of

    return _format_of(t)


def view(dtype: str, shape: tuple[int, ...], data: bytes) -> torch.Tensor:
    """A tensor over ``data`` itself (no copy); ``data`` must already have the right length."""
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=DTYPES[dtype])
    np_dtype = np.dtype("<i2") if dtype == "bfloat16" else np.dtype(dtype).newbyteorder("<")
    arr = np.frombuffer(data, dtype=np_dtype).reshape(shape)
    if sys.byteorder != "little":  # pragma: no cover
        arr = arr.byteswap()
    global _WARNED_READ_ONLY
    if _WARNED_READ_ONLY or arr.flags.writeable:
        out = torch.from_numpy(arr)
    else:
        with warnings.catch_warnings():  # the buffer is immutable bytes: the tensor is read-only by contract
            warnings.simplefilter("ignore", UserWarning)
            out = torch.from_numpy(arr)
        _WARNED_READ_ONLY = True
    return out.view(torch.bfloat16) if dtype == "bfloat16" else out


# torch warns about a tensor over a read-only array once per process (TORCH_WARN_ONCE); after that
# first, silenced, warning a catch_warnings per decode only costs time (it copies the process-wide
# filter list: tens of microseconds per request on a busy server)
_WARNED_READ_ONLY = False


# ----------------------------------------------------------------------------- data-plane speed
def all_finite(x: torch.Tensor) -> bool:
    """Whether every element of ``x`` is finite, in one pass and without torch's thread pool.

    ``torch.isfinite(x).all()`` dispatches two parallel kernels; on a small, busy CPU that costs
    milliseconds per request where numpy's single pass takes microseconds.
    """
    if x.device.type != "cpu" or not x.is_floating_point():
        return bool(torch.isfinite(x).all()) if x.is_floating_point() else True
    if x.dtype == torch.bfloat16:  # no numpy twin: an all-ones exponent means Inf or NaN
        bits = x.contiguous().view(torch.int16).numpy()
        return not bool(np.any((bits & 0x7F80) == 0x7F80))
    arr = x.numpy()
    if arr.size == 0:
        return True
    # max and min propagate NaN and show an infinity: two reductions without the temporary boolean
    # array of np.isfinite(arr).all(), about a third less CPU on a request's activations
    return math.isfinite(float(arr.max())) and math.isfinite(float(arr.min()))


def _varint_size(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _tensor_size(t: pb.Tensor, framed: bool = False) -> int:
    if t.dtype not in _ITEMSIZE or t.indices:  # sparse payloads are small; size them exactly
        return int(t.ByteSize())  # not ours to size cheaply
    head: int = pb.Tensor(dtype=t.dtype, shape=t.shape, scale=t.scale).ByteSize()
    n = 0 if framed else math.prod(int(d) for d in t.shape) * _ITEMSIZE[t.dtype]
    return head + (1 + _varint_size(n) + n if n else 0)  # field 3: tag, length, bytes


def message_size(msg: Any, framed: frozenset[str] | set[str] = frozenset()) -> int:
    """``msg.ByteSize()`` without serializing the tensor payloads.

    upb computes ``ByteSize`` by encoding the whole message, a full pass over megabytes of
    activations just to count them. Here a ``Tensor``'s payload length comes from its dtype and
    shape, so the result equals ``ByteSize()`` for every message whose tensors passed
    :func:`decode`'s length check or were built by :func:`encode`. The top-level tensors named
    in ``framed`` are counted without data (their payloads travel beside the message).
    """
    if isinstance(msg, pb.Tensor):
        return _tensor_size(msg)
    total = 0
    small = type(msg)()
    for fd, value in msg.ListFields():
        if fd.message_type is not None and not fd.is_repeated:
            n = _tensor_size(value, framed=True) if fd.name in framed else message_size(value)
            total += _varint_size(fd.number << 3) + _varint_size(n) + n
        elif fd.is_repeated:
            getattr(small, fd.name).extend(value)
        else:
            setattr(small, fd.name, value)
    return total + int(small.ByteSize())


_ALLOCATOR_TUNED = False


def tune_allocator() -> bool:
    """Keep glibc from mapping and unmapping every large buffer (once per process; Linux only).

    glibc serves allocations above ``M_MMAP_THRESHOLD`` (adaptive, but an equal-sized request
    after a free still qualifies) with a fresh ``mmap``; every message buffer of a megabyte or
    more then costs a page fault per 4 KiB page, which made serializing a 4 MB message 20x
    slower than copying it. Raising the threshold to 32 MiB (glibc's maximum) and the trim
    threshold to 64 MiB lets those buffers be reused. The process keeps up to 64 MiB of freed
    heap; set ``FSL_MALLOC_TUNING=0`` to leave the allocator alone.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or os.environ.get("FSL_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return _ALLOCATOR_TUNED
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok: bool = libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024) == 1
        ok = libc.mallopt(m_trim_threshold, 64 * 1024 * 1024) == 1 and ok
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        ok = False
    _ALLOCATOR_TUNED = ok
    return ok
