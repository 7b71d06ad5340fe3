"""Architectures the attacker can rebuild: the fsl model zoo plus reference models from papers.

An attack that knows "the architecture" rebuilds it from the observation's
``model`` name with :func:`build_architecture` and loads whatever weights it
knows. ``lenet-he`` is the LeNet of He, Zhang and Lee (ACSAC 2019) as far as the
paper describes it, with their two cut points: ``conv1`` (the raw output of the
first 5x5 convolution) and ``relu2`` (after the second convolution's ReLU). It
is used to reproduce their table; it is not part of the training zoo.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from fsl.models import MODELS, build_model, split_model

__all__ = [
    "REFERENCE_CUTS",
    "build_architecture",
    "fsha_client",
    "fsha_critic",
    "fsha_decoder",
    "fsha_pilot",
    "lenet_he",
    "segments",
]


def lenet_he(input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10) -> nn.Sequential:
    """LeNet-5 layout: conv5x5(6) | ReLU, pool, conv5x5(16), ReLU | pool, fc120, fc84, fc."""
    c, h, w = input_shape
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(c, 6, 5, padding=2)),  # (B, 6, H, W) smashed: raw conv output
                (
                    "relu2",
                    nn.Sequential(nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5, padding=2), nn.ReLU()),
                ),  # (B, 16, H/2, W/2) smashed
                (
                    "fc1",
                    nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * (h // 4) * (w // 4), 120), nn.ReLU()),
                ),  # (B, 120)
                ("head", nn.Sequential(nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes))),
            ]
        )
    )


REFERENCE_CUTS: dict[str, tuple[str, ...]] = {"lenet-he": ("conv1", "relu2", "fc1")}


def build_architecture(
    name: str, input_shape: tuple[int, ...], num_classes: int = 10, norm: str = "", seed: int | None = None
) -> nn.Sequential:
    """A fresh model of architecture ``name`` (zoo or reference), seeded if ``seed`` is given."""
    if name == "lenet-he":
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            return lenet_he(tuple(input_shape), num_classes)  # type: ignore[arg-type]
    if name not in MODELS:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted([*MODELS, *REFERENCE_CUTS])}")
    return build_model(name, tuple(input_shape), num_classes, norm=norm or None, seed=seed)


def segments(
    name: str,
    cut: str,
    input_shape: tuple[int, ...],
    num_classes: int = 10,
    norm: str = "",
    seed: int | None = None,
) -> tuple[nn.Sequential, nn.Sequential]:
    """(client segment, server segment) of a fresh ``name`` model cut at ``cut``."""
    split = split_model(build_architecture(name, input_shape, num_classes, norm, seed), cut)
    return split.client, split.server


# ---------------------------------------------------------------------------------------------------
# The networks of feature-space hijacking (Pasquini, Ateniese, Bernaschi, CCS 2021), as their public
# code lays them out for MNIST-like inputs (32x32, three channels, pixels in [-1, 1]), split level 1-4.
# ``width`` scales every channel count (1.0: the paper's 64/128/256): a single CPU thread cannot afford
# the paper's widths for thousands of steps. ``blocks``: the critic's residual blocks (paper: 6).


class _ResBlock(nn.Module):
    """ReLU, conv3x3 (stride ``reduce``), ReLU, conv3x3, plus the input (through a strided conv3x3 when
    the block reduces), no normalisation: the block of the FSHA code's client and critic."""

    def __init__(self, c_in: int, c_out: int, reduce: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(c_in, c_out, 3, reduce, padding=1),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1),
        )
        self.skip: nn.Module = nn.Conv2d(c_in, c_out, 3, reduce, padding=1) if reduce > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.skip(x) + self.body(x)
        return out


def _ch(n: int, width: float) -> int:
    return max(4, round(n * width))


def fsha_client(level: int = 4, width: float = 1.0, channels: int = 3) -> nn.Sequential:
    """The client's segment ``f``: conv3x3(64), BN, ReLU, max-pool, then residual blocks 64, 128/2, 128,
    256/2, cut after block ``level`` (level 4 on 32x32 inputs: (256, 4, 4) activations)."""
    if not 1 <= level <= 4:
        raise ValueError(f"split level must be 1-4, not {level}")
    c64, c128, c256 = _ch(64, width), _ch(128, width), _ch(256, width)
    layers: list[nn.Module] = [
        nn.Conv2d(channels, c64, 3, padding=1),
        nn.BatchNorm2d(c64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        _ResBlock(c64, c64),
    ]
    plan = [(c64, c128, 2), (c128, c128, 1), (c128, c256, 2)]
    layers += [_ResBlock(*plan[i]) for i in range(level - 1)]
    return nn.Sequential(*layers)


def fsha_pilot(level: int = 4, width: float = 1.0, channels: int = 3) -> nn.Sequential:
    """The attacker's pilot ``f~``: strided conv3x3 with swish down to the client's activation shape,
    then a linear conv3x3 (the layout of the code that produced the authors' published MNIST log)."""
    if not 1 <= level <= 4:
        raise ValueError(f"split level must be 1-4, not {level}")
    c64, c128, c256 = _ch(64, width), _ch(128, width), _ch(256, width)
    if level == 1:
        return nn.Sequential(nn.Conv2d(channels, c64, 3, 2, padding=1), nn.SiLU(), nn.Conv2d(c64, c64, 3, padding=1))
    down: list[nn.Module] = [
        nn.Conv2d(channels, c64, 3, 2, padding=1),
        nn.SiLU(),
        nn.Conv2d(c64, c128, 3, 2, padding=1),
        nn.SiLU(),
    ]
    if level <= 3:
        return nn.Sequential(*down, nn.Conv2d(c128, c128, 3, padding=1))
    return nn.Sequential(*down, nn.Conv2d(c128, c256, 3, 2, padding=1), nn.SiLU(), nn.Conv2d(c256, c256, 3, padding=1))


def fsha_decoder(z_channels: int, level: int = 4, width: float = 1.0, channels: int = 3) -> nn.Sequential:
    """The attacker's decoder ``f~^-1``: 2x transposed convs (256, 128) with ReLU, tanh output in [-1, 1]."""
    c128, c256 = _ch(128, width), _ch(256, width)

    def up(c_in: int, c_out: int) -> nn.Module:
        return nn.ConvTranspose2d(c_in, c_out, 3, 2, padding=1, output_padding=1)

    if level == 1:
        return nn.Sequential(up(z_channels, c256), nn.ReLU(), nn.Conv2d(c256, channels, 3, padding=1), nn.Tanh())
    layers: list[nn.Module] = [up(z_channels, c256), nn.ReLU(), up(c256, c128), nn.ReLU()]
    if level <= 3:
        return nn.Sequential(*layers, nn.Conv2d(c128, channels, 3, padding=1), nn.Tanh())
    return nn.Sequential(*layers, up(c128, channels), nn.Tanh())


def fsha_critic(z_channels: int, width: float = 1.0, blocks: int = 6) -> nn.Sequential:
    """The WGAN critic ``D`` on activations: conv3x3(256), ``blocks`` residual blocks of 256, a strided
    conv3x3 and a linear score. (The public code builds this same stack for every split level 1-4: its
    level-specific first layers are overwritten before use.)"""
    c256 = _ch(256, width)
    return nn.Sequential(
        nn.Conv2d(z_channels, c256, 3, padding=1),
        *[_ResBlock(c256, c256) for _ in range(blocks)],
        nn.Conv2d(c256, c256, 3, 2, padding=1),
        nn.Flatten(),
        nn.LazyLinear(1),
    )
