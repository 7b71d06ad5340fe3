"""Split any ``nn.Module`` at module boundaries by tracing its graph.

A cut is a module path (``layer3``, ``bert.encoder.layer.2``, ``transformer.h.4``): the client keeps
every operation up to the last one that module runs, the server the rest. The model is traced with
``torch.export`` (non-strict, so Hugging Face models trace as they are) twice, once in training and
once in evaluation mode, because tracing bakes the mode in (dropout, batch-norm statistics, the
attention dropout Hugging Face passes to SDPA); each segment runs the graph of its current mode.
Batch and sequence sizes are traced as symbols, so one trace serves every batch and every sequence
length within the declared bounds.

Every value the server needs from the client travels, not just the cut module's output: skip
connections, attention masks, position ids. Three kinds of values never travel as they are:

- values derived from the raw inputs alone, without parameters (masks, position ids, the length of
  each sequence) are computed on the client, so a raw input never reaches the server: a split that
  would send one is refused;
- values derived from constants alone (a buffer of position ids, an ``arange``) are recomputed on
  each side that needs them;
- sizes (the batch, the sequence length) are read back from the tensors that do travel.

The segments own the model's own parameter objects under their original names, so state dicts,
aggregation, checkpoints and attacks see the unsplit model's keys, and a step through the segments
gives the unsplit model's gradients.

A multi-exit model (:class:`fsl.exits.ExitBlock` inside, from :func:`fsl.exits.add_exits_at`) is traced
with its exits' logits as extra outputs. Each exit runs in the segment that runs its block (an exit at
the cut module is the client's), with its head's parameters; its logits stay there (the segment keeps
them, as an ``ExitBlock`` does, for :func:`fsl.exits.exit_logits`) and never cross, so what travels is
what travels without exits. A computation the exit alone needs from the raw inputs (its share of the
attention mask) runs where the exit does, from values that cross anyway.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import operator
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

if TYPE_CHECKING:
    from fsl.cutvalues import Signature

__all__ = [
    "Crossing",
    "CutRow",
    "cut_table",
    "GraphSegment",
    "GraphSplit",
    "SplitError",
    "Traced",
    "as_inputs",
    "graph_split",
    "join_params",
    "split_traced",
    "trace",
    "module_paths",
]

BATCH = "batch"


class SplitError(ValueError):
    """A model or a cut that cannot be split; the message says why and what to do instead."""


@dataclass(frozen=True)
class Crossing:
    """One value that crosses from one segment to another.

    ``dims`` are the per-sample dimensions (after the batch): an int is fixed, a string a size that
    varies between batches within the declared bounds (``"seq"``) and that all values share.
    ``grad`` says whether the value depends on the sending side's parameters, so that a gradient
    must travel back for it.
    """

    name: str
    dtype: torch.dtype
    dims: tuple[int | str, ...]
    grad: bool
    source: int  # index of the segment that computes it
    target: int  # index of the segment that reads it


def module_paths(model: nn.Module) -> list[str]:
    """Every submodule's path in ``model``, in registration order."""
    return [name for name, _ in model.named_modules() if name]


