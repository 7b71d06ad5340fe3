"""What a split-inference request costs: measured model profiles, device and network profiles.

A :class:`ModelProfile` is *measured* on the machine that runs :func:`profile_model`: the
forward latency of every block of an ``nn.Sequential`` (eval mode, ``no_grad``, the median
of timed repeats after a warm-up) at a few batch sizes, plus what can be counted exactly:
forward FLOPs per block (torch's ``FlopCounterMode``, as in :mod:`fsl.costs`), float32 bytes
per sample at every cut, parameter bytes and an activation-memory estimate.

Other machines enter as a :class:`DeviceProfile` whose ``speed`` is throughput relative to
the profiling host running with one thread (``1.0`` = this host). The built-in
:data:`DEVICES` are *declared* estimates, not measurements; :meth:`DeviceProfile.measured`
builds one from a profile measured on the other machine. A :class:`NetworkProfile` turns
bytes into milliseconds.

Cut names follow :mod:`fsl.models`: a cut is the last block that stays on the device.
Two cuts exist beyond the model's own: ``"input"`` (nothing runs on the device, the raw
input is sent: all cloud) and the model's last block (everything runs on the device).

Any other model (a Hugging Face RegNet or BERT, a plug-in) is profiled by
:func:`profile_graph_model`: its blocks are the segments between module paths of its traced
graph (:mod:`fsl.graphsplit`), and what a cut sends is every value that crosses it (skip
connections, attention masks), at the dtypes that travel, as :func:`fsl.graphsplit.cut_table`
counts them.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from fsl.costs import count_flops

__all__ = [
    "DEVICES",
    "INPUT",
    "NETWORKS",
    "DeviceProfile",
    "ModelProfile",
    "NetworkProfile",
    "profile_graph_model",
    "profile_model",
]

INPUT = "input"  # the cut before the first block: the raw input is sent (all cloud)
_FLOAT32 = 4  # bytes


def _interp(xs: Sequence[int], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear ``y(x)`` through measured points, extrapolated from the end segments.

    The slope used beyond the measured range is clamped at zero (a noisy measurement must not
    make a bigger batch cheaper); the result is never negative.
    """
    if len(xs) == 1:
        return max(0.0, ys[0] * x / xs[0])  # one point: proportional in batch
    if x <= xs[0]:
        i = 0
    elif x >= xs[-1]:
        i = len(xs) - 2
    else:
        i = next(k for k in range(len(xs) - 1) if xs[k] <= x <= xs[k + 1])
    slope = (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
    if x < xs[0] or x > xs[-1]:
        slope = max(slope, 0.0)
    anchor = i + 1 if x > xs[-1] else i
    return max(0.0, ys[anchor] + slope * (x - xs[anchor]))


@dataclass
class ModelProfile:
    """Per-block costs of one model, measured on one host.

    Attributes
    ----------
    blocks : list of str
        Block names in forward order.
    input_shape : tuple of int
        Per-sample input shape (C, H, W).
    batch_sizes : list of int
        Batch sizes the latencies were measured at, ascending.
    block_ms : dict
        ``block_ms[block][i]`` is the median forward latency (ms) of ``block`` at
        ``batch_sizes[i]``.
    total_ms : list of float
        Median latency of the whole model per batch size, timed in one call (a check on the
        sum of the blocks, which also includes per-call overheads).
    block_flops : dict
        Forward FLOPs per sample of every block (convolutions and matrix products).
    input_bytes : int
        Float32 bytes of one input sample (what the ``"input"`` cut sends).
    out_bytes : dict
        Float32 bytes per sample of every block's output (what a cut after it sends).
    param_bytes : dict
        Bytes of every block's parameters and buffers.
    act_bytes : dict
        Estimated peak activation bytes per sample while the block runs (its input, which a
        residual block keeps alive, plus the largest input + output of one of its layers).
    threads : int
        ``torch`` intra-op threads used while timing.
    repeats : int
        Timed repeats per measurement.
    host : str
        What the profile was measured on.
    notes : dict
        What else a reader needs to know (the model, what the ``"input"`` cut sends, the host's
        load while timing); free text, not read by the planner.
    """

    blocks: list[str]
    input_shape: tuple[int, ...]
    batch_sizes: list[int]
    block_ms: dict[str, list[float]]
    total_ms: list[float]
    block_flops: dict[str, float]
    input_bytes: int
    out_bytes: dict[str, int]
    param_bytes: dict[str, int]
    act_bytes: dict[str, int]
    threads: int = 1
    repeats: int = 0
    host: str = ""
    notes: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (see :meth:`from_dict`)."""
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelProfile:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["input_shape"] = tuple(d["input_shape"])
        return cls(**d)

    def scaled(self, time_factor: float) -> ModelProfile:
        """A what-if copy whose latencies and FLOPs are ``time_factor`` times this one's.

        Bytes and memory are unchanged: it stands for a model of the same shape that is
        ``time_factor`` times heavier to compute (or for this model on a slower host).
        """
        if time_factor <= 0:
            raise ValueError(f"time_factor must be positive, got {time_factor}")
        return replace(
            self,
            block_ms={b: [t * time_factor for t in ts] for b, ts in self.block_ms.items()},
            total_ms=[t * time_factor for t in self.total_ms],
            block_flops={b: f * time_factor for b, f in self.block_flops.items()},
            host=f"{self.host} (x{time_factor:g})",
        )

    # ------------------------------------------------------------------ blocks and cuts
    @property
    def last_block(self) -> str:
        """Name of the last block (the cut that keeps the whole model on the device)."""
        return self.blocks[-1]

    @property
    def cuts(self) -> list[str]:
        """Every cut, from all-cloud (``"input"``) to all-on-device (the last block)."""
        return [INPUT, *self.blocks]

    def _index(self, cut: str) -> int:
        """Number of blocks that run on the device for ``cut``."""
        if cut == INPUT:
            return 0
        if cut not in self.blocks:
            raise ValueError(f"unknown cut {cut!r}; choose one of {self.cuts}")
        return self.blocks.index(cut) + 1

    def client_blocks(self, cut: str) -> list[str]:
        """Blocks that run on the device for ``cut``."""
        return self.blocks[: self._index(cut)]

    def server_blocks(self, cut: str) -> list[str]:
        """Blocks that run on the server for ``cut``."""
        return self.blocks[self._index(cut) :]

    def cut_bytes(self, cut: str) -> int:
        """Float32 bytes per sample that cross the network at ``cut``.

        ``"input"`` sends the raw input (as float32); a block sends its output; the last block
        sends the logits (what a device would report if the result has to leave it).
        """
        return self.input_bytes if cut == INPUT else self.out_bytes[self.blocks[self._index(cut) - 1]]

    @property
    def logits_bytes(self) -> int:
        """Float32 bytes per sample of the model's output."""
        return self.out_bytes[self.last_block]

    # ------------------------------------------------------------------ latency, FLOPs, memory
    def block_latency_ms(self, block: str, batch: float) -> float:
        """Latency (ms, this host) of ``block`` at ``batch``, interpolated between measured sizes."""
        return _interp(self.batch_sizes, self.block_ms[block], batch)

    def blocks_ms(self, blocks: Sequence[str], batch: float, speed: float = 1.0) -> float:
        """Latency (ms) of running ``blocks`` one after another at ``batch`` on a machine ``speed``."""
        if speed <= 0:
            raise ValueError(f"speed must be positive, got {speed}")
        return sum(self.block_latency_ms(b, batch) for b in blocks) / speed

    def _span(self, first_block: str | None, last_block: str | None) -> list[str]:
        i = 0 if first_block is None else self.blocks.index(first_block)
        j = len(self.blocks) - 1 if last_block is None else self.blocks.index(last_block)
        if j < i:
            raise ValueError(f"segment {first_block!r}..{last_block!r} is empty (blocks are {self.blocks})")
        return self.blocks[i : j + 1]

    def segment_ms(self, first_block: str | None, last_block: str | None, batch: float, speed: float = 1.0) -> float:
        """Latency (ms) of blocks ``first_block`` .. ``last_block`` (inclusive) at ``batch``.

        ``None`` means the first (or last) block of the model. Latency is interpolated linearly
        in batch between measured sizes and extrapolated beyond them, then divided by ``speed``
        (throughput relative to the profiling host).
        """
        return self.blocks_ms(self._span(first_block, last_block), batch, speed)

    def segment_flops(self, first_block: str | None, last_block: str | None) -> float:
        """Forward FLOPs per sample of blocks ``first_block`` .. ``last_block`` (inclusive)."""
        return float(sum(self.block_flops[b] for b in self._span(first_block, last_block)))

    def client_ms(self, cut: str, batch: float = 1, speed: float = 1.0) -> float:
        """Latency (ms) of the device segment for ``cut`` (0 for ``"input"``)."""
        return self.blocks_ms(self.client_blocks(cut), batch, speed)

    def server_ms(self, cut: str, batch: float = 1, speed: float = 1.0) -> float:
        """Latency (ms) of the server segment for ``cut`` (0 for the last block)."""
        return self.blocks_ms(self.server_blocks(cut), batch, speed)

    def memory_bytes(self, blocks: Sequence[str], batch: int = 1) -> int:
        """Estimated memory to run ``blocks`` at ``batch``: parameters + peak activations."""
        if not blocks:
            return 0
        return sum(self.param_bytes[b] for b in blocks) + batch * max(self.act_bytes[b] for b in blocks)

    def flops(self, blocks: Sequence[str]) -> float:
        """Forward FLOPs per sample of ``blocks``."""
        return float(sum(self.block_flops[b] for b in blocks))


# ---------------------------------------------------------------------- measuring


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(o) for o in obj)
    return 0


