"""The client trainer learns through the split (in-memory channel, real codec)."""

import torch

from clients.trainer import evaluate_model, evaluate_split, train_segment
from fsl.channel import InMemoryChannel
from fsl.data import client_partition
from fsl.models import join_segments
from helpers import make_state


def test_split_training_learns_digits(digits):
    _, split, state = make_state("cnn", "conv1", input_shape=digits.input_shape, lr=0.05, momentum=0.9)
    part = client_partition(digits, 0, 1, seed=0)
    ch = InMemoryChannel(server=state)
    before = evaluate_split(split.client, digits.x_test, digits.y_test, ch)
    stats = train_segment(split.client, part.x_train, part.y_train, ch, epochs=6, batch_size=32, lr=0.05)
    after = evaluate_split(split.client, digits.x_test, digits.y_test, ch)
    assert before.accuracy < 0.3
    assert after.accuracy > 0.9, after
    assert stats.examples == 6 * len(part.y_train) and stats.bytes_up > 0 and stats.bytes_down > 0
    # split inference and the joined model agree
    whole = evaluate_model(join_segments(split.client, state.segment), digits.x_test, digits.y_test)
    assert abs(whole.accuracy - after.accuracy) < 1e-9


def test_fedprox_term_pulls_towards_the_start(digits):
    torch.manual_seed(0)
    dist = {}
    for mu in (0.0, 10.0):
        _, split, state = make_state("cnn", "conv1", input_shape=digits.input_shape, lr=0.05)
        start = [p.detach().clone() for p in split.client.parameters()]
        part = client_partition(digits, 0, 1, seed=0)
        train_segment(split.client, part.x_train, part.y_train, InMemoryChannel(server=state), epochs=1, proximal_mu=mu)
        dist[mu] = sum(float((p - s).norm()) for p, s in zip(split.client.parameters(), start, strict=True))
    assert dist[10.0] < 0.8 * dist[0.0]