def _input_names(model: nn.Module, example: torch.Tensor | Mapping[str, torch.Tensor]) -> list[str]:
    if isinstance(example, Mapping):
        return list(example)
    params = [
        p
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if not params:
        raise SplitError(f"{type(model).__name__}.forward takes no positional input to feed the example to")
    return [params[0].name]


def _export(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    dynamic: Mapping[str, Mapping[int, str]],
    bounds: Mapping[str, tuple[int, int]],
    train: bool,
) -> fx.GraphModule:
    from torch.export import Dim

    dims = {name: Dim(name, min=max(2, lo), max=hi) for name, (lo, hi) in bounds.items()}
    shapes = {k: {d: dims[s] for d, s in dynamic.get(k, {}).items()} for k in inputs}
    was = {m: m.training for m in model.modules()}
    model.train(train)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(model, (), dict(inputs), dynamic_shapes=shapes, strict=False)
    except Exception as e:  # torch.export raises many types; all mean the same thing to the user
        raise SplitError(
            f"{type(model).__name__} cannot be traced by torch.export ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Data-dependent Python control flow is the usual cause: make it depend on shapes or config only, "
            "or split the model by hand into an nn.Sequential of blocks."
        ) from e
    finally:
        for m, mode in was.items():
            m.training = mode
    gm: fx.GraphModule = ep.module()
    return gm


def _output_index(gm: fx.GraphModule) -> int:
    """Which output leaf is the prediction: ``logits`` of a Hugging Face output, else the first."""
    spec = getattr(gm, "_out_spec", None)
    context = getattr(spec, "context", None)
    if isinstance(context, list) and "logits" in context:
        return context.index("logits")
    return 0


def _val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _is_sym(n: fx.Node) -> bool:
    return isinstance(_val(n), torch.SymInt | int) and n.op == "call_function"


def _mutates(n: fx.Node) -> bool:
    schema = getattr(n.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def _module_of(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack")
    if not stack:
        return ""
    return str(list(stack.values())[-1][0])


def _in_module(n: fx.Node, path: str) -> bool:
    stack = n.meta.get("nn_module_stack") or {}
    return any(fqn == path for fqn, _ in stack.values())


class _Plan:
    """Which segment every node of one traced graph runs in."""

    def __init__(
        self, gm: fx.GraphModule, cuts: Sequence[str], params: set[str], exit_only: set[fx.Node] | None = None
    ) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.params = params
        ends = []
        for path in cuts:
            idx = [i for i, n in enumerate(self.nodes) if n.op == "call_function" and _in_module(n, path)]
            if not idx:
                raise SplitError(
                    f"module {path!r} runs no operation in the traced graph: cut at a module that computes"
                )
            ends.append(max(idx))
        for a, b in zip(cuts, cuts[1:], strict=False):
            if ends[cuts.index(b)] <= ends[cuts.index(a)]:
                raise SplitError(f"cut {b!r} must come after cut {a!r} in the model's computation")
        self.ends = ends
        self.kind: dict[fx.Node, str] = {}  # "input" (raw-input-derived), "const", "param", "act"
        for n in self.nodes:
            self.kind[n] = self._kind(n)
        self.side: dict[fx.Node, int] = {}
        for n in self.nodes:
            if n.op != "call_function":
                continue
            i = self.order[n]
            side = sum(1 for e in ends if i > e)
            if self.kind[n] == "input" and n not in (exit_only or ()):
                side = 0  # computed beside the raw inputs, so that they never travel
            self.side[n] = side
        for n in self.nodes:  # a tuple's items stay where the tuple is made
            if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node):
                src = n.args[0]
                if src in self.side:
                    self.side[n] = self.side[src]
        if all(s == 0 for s in self.side.values()) or not any(s == 0 for s in self.side.values()):
            raise SplitError(f"cut {list(cuts)} leaves one side with no computation")

    def _kind(self, n: fx.Node) -> str:
        if n.op == "placeholder":
            return "input"
        if n.op == "get_attr":
            return "param" if str(n.target) in self.params else "const"
        if n.op != "call_function":
            return "act"
        kinds = {self.kind[a] for a in n.all_input_nodes if a in self.kind}
        if "act" in kinds or "param" in kinds or _mutates(n):
            return "act"
        if "input" in kinds:
            return "input"
        return "const"


def _fmt_dim(v: Any, names: Mapping[str, str]) -> int | str:
    if isinstance(v, int):
        return v
    expr = str(v.node.expr) if isinstance(v, torch.SymInt) else str(v)
    return names.get(expr, expr)


class _Builder:
    """Builds one segment's graph from a plan."""

    def __init__(self) -> None:
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.inputs: dict[fx.Node, fx.Node] = {}  # crossing value -> placeholder
        self.attrs: set[str] = set()

    def placeholder_for(self, n: fx.Node, name: str) -> fx.Node:
        if n not in self.inputs:
            p = self.graph.placeholder(name)
            p.meta = dict(n.meta)
            self.inputs[n] = p
            self.env[n] = p
        return self.inputs[n]


@dataclass
class _Partition:
    graphs: list[fx.Graph]
    attrs: list[set[str]]
    crossings: list[Crossing]
    inputs: list[str]  # raw input names the first segment reads
    crossing_nodes: list[fx.Node]
    side: dict[fx.Node, int]  # the segment each operation of the traced graph runs in
    exits: list[tuple[str, ...]]  # names of the exits each segment computes


def _exit_only(gm: fx.GraphModule, main: Sequence[fx.Node], exits: Sequence[fx.Node]) -> set[fx.Node]:
    """The operations that only exits need: what feeds the ``exits`` outputs and neither a ``main``
    output nor a change of state (a buffer update), and the checks that read them."""
    if not exits:
        return set()

    def ancestors(roots: Sequence[fx.Node]) -> set[fx.Node]:
        seen: set[fx.Node] = set()
        todo = list(roots)
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(n.all_input_nodes)
        return seen

    nodes = list(gm.graph.nodes)
    kept = ancestors([*main, *(n for n in nodes if n.op == "call_function" and _mutates(n))])
    only = ancestors(exits) - kept
    for n in nodes:  # checks without users (tensor metadata asserts) go with what they check
        if n.op == "call_function" and not n.users and any(a in only for a in n.all_input_nodes):
            only.add(n)
    return only


def _plain_path(fqn: str, exit_paths: Sequence[str]) -> str:
    """``fqn`` as it is in the model without exits: an exit's block sits one level down, at ``<path>.body``."""
    for p in sorted(exit_paths, key=len, reverse=True):
        if fqn == f"{p}.body":
            fqn = p
        elif fqn.startswith(f"{p}.body."):
            fqn = p + fqn[len(p) + len(".body") :]
    return fqn


def _partition(
    gm: fx.GraphModule,
    cuts: Sequence[str],
    params: set[str],
    input_dims: dict[str, dict[int, str]],
    exits: Sequence[tuple[str, str]] = (),
) -> _Partition:
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = out_node.args[0]
    leaves = list(leaves) if isinstance(leaves, list | tuple) else [leaves]
    exit_nodes: dict[str, fx.Node] = {}
    if exits:  # traced by _exits_as_outputs: the prediction, then the exits' logits
        if len(leaves) != len(exits) + 1 or not all(isinstance(n, fx.Node) for n in leaves):
            raise SplitError(
                f"internal: a graph traced with exits {[e for e, _ in exits]} returns {len(leaves)} values"
            )
        result = leaves[0]
        exit_nodes = dict(zip([name for name, _ in exits], leaves[1:], strict=True))
    else:
        result = leaves[_output_index(gm)]
    if not isinstance(result, fx.Node):
        raise SplitError("the model's prediction is not a tensor computed from its inputs")
    exit_only = _exit_only(gm, [result], list(exit_nodes.values()))
    exit_paths = [path for _, path in exits]
    plan = _Plan(gm, cuts, params, exit_only)
    nseg = len(cuts) + 1
    placeholders = [n for n in plan.nodes if n.op == "placeholder"]
    # symbolic sizes of the inputs, by the name the caller gave them
    sym_names: dict[str, str] = {}
    for p in placeholders:
        val = _val(p)
        for d, name in input_dims.get(str(p.target), {}).items():
            size = val.shape[d]
            if isinstance(size, torch.SymInt):
                sym_names.setdefault(str(size.node.expr), name)

    # which values each segment needs from another one
    needed: dict[fx.Node, set[int]] = {}
    users_of: dict[int, list[fx.Node]] = {s: [] for s in range(nseg)}
    for n, s in plan.side.items():
        users_of[s].append(n)

    def owner(n: fx.Node) -> int | None:
        if n.op == "placeholder":
            return 0
        return plan.side.get(n)

    for s in range(nseg):
        for n in users_of[s]:
            if n in exit_only:
                continue
            for a in n.all_input_nodes:
                o = owner(a)
                if o is None or o == s or plan.kind.get(a) == "const" or _is_sym(a):
                    continue
                if o > s:
                    raise SplitError(
                        f"segment {s} needs {a.name!r}, which a later segment computes: the cuts {list(cuts)} "
                        "do not follow the model's order of computation"
                    )
                needed.setdefault(a, set()).add(s)
    # an exit reads only what crosses anyway: exits never change what travels
    for s in range(nseg):
        for n in users_of[s]:
            if n not in exit_only:
                continue
            for a in n.all_input_nodes:
                o = owner(a)
                if o is None or o == s or plan.kind.get(a) == "const" or _is_sym(a) or s in needed.get(a, ()):
                    continue
                which = [name for name, path in exits if _in_module(n, path)][-1:] or ["?"]
                raise SplitError(
                    f"exit {which[0]!r} (segment {s}) would need {a.name!r} from segment {o}, which does not cross "
                    f"the cuts {list(cuts)} otherwise: put the exit after a module of segment {o}, or cut elsewhere"
                )
    if owner(result) != nseg - 1:
        needed.setdefault(result, set()).add(nseg - 1)
    crossing_nodes = sorted(needed, key=plan.order.__getitem__)
    for a in crossing_nodes:
        if a.op == "placeholder":
            raise SplitError(
                f"the raw input {a.target!r} would cross the cut {list(cuts)}: the server would see the client's data. "
                "Cut deeper, after the module that first consumes it"
            )
    # a value that is the last thing a module computes goes by that module's path (the outermost
    # such module: the cut itself for the cut's output)
    last_of: dict[fx.Node, str] = {}
    last_node: dict[str, fx.Node] = {}
    for n in plan.nodes:
        if n in exit_only:
            continue
        for fqn, _ in (n.meta.get("nn_module_stack") or {}).values():
            if fqn:
                last_node[_plain_path(fqn, exit_paths)] = n
    for fqn, n in sorted(last_node.items(), key=lambda kv: -len(kv[0])):
        last_of[n] = fqn
    for fqn in cuts:
        last_of[last_node[_plain_path(fqn, exit_paths)]] = fqn
    crossings: list[Crossing] = []
    names: dict[fx.Node, str] = {}
    used_names: set[str] = set()
    for a in crossing_nodes:
        val = _val(a)
        if not isinstance(val, torch.Tensor):
            raise SplitError(f"value {a.name!r} crossing the cut is a {type(val).__name__}, not a tensor")
        dims = [_fmt_dim(v, sym_names) for v in val.shape]
        if not dims or dims[0] != BATCH:
            raise SplitError(
                f"value {a.name!r} of shape {dims} crosses the cut without the batch in its first dimension; "
                "cut at a module boundary where every crossing value is per sample"
            )
        module = _plain_path(_module_of(a), exit_paths)
        name = last_of.get(a) or (f"{module}:{a.name}" if module else a.name)
        while name in used_names:
            name += "_"
        used_names.add(name)
        names[a] = name
        grad = bool(val.dtype.is_floating_point and plan.kind.get(a) == "act")
        for t in sorted(needed[a]):
            crossings.append(Crossing(name, val.dtype, tuple(dims[1:]), grad, owner(a) or 0, t))

    graphs: list[fx.Graph] = []
    attrs: list[set[str]] = []
    seg_exits: list[tuple[str, ...]] = []
    for s in range(nseg):
        b = _Builder()
        g = b.graph
        env = b.env
        if s == 0:
            for p in placeholders:
                q = g.placeholder(str(p.target))
                q.meta = dict(p.meta)
                env[p] = q
        for i, a in enumerate(a for a in crossing_nodes if s in needed[a]):
            b.placeholder_for(a, f"in_{i}")  # crossing names are not identifiers; they are matched by position

        def sym_from_inputs(n: fx.Node, b: _Builder = b) -> fx.Node:
            val = _val(n)
            expr = str(val.node.expr) if isinstance(val, torch.SymInt) else None
            for src, ph in b.inputs.items():
                shape = _val(src).shape
                for d, size in enumerate(shape):
                    if isinstance(size, torch.SymInt) and str(size.node.expr) == expr:
                        node = b.graph.call_function(torch.ops.aten.sym_size.int, (ph, d))
                        node.meta = dict(n.meta)
                        return node
            raise SplitError(f"size {expr} is needed after the cut but no crossing tensor carries it")

        def materialize(n: fx.Node, b: _Builder = b, s: int = s) -> fx.Node:
            if n in b.env:
                return b.env[n]
            if n.op == "get_attr":
                b.attrs.add(str(n.target))
                new = b.graph.get_attr(str(n.target))
                new.meta = dict(n.meta)
            elif _is_sym(n) and owner(n) != s:
                new = sym_from_inputs(n)
            elif plan.kind.get(n) == "const" or owner(n) == s:
                new = b.graph.node_copy(n, materialize)
            else:
                raise SplitError(f"internal: {n.name} is neither local nor sent to segment {s}")
            b.env[n] = new
            return new

        for n in plan.nodes:
            if n.op == "call_function" and plan.side.get(n) == s and n not in env:
                if n.target is torch.ops.aten._assert_tensor_metadata.default and s != 0:
                    continue
                materialize(n)
        outs = [a for a in crossing_nodes if owner(a) == s]
        main = materialize(result) if s == nseg - 1 else {names[a]: env[a] for a in outs}
        mine = {name: n for name, n in exit_nodes.items() if owner(n) == s}
        if mine:  # (what it returned without exits, its exits' logits by name): see GraphSegment.forward
            g.output((main, {name: materialize(n) for name, n in mine.items()}))
        else:
            g.output(main)
        seg_exits.append(tuple(mine))
        if s > 0:
            _clone_mutated_inputs(g)
        g.eliminate_dead_code()
        graphs.append(g)
        attrs.append(b.attrs)
    inputs = [str(p.target) for p in placeholders]
    return _Partition(graphs, attrs, crossings, inputs, crossing_nodes, plan.side, seg_exits)


def _clone_mutated_inputs(g: fx.Graph) -> None:
    """A received value that the graph changes in place (``x += residual``) is cloned first: it arrives
    as a leaf that takes a gradient, which autograd does not let an in-place operation touch."""
    inputs = [n for n in g.nodes if n.op == "placeholder"]
    for p in inputs:
        if not any(_mutates(u) and u.args and u.args[0] is p for u in p.users):
            continue
        with g.inserting_after(inputs[-1]):
            copy = g.call_function(torch.ops.aten.clone.default, (p,))
        copy.meta = dict(p.meta)
        p.replace_all_uses_with(copy, delete_user_cb=lambda user, c=copy: user is not c)


def _owned(model: nn.Module, attrs: set[str]) -> tuple[dict[str, nn.Parameter], dict[str, tuple[torch.Tensor, bool]]]:
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers: dict[str, tuple[torch.Tensor, bool]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for bname, buf in mod.named_buffers(recurse=False):
            if buf is not None:
                fqn = f"{mod_name}.{bname}" if mod_name else bname
                buffers[fqn] = (buf, bname not in mod._non_persistent_buffers_set)
    # tied tensors go by every name the model gives them (the trace uses one of them), so the
    # segment's state dict has the model's keys for them
    aliases: dict[int, list[str]] = {}
    for k, t in [*params.items(), *((k, b) for k, (b, _) in buffers.items())]:
        aliases.setdefault(id(t), []).append(k)
    wanted = {
        a
        for k in attrs
        if k in params or k in buffers
        for a in aliases[id(params[k] if k in params else buffers[k][0])]
    }
    got_p = {k: params[k] for k in sorted(wanted) if k in params}
    got_b = {k: buffers[k] for k in sorted(wanted) if k in buffers}
    return got_p, got_b


def _set(root: nn.Module, fqn: str, value: torch.Tensor, *, param: bool, persistent: bool = True) -> None:
    *path, leaf = fqn.split(".")
    mod = root
    for part in path:
        child = mod._modules.get(part)
        if child is None:
            child = nn.Module()
            mod.add_module(part, child)
        mod = child
    if param:
        mod.register_parameter(leaf, value)  # type: ignore[arg-type]
    else:
        mod.register_buffer(leaf, value, persistent=persistent)


class GraphSegment(nn.Module):
    """One segment of a graph split: the model's own parameters under their own names, and the
    traced graphs of this segment for training and for evaluation (picked by ``self.training``).

    The first segment takes the model's input (a tensor, or a dict of named tensors); the others
    take a dict of the values that cross into them. The last returns the prediction, the others a
    dict of the values they send on.
    """

    def __init__(
        self,
        index: int,
        input_names: Sequence[str],
        params: Mapping[str, nn.Parameter],
        buffers: Mapping[str, tuple[torch.Tensor, bool]],
        graphs: tuple[fx.Graph, fx.Graph],
        exits: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.traced = True  # runs a graph of operations, not its submodules (per-layer tools cannot hook it)
        self.index = index
        # name of each value this segment returns -> the segments that read it (a value derived from the
        # inputs, such as an attention mask, may be read by both the server's middle and the client's top)
        self.sends: dict[str, tuple[int, ...]] = {}
        # the values it sends that its parameters computed (hidden states, which take a gradient back):
        # what a release mechanism acts on; the rest (masks, position ids) derive from the raw inputs
        self.hidden: tuple[str, ...] = ()
        self.input_names = tuple(input_names)
        # the exits this segment computes (fsl.exits), and their logits from the last forward, which
        # stay here: whoever holds the labels beside this segment adds their loss (fsl.exits.exit_loss)
        self.exits = tuple(exits)
        self.exit_outputs: dict[str, torch.Tensor] = {}
        for fqn, p in params.items():
            _set(self, fqn, p, param=True)
        for fqn, (buf, persistent) in buffers.items():
            _set(self, fqn, buf, param=False, persistent=persistent)
        # kept out of the module tree: they read the same tensors as this module's, which the
        # state dict already holds under the model's names
        self._graphs = (fx.GraphModule(self, graphs[0]), fx.GraphModule(self, graphs[1]))

    def __getstate__(self) -> dict[str, object]:
        # copies (server replicas, checkpoints) never carry the last batch's exit logits and their graph
        state = dict(super().__getstate__())  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        state["exit_outputs"] = {}
        return state

    def forward(self, x: Any) -> Any:
        gm = self._graphs[0] if self.training else self._graphs[1]
        if not isinstance(x, Mapping):
            if len(self.input_names) != 1:
                raise ValueError(f"this segment takes {list(self.input_names)} as a dict of tensors")
            out = gm(x)
        else:
            missing = [n for n in self.input_names if n not in x]
            if missing:
                raise ValueError(f"this segment needs {missing}; got {list(x)}")
            out = gm(*(x[n] for n in self.input_names))
        if not self.exits:
            return out
        out, logits = out
        self.exit_outputs = dict(logits)  # (B, num_classes) by exit name
        return out

    def _apply(self, fn: Any, recurse: bool = True) -> GraphSegment:
        # .to()/.cuda() replace tensors; the graphs must follow them
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        for gm in self._graphs:
            for name, t in [*self.named_parameters(), *self.named_buffers()]:
                *path, leaf = name.split(".")
                mod: nn.Module = gm
                for part in path:
                    mod = getattr(mod, part)
                if leaf in mod._parameters:
                    mod._parameters[leaf] = t  # type: ignore[assignment]
                else:
                    mod._buffers[leaf] = t
        return self


def join_params(*segments: nn.Module) -> nn.Module:
    """One container holding the parameters and buffers of ``segments`` under the model's names
    (the same tensors, for state dicts and aggregation; it has no forward)."""
    joined = nn.Module()
    joined.traced = True  # type: ignore[assignment]  # tells per-layer tools (Opacus) what this holds
    seen: set[str] = set()
    for seg in segments:
        for name, p in seg.named_parameters(remove_duplicate=False):
            if name not in seen:
                _set(joined, name, p, param=True)
                seen.add(name)
        for mod_name, mod in seg.named_modules():
            for bname, buf in mod.named_buffers(recurse=False):
                fqn = f"{mod_name}.{bname}" if mod_name else bname
                if buf is not None and fqn not in seen:
                    _set(joined, fqn, buf, param=False, persistent=bname not in mod._non_persistent_buffers_set)
                    seen.add(fqn)
    return joined


@dataclass
class GraphSplit:
    """A model split at ``cuts`` into ``len(cuts) + 1`` segments."""

    segments: list[GraphSegment]
    cuts: tuple[str, ...]
    crossings: list[Crossing]
    inputs: tuple[str, ...]
    bounds: dict[str, tuple[int, int]]

    def into(self, target: int) -> list[Crossing]:
        """The values that segment ``target`` receives, in the order they travel."""
        return [c for c in self.crossings if c.target == target]

    def signature(self, target: int) -> Signature:
        """What segment ``target`` receives, as the data plane checks it (:mod:`fsl.cutvalues`)."""
        from fsl.cutvalues import Signature, TensorSpec, wire_dtype_name

        specs = tuple(TensorSpec(c.name, wire_dtype_name(c.dtype), c.dims, c.grad) for c in self.into(target))
        used = {d for c in self.into(target) for d in c.dims if isinstance(d, str)}
        return Signature(specs, {k: v for k, v in self.bounds.items() if k in used})


def graph_split(
    model: nn.Module,
    cuts: str | Sequence[str],
    example: torch.Tensor | Mapping[str, torch.Tensor],
    *,
    dynamic: Mapping[str, Mapping[int, str]] | None = None,
    bounds: Mapping[str, tuple[int, int]] | None = None,
    cache_key: str | None = None,
) -> GraphSplit:
    """Split ``model`` after each module path in ``cuts``.

    ``example`` is one batch of inputs (a tensor for a model with one input, else a dict by argument
    name). ``dynamic`` names the input dimensions that vary between batches beyond the batch (dim 0
    of every input is ``"batch"``): ``{"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}``;
    ``bounds`` gives each name's ``(min, max)``.

    With ``cache_key`` the trace is kept for the process and reused for every model built the same
    way (the key must say so: architecture, options, input shape): a client that rebuilds its model
    each round traces it once (about 4 s for MiniLM on a 2-core CPU).
    """
    cut_list = [cuts] if isinstance(cuts, str) else list(cuts)
    known = dict(model.named_modules())
    for c in cut_list:
        if c not in known or not c:
            near = [p for p in known if p and (p.startswith(c.rsplit(".", 1)[0]) or c.startswith(p))][:8]
            raise SplitError(
                f"{c!r} is not a module of {type(model).__name__}: a cut is the path of a submodule "
                f"(the last one the client runs){'; near it: ' + ', '.join(near) if near else ''}"
            )
    if cache_key is None:
        return split_traced(trace(model, example, dynamic, bounds), cut_list)
    exits = _exit_paths(model)
    if exits:  # a trace with exits returns more than one without: never the same graph
        cache_key = json.dumps([cache_key, exits])
    cached = _TRACES.get(cache_key)
    if cached is None:
        cached = trace(model, example, dynamic, bounds)
        _TRACES[cache_key] = cached
        while len(_TRACES) > _TRACE_CACHE_SIZE:
            _TRACES.pop(next(iter(_TRACES)))
    # the graphs give the structure; the segments take this model's own parameters by name
    return split_traced(Traced(model, cached.graphs, cached.dynamic, cached.bounds, cached.exits), cut_list)


_TRACES: dict[str, Traced] = {}
_TRACE_CACHE_SIZE = 4


@dataclass
class Traced:
    """A model traced once per mode, ready to be split at any cut."""

    model: nn.Module
    graphs: tuple[fx.GraphModule, fx.GraphModule]  # training, evaluation
    dynamic: dict[str, dict[int, str]]
    bounds: dict[str, tuple[int, int]]
    # (name, module path) of each exit, shallow to deep: the graphs then return the prediction and
    # these exits' logits, in this order
    exits: tuple[tuple[str, str], ...] = ()


def as_inputs(model: nn.Module, example: torch.Tensor | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``example`` as the dict of the model's inputs by argument name."""
    return dict(example) if isinstance(example, Mapping) else {_input_names(model, example)[0]: example}


def trace(
    model: nn.Module,
    example: torch.Tensor | Mapping[str, torch.Tensor],
    dynamic: Mapping[str, Mapping[int, str]] | None = None,
    bounds: Mapping[str, tuple[int, int]] | None = None,
) -> Traced:
    """Trace ``model`` on one batch ``example`` in training and in evaluation mode (see :func:`graph_split`)."""
    inputs = as_inputs(model, example)
    dyn: dict[str, dict[int, str]] = {k: {0: BATCH} for k in inputs}
    for k, dims in (dynamic or {}).items():
        dyn.setdefault(k, {0: BATCH}).update(dict(dims))
    bnd: dict[str, tuple[int, int]] = {BATCH: (1, 1 << 16)}
    bnd.update(bounds or {})
    for k, dims in dyn.items():
        for s in dims.values():
            if s not in bnd:
                raise SplitError(f"dimension {s!r} of input {k!r} has no bounds: pass bounds={{{s!r}: (min, max)}}")
    exits = _exit_paths(model)
    with _exits_as_outputs(model, exits):
        graphs = (_export(model, inputs, dyn, bnd, True), _export(model, inputs, dyn, bnd, False))
    return Traced(model, graphs, dyn, bnd, exits)


def _exit_paths(model: nn.Module) -> tuple[tuple[str, str], ...]:
    """(exit name, module path) of every exit in ``model``, shallow to deep (as :func:`fsl.exits.exit_names`)."""
    from fsl.exits import ExitBlock, exit_name

    return tuple((exit_name(n, m), n) for n, m in model.named_modules() if isinstance(m, ExitBlock))


@contextmanager
def _exits_as_outputs(model: nn.Module, exits: Sequence[tuple[str, str]]) -> Iterator[None]:
    """While tracing, ``model`` returns its prediction followed by its exits' logits.

    An exit keeps its logits in an attribute, which the trace does not see as an output: without
    this the exported graph drops the exit heads as dead code. The forward is replaced on the instance
    (with the original's signature, which export reads to bind the named inputs), so that module paths,
    and with them cuts and parameter names, stay the model's own.
    """
    if not exits:
        yield
        return
    from fsl.exits import ExitBlock

    blocks = [b for _, path in exits if isinstance(b := model.get_submodule(path), ExitBlock)]
    original = model.forward

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        out = original(*args, **kwargs)
        pred = _prediction(out)
        logits = [b.logits for b in blocks]
        if any(z is None for z in logits):
            missing = [name for (name, _), z in zip(exits, logits, strict=True) if z is None]
            raise SplitError(f"exits {missing} do not run in the model's forward")
        return (pred, *logits)  # type: ignore[arg-type]

    model.forward = forward
    try:
        yield
    finally:
        del model.forward
        for b in blocks:
            b.logits = None  # the trace's symbolic tensors: no use outside it


def _prediction(out: Any) -> torch.Tensor:
    """The prediction in a model's output, as :func:`_output_index` finds it in a traced graph's."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]  # type: ignore[no-any-return]
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    if not leaves:
        raise SplitError("the model's output holds no tensor")
    return leaves[0]


def split_traced(traced: Traced, cut_list: Sequence[str]) -> GraphSplit:
    """Split a traced model after each module path in ``cut_list``."""
    model, dyn, bnd = traced.model, traced.dynamic, traced.bounds
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    parts = [_partition(gm, cut_list, params, dyn, traced.exits) for gm in traced.graphs]
    tr, ev = parts
    sig_t = [(c.dtype, c.dims, c.source, c.target) for c in tr.crossings]
    sig_e = [(c.dtype, c.dims, c.source, c.target) for c in ev.crossings]
    if sig_t != sig_e:
        raise SplitError(
            f"at cut {cut_list} the model sends different values in training ({len(sig_t)}) and in evaluation "
            f"({len(sig_e)}); cut at another module"
        )
    if tr.exits != ev.exits:
        raise SplitError(
            f"at cut {cut_list} the exits fall in other segments in training and in evaluation; cut elsewhere"
        )
    nseg = len(cut_list) + 1
    _check_ownership(params, [tr, ev], cut_list)
    segments = []
    for s in range(nseg):
        attrs = tr.attrs[s] | ev.attrs[s]
        p, b = _owned(model, attrs)
        names = tr.inputs if s == 0 else [c.name for c in tr.crossings if c.target == s]
        seg = GraphSegment(s, names, p, b, (tr.graphs[s], _renamed(ev, tr, s)), exits=tr.exits[s])
        targets: dict[str, list[int]] = {}
        for c in tr.crossings:
            if c.source == s:
                targets.setdefault(c.name, []).append(c.target)
        seg.sends = {name: tuple(ts) for name, ts in targets.items()}
        seg.hidden = tuple(dict.fromkeys(c.name for c in tr.crossings if c.source == s and c.grad))
        segments.append(seg)
    return GraphSplit(segments, tuple(cut_list), tr.crossings, tuple(tr.inputs), bnd)


def _renamed(ev: _Partition, tr: _Partition, s: int) -> fx.Graph:
    """The evaluation graph of segment ``s``, sending its values under the training graph's names
    (the two traces name nodes differently where the modes differ; the values match by position)."""
    by_pos = dict(zip([c.name for c in ev.crossings], [c.name for c in tr.crossings], strict=True))
    g = ev.graphs[s]
    for n in g.nodes:
        if n.op != "output":
            continue
        out, exits = n.args[0] if ev.exits[s] else (n.args[0], None)
        if isinstance(out, dict):
            out = {by_pos.get(k, k): v for k, v in out.items()}
        n.args = ((out, exits) if ev.exits[s] else out,)
    return g


def _check_ownership(params: set[str], parts: Sequence[_Partition], cuts: Sequence[str]) -> None:
    """A parameter used by two segments (tied weights) cannot be trained by one side alone; the two
    client segments of a U-shaped split may share one."""
    nseg = len(cuts) + 1
    side = {s: "client" if s == 0 or (nseg == 3 and s == 2) else f"server{s}" for s in range(nseg)}
    seen: dict[str, int] = {}
    for part in parts:
        for s, attrs in enumerate(part.attrs):
            for a in attrs & params:
                if a in seen and side[seen[a]] != side[s]:
                    raise SplitError(
                        f"parameter {a!r} is used on both sides of the cut {list(cuts)} (tied weights, e.g. an "
                        "output layer sharing the input embedding). Untie them in the model's config "
                        "(tie_word_embeddings=False) or use a U-shaped split that keeps both uses on the client"
                    )
                seen[a] = s


@dataclass(frozen=True)
class CutRow:
    """One legal cut: what crosses it and how the work divides."""

    cut: str
    tensors: tuple[tuple[str, tuple[int, ...], str], ...]  # (name, shape of one sample, dtype)
    bytes_per_sample: int
    client_flops: float  # share of the forward pass's FLOPs the client runs
    client_params: float  # share of the parameters the client holds


def _node_flops(gm: fx.GraphModule, inputs: Mapping[str, torch.Tensor]) -> dict[fx.Node, float]:
    """FLOPs of every node of ``gm`` run on ``inputs``."""
    from torch.utils.flop_counter import FlopCounterMode

    flops: dict[fx.Node, float] = {}

    class _Counting(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            with FlopCounterMode(display=False) as counter:
                out = super().run_node(n)
            flops[n] = float(counter.get_total_flops())
            return out

    placeholders = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        _Counting(gm).run(*(inputs[p] for p in placeholders))
    return flops


def cut_table(
    traced: Traced,
    example: torch.Tensor | Mapping[str, torch.Tensor],
    paths: Sequence[str] | None = None,
) -> tuple[list[CutRow], dict[str, str]]:
    """Every module path of the traced model as a cut: the legal ones as rows, the others with why not.

    Shapes and bytes are those of ``example`` (for token models: at its sequence length). ``paths``
    tries only those module paths (a profile of a few cuts of a large model need not plan every one).
    """
    gm = traced.graphs[1]
    model = traced.model
    example = as_inputs(model, example)
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    flops = _node_flops(gm, example)
    total_flops = sum(flops.values()) or 1.0
    sizes = {n: p.numel() for n, p in model.named_parameters(remove_duplicate=False)}
    total_params = sum(p.numel() for p in model.parameters()) or 1
    values: dict[str, int] = {}
    for p in gm.graph.nodes:
        if p.op == "placeholder":
            for d, name in traced.dynamic.get(str(p.target), {}).items():
                values[name] = int(example[str(p.target)].shape[d])
    rows: list[CutRow] = []
    refused: dict[str, str] = {}
    for path in module_paths(model) if paths is None else paths:
        try:
            part = _partition(gm, [path], params, traced.dynamic, traced.exits)
            _check_ownership(params, [part], [path])
        except SplitError as e:
            refused[path] = str(e)
            continue
        client_flops = sum(f for n, f in flops.items() if part.side.get(n) == 0)
        client_params = sum(sizes[a] for a in part.attrs[0] if a in sizes)
        tensors = []
        nbytes = 0
        for c in part.crossings:
            shape = tuple(values.get(d, 0) if isinstance(d, str) else d for d in c.dims)
            tensors.append((c.name, shape, str(c.dtype).removeprefix("torch.")))
            nbytes += math.prod(shape) * c.dtype.itemsize
        rows.append(CutRow(path, tuple(tensors), nbytes, client_flops / total_flops, client_params / total_params))
    return rows, refused
