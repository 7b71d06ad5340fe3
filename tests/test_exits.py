"""Multi-exit models: exits leave the model's output alone and learn where the labels are."""

import pytest
import torch

from clients.trainer import TrainHooks, TrainOptions, train_local, train_segment
from fsl.channel import InMemoryChannel
from fsl.config import ExperimentConfig, from_dict
from fsl.data import client_partition
from fsl.exits import ExitBlock, add_exits, all_exit_logits, exit_names
from fsl.experiment import build_model_for
from fsl.models import build_model, cut_shape, split_model
from helpers import split_state
from server.batching import RequestBatcher


def _accuracies(model, ds):
    logits = all_exit_logits(model, ds.x_test)
    return {k: float((v.argmax(1) == ds.y_test).float().mean()) for k, v in logits.items()}


def test_exits_do_not_change_the_model_and_split_with_it():
    model = build_model("cnn", seed=0)
    multi = add_exits(model, (1, 28, 28), 10, at=("conv1", "conv2", "fc1"), seed=0)
    x = torch.randn(5, 1, 28, 28)
    assert torch.equal(model.eval()(x), multi.eval()(x))
    assert exit_names(multi) == ["conv1", "conv2", "fc1"]
    s = split_model(multi, "conv1")
    assert exit_names(s.client) == ["conv1"] and exit_names(s.server) == ["conv2", "fc1"]
    assert any(k.startswith("conv1.head.") for k in s.client.state_dict())
    assert cut_shape(s.client, (1, 28, 28)) == (16, 14, 14)  # what travels is unchanged
    with pytest.raises(ValueError, match="exits go after"):
        add_exits(model, (1, 28, 28), 10, at=("fc2",))


def test_config_builds_a_multi_exit_model():
    cfg = from_dict(ExperimentConfig, {"model": {"exits": True}})
    model = build_model_for(cfg, (1, 28, 28), 10)
    assert sum(isinstance(m, ExitBlock) for m in model) == 3


@pytest.mark.parametrize("weight", [0.5, 0.0])
def test_exits_learn_only_with_their_loss(digits, weight):
    torch.manual_seed(0)
    model = add_exits(build_model("cnn", digits.input_shape, seed=0), digits.input_shape, 10, ("conv1", "conv2", "fc1"))
    train_local(model, digits.x_train, digits.y_train, TrainOptions(epochs=4, lr=0.05, exit_weight=weight))
    acc = _accuracies(model, digits)
    assert acc["final"] > 0.9, acc
    if weight > 0:
        assert min(acc.values()) > 0.8, acc  # every exit classifies well
    else:
        assert max(acc[k] for k in ("conv1", "conv2", "fc1")) < 0.35, acc  # untrained heads stay near chance


@pytest.mark.parametrize("batched", [False, True])
def test_split_training_trains_client_and_server_exits(digits, batched):
    torch.manual_seed(0)
    model = add_exits(build_model("cnn", digits.input_shape, seed=0), digits.input_shape, 10, ("conv1", "conv2", "fc1"))
    split = split_model(model, "conv1")
    state = split_state(split, digits.input_shape, exit_weight=0.5)
    server = RequestBatcher(state, max_requests=4, max_wait_ms=1.0) if batched else state
    part = client_partition(digits, 0, 1, seed=0)
    ch = InMemoryChannel(server=server)
    train_segment(split.client, part.x_train, part.y_train, ch, TrainOptions(epochs=5, lr=0.05, exit_weight=0.5))
    acc = _accuracies(model, digits)
    assert min(acc.values()) > 0.8, acc  # conv1's exit learned on the client, conv2/fc1's on the server


@pytest.mark.parametrize("mode", ["split", "local"])
def test_training_reports_true_label_confidence_per_sample(digits, mode):
    """The split server returns p(true label) per sample; the client files it under its own indices."""
    torch.manual_seed(0)
    model = build_model("cnn", digits.input_shape, seed=0)
    seen: dict[int, list[float]] = {}

    def record(idx, p, epoch):
        assert p.shape == idx.shape and bool(((p >= 0) & (p <= 1)).all())
        for i, v in zip(idx.tolist(), p.tolist(), strict=True):
            seen.setdefault(i, []).append(v)

    x, y = digits.x_train, digits.y_train
    n = len(y)
    if mode == "split":
        split = split_model(model, "conv1")
        state = split_state(split, digits.input_shape)
        train_segment(
            split.client, x, y, InMemoryChannel(server=state), TrainOptions(epochs=3), TrainHooks(cartography=record)
        )
    else:
        train_local(model, x, y, TrainOptions(epochs=3), TrainHooks(cartography=record))
    assert sorted(seen) == list(range(n)) and all(len(v) == 3 for v in seen.values())
    first = sum(v[0] for v in seen.values()) / n
    last = sum(v[-1] for v in seen.values()) / n
    assert first < 0.5 < last, (first, last)  # confidence in the true label grows as the model learns


def test_a_used_multi_exit_segment_can_be_copied():
    """Server replicas deep-copy the segment mid-training: the kept logits (with their graph) must not travel."""
    import copy

    model = add_exits(build_model("cnn", seed=0), (1, 28, 28), 10, ("conv1", "conv2", "fc1"))
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    twin = copy.deepcopy(model)
    assert all(m.logits is None for m in twin if isinstance(m, ExitBlock))
    assert all(m.logits is not None for m in model if isinstance(m, ExitBlock))
