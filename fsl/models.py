"""Model zoo with named cut points, and splitting a model at a cut.

Every model is an ``nn.Sequential`` of named blocks. A *cut* is the name of the
last block that stays on the client: ``split_model(model, "conv1")`` gives the
client everything up to and including block ``conv1`` and the server the rest.
Both segments reuse the model's own modules, so their ``state_dict`` keys are the
full model's keys (``conv1.0.weight`` on the client, ``fc2.weight`` on the
server) and joining them back gives the same model.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

if TYPE_CHECKING:
    from fsl.graphsplit import GraphSplit

from fsl.plugins import PluginError, resolve

__all__ = [
    "INPUT_KINDS",
    "MODELS",
    "ModelSpec",
    "Split",
    "TASKS",
    "build_model",
    "build_module",
    "is_plugin",
    "logits_of",
    "register_model",
    "run_model",
    "cut_points",
    "join_segments",
    "model_spec",
    "USplit",
    "cut_shape",
    "split_model",
    "split_model_u",
]


def _cnn(input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10, norm: str = "none") -> nn.Sequential:
    """A small CNN for grayscale images (28x28 MNIST/Fashion-MNIST; any H, W divisible by 4)."""
    in_channels, height, width = input_shape

    def conv_block(cin: int, cout: int) -> nn.Sequential:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1)]
        if norm == "group":
            layers.append(nn.GroupNorm(4, cout))
        elif norm != "none":
            raise ValueError(f"cnn supports norm 'none' or 'group', not {norm!r}")
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        return nn.Sequential(*layers)

    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", conv_block(in_channels, 16)),  # (B, 16, 14, 14) smashed
                ("conv2", conv_block(16, 32)),  # (B, 32, 7, 7) smashed
                (
                    "fc1",
                    nn.Sequential(nn.Flatten(), nn.Linear(32 * (height // 4) * (width // 4), 128), nn.ReLU()),
                ),  # (B, 128)
                ("fc2", nn.Linear(128, num_classes)),  # (B, num_classes) logits
            ]
        )
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs and a (projected) identity shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.n1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.n2 = norm(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.n1(self.conv1(x)))
        out = self.n2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def _resnet(
    input_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10, norm: str = "batch"
) -> nn.Sequential:
    """A small ResNet (ResNet-8 layout) for 32x32 RGB images (CIFAR-10); any H, W work."""
    in_channels = input_shape[0]
    if norm == "batch":
        make_norm: Callable[[int], nn.Module] = nn.BatchNorm2d
    elif norm == "group":

        def make_norm(c: int) -> nn.Module:
            return nn.GroupNorm(min(8, c), c)

    else:
        raise ValueError(f"resnet supports norm 'batch' or 'group', not {norm!r}")
    return nn.Sequential(
        OrderedDict(
            [
                ("stem", nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), make_norm(16), nn.ReLU())),
                ("layer1", BasicBlock(16, 16, 1, make_norm)),  # (B, 16, 32, 32) smashed
                ("layer2", BasicBlock(16, 32, 2, make_norm)),  # (B, 32, 16, 16) smashed
                ("layer3", BasicBlock(32, 64, 2, make_norm)),  # (B, 64, 8, 8) smashed
                ("head", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))),
            ]
        )
    )


INPUT_KINDS = ("image", "tokens")
TASKS = ("classify", "causal-lm")


@dataclass(frozen=True)
class ModelSpec:
    """What the zoo knows about a model: how to build it, what it takes, and where it may be cut.

    A *sequential* model (``graph=False``) is an ``nn.Sequential`` of named blocks and ``cuts`` are its
    legal cut points. Any other model (``graph=True``) is cut at a module path (``bert.encoder.layer.2``)
    by the graph splitter, which decides what is legal; its ``cuts`` are suggestions, shallow to deep.
    """

    name: str
    build: Callable[..., nn.Module]
    input_shape: tuple[int, ...]  # one sample: (C, H, W) of an image, (T,) tokens; () = from the data
    cuts: tuple[str, ...]  # legal (sequential) or suggested (graph) cut points, shallow to deep
    default_cut: str
    default_norm: str = ""  # "" = the model has no norm choice
    input_kind: str = "image"  # "image": a float (N, C, H, W) tensor; "tokens": input_ids + attention_mask
    task: str = "classify"  # "classify": logits (B, classes); "causal-lm": logits (B, T, vocab)
    graph: bool = False
    requires: str = ""  # the pyproject extra the builder imports ("" = torch alone)


# Filled by @register_model: the two hand-written sequential models here, the Hugging Face builders
# in fsl.zoo_hf (imported at the end of this module, so every process that knows a zoo name knows them all).
MODELS: dict[str, ModelSpec] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


def register_model(
    name: str,
    *,
    input_shape: tuple[int, ...],
    cuts: tuple[str, ...],
    default_cut: str = "",
    default_norm: str = "",
    input_kind: str = "image",
    task: str = "classify",
    graph: bool = False,
    requires: str = "",
) -> Callable[[F], F]:
    """Register the decorated builder as zoo model ``name``.

    The builder is called with ``input_shape=``, ``num_classes=`` (and ``norm=``, when the model has a
    norm choice) where its signature takes them, and with the experiment's ``[model.options]``. The
    spec is also attached to the function as ``fsl_spec``, so a builder outside the project that is
    named by import string (``"pkg.mod:build"``) carries its input kind and cuts with it.
    """
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"model {name!r}: input_kind must be one of {list(INPUT_KINDS)}, not {input_kind!r}")
    if task not in TASKS:
        raise ValueError(f"model {name!r}: task must be one of {list(TASKS)}, not {task!r}")
    if not cuts and not graph:
        raise ValueError(f"model {name!r}: a sequential model declares its cut points")

    def decorate(build: F) -> F:
        spec = ModelSpec(
            name=name,
            build=build,
            input_shape=tuple(input_shape),
            cuts=tuple(cuts),
            default_cut=default_cut or (cuts[0] if cuts else ""),
            default_norm=default_norm,
            input_kind=input_kind,
            task=task,
            graph=graph,
            requires=requires,
        )
        known = MODELS.get(name)
        if known is not None and _qualname(known.build) != _qualname(build):
            raise ValueError(f"model {name!r} is already registered by {_qualname(known.build)}")
        MODELS[name] = spec
        build.fsl_spec = spec  # type: ignore[attr-defined]
        return build

    return decorate


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


register_model("cnn", input_shape=(1, 28, 28), cuts=("conv1", "conv2", "fc1"), default_norm="none")(_cnn)
register_model(
    "resnet",
    input_shape=(3, 32, 32),
    cuts=("stem", "layer1", "layer2", "layer3"),
    default_cut="layer1",
    default_norm="batch",
)(_resnet)


def is_plugin(name: str) -> bool:
    """Whether ``name`` is an import string (``"package.module:factory"``) rather than a zoo name."""
    return ":" in name


def model_spec(name: str) -> ModelSpec:
    """The zoo entry for ``name``, or the spec of the plug-in factory an import string names.

    A plug-in factory decorated with :func:`register_model` brings its declared spec; any other
    callable is a graph-split model whose input shape comes from the data and whose cut the
    experiment must name. Raises ``ValueError`` (a :class:`~fsl.plugins.PluginError` for import
    strings) listing the choices or saying what is wrong.
    """
    if is_plugin(name):
        factory = resolve(name)
        if not callable(factory):
            raise PluginError(f"{name!r} names a {type(factory).__name__}, not a callable that returns an nn.Module")
        declared = getattr(factory, "fsl_spec", None)
        if isinstance(declared, ModelSpec):
            return dataclasses.replace(declared, name=name)
        return ModelSpec(name=name, build=factory, input_shape=(), cuts=(), default_cut="", graph=True)
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; choose one of {sorted(MODELS)} or name a factory as 'package.module:function'"
        ) from None


def cut_points(name: str) -> tuple[str, ...]:
    """Cut points of model ``name``, from shallow to deep (legal ones, or suggestions for a graph-split model)."""
    return model_spec(name).cuts


def build_module(
    name: str,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int = 10,
    norm: str | None = None,
    seed: int | None = None,
    options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build model ``name`` (a zoo name or a ``"package.module:factory"`` import string).

    The builder gets ``input_shape`` (per sample; the spec's default when None), ``num_classes`` and
    ``norm`` where its signature takes them, and ``options`` as keyword arguments. With ``seed`` the
    initial weights are reproducible (the global torch RNG is not disturbed).
    """
    spec = model_spec(name)
    shape = spec.input_shape if input_shape is None else tuple(input_shape)
    given = dict(options or {})
    offered: dict[str, Any] = {"num_classes": num_classes}
    if shape:
        offered["input_shape"] = shape
    if norm and not spec.default_norm:
        raise ValueError(f"model {name!r} has no norm choice; leave model.norm empty")
    if spec.default_norm:
        offered["norm"] = norm or spec.default_norm
    clash = sorted(set(given) & {"input_shape", "num_classes", "norm"})
    if clash:
        raise ValueError(f"model {name!r}: {clash} come from the data and model.norm, not from [model.options]")
    params = inspect.signature(spec.build).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in offered.items() if takes_any or k in params}
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = spec.build(**kwargs, **given)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {name!r}: its builder returned a {type(model).__name__}, not an nn.Module")
    return model


