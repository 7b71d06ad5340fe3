"""Compressed tensors on the data plane: int8 linear quantization and top-k sparsification.

A wire format is named by a short string so it can travel with a request and be mirrored in the
reply: ``"float32"``, ``"float16"``, ``"bfloat16"`` (plain casts, :mod:`fsl.wire.codec`), ``"int8"``
(``code = round(x / scale)`` in [-127, 127] with one float scale per tensor, ``scale = max|x| / 127``)
and ``"<dtype>+topk:<ratio>"`` (per sample, the ``ceil(ratio * D)`` largest-magnitude entries of its
``D`` values; their flat positions travel as uint32 in ``Tensor.indices``, every other entry is 0).
The split server answers in the format the client sent (gradients at the cut like the activations).

Bytes per element against float32's 4: float16/bfloat16 2, int8 1 (plus 8 bytes of scale), top-k
``ratio * (4 + itemsize)``. None of this is a privacy mechanism: it changes what travels, not who
may learn from it (quantization noise is not calibrated noise).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch

from fsl.wire import dataplane_pb2 as pb

__all__ = ["WireFormat", "decode_sparse", "encode_compressed", "format_of", "parse_format"]

_VALUE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}


@dataclass(frozen=True)
class WireFormat:
    """How a float tensor travels: ``dtype`` of the stored values (int8 = quantized) and ``topk`` (0 = dense)."""

    dtype: str = "float32"
    topk: float = 0.0

    def __post_init__(self) -> None:
        if self.dtype not in _VALUE_DTYPES:
            raise ValueError(f"wire format dtype must be one of {sorted(_VALUE_DTYPES)}, not {self.dtype!r}")
        if not 0.0 <= self.topk <= 1.0:
            raise ValueError(f"top-k ratio must lie in [0, 1], got {self.topk}")

    @property
    def name(self) -> str:
        return self.dtype if self.topk == 0 else f"{self.dtype}+topk:{self.topk:.6g}"


def parse_format(name: str) -> WireFormat:
    """``"int8"``, ``"float16+topk:0.1"``, ... -> :class:`WireFormat`."""
    dtype, _, rest = name.partition("+")
    if rest and not rest.startswith("topk:"):
        raise ValueError(f"unknown wire format {name!r}")
    return WireFormat(dtype, float(rest[5:]) if rest else 0.0)


def format_of(t: pb.Tensor) -> str:
    """The format a received wire tensor used (so a reply can travel the same way)."""
    if not t.indices:
        return t.dtype
    count = math.prod(int(d) for d in t.shape)
    return f"{t.dtype}+topk:{(len(t.indices) // 4) / max(1, count):.6g}"


def _quantize(v: torch.Tensor) -> tuple[torch.Tensor, float]:
    amax = float(v.abs().max()) if v.numel() else 0.0
    if not math.isfinite(amax) or amax == 0.0:
        return torch.zeros(v.shape, dtype=torch.int8), 0.0
    scale = amax / 127.0
    return torch.round(v / scale).clamp_(-127, 127).to(torch.int8), scale


def encode_compressed(out: pb.Tensor, x: torch.Tensor, fmt: WireFormat) -> pb.Tensor:
    """Encode float tensor ``x`` into ``out`` in format ``fmt``."""
    from fsl.wire import codec

    x = x.detach().float().cpu()
    shape = tuple(x.shape)
    idx_bytes = b""
    values = x
    if fmt.topk > 0 and x.numel():
        rows = x.reshape(shape[0], -1) if x.ndim > 1 else x.reshape(1, -1)  # (B, D): per sample
        d = rows.shape[1]
        k = min(d, max(1, math.ceil(fmt.topk * d)))
        cols = rows.abs().topk(k, dim=1).indices.sort(dim=1).values  # (B, k)
        flat = (cols + torch.arange(rows.shape[0]).unsqueeze(1) * d).reshape(-1)  # ascending flat positions
        values = x.reshape(-1)[flat]
        idx = flat.numpy().astype("<u4")
        idx_bytes = idx.tobytes()
    if fmt.dtype == "int8":
        q, scale = _quantize(values)
        codec.encode_into(out, q)
        out.scale = scale
    else:
        codec.encode_into(out, values, _VALUE_DTYPES[fmt.dtype])
    del out.shape[:]
    out.shape.extend(shape)
    out.indices = idx_bytes
    return out


def decode_sparse(t: pb.Tensor, name: str, count: int) -> torch.Tensor:
    """A top-k wire tensor back to its dense float32 shape; checks every length and index first."""
    from fsl.wire import codec

    raw = t.indices
    if len(raw) % 4:
        raise codec.WireError(f"{name}: indices hold {len(raw)} bytes, not a multiple of 4")
    nnz = len(raw) // 4
    if nnz > count:
        raise codec.WireError(f"{name}: {nnz} stored elements for a tensor of {count}")
    idx = np.frombuffer(raw, dtype="<u4")
    if sys.byteorder != "little":  # pragma: no cover
        idx = idx.byteswap()
    if nnz and (int(idx[-1]) >= count or (nnz > 1 and not bool(np.all(np.diff(idx.astype(np.int64)) > 0)))):
        raise codec.WireError(f"{name}: indices must be ascending and below {count}")
    values = codec.decode(pb.Tensor(dtype=t.dtype, shape=[nnz], data=t.data, scale=t.scale), name=name).float()
    dense = torch.zeros(count, dtype=torch.float32)
    if nnz:
        dense[torch.from_numpy(idx.astype(np.int64))] = values
    return dense.reshape(tuple(int(d) for d in t.shape))