def _peak_layer_bytes(block: nn.Module, x: torch.Tensor) -> int:
    """Largest input + output bytes of one leaf layer of ``block`` on ``x`` (one sample)."""
    peak = 0

    def hook(_m: nn.Module, inputs: Any, output: Any) -> None:
        nonlocal peak
        peak = max(peak, _tensor_bytes(inputs) + _tensor_bytes(output))

    leaves = [m for m in block.modules() if not list(m.children())] or [block]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        out = block(x)
    finally:
        for h in handles:
            h.remove()
    return max(peak, _tensor_bytes(x) + _tensor_bytes(out))


def _time_ms(fn: Any, x: Any, repeats: int, warmup: int, sync: Any, stat: Any = statistics.median) -> float:
    for _ in range(warmup):
        fn(x)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        fn(x)
        sync()
        times.append((time.perf_counter_ns() - t0) / 1e6)
    return float(stat(times))


def _forward_with_flops(block: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``block(h)`` and the FLOPs torch counted for it."""
    out: list[torch.Tensor] = []
    flops = count_flops(lambda: out.append(block(h)))
    return out[0], float(flops)


def profile_model(
    model: nn.Sequential,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 8, 32),
    repeats: int = 15,
    threads: int = 1,
    warmup: int = 3,
    device: str | torch.device = "cpu",
) -> ModelProfile:
    """Measure per-block latency, FLOPs, bytes and memory of ``model`` on this machine.

    Parameters
    ----------
    model : nn.Sequential
        A model of named blocks (as built by :func:`fsl.models.build_model`). It is put in
        eval mode for the measurement and its mode is restored afterwards.
    input_shape : sequence of int
        Per-sample input shape, e.g. ``(1, 28, 28)``.
    batch_sizes : sequence of int
        Batch sizes to time, e.g. ``(1, 8, 32)``.
    repeats : int
        Timed repeats per block and batch size; the median is kept.
    threads : int
        ``torch`` intra-op threads while timing (restored afterwards). Device speeds in
        :data:`DEVICES` are relative to a one-thread profile.
    warmup : int
        Untimed calls before timing.
    device : str or torch.device
        Where to run (``"cuda"`` synchronizes around every timed call).

    Returns
    -------
    ModelProfile
    """
    if repeats < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError("repeats must be >= 1 and batch_sizes a non-empty list of positive sizes")
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    names = [name for name, _ in model.named_children()]
    blocks = [module for _, module in model.named_children()]
    modes = {m: m.training for m in model.modules()}
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model.eval().to(dev)
        with torch.no_grad():
            # exact, per-sample quantities from one sample
            h = torch.zeros(1, *input_shape, device=dev)  # (1, C, H, W)
            input_bytes = h.numel() * _FLOAT32
            flops: dict[str, float] = {}
            out_bytes: dict[str, int] = {}
            act: dict[str, int] = {}
            params: dict[str, int] = {}
            for name, block in zip(names, blocks, strict=True):
                out, flops[name] = _forward_with_flops(block, h)
                act[name] = _tensor_bytes(h) + _peak_layer_bytes(block, h)
                out_bytes[name] = out[0].numel() * _FLOAT32  # (1, ...) -> one sample
                params[name] = sum(_tensor_bytes(t) for t in (*block.parameters(), *block.buffers()))
                h = out
            # latencies
            sizes = sorted(set(int(b) for b in batch_sizes))
            block_ms: dict[str, list[float]] = {n: [] for n in names}
            total_ms: list[float] = []
            gen = torch.Generator().manual_seed(0)
            for b in sizes:
                x = torch.rand(b, *input_shape, generator=gen).to(dev)  # (B, C, H, W)
                for name, block in zip(names, blocks, strict=True):
                    block_ms[name].append(_time_ms(block, x, repeats, warmup, sync))
                    x = block(x)  # the next block's input, (B, ...) smashed
                x = torch.rand(b, *input_shape, generator=gen).to(dev)
                total_ms.append(_time_ms(model, x, repeats, warmup, sync))
    finally:
        torch.set_num_threads(old_threads)
        for m, mode in modes.items():
            m.training = mode
    host = f"{platform.machine()} {platform.processor() or platform.node()} torch {torch.__version__} {dev}"
    return ModelProfile(
        blocks=names,
        input_shape=tuple(int(s) for s in input_shape),
        batch_sizes=sizes,
        block_ms=block_ms,
        total_ms=total_ms,
        block_flops=flops,
        input_bytes=input_bytes,
        out_bytes=out_bytes,
        param_bytes=params,
        act_bytes=act,
        threads=threads,
        repeats=repeats,
        host=host.strip(),
    )


Inputs = torch.Tensor | Mapping[str, torch.Tensor]


def _cpu_name() -> str:
    """The CPU model as the kernel reports it (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sample_bytes(x: Inputs) -> int:
    """Bytes of one sample of ``x`` (a batch, or a dict of batches), at the dtypes it has."""
    tensors = list(x.values()) if isinstance(x, Mapping) else [x]
    return sum(t[0].numel() * t.element_size() for t in tensors)


def _peak_op_bytes(fn: Callable[[], Any], exclude: set[int]) -> int:
    """Largest bytes of one operation's inputs and outputs while ``fn()`` runs.

    Tensors whose storage is in ``exclude`` (the segment's parameters and buffers, counted apart)
    are left out; views count at their own size, so a broadcast errs high.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    peak = 0

    class _Peak(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            nonlocal peak
            out = func(*args, **(kwargs or {}))
            leaves = tree_leaves((args, kwargs, out))
            nbytes = sum(
                t.numel() * t.element_size()
                for t in leaves
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in exclude
            )
            peak = max(peak, nbytes)
            return out

    with _Peak():
        fn()
    return peak


def _run_segments(segments: Sequence[nn.Module], x: Inputs) -> tuple[list[Any], Any]:
    """Each segment's input (the model's input for the first, the values it receives for the
    others) and the last segment's output, running ``segments`` in order on ``x``."""
    pool: dict[str, torch.Tensor] = {}
    inputs: list[Any] = []
    out: Any = None
    for k, seg in enumerate(segments):
        inp = x if k == 0 else {n: pool[n] for n in seg.input_names}
        inputs.append(inp)
        out = seg(inp)
        if k < len(segments) - 1:
            pool.update(out)
    return inputs, out


def _timed_segments(segments: Sequence[nn.Module], x: Inputs) -> list[float]:
    """Milliseconds of each segment in one pass of ``x`` through all of them, one after another.

    Timed in the chain rather than one block at a time on a cached input: a block then finds the
    caches as the blocks before it left them, as it does when the model runs whole.
    """
    pool: dict[str, torch.Tensor] = {}
    times = []
    for k, seg in enumerate(segments):
        inp = x if k == 0 else {n: pool[n] for n in seg.input_names}
        t0 = time.perf_counter_ns()
        out = seg(inp)
        times.append((time.perf_counter_ns() - t0) / 1e6)
        if k < len(segments) - 1:
            pool.update(out)
    return times


def profile_graph_model(
    model: nn.Module,
    make_batch: Callable[[int], Inputs],
    cuts: Sequence[str],
    batch_sizes: Sequence[int] = (1, 8, 32),
    repeats: int = 15,
    threads: int = 1,
    warmup: int = 3,
    *,
    dynamic: Mapping[str, Mapping[int, str]] | None = None,
    bounds: Mapping[str, tuple[int, int]] | None = None,
    head: str = "head",
    input_bytes: int | None = None,
    notes: Mapping[str, Any] | None = None,
    statistic: str = "median",
) -> ModelProfile:
    """Measure a model that is split by its traced graph, block by block, on this machine (CPU).

    The model is traced once (:func:`fsl.graphsplit.trace`) and split at every path of ``cuts``
    at once; block ``cuts[i]`` is the segment that ends with that module, and ``head`` is the
    rest of the model after the last cut. Per block: the forward latency of its segment (eval
    mode, ``no_grad``; ``statistic`` of the repeats) at each batch size, timed as the segments run
    one after another; FLOPs from the traced graph's per-operation count (the client's FLOPs share
    at each cut, :func:`fsl.graphsplit.cut_table`, times the model's FLOPs); the bytes one sample sends when the model is cut there alone (every value
    crossing the cut, at its dtype); its parameters; and an activation estimate (the values it
    receives plus the largest operation's inputs and outputs, parameters excluded).

    Parameters
    ----------
    model : nn.Module
        The model (its training mode is restored afterwards).
    make_batch : callable
        ``make_batch(b)``: inputs of batch ``b`` (a tensor, or a dict by argument name, as the
        model takes them). The trace and the bytes per cut use ``make_batch(2)``.
    cuts : sequence of str
        Module paths in forward order; each must be a legal cut of the model.
    batch_sizes, repeats, threads, warmup
        As for :func:`profile_model`.
    dynamic, bounds
        The inputs' varying dimensions and their bounds, as for :func:`fsl.graphsplit.trace`.
    head : str
        Name of the block after the last cut (the all-on-device cut).
    input_bytes : int, optional
        Bytes of one raw input sample as a device would send it for the ``"input"`` cut; by
        default the model's input tensors at their dtypes.
    notes : mapping, optional
        Saved with the profile (what the model is, why ``input_bytes`` is what it is).
    statistic : str
        ``"median"`` of the timed repeats, or ``"min"``: on a host shared with other jobs every
        interruption only adds time, so the fastest repeat is the closest to the model's own cost.
    """
    from fsl.graphsplit import cut_table, split_traced, trace
    from fsl.models import logits_of, run_model

    if repeats < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError("repeats must be >= 1 and batch_sizes a non-empty list of positive sizes")
    if not cuts:
        raise ValueError("give at least one cut")
    if head in cuts:
        raise ValueError(f"the head block's name {head!r} is also a cut")
    stats = {"median": statistics.median, "min": min}
    if statistic not in stats:
        raise ValueError(f"statistic must be one of {list(stats)}, not {statistic!r}")
    stat = stats[statistic]
    known = {name for name, _ in model.named_modules() if name}
    unknown = [c for c in cuts if c not in known]
    if unknown:
        raise ValueError(f"not module paths of {type(model).__name__}: {unknown}")
    modes = {m: m.training for m in model.modules()}
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    try:
        model.eval()
        example = make_batch(2)  # the trace needs a batch of 2 or more (a batch of 1 is specialised)
        with torch.no_grad():
            traced = trace(model, example, dynamic, bounds)
            rows, refused = cut_table(traced, example, list(cuts))
            by_cut = {r.cut: r for r in rows}
            bad = {c: refused[c] for c in cuts if c not in by_cut}
            if bad:
                raise ValueError(f"not legal cuts: {bad}")
            shares = [by_cut[c].client_flops for c in cuts]
            if any(b < a - 1e-9 for a, b in zip(shares, shares[1:], strict=False)):
                raise ValueError(f"cuts must be in forward order: the client's FLOPs share goes {shares}")
            one = make_batch(1)
            total_flops = float(count_flops(lambda: run_model(model, one)))
            split = split_traced(traced, list(cuts))
            segments = split.segments
            for seg in segments:
                seg.eval()
            names = [*cuts, head]
            cum = [0.0, *shares, 1.0]
            flops = {n: float(round(max(0.0, cum[i + 1] - cum[i]) * total_flops)) for i, n in enumerate(names)}
            seg_inputs, logits = _run_segments(segments, one)
            out_bytes = {c: by_cut[c].bytes_per_sample for c in cuts}
            out_bytes[head] = logits_of(logits)[0].numel() * _FLOAT32
            params: dict[str, int] = {}
            act: dict[str, int] = {}
            for name, seg, inp in zip(names, segments, seg_inputs, strict=True):
                own = [*seg.parameters(), *seg.buffers()]
                params[name] = sum(_tensor_bytes(t) for t in own)
                storages = {t.untyped_storage().data_ptr() for t in own}
                act[name] = _sample_bytes(inp) + _peak_op_bytes(lambda s=seg, i=inp: s(i), storages)
            sizes = sorted(set(int(b) for b in batch_sizes))
            block_ms: dict[str, list[float]] = {n: [] for n in names}
            total_ms: list[float] = []
            for b in sizes:
                x = make_batch(b)
                for _ in range(warmup):
                    _run_segments(segments, x)
                runs = [_timed_segments(segments, x) for _ in range(repeats)]
                for i, name in enumerate(names):
                    block_ms[name].append(float(stat([r[i] for r in runs])))
                total_ms.append(_time_ms(lambda v: run_model(model, v), x, repeats, warmup, lambda: None, stat))
    finally:
        torch.set_num_threads(old_threads)
        for m, mode in modes.items():
            m.training = mode
    first = next(iter(one.values())) if isinstance(one, Mapping) else one
    host = f"{platform.machine()} {platform.processor() or platform.node()} torch {torch.__version__} cpu"
    return ModelProfile(
        blocks=names,
        input_shape=tuple(int(s) for s in first.shape[1:]),
        batch_sizes=sizes,
        block_ms=block_ms,
        total_ms=total_ms,
        block_flops=flops,
        input_bytes=_sample_bytes(one) if input_bytes is None else int(input_bytes),
        out_bytes=out_bytes,
        param_bytes=params,
        act_bytes=act,
        threads=threads,
        repeats=repeats,
        host=host.strip(),
        notes={**dict(notes or {}), "statistic": statistic, "cpu": _cpu_name(), "load_avg_1m_before": load},
    )


# ---------------------------------------------------------------------- devices


@dataclass(frozen=True)
class DeviceProfile:
    """A machine that runs a segment of the model."""

    name: str  # identifier, e.g. "pi4"
    tier: str  # "device", "edge" or "cloud"
    # throughput relative to the profiling host with one thread (1.0 = that host): a segment that
    # takes t ms in the ModelProfile takes t / speed here
    speed: float
    memory_mb: float  # memory available to the model segment (MiB)
    declared: bool = True  # True when speed is an estimate written down rather than measured
    note: str = ""  # where the figure comes from
    # fixed cost per block call (ms) that does not shrink with speed (kernel launches on a GPU, for
    # instance); 0 for CPUs, whose overheads are already in the host profile
    overhead_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.speed <= 0:
            raise ValueError(f"device {self.name!r}: speed must be positive, got {self.speed}")
        if self.tier not in ("device", "edge", "cloud"):
            raise ValueError(f"device {self.name!r}: tier must be 'device', 'edge' or 'cloud', not {self.tier!r}")

    def compute_ms(self, profile: ModelProfile, blocks: Sequence[str], batch: float = 1) -> float:
        """Latency (ms) of ``blocks`` at ``batch`` on this device."""
        if not blocks:
            return 0.0
        return profile.blocks_ms(blocks, batch, self.speed) + self.overhead_ms * len(blocks)

    def fits(self, profile: ModelProfile, blocks: Sequence[str], batch: int = 1) -> bool:
        """Whether ``blocks`` at ``batch`` fit in this device's memory."""
        return profile.memory_bytes(blocks, batch) <= self.memory_mb * 2**20

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceProfile:
        return cls(**d)

    @classmethod
    def measured(
        cls,
        name: str,
        model_profile_on_device: ModelProfile,
        host_profile: ModelProfile,
        tier: str = "device",
        memory_mb: float = 1024.0,
    ) -> DeviceProfile:
        """A device whose speed is measured: the same model profiled there and on the host.

        ``speed`` is the median over the batch sizes both profiles share of
        ``host total latency / device total latency`` (sum of the block latencies).
        """
        if model_profile_on_device.blocks != host_profile.blocks:
            raise ValueError("the two profiles are of different models (their blocks differ)")
        common = [b for b in host_profile.batch_sizes if b in model_profile_on_device.batch_sizes]
        if not common:
            raise ValueError("the two profiles share no batch size")
        ratios = {
            b: host_profile.segment_ms(None, None, b) / model_profile_on_device.segment_ms(None, None, b)
            for b in common
        }
        speed = statistics.median(ratios.values())
        per_batch = ", ".join(f"batch {b}: {r:.3g}x" for b, r in ratios.items())
        note = (
            f"measured: {model_profile_on_device.host} vs host {host_profile.host} "
            f"({model_profile_on_device.threads} vs {host_profile.threads} threads; {per_batch})"
        )
        return cls(name, tier, speed, memory_mb, declared=False, note=note)


_CPU_NOTE = "declared estimate, not measured here; relative to one thread of the x86_64 profiling host"
DEVICES: dict[str, DeviceProfile] = {
    d.name: d
    for d in (
        DeviceProfile(
            "pi4",
            "device",
            0.2,
            1024,
            note=f"{_CPU_NOTE}: a Cortex-A72 at 1.5-1.8 GHz is roughly 0.15-0.25x a modern x86 core in "
            "single-thread fp32 PyTorch; ~1 GiB left to the model on a 2-4 GiB board",
        ),
        DeviceProfile(
            "pi5",
            "device",
            0.5,
            2048,
            note=f"{_CPU_NOTE}: a Cortex-A76 at 2.4 GHz is roughly 2-3x a Pi 4, so ~0.4-0.6x an x86 core",
        ),
        DeviceProfile(
            "phone",
            "device",
            0.5,
            512,
            note=f"{_CPU_NOTE}: one big core of a recent phone SoC, throttled when hot; 0.3-0.8x depending "
            "on the SoC and runtime; an app gets a few hundred MiB",
        ),
        DeviceProfile(
            "laptop",
            "device",
            1.0,
            4096,
            note=f"{_CPU_NOTE}: one core of a current laptop CPU is about as fast as one core of the host "
            "(0.7-1.3x); on battery it is slower",
        ),
        DeviceProfile(
            "edge",
            "edge",
            4.0,
            16384,
            note=f"{_CPU_NOTE}: an edge server CPU with 8-16 cores; small batches of small models scale "
            "poorly across threads, so ~4x one host core rather than the core count",
        ),
        DeviceProfile(
            "gpu-server",
            "cloud",
            40.0,
            80 * 1024,
            overhead_ms=0.03,
            note="declared estimate, not measured here: a data-centre GPU is launch-bound for small models "
            "(~10-50 us per kernel, modelled by overhead_ms per block) and 10-100x one CPU core in "
            "throughput once batches are large (>= 32); 40x is a middle figure for a small CNN",
        ),
    )
}


# ---------------------------------------------------------------------- networks


@dataclass(frozen=True)
class NetworkProfile:
    """A link between a device and the server."""

    name: str  # identifier, e.g. "4g"
    bandwidth_mbps: float  # uplink bandwidth (megabits per second): what activations travel on
    rtt_ms: float  # round-trip time (ms)
    loss: float = 0.0  # packet loss probability in [0, 1)
    downlink_mbps: float | None = None  # downlink bandwidth (Mbit/s); None: the same as the uplink
    note: str = field(default="", compare=False)  # where the figures come from

    def __post_init__(self) -> None:
        if self.bandwidth_mbps <= 0 or (self.downlink_mbps is not None and self.downlink_mbps <= 0):
            raise ValueError(f"network {self.name!r}: bandwidth must be positive")
        if self.rtt_ms < 0 or not 0.0 <= self.loss < 1.0:
            raise ValueError(f"network {self.name!r}: need rtt_ms >= 0 and 0 <= loss < 1")

    def transfer_ms(self, nbytes: float, direction: str = "up") -> float:
        """One-way time (ms) to deliver ``nbytes``: RTT/2 + serialization, times 1/(1-loss).

        The loss term is the expected number of transmissions of a geometric retry; it ignores
        retransmission timeouts and congestion control, so it is optimistic for lossy links.
        """
        if nbytes <= 0:
            return 0.0
        mbps = self.bandwidth_mbps if direction == "up" or self.downlink_mbps is None else self.downlink_mbps
        serialization = nbytes * 8 / (mbps * 1e6) * 1e3
        return (self.rtt_ms / 2 + serialization) / (1.0 - self.loss)

    def with_(self, bandwidth_mbps: float | None = None, rtt_ms: float | None = None) -> NetworkProfile:
        """A copy with new uplink bandwidth and/or RTT (the downlink keeps its ratio to the uplink)."""
        bw = self.bandwidth_mbps if bandwidth_mbps is None else bandwidth_mbps
        down = None if self.downlink_mbps is None else self.downlink_mbps * bw / self.bandwidth_mbps
        return replace(self, bandwidth_mbps=bw, rtt_ms=self.rtt_ms if rtt_ms is None else rtt_ms, downlink_mbps=down)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetworkProfile:
        return cls(**d)


_NET_NOTE = "typical figures, declared, not measured here"
NETWORKS: dict[str, NetworkProfile] = {
    n.name: n
    for n in (
        NetworkProfile("3g", 1.0, 150.0, 0.01, 4.0, note=f"{_NET_NOTE}: HSPA, ~1 Mbit/s up, 100-200 ms RTT"),
        NetworkProfile("4g", 8.0, 50.0, 0.005, 30.0, note=f"{_NET_NOTE}: LTE, 5-10 Mbit/s up, 30-70 ms RTT"),
        NetworkProfile("5g", 50.0, 20.0, 0.001, 200.0, note=f"{_NET_NOTE}: 5G NR mid-band, 10-30 ms RTT"),
        NetworkProfile("wifi", 80.0, 5.0, 0.002, note=f"{_NET_NOTE}: 802.11ac/ax to a nearby edge, 2-10 ms RTT"),
        NetworkProfile("ethernet", 940.0, 0.5, 0.0, note=f"{_NET_NOTE}: gigabit LAN, TCP goodput ~940 Mbit/s"),
        NetworkProfile("loopback", 20000.0, 0.05, 0.0, note=f"{_NET_NOTE}: same host; order of magnitude only"),
    )
}
