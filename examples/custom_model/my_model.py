"""A user's own model, defined outside the library: a small CNN with a skip connection.

It is an ordinary ``nn.Module`` (not an ``nn.Sequential``): the stem's output is added back after
``block2``, so a cut after ``block1`` sends two tensors to the server, ``block1``'s output and the
stem's output on the skip path. The framework names it by import string and calls ``build`` with
``num_classes`` and ``input_shape`` from the data and the keyword arguments in ``[model.options]``.
"""

from __future__ import annotations

import torch
from torch import nn


class SkipNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        h = torch.relu(self.block2(self.block1(s)) + s)  # the skip: s crosses a cut after block1
        return self.head(torch.flatten(self.pool(h), 1))


def build(input_shape: tuple[int, ...] = (1, 8, 8), num_classes: int = 10, width: int = 16) -> nn.Module:
    """The model for images of ``input_shape`` (C, H, W); ``width`` channels in every block."""
    return SkipNet(int(input_shape[0]), num_classes, width)
