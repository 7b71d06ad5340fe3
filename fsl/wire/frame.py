"""Framed data-plane messages: tensor payloads beside the protobuf message, not inside it.

Protobuf holds a ``bytes`` field in its own memory, so a tensor that travels inside a message is
copied on its way from the tensor to the socket (``tobytes``, the field setter, serialization)
and again on its way back (parsing, reading the field): about 0.1-0.2 ms per copy per megabyte
(``benchmarks/bench_dataplane.py``). A frame carries the same message with the large
tensors' ``data`` left empty and their raw bytes appended after it. The sender joins the parts
into the one buffer gRPC sends (one copy, from the tensor's memory); the receiver's tensors view
the received bytes (no copy).

Layout (little endian)::

    b"FSF1" | u32 head_len | u32 count | count x (u32 field number, u32 index, u64 length)
    | head (the protobuf message, framed tensors without data) | payloads

Each payload starts at the next multiple of 16 bytes from the start of the frame, in the order
of the table; the frame ends with the last payload. A payload belongs to a top-level ``Tensor``
field (index 0) or to the ``tensor`` of entry ``index`` of a top-level repeated ``NamedTensor``
field (the named tensors of a cut); each at most once, and a framed tensor's ``data`` in the head
must be empty. Any protobuf
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

__all__ = ["MAGIC", "Framed", "Key", "as_framed", "as_sent", "frame_bytes", "parse", "wire_size"]

MAGIC = b"FSF1"
_PREFIX = struct.Struct("<4sII")  # magic, head length, payload count
_ENTRY = struct.Struct("<IIQ")  # field number, index in a repeated field (0 for a Tensor field), payload length
_ALIGN = 16  # numpy views need the element size (8 at most); the bytes object itself is 16-aligned
_MAX_PAYLOADS = 64  # a graph cut carries a few tensors; a frame claiming thousands is refused unread

# a payload's place in the message: a top-level Tensor field's name, or (repeated NamedTensor field, index)
Key = str | tuple[str, int]


@functools.cache
def _tensor_fields(message_type: Any) -> dict[int, str]:
    return {
        f.number: f.name
        for f in message_type.DESCRIPTOR.fields
        if f.message_type is not None and f.message_type.full_name == pb.Tensor.DESCRIPTOR.full_name
    }


@functools.cache
def _named_fields(message_type: Any) -> dict[int, str]:
    return {
        f.number: f.name
        for f in message_type.DESCRIPTOR.fields
        if f.message_type is not None
        and f.is_repeated
        and f.message_type.full_name == pb.NamedTensor.DESCRIPTOR.full_name
    }


@functools.cache
def _field_numbers(message_type: Any) -> dict[str, int]:
    both = _tensor_fields(message_type) | _named_fields(message_type)
    return {name: number for number, name in both.items()}


def _wire_tensor(msg: Any, key: Key) -> Any:
    """The ``Tensor`` message a payload key names inside ``msg``."""
    if isinstance(key, str):
        return getattr(msg, key)
    return getattr(msg, key[0])[key[1]].tensor


def _pad(offset: int) -> int:
    return -offset % _ALIGN


def _bytes_view(raw: Any) -> memoryview:
    """A flat byte view of a payload (a numpy array or a buffer), without copying it."""
    return memoryview(np.ascontiguousarray(raw).data if isinstance(raw, np.ndarray) else raw).cast("B")


@dataclass
class Framed:
    """A data-plane message and the raw payloads of some of its tensor fields.

    ``payloads`` maps a top-level ``Tensor`` field's name, or ``(field, index)`` of an entry of a
    repeated ``NamedTensor`` field, to its raw bytes: a numpy array (a message being sent: the
    tensor's own memory) or a ``memoryview`` of a received frame. The tensor in ``msg`` holds
    dtype, shape and scale, and no data.
    """

    msg: Any
    payloads: dict[Key, Any] = field(default_factory=dict)
    wire_bytes: int | None = field(default=None, repr=False)  # the frame's length, once built or parsed

    def data(self, name: Key) -> Any:
        """The raw bytes of tensor ``name``: its payload (a byte view), or the data inside the message."""
        got = self.payloads.get(name)
        return _wire_tensor(self.msg, name).data if got is None else _bytes_view(got)

    def tensor(self, name: Key, *, max_elements: int | None = None) -> torch.Tensor:
        """Decode tensor ``name`` (a view of the received bytes when it was framed)."""
        got = self.payloads.get(name)
        data = None if got is None else _bytes_view(got)
        label = name if isinstance(name, str) else f"{name[0]}[{getattr(self.msg, name[0])[name[1]].name!r}]"
        return codec.decode(_wire_tensor(self.msg, name), name=label, max_elements=max_elements, data=data)

    def named(self, field_name: str) -> dict[str, torch.Tensor]:
        """Repeated ``NamedTensor`` field ``field_name`` decoded into an ordered dict (names must not repeat)."""
        out: dict[str, torch.Tensor] = {}
        for i, nt in enumerate(getattr(self.msg, field_name)):
            if nt.name in out:
                raise codec.WireError(f"{field_name}: {nt.name!r} appears twice")
            out[nt.name] = self.tensor((field_name, i))
        return out

    def message(self) -> Any:
        """The plain protobuf message, payloads copied back inside (for code that wants one)."""
        if not self.payloads:
            return self.msg
        out = type(self.msg)()
        out.CopyFrom(self.msg)
        for name, raw in self.payloads.items():
            _wire_tensor(out, name).data = bytes(_bytes_view(raw))
        return out

    def nbytes(self) -> int:
        """Length of :func:`frame_bytes` of this message (without building it, if it was not)."""
        if self.wire_bytes is not None:
            return self.wire_bytes
        top = {k for k in self.payloads if isinstance(k, str)}
        offset = _PREFIX.size + len(self.payloads) * _ENTRY.size + codec.message_size(self.msg, top)
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

    def add(self, field_name: str, name: str, x: torch.Tensor, dtype: Any = None) -> None:
        """Append ``x`` as entry ``name`` of repeated ``NamedTensor`` field ``field_name``, framed when
        dense. ``dtype`` (a float dtype or a compressed format) applies to float tensors only:
        integer and bool tensors travel exact."""
        self.wire_bytes = None
        items = getattr(self.msg, field_name)
        index = len(items)
        arr = codec.encode_payload(items.add(name=name).tensor, x, dtype if x.is_floating_point() else None)
        if arr is not None:
            self.payloads[(field_name, index)] = arr

    def add_all(self, field_name: str, values: dict[str, torch.Tensor], dtype: Any = None) -> None:
        """:meth:`add` for every entry of ``values``, in order."""
        for n, x in values.items():
            self.add(field_name, n, x, dtype)


def frame_bytes(message: Framed | Any) -> bytes:
    """The frame of ``message`` (a :class:`Framed` or a plain protobuf message) as one buffer.

    One copy of every payload, from its own memory into the buffer gRPC sends.
    """
    framed = message if isinstance(message, Framed) else Framed(message)
    msg, payloads = framed.msg, framed.payloads
    numbers = _field_numbers(type(msg))  # type: ignore[arg-type]  # mypy holds type[Any] unhashable
    head = msg.SerializeToString()
    views = [(name, _bytes_view(raw)) for name, raw in payloads.items()]
    parts: list[Any] = [_PREFIX.pack(MAGIC, len(head), len(views))]
    parts += [
        _ENTRY.pack(numbers[key], 0, v.nbytes)
        if isinstance(key, str)
        else _ENTRY.pack(numbers[key[0]], key[1], v.nbytes)
        for key, v in views
    ]
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
    named = _named_fields(message_type)
    entries: list[tuple[Key, int]] = []
    seen: set[Key] = set()
    for i in range(count):
        number, index, length = _ENTRY.unpack_from(data, _PREFIX.size + i * _ENTRY.size)
        key: Key
        if number in fields and index == 0:
            key = fields[number]
        elif number in named:
            key = (named[number], index)
        else:
            raise codec.WireError(f"{name} frame: payload {i} names field {number}, not a tensor of {name}")
        if key in seen:
            raise codec.WireError(f"{name} frame: {_label(key)} framed twice")
        seen.add(key)
        entries.append((key, length))
    view = memoryview(data)
    try:
        msg = message_type.FromString(view[table_end : table_end + head_len])
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise codec.WireError(f"{name} frame: the head is not a valid {name}: {e}") from None
    payloads: dict[Key, memoryview] = {}
    offset = table_end + head_len
    for key, length in entries:
        offset += _pad(offset)
        if offset + length > len(data):
            raise codec.WireError(f"{name} frame: payload {_label(key)} of {length} bytes runs past the end")
        if isinstance(key, str):
            present = msg.HasField(key)
        else:
            present = key[1] < len(getattr(msg, key[0])) and getattr(msg, key[0])[key[1]].HasField("tensor")
        if not present:
            raise codec.WireError(f"{name} frame: a payload for {_label(key)}, which the head does not have")
        if _wire_tensor(msg, key).data:
            raise codec.WireError(f"{name} frame: {_label(key)} has data both inline and framed")
        payloads[key] = view[offset : offset + length]
        offset += length
    if offset != len(data):
        raise codec.WireError(f"{name} frame: {len(data) - offset} stray bytes after the last payload")
    return Framed(msg, payloads, wire_bytes=len(data))


def _label(key: Key) -> str:
    return repr(key) if isinstance(key, str) else f"{key[0]}[{key[1]}]"


def as_framed(message: Framed | Any) -> Framed:
    """``message`` itself if it is a :class:`Framed`, else a plain protobuf message wrapped (no payloads)."""
    return message if isinstance(message, Framed) else Framed(message)


def as_sent(reply: Framed | Any, framed: bool) -> Any:
    """``reply`` in the form its request came in: a :class:`Framed`, or a plain protobuf message."""
    return as_framed(reply) if framed else (reply.message() if isinstance(reply, Framed) else reply)


def wire_size(message: Framed | Any) -> int:
    """Bytes ``message`` takes on the wire: a frame's length, or a protobuf message's ``ByteSize()``."""
    return message.nbytes() if isinstance(message, Framed) else codec.message_size(message)
