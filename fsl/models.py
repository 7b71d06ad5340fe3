"""Model zoo with named cut points, and splitting a model at a cut.

Every model is an ``nn.Sequential`` of named blocks. A *cut* is the name of the
last block that stays on the client: ``split_model(model, "conv1")`` gives the
client everything up to and including block ``conv1`` and the server the rest.
Both segments reuse the model's own modules, so their ``state_dict`` keys are the
full model's keys (``conv1.0.weight`` on the client, ``fc2.weight`` on the
server) and joining them back gives the same model.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "MODELS",
    "ModelSpec",
    "Split",
    "build_model",
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


@dataclass(frozen=True)
class ModelSpec:
    """What the zoo knows about a model: how to build it and where it may be cut."""

    name: str
    build: Callable[..., nn.Sequential]
    input_shape: tuple[int, int, int]  # (C, H, W) of one sample
    cuts: tuple[str, ...]  # legal cut points, shallow to deep
    default_cut: str
    default_norm: str


MODELS: dict[str, ModelSpec] = {
    "cnn": ModelSpec("cnn", _cnn, (1, 28, 28), ("conv1", "conv2", "fc1"), "conv1", "none"),
    "resnet": ModelSpec("resnet", _resnet, (3, 32, 32), ("stem", "layer1", "layer2", "layer3"), "layer1", "batch"),
}


def model_spec(name: str) -> ModelSpec:
    """Return the zoo entry for ``name`` or raise a ``ValueError`` listing the choices."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None


def cut_points(name: str) -> tuple[str, ...]:
    """Legal cut points of model ``name``, from shallow to deep."""
    return model_spec(name).cuts


def build_model(
    name: str,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int = 10,
    norm: str | None = None,
    seed: int | None = None,
) -> nn.Sequential:
    """Build zoo model ``name`` for per-sample ``input_shape`` (C, H, W).

    With ``seed`` the initial weights are reproducible (the global torch RNG is
    not disturbed).
    """
    spec = model_spec(name)
    shape = spec.input_shape if input_shape is None else tuple(input_shape)
    if len(shape) != 3:
        raise ValueError(f"model {name!r} takes (C, H, W) inputs, got input_shape {shape}")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return spec.build(input_shape=shape, num_classes=num_classes, norm=spec.default_norm if norm is None else norm)


@dataclass
class Split:
    """A model cut in two; both segments share modules with the original model."""

    client: nn.Sequential
    server: nn.Sequential
    cut: str


def split_model(model: nn.Sequential, cut: str) -> Split:
    """Split ``model`` after block ``cut``.

    Raises ``ValueError`` when ``cut`` is not a block name, or is the last block
    (the server segment would be empty).
    """
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

    bottom: nn.Sequential
    middle: nn.Sequential
    top: nn.Sequential
    cut: str
    top_cut: str

    @property
    def client_modules(self) -> nn.Sequential:
        """Both client segments in one container (for state dicts and aggregation)."""
        return join_segments(self.bottom, self.top)


def split_model_u(model: nn.Sequential, cut: str, top_cut: str) -> USplit:
    """Cut ``model`` after ``cut`` and after ``top_cut``: bottom | middle | top.

    ``top_cut`` must be a deeper block than ``cut`` and not the last block.
    """
    names = [name for name, _ in model.named_children()]
    first = split_model(model, cut)
    if top_cut not in names:
        raise ValueError(f"unknown top cut {top_cut!r}; this model can be cut after {names[:-1]}")
    if names.index(top_cut) <= names.index(cut):
        raise ValueError(f"the top cut {top_cut!r} must come after the first cut {cut!r}")
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