def build_model(
    name: str,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int = 10,
    norm: str | None = None,
    seed: int | None = None,
    options: Mapping[str, Any] | None = None,
) -> nn.Sequential:
    """Build sequential zoo model ``name`` for per-sample ``input_shape`` (C, H, W).

    With ``seed`` the initial weights are reproducible (the global torch RNG is not disturbed). A
    model that is split by its graph (Hugging Face models, plug-ins) is built by :func:`build_module`.
    """
    spec = model_spec(name)
    if spec.graph:
        raise ValueError(f"model {name!r} is split by its graph, not a Sequential of blocks: use build_module")
    shape = spec.input_shape if input_shape is None else tuple(input_shape)
    if len(shape) != 3:
        raise ValueError(f"model {name!r} takes (C, H, W) inputs, got input_shape {shape}")
    model = build_module(name, shape, num_classes, norm=norm, seed=seed, options=options)
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model {name!r} is registered as sequential but its builder returned a {type(model).__name__}")
    return model


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, or the ``logits`` of a Hugging Face ``ModelOutput``."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]  # type: ignore[no-any-return]
    raise TypeError(f"a model's output must be a tensor or carry .logits, got {type(output).__name__}")


def run_model(model: nn.Module, x: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``model``'s logits for inputs ``x``: a tensor goes in positionally, a dict of tensors
    (``input_ids``, ``attention_mask``) as keyword arguments, the way Hugging Face models take them."""
    out = model(**x) if isinstance(x, Mapping) else model(x)
    return logits_of(out)


@dataclass
class Split:
    """A model cut in two; both segments share parameters with the original model.

    ``graph`` is set when the model was split by its graph (:mod:`fsl.graphsplit`): the client
    segment then returns a dict of the named values that cross the cut, and the server segment
    takes that dict. Otherwise both are ``nn.Sequential`` and one tensor crosses.
    """

    client: nn.Module
    server: nn.Module
    cut: str
    graph: GraphSplit | None = None


Example = torch.Tensor | Mapping[str, torch.Tensor]


def _is_block(model: nn.Module, *cuts: str) -> bool:
    """Whether every cut names a top-level block of a Sequential (the split that needs no trace)."""
    names = [n for n, _ in model.named_children()]
    return isinstance(model, nn.Sequential) and all(c in names[:-1] for c in cuts)


def split_model(
    model: nn.Module,
    cut: str,
    example: Example | None = None,
    *,
    dynamic: Mapping[str, Mapping[int, str]] | None = None,
    bounds: Mapping[str, tuple[int, int]] | None = None,
    cache_key: str | None = None,
) -> Split:
    """Split ``model`` after ``cut``.

    A cut that names a top-level block of an ``nn.Sequential`` splits the container (no tracing,
    one tensor crosses); any other module path splits the traced graph of the model run on
    ``example`` (:func:`fsl.graphsplit.graph_split`, which also takes ``dynamic`` and ``bounds``).
    Raises ``ValueError`` when ``cut`` is not a block name, or is the last block
    (the server segment would be empty).
    """
    if not _is_block(model, cut) and (example is not None or not isinstance(model, nn.Sequential)):
        from fsl.graphsplit import graph_split

        if example is None:
            raise ValueError(f"splitting {type(model).__name__} at {cut!r} traces it: pass an example batch")
        g = graph_split(model, cut, example, dynamic=dynamic, bounds=bounds, cache_key=cache_key)
        for seg in g.segments:
            seg.train(model.training)
        return Split(client=g.segments[0], server=g.segments[1], cut=cut, graph=g)
    assert isinstance(model, nn.Sequential)
    names = [name for name, _ in model.named_children()]
    if cut not in names:
        raise ValueError(f"unknown cut {cut!r}; this model can be cut after {names[:-1]}")
    k = names.index(cut) + 1
    if k == len(names):
        raise ValueError(
            f"cut {cut!r} is the last block: the server segment would be empty; choose one of {names[:-1]}"
        )
    blocks = list(model.named_children())
    client, server = nn.Sequential(OrderedDict(blocks[:k])), nn.Sequential(OrderedDict(blocks[k:]))
    client.training = server.training = model.training
    return Split(client=client, server=server, cut=cut)


@dataclass
class USplit:
    """A model cut twice for a label-private U-shaped split: the client keeps ``bottom`` and
    ``top`` (with the labels and the loss), the server runs ``middle``."""

    bottom: nn.Module
    middle: nn.Module
    top: nn.Module
    cut: str
    top_cut: str
    graph: GraphSplit | None = None

    @property
    def client_modules(self) -> nn.Module:
        """Both client segments in one container (for state dicts and aggregation)."""
        if self.graph is not None:
            from fsl.graphsplit import join_params

            return join_params(self.bottom, self.top)
        assert isinstance(self.bottom, nn.Sequential) and isinstance(self.top, nn.Sequential)
        return join_segments(self.bottom, self.top)


def split_model_u(
    model: nn.Module,
    cut: str,
    top_cut: str,
    example: Example | None = None,
    *,
    dynamic: Mapping[str, Mapping[int, str]] | None = None,
    bounds: Mapping[str, tuple[int, int]] | None = None,
    cache_key: str | None = None,
) -> USplit:
    """Cut ``model`` after ``cut`` and after ``top_cut``: bottom | middle | top.

    ``top_cut`` must be a deeper block than ``cut`` and not the last block. Module paths other than
    a Sequential's blocks split the traced graph, as in :func:`split_model`.
    """
    if not _is_block(model, cut, top_cut) and (example is not None or not isinstance(model, nn.Sequential)):
        from fsl.graphsplit import graph_split

        if example is None:
            raise ValueError(f"splitting {type(model).__name__} at {cut!r} traces it: pass an example batch")
        g = graph_split(model, [cut, top_cut], example, dynamic=dynamic, bounds=bounds, cache_key=cache_key)
        bottom, middle, top = g.segments
        for seg in g.segments:
            seg.train(model.training)
        return USplit(bottom=bottom, middle=middle, top=top, cut=cut, top_cut=top_cut, graph=g)
    assert isinstance(model, nn.Sequential)
    names = [name for name, _ in model.named_children()]
    first = split_model(model, cut)
    if top_cut not in names:
        raise ValueError(f"unknown top cut {top_cut!r}; this model can be cut after {names[:-1]}")
    if names.index(top_cut) <= names.index(cut):
        raise ValueError(f"the top cut {top_cut!r} must come after the first cut {cut!r}")
    assert isinstance(first.server, nn.Sequential)
    second = split_model(first.server, top_cut)
    return USplit(bottom=first.client, middle=second.client, top=second.server, cut=cut, top_cut=top_cut)


def join_segments(*segments: nn.Sequential) -> nn.Sequential:
    """Join consecutive segments back into one model (modules are shared)."""
    joined = nn.Sequential(OrderedDict([kv for seg in segments for kv in seg.named_children()]))
    joined.training = segments[0].training
    return joined


def cut_shape(client: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-sample shape of what ``client`` (a client segment) sends for inputs of ``input_shape``."""
    modes = {m: m.training for m in client.modules()}
    try:
        with torch.no_grad():
            h = client.eval()(torch.zeros(1, *input_shape))
    finally:
        for m, mode in modes.items():  # restore each module's own mode, not one flag for all
            m.training = mode
    return tuple(h.shape[1:])


# the Hugging Face builders register themselves; importing the module costs nothing (transformers is
# imported inside each builder)
from fsl import zoo_hf as _zoo_hf  # noqa: E402, F401
