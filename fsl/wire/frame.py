"""Framed data-plane messages: tensor payloads beside the protobuf message, not inside it.

Protobuf holds a ``bytes`` field in its own memory, so a tensor that travels inside a message is
copied on its way from the tensor to the socket (``tobytes``, the field setter, serialization)
and again on its way back (parsing, reading the field): about 0.1-0.2 ms per copy per megabyte
(``benchmarks/bench_dataplane.py``). A frame carries the same message with the large
tensors' ``data`` left empty and their raw bytes appended after it. The sender joins the parts
into the one buffer gRPC sends (one copy, from the tensor's memory); the receiver's tensors view
the received bytes (no copy).

Layout (little endian)::

    b"FSF1" | u32 head_len | u32 count | count x (u32 field number, u32 0, u64 length)
    | head (the protobuf message, framed tensors without data) | payloads

Each payload starts at the next multiple of 16 bytes from the start of the frame, in the order
of the table; the frame ends with the last payload. Only top-level ``Tensor`` fields are framed,
each at most once, and a framed tensor's ``data`` in the head must be empty. Any protobuf
message is also a valid frame with ``count = 0``. :func:`parse` checks all of it and raises
:class:`fsl.wire.codec.WireError` with what was wrong; the payload lengths are checked against
dtype and shape by :func:`fsl.wire.codec.decode` as for inline tensors.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fsl.wire import codec
from fsl.wire import dataplane_pb2 as pb

__all__ = ["MAGIC", "Framed", "as_framed", "as_sent", "frame_bytes", "parse", "wire_size"]

MAGIC = b"FSF1"
_PREFIX = struct.Struct("<4sII")  # magic, head length, payload count
_ENTRY = struct.Struct("<IIQ")  # field number, reserved (0), payload length
_ALIGN = 16  # numpy views need the element size (8 at most); the bytes object itself is 16-aligned
_MAX_PAYLOADS = 8


@functools.cache
def _tensor_fields(message_type: Any) -> dict[int, str]:
    return {
        f.number: f.name
        for f in message_type.DESCRIPTOR.fields
        if f.message_type is not None and f.message_type.full_name == pb.Tensor.DESCRIPTOR.full_name
    }


@functools.cache
def _field_numbers(message_type: Any) -> dict[str, int]:
    return {name: number for number, name in _tensor_fields(message_type).items()}


def _pad(offset: int) -> int:
    return -offset % _ALIGN


def _bytes_view(raw: Any) -> memoryview:
    """A flat byte view of a payload (a numpy array or a buffer), without copying it."""
    return memoryview(np.ascontiguousarray(raw) if isinstance(raw, np.ndarray) else raw).cast("B")


@dataclass
class Framed:
    """A data-plane message and the raw payloads of some of its tensor fields.

    ``payloads`` maps a top-level ``Tensor`` field's name to its raw bytes: a numpy array (a
    message being sent: the tensor's own memory) or a ``memoryview`` of a received frame. The
    field in ``msg`` holds dtype, shape and scale, and no data.
    """

    msg: Any
    payloads: dict[str, Any] = field(default_factory=dict)
    wire_bytes: int | None = field(default=None, repr=False)  # the frame's length, once built or parsed

    def data(self, name: str) -> Any:
        """The raw bytes of tensor field ``name``: its payload (a byte view), or the data inside the message."""
        got = self.payloads.get(name)
        return getattr(self.msg, name).data if got is None else _bytes_view(got)

    def tensor(self, name: str, *, max_elements: int | None = None) -> torch.Tensor:
        """Decode tensor field ``name`` (a view of the received bytes when it was framed)."""
        got = self.payloads.get(name)
        data = None if got is None else _bytes_view(got)
        return codec.decode(getattr(self.msg, name), name=name, max_elements=max_elements, data=data)

    def message(self) -> Any:
        """The plain protobuf message, payloads copied back inside (for code that wants one)."""
        if not self.payloads:
            return self.msg
        out = type(self.msg)()
        out.CopyFrom(self.msg)
        for name, raw in self.payloads.items():
            getattr(out, name).data = bytes(_bytes_view(raw))
        return out

    def nbytes(self) -> int:
        """Length of :func:`frame_bytes` of this message (without building it, if it was not)."""
        if self.wire_bytes is not None:
            return self.wire_bytes
        offset = _PREFIX.size + len(self.payloads) * _ENTRY.size + codec.message_size(self.msg, set(self.payloads))
        for raw in self.payloads.values():
            offset += _pad(offset) + _bytes_view(raw).nbytes
        return offset

    def set(self, name: str, x: torch.Tensor, dtype: Any = None) -> None:
        """Encode ``x`` into tensor field ``name``: dense payloads travel framed, compressed ones inline."""
        self.wire_bytes = None
        arr = codec.encode_payload(getattr(self.msg, name), x, dtype)
        if arr is None:
            self.payloads.pop(name, None)
        else:
            self.payloads[name] = arr


def frame_bytes(message: Framed | Any) -> bytes:
    """The frame of ``message`` (a :class:`Framed` or a plain protobuf message) as one buffer.

    One copy of every payload, from its own memory into the buffer gRPC sends.
    """
    framed = message if isinstance(message, Framed) else Framed(message)
    msg, payloads = framed.msg, framed.payloads
    numbers = _field_numbers(type(msg))
    head = msg.SerializeToString()
    views = [(name, _bytes_view(raw)) for name, raw in payloads.items()]
    parts: list[Any] = [_PREFIX.pack(MAGIC, len(head), len(views))]
    parts += [_ENTRY.pack(numbers[name], 0, v.nbytes) for name, v in views]
    parts.append(head)
    offset = sum(len(p) for p in parts)
    for _, v in views:
        parts.append(bytes(_pad(offset)))
        offset += _pad(offset)
        parts.append(v)
        offset += v.nbytes
    framed.wire_bytes = offset
    return b"".join(parts)


def parse(message_type: Any, data: bytes) -> Framed:
    """Parse a frame of ``message_type``; tensors framed in it view ``data`` (no copy).

    Raises :class:`fsl.wire.codec.WireError` when ``data`` is not a well-formed frame.
    """
    name = message_type.DESCRIPTOR.name
    if len(data) < _PREFIX.size:
        raise codec.WireError(f"{name} frame: {len(data)} bytes is shorter than its {_PREFIX.size}-byte prefix")
    magic, head_len, count = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise codec.WireError(f"{name} frame: bad magic {magic!r} (expected {MAGIC!r})")
    if count > _MAX_PAYLOADS:
        raise codec.WireError(f"{name} frame: {count} payloads (at most {_MAX_PAYLOADS})")
    table_end = _PREFIX.size + count * _ENTRY.size
    if table_end + head_len > len(data):
        raise codec.WireError(f"{name} frame: head of {head_len} bytes runs past the end of a {len(data)}-byte frame")
    fields = _tensor_fields(message_type)
    entries: list[tuple[str, int]] = []
    for i in range(count):
        number, reserved, length = _ENTRY.unpack_from(data, _PREFIX.size + i * _ENTRY.size)
        if number not in fields or reserved != 0:
            raise codec.WireError(f"{name} frame: payload {i} names field {number}, not a tensor of {name}")
        if any(fields[number] == n for n, _ in entries):
            raise codec.WireError(f"{name} frame: field {fields[number]!r} framed twice")
        entries.append((fields[number], length))
    view = memoryview(data)
    try:
        msg = message_type.FromString(view[table_end : table_end + head_len])
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise codec.WireError(f"{name} frame: the head is not a valid {name}: {e}") from None
    payloads: dict[str, memoryview] = {}
    offset = table_end + head_len
    for field_name, length in entries:
        offset += _pad(offset)
        if offset + length > len(data):
            raise codec.WireError(f"{name} frame: payload {field_name!r} of {length} bytes runs past the end")
        if not msg.HasField(field_name):
            raise codec.WireError(f"{name} frame: a payload for {field_name!r}, which the head does not have")
        if getattr(msg, field_name).data:
            raise codec.WireError(f"{name} frame: {field_name!r} has data both inline and framed")
        payloads[field_name] = view[offset : offset + length]
        offset += length
    if offset != len(data):
        raise codec.WireError(f"{name} frame: {len(data) - offset} stray bytes after the last payload")
    return Framed(msg, payloads, wire_bytes=len(data))


def as_framed(message: Framed | Any) -> Framed:
    """``message`` itself if it is a :class:`Framed`, else a plain protobuf message wrapped (no payloads)."""
    return message if isinstance(message, Framed) else Framed(message)


def as_sent(reply: Framed | Any, framed: bool) -> Any:
    """``reply`` in the form its request came in: a :class:`Framed`, or a plain protobuf message."""
    return as_framed(reply) if framed else (reply.message() if isinstance(reply, Framed) else reply)


def wire_size(message: Framed | Any) -> int:
    """Bytes ``message`` takes on the wire: a frame's length, or a protobuf message's ``ByteSize()``."""
    return message.nbytes() if isinstance(message, Framed) else codec.message_size(message)
