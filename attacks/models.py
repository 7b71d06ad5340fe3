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

__all__ = ["REFERENCE_CUTS", "build_architecture", "lenet_he", "segments"]


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
