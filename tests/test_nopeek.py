"""NoPeek: distance correlation is right, and the penalty lowers dCor(x, h) in split training."""

from __future__ import annotations

import torch

from clients.trainer import TrainHooks, TrainOptions, train_segment
from fsl.channel import InMemoryChannel
from fsl.data import load_dataset
from fsl.privacy.nopeek import NoPeek, distance_correlation
from tests.helpers import make_state


def test_distance_correlation_detects_dependence_and_independence():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 5, generator=g)
    assert float(distance_correlation(x, x)) > 0.99
    dependent = float(distance_correlation(x, x**2 + 0.01 * torch.randn(500, 5, generator=g)))  # non-linear
    independent = float(distance_correlation(x, torch.randn(500, 3, generator=g)))  # only the V-statistic's bias
    assert dependent > 0.3 and independent < 0.2 and dependent > 2 * independent
    scaled = distance_correlation(x, 3.0 * x[:, :2] + 1.0)
    assert abs(float(scaled) - float(distance_correlation(x, x[:, :2]))) < 1e-5  # invariant to scale and shift


def test_nopeek_penalty_lowers_the_input_activation_correlation():
    ds = load_dataset("digits")
    x, y = ds.x_train[:600], ds.y_train[:600]
    dcors, accs = {}, {}
    for weight in (0.0, 3.0):
        _, split, state = make_state("cnn", cut="conv1", input_shape=ds.input_shape, lr=0.05, momentum=0.9)
        penalty = NoPeek(weight) if weight else None
        for epoch in range(4):
            opts = TrainOptions(batch_size=16, lr=0.05, seed=epoch)
            stats = train_segment(split.client, x, y, InMemoryChannel(server=state), opts, TrainHooks(penalty=penalty))
        with torch.no_grad():
            dcors[weight] = float(distance_correlation(ds.x_test[:300], split.client.eval()(ds.x_test[:300])))
        accs[weight] = stats.accuracy
    assert dcors[3.0] < dcors[0.0] - 0.05, dcors  # measured: 0.974 -> 0.881
    assert accs[0.0] > 0.8 and accs[3.0] > 0.4, accs  # it still learns the task, at a cost (0.89 -> 0.67)
