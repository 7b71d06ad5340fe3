"""What every data-plane request must pass before it may touch the server segment.

The checks read the tensor's header (dtype, shape) before any buffer is decoded, so a request
that claims a huge batch is refused without allocating it; then the values (finite activations,
labels in range). :class:`InvalidRequest` maps to ``INVALID_ARGUMENT`` on the wire.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fsl.cutvalues import Signature, SignatureError
from fsl.wire import codec
from fsl.wire import dataplane_pb2 as pb
from fsl.wire.frame import Framed

__all__ = ["ACTIVATION_DTYPES", "IGNORE_INDEX", "InvalidRequest", "check_labels", "check_named", "check_tensor"]

IGNORE_INDEX = -100  # a token target the causal-LM loss skips (padding, the prompt)

# int8 is the quantized wire format (fsl/wire/compress.py); the others are plain floats
ACTIVATION_DTYPES = ("float32", "float16", "bfloat16", "int8")


class InvalidRequest(ValueError):
    """A request that is well-formed on the wire but not acceptable (maps to INVALID_ARGUMENT)."""


def check_tensor(
    t: pb.Tensor, what: str, per_sample: tuple[int, ...], *, max_batch: int, cut: str = "", data: Any = None
) -> torch.Tensor:
    """``t`` decoded as a ``(B, *per_sample)`` float tensor with ``1 <= B <= max_batch`` and finite values.

    ``data`` is the tensor's payload when it travelled framed beside the message.
    """
    if t.dtype not in ACTIVATION_DTYPES:
        raise InvalidRequest(f"{what} must be one of {ACTIVATION_DTYPES}, got {t.dtype!r}")
    shape = tuple(t.shape)  # checked against the segment before any buffer is touched
    if len(shape) != len(per_sample) + 1 or shape[1:] != tuple(per_sample):
        raise InvalidRequest(
            f"{what} of shape {list(shape)} do not fit the server segment at cut {cut!r}: "
            f"expected (B, {', '.join(map(str, per_sample))})"
        )
    if not 1 <= shape[0] <= max_batch:
        raise InvalidRequest(f"batch size {shape[0]} outside [1, {max_batch}]")
    h = codec.decode(t, name=what, max_elements=max_batch * max(1, math.prod(per_sample)), data=data)
    if not codec.all_finite(h):  # one numpy pass: cheaper than torch's thread-pool dispatch on a busy CPU
        raise InvalidRequest(f"{what} contain NaN or Inf")
    return h


def check_named(
    req: Framed, field: str, sig: Signature, *, max_batch: int, cut: str = "", what: str = "cut"
) -> dict[str, torch.Tensor]:
    """Repeated ``NamedTensor`` field ``field`` of ``req`` decoded into a dict in the signature's order.

    Every name, dtype and shape is checked against ``sig`` (:meth:`Signature.check_shapes`) before
    any buffer is decoded; then integer and bool tensors must have travelled exact (no scale, not
    sparse) and float tensors must be finite. The error names the tensor and says why.
    """
    items = getattr(req.msg, field)
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
    for nt in items:
        if nt.name in shapes:
            raise InvalidRequest(f"{what} tensor {nt.name!r} sent twice")
        shapes[nt.name] = (nt.tensor.dtype, tuple(nt.tensor.shape))
    try:
        sig.check_shapes(shapes, max_batch=max_batch)
    except SignatureError as e:
        raise InvalidRequest(f"{what} at {cut!r}: {e}") from None
    out: dict[str, torch.Tensor] = {}
    for i, nt in enumerate(items):
        spec = sig.spec(nt.name)
        if not spec.floating and (nt.tensor.indices or nt.tensor.scale not in (0.0, 1.0)):
            raise InvalidRequest(
                f"{what} tensor {nt.name!r}: a {spec.dtype} tensor travels exact (no scale, not sparse)"
            )
        t = req.tensor((field, i), max_elements=sig.max_elements(nt.name, max_batch))
        if spec.floating and not codec.all_finite(t):
            raise InvalidRequest(f"{what} tensor {nt.name!r} contains NaN or Inf")
        out[nt.name] = t
    return {n: out[n] for n in sig.names}


def check_labels(
    t: pb.Tensor,
    batch: int,
    *,
    num_classes: int,
    max_batch: int,
    data: Any = None,
    task: str = "classify",
    max_elements: int | None = None,
) -> torch.Tensor:
    """``t`` decoded as ``(batch,)`` int64 class indices in ``[0, num_classes)``, or for ``task``
    ``"causal-lm"`` as ``(batch, T)`` int64 token targets in ``[0, num_classes)`` or
    :data:`IGNORE_INDEX`."""
    if t.dtype != "int64":
        raise InvalidRequest(f"labels must be int64, got {t.dtype!r}")
    lm = task == "causal-lm"
    y = codec.decode(t, name="labels", max_elements=max_elements if lm and max_elements else max_batch, data=data)
    if lm:
        if y.ndim != 2 or y.shape[0] != batch or y.shape[1] < 1:
            raise InvalidRequest(
                f"labels of shape {list(y.shape)} for a batch of {batch}: expected ({batch}, T) tokens"
            )
        real = y[y != IGNORE_INDEX]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= num_classes):
            raise InvalidRequest(f"token labels must lie in [0, {num_classes}) or be {IGNORE_INDEX}")
        return y
    if tuple(y.shape) != (batch,):
        raise InvalidRequest(f"labels of shape {list(y.shape)} for a batch of {batch}: expected ({batch},)")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InvalidRequest(f"labels must lie in [0, {num_classes})")
    return y
