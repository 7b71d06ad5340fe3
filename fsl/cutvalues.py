"""The values that cross a cut: one tensor, or an ordered dict of named tensors, and their signature.

A Sequential split sends one float tensor (the smashed activations). A split of an arbitrary model
by its graph sends every value the server segment needs: hidden states that need a gradient, an
attention mask (bool) or position ids (int64) that need none, a skip connection. Both are
:data:`Activations`; a single tensor is the one-entry case (named :data:`SINGLE`).

A :class:`Signature` says what a cut carries: per tensor its name, wire dtype, per-sample dims
(an ``int`` is a fixed size, a ``str`` a symbolic size such as ``"seq"`` that every tensor using
it must agree on, within ``bounds``) and whether a gradient comes back for it. The split server
checks every request against it before it decodes a byte, and a client can check against the
signature the server reports (``Info``) before it trains.

The helpers below are what the data plane does to cut values: batch size, concatenation of
requests along the batch and the split back, leaves that take gradients on the server, the
gradients collected from them, bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "FLOAT_DTYPES",
    "SINGLE",
    "Activations",
    "Signature",
    "SignatureError",
    "TensorSpec",
    "as_dict",
    "batch_size",
    "concat",
    "detached",
    "gradients",
    "leaves",
    "like",
    "map_floats",
    "map_hidden",
    "nbytes",
    "pad_key",
    "pad_to",
    "pad_value",
    "sample_key",
    "select_rows",
    "split",
    "symbol_sizes",
    "trim_to",
    "wire_dtype_name",
]

Activations = torch.Tensor | dict[str, torch.Tensor]

SINGLE = "activations"  # the name of the one tensor of a single-tensor cut (the wire's own field name)

# dtypes whose values a float spec accepts on the wire: the float casts and the int8 quantization
# (fsl/wire/compress.py); integer and bool tensors always travel exact, in their own dtype
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "int8")
_FLOAT_SPECS = ("float32", "float16", "bfloat16", "float64")
_TORCH = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _TORCH.items()}
DEFAULT_MAX_SIZE = 1 << 16  # upper bound of a symbolic size without declared bounds


class SignatureError(ValueError):
    """Cut values that do not fit a :class:`Signature`; the text names the tensor and says why."""


def wire_dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype (``torch.bool`` -> ``"bool"``)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise SignatureError(f"dtype {dtype} cannot cross a cut") from None


@dataclass(frozen=True)
class TensorSpec:
    """One tensor that crosses the cut: ``(B, *dims)`` of wire dtype ``dtype``.

    ``dims`` are per sample; a ``str`` is a symbolic size (``"seq"``) shared by every tensor that
    names it. ``grad``: the server returns dL/d(this tensor) (float tensors only).
    """

    name: str
    dtype: str
    dims: tuple[int | str, ...]
    grad: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in _TORCH:
            raise SignatureError(f"{self.name}: dtype {self.dtype!r} cannot cross a cut; use one of {sorted(_TORCH)}")
        if self.grad and not self.floating:
            raise SignatureError(f"{self.name}: a {self.dtype} tensor has no gradient")
        for d in self.dims:
            if isinstance(d, bool) or not isinstance(d, (int, str)) or (isinstance(d, int) and d < 0):
                raise SignatureError(f"{self.name}: dim {d!r} is neither a size nor a symbol")

    @property
    def floating(self) -> bool:
        return self.dtype in _FLOAT_SPECS

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH[self.dtype]

    def accepts(self, wire_dtype: str) -> bool:
        """Whether a tensor that travelled as ``wire_dtype`` may stand for this one."""
        return wire_dtype in FLOAT_DTYPES if self.floating else wire_dtype == self.dtype


@dataclass(frozen=True)
class Signature:
    """What a cut carries: its tensors in order and the bounds ``[low, high]`` of its symbolic sizes."""

    tensors: tuple[TensorSpec, ...]
    bounds: Mapping[str, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tensors:
            raise SignatureError("a cut carries at least one tensor")
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise SignatureError(f"tensor names repeat: {names}")
        for sym, (lo, hi) in self.bounds.items():
            if not 0 <= lo <= hi:
                raise SignatureError(f"bounds of {sym!r} must satisfy 0 <= low <= high, got [{lo}, {hi}]")

    @classmethod
    def single(cls, dims: Sequence[int], dtype: str = "float32") -> Signature:
        """The classic cut: one float tensor ``(B, *dims)`` named :data:`SINGLE`, with a gradient."""
        return cls((TensorSpec(SINGLE, dtype, tuple(int(d) for d in dims), grad=True),))

    @property
    def positional(self) -> bool:
        """One tensor named :data:`SINGLE`: the segments pass a plain tensor, not a dict."""
        return len(self.tensors) == 1 and self.tensors[0].name == SINGLE

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    @property
    def grad_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors if t.grad)

    def spec(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name:
                return t
        raise SignatureError(f"{name!r} is not a tensor of this cut; it carries {list(self.names)}")

    def bound(self, symbol: str) -> tuple[int, int]:
        return tuple(self.bounds.get(symbol, (1, DEFAULT_MAX_SIZE)))  # type: ignore[return-value]

    def max_elements(self, name: str, max_batch: int) -> int:
        """Most elements tensor ``name`` may hold in a batch of ``max_batch`` (symbols at their upper bound)."""
        dims = [d if isinstance(d, int) else self.bound(d)[1] for d in self.spec(name).dims]
        return max_batch * max(1, math.prod(dims))

    def check_shapes(
        self, shapes: Mapping[str, tuple[str, Sequence[int]]], *, max_batch: int | None = None
    ) -> tuple[int, dict[str, int]]:
        """Check ``name -> (wire dtype, shape)`` against the signature before anything is decoded.

        Returns the batch size and the value of every symbolic size; raises :class:`SignatureError`
        naming the tensor and what was wrong (a missing or unknown name, a dtype, a rank, a fixed
        size, a symbolic size that disagrees between tensors or leaves its bounds, a batch size
        that differs between tensors or leaves ``[1, max_batch]``).
        """
        unknown = [n for n in shapes if n not in self.names]
        if unknown:
            raise SignatureError(f"unknown tensor(s) {unknown}: this cut carries {list(self.names)}")
        missing = [n for n in self.names if n not in shapes]
        if missing:
            raise SignatureError(f"missing tensor(s) {missing}: this cut carries {list(self.names)}")
        batch: tuple[str, int] | None = None
        sizes: dict[str, tuple[str, int]] = {}
        for spec in self.tensors:
            dtype, raw = shapes[spec.name]
            shape = tuple(int(d) for d in raw)
            if not spec.accepts(dtype):
                accepted = f"one of {list(FLOAT_DTYPES)}" if spec.floating else spec.dtype
                raise SignatureError(f"{spec.name}: dtype {dtype!r}, expected {accepted}")
            if len(shape) != len(spec.dims) + 1:
                raise SignatureError(
                    f"{spec.name}: shape {list(shape)} has {len(shape)} dims, expected {len(spec.dims) + 1} "
                    f"(B, {', '.join(map(str, spec.dims))})"
                )
            if batch is None:
                batch = (spec.name, shape[0])
                if not 1 <= shape[0] <= (max_batch if max_batch is not None else shape[0]):
                    raise SignatureError(f"{spec.name}: batch size {shape[0]} outside [1, {max_batch}]")
            elif shape[0] != batch[1]:
                raise SignatureError(f"{spec.name}: batch size {shape[0]}, but {batch[0]!r} has {batch[1]}")
            for i, (d, want) in enumerate(zip(shape[1:], spec.dims, strict=True)):
                if isinstance(want, int):
                    if d != want:
                        raise SignatureError(f"{spec.name}: dim {i + 1} is {d}, expected {want} (shape {list(shape)})")
                    continue
                lo, hi = self.bound(want)
                if not lo <= d <= hi:
                    raise SignatureError(f"{spec.name}: {want!r} = {d} (dim {i + 1}) outside its bounds [{lo}, {hi}]")
                seen = sizes.setdefault(want, (spec.name, d))
                if seen[1] != d:
                    raise SignatureError(
                        f"{spec.name}: {want!r} = {d} (dim {i + 1}), but {seen[0]!r} has {want!r} = {seen[1]}"
                    )
        assert batch is not None
        return batch[1], {k: v for k, (_, v) in sizes.items()}

    def check(self, values: Activations, *, max_batch: int | None = None) -> int:
        """Check tensors (a client's, before it trains) against the signature; returns the batch size."""
        d = as_dict(values)
        shapes = {n: (wire_dtype_name(t.dtype), tuple(t.shape)) for n, t in d.items()}
        return self.check_shapes(shapes, max_batch=max_batch)[0]

    def example(self, batch: int = 1, device: torch.device | str = "cpu") -> Activations:
        """Zeros that fit the signature (symbols at their lower bound, at least 1): probes a segment."""
        sym = {s: max(1, self.bound(s)[0]) for t in self.tensors for s in t.dims if isinstance(s, str)}
        out = {
            t.name: torch.zeros(
                (batch, *(d if isinstance(d, int) else sym[d] for d in t.dims)), dtype=t.torch_dtype, device=device
            )
            for t in self.tensors
        }
        return out[SINGLE] if self.positional else out


# ----------------------------------------------------------------------------- helpers
def as_dict(values: Activations) -> dict[str, torch.Tensor]:
    """``values`` as a dict (a tensor becomes ``{SINGLE: tensor}``)."""
    return {SINGLE: values} if isinstance(values, torch.Tensor) else values


def like(values: Activations, d: dict[str, torch.Tensor]) -> Activations:
    """``d`` in the kind of ``values``: the one tensor for a tensor, the dict for a dict."""
    return d[SINGLE] if isinstance(values, torch.Tensor) else d


def batch_size(values: Activations) -> int:
    """Samples in ``values`` (the first dim of its first tensor; every tensor shares it)."""
    if isinstance(values, torch.Tensor):
        return int(values.shape[0])
    return int(next(iter(values.values())).shape[0]) if values else 0


def nbytes(values: Activations) -> int:
    """Bytes of the tensors' elements."""
    return sum(t.numel() * t.element_size() for t in as_dict(values).values())


def sample_key(values: Activations) -> tuple[tuple[str, tuple[int, ...]], ...] | None:
    """What requests must share to run in one batch: every tensor's per-sample shape (``None`` for a
    single tensor, whose per-sample shape admission fixed already)."""
    if isinstance(values, torch.Tensor):
        return None
    return tuple((n, tuple(t.shape[1:])) for n, t in values.items())


# ---------------------------------------------------------------- padding to a common length
# Requests whose symbolic sizes differ (sequences of different lengths) can share one server step
# when each is padded to the longest: positions appended at the end that every mask that crosses
# the cut marks as absent. That is exact for a segment that mixes positions only through attention
# under those masks and reads out per position or at a real one (BERT's [CLS], a causal LM's
# tokens): padded keys get no attention weight, so real positions compute what they did alone.
def pad_value(spec: TensorSpec) -> float | int | bool:
    """What fills the padded positions of ``spec``'s tensor: "absent" for a mask, zero otherwise.

    A float tensor without a gradient whose last dim is symbolic is taken for an additive
    attention mask over keys (HF's ``(B, 1, T, T)`` or ``(B, 1, 1, T)``): the most negative
    float32, so that a padded key gets zero weight and a padded query row stays finite. A bool or
    integer tensor (a 0/1 mask, position ids) is padded with 0 / False; hidden states (the float
    tensors that take gradients) with 0.0, which keeps every value finite.
    """
    if spec.floating and not spec.grad and spec.dims and isinstance(spec.dims[-1], str):
        return float(torch.finfo(torch.float32).min)
    return False if spec.dtype == "bool" else 0


def symbol_sizes(values: Activations, sig: Signature) -> dict[str, int]:
    """The value of every symbolic size in ``values`` (admission checked that tensors agree)."""
    d = as_dict(values)
    out: dict[str, int] = {}
    for spec in sig.tensors:
        for i, dim in enumerate(spec.dims):
            if isinstance(dim, str):
                out.setdefault(dim, int(d[spec.name].shape[i + 1]))
    return out


def pad_key(values: Activations, sig: Signature) -> tuple[tuple[str, tuple[int | str, ...]], ...] | None:
    """:func:`sample_key` with every symbolic size left a symbol: requests that differ only in
    their lengths share it (and may share a padded step)."""
    if isinstance(values, torch.Tensor):
        return None
    return tuple(
        (n, tuple(d if isinstance(d, str) else int(t.shape[i + 1]) for i, d in enumerate(sig.spec(n).dims)))
        for n, t in values.items()
    )


def pad_to(values: Activations, sig: Signature, sizes: Mapping[str, int]) -> Activations:
    """``values`` with every symbolic dim grown to ``sizes[symbol]`` at its end, filled with
    :func:`pad_value` (``values`` itself where nothing grows)."""
    d = as_dict(values)
    out: dict[str, torch.Tensor] = {}
    for spec in sig.tensors:
        t = d[spec.name]
        target = [t.shape[0], *(sizes[x] if isinstance(x, str) else t.shape[i + 1] for i, x in enumerate(spec.dims))]
        if list(t.shape) == target:
            out[spec.name] = t
            continue
        grown = torch.full(target, pad_value(spec), dtype=t.dtype, device=t.device)
        grown[tuple(slice(0, n) for n in t.shape)] = t
        out[spec.name] = grown
    return like(values, out)


def trim_to(t: torch.Tensor, spec: TensorSpec, sizes: Mapping[str, int]) -> torch.Tensor:
    """:func:`pad_to` undone for one tensor (a gradient): its symbolic dims cut back to ``sizes``."""
    for i, x in enumerate(spec.dims):
        if isinstance(x, str):
            t = t.narrow(i + 1, 0, sizes[x])
    return t


def concat(items: Sequence[Activations]) -> Activations:
    """Requests' values joined along the batch (one request: itself, not copied)."""
    if len(items) == 1:
        return items[0]
    if isinstance(items[0], torch.Tensor):
        return torch.cat(items)  # type: ignore[arg-type]
    return {n: torch.cat([as_dict(v)[n] for v in items]) for n in items[0]}


def split(values: Activations, sizes: Sequence[int]) -> list[Activations]:
    """:func:`concat` undone: ``values`` cut along the batch into parts of ``sizes`` (views)."""
    if isinstance(values, torch.Tensor):
        return list(values.split(list(sizes)))
    parts = {n: t.split(list(sizes)) for n, t in values.items()}
    return [{n: p[i] for n, p in parts.items()} for i in range(len(sizes))]


def select_rows(values: Activations, rows: torch.Tensor) -> Activations:
    """The samples ``rows`` (an index tensor) of every tensor."""
    if isinstance(values, torch.Tensor):
        return values[rows]
    return {n: t[rows] for n, t in values.items()}


def detached(values: Activations) -> Activations:
    return values.detach() if isinstance(values, torch.Tensor) else {n: t.detach() for n, t in values.items()}


def map_floats(values: Activations, fn: Callable[[torch.Tensor], torch.Tensor]) -> Activations:
    """``fn`` applied to every float tensor (a release mechanism, a cast); the others as they are."""
    if isinstance(values, torch.Tensor):
        return fn(values) if values.is_floating_point() else values
    return {n: fn(t) if t.is_floating_point() else t for n, t in values.items()}


def map_hidden(
    values: Activations, fn: Callable[[torch.Tensor], torch.Tensor], hidden: Collection[str] | None
) -> Activations:
    """``fn`` applied to the hidden states among ``values``, the others as they are.

    ``hidden`` names them (a traced client segment's ``hidden``: the values its parameters
    computed); ``None`` means every float tensor, right for a cut of one tensor. A release
    mechanism (clipping, noise) must not touch the rest: an additive attention mask holds the
    float32 minimum, whose per-sample norm overflows, so clipping it would zero the mask and let
    every position attend to the padding.
    """
    if hidden is None:
        return map_floats(values, fn)
    if isinstance(values, torch.Tensor):
        return fn(values) if SINGLE in hidden and values.is_floating_point() else values
    return {n: fn(t) if n in hidden and t.is_floating_point() else t for n, t in values.items()}


def leaves(
    values: Activations, names: Sequence[str], *, device: torch.device | str | None = None
) -> tuple[Activations, dict[str, torch.Tensor]]:
    """The server step's inputs: ``values`` on ``device`` with the float tensors in ``names`` as fresh
    leaves that take gradients (float tensors as float32 unless they are float64). Returns the inputs
    (the kind of ``values``) and the leaves by name."""
    out: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    for n, t in as_dict(values).items():
        if t.is_floating_point() and t.dtype != torch.float64:
            t = t.to(device, dtype=torch.float32)
        elif device is not None:
            t = t.to(device)
        if n in names and t.is_floating_point():
            t = t.detach().requires_grad_(True)
            grads[n] = t
        out[n] = t
    return like(values, out), grads


def gradients(leaf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gradients the leaves took (zeros where the segment did not use one)."""
    return {n: t.grad if t.grad is not None else torch.zeros_like(t) for n, t in leaf.items()}
