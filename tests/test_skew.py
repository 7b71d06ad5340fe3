"""Label skew: the logit-adjusted loss of the split server (train.logit_adjust) and of U-shaped clients."""

import copy

import pytest
import torch

from clients.trainer import TrainOptions, evaluate_model, train_segment
from fsl.channel import ChannelIdentity, InMemoryChannel
from fsl.data import client_partition
from fsl.models import join_segments
from fsl.training import label_log_prior
from helpers import make_state


def _train(state, split, x, y, client="a", epochs=1, batch_size=8):
    ch = InMemoryChannel(server=state, identity=ChannelIdentity(client_id=client))
    opts = TrainOptions(epochs=epochs, batch_size=batch_size, lr=0.05, momentum=0.0)
    return train_segment(split.client, x, y, ch, opts)


def test_the_prior_is_counted_per_client_and_forgotten_at_the_round_end():
    _, split, state = make_state("cnn", "conv1", lr=0.05, logit_adjust=True)
    x = torch.rand(8, 1, 28, 28)
    _train(state, split, x, torch.full((8,), 3), epochs=2)  # two steps of one client
    assert state._label_counts["a"].tolist() == [0] * 3 + [16] + [0] * 6
    _train(state, split, x, torch.arange(8), client="b")
    assert state._label_counts["b"][:8].tolist() == [1] * 8 and "a" in state._label_counts
    state.end_round()
    assert not state._label_counts
    p = label_log_prior(torch.tensor([16, 0, 0, 0]))
    assert torch.allclose(p.exp().sum(), torch.tensor(1.0)) and p[0] > -0.2 and p[1] < -2.9


def test_a_uniform_prior_trains_exactly_like_plain_cross_entropy():
    """Balanced labels: the shift is a constant, and softmax ignores constants (IID data is unchanged)."""
    x, y = torch.rand(20, 1, 28, 28), torch.arange(10).repeat(2)
    grads = {}
    for adjust in (False, True):
        _, split, state = make_state("cnn", "conv1", lr=0.05, logit_adjust=adjust)
        _train(state, split, x, y, batch_size=20)  # one batch of balanced labels
        grads[adjust] = [p.detach().clone() for p in state.segment.parameters()]
    for a, b in zip(grads[False], grads[True], strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def _fsl_rounds(adjust, ds, parts, rounds):
    """fsl, clients in turn against one shared server segment (the worst case for skew), FedAvg of the
    client segments after each round; the test accuracy of the joined model per round."""
    torch.manual_seed(0)
    _, split, state = make_state("cnn", "conv1", input_shape=ds.input_shape, lr=0.05, momentum=0.9, logit_adjust=adjust)
    accs = []
    for _ in range(rounds):
        start, trained = copy.deepcopy(split.client.state_dict()), []
        for i, p in enumerate(parts):
            split.client.load_state_dict(start)
            ch = InMemoryChannel(server=state, identity=ChannelIdentity(client_id=str(i)))
            train_segment(split.client, p.x_train, p.y_train, ch, TrainOptions(epochs=2, batch_size=32, lr=0.05))
            trained.append((len(p.y_train), copy.deepcopy(split.client.state_dict())))
        total = sum(n for n, _ in trained)
        split.client.load_state_dict({k: sum(n * sd[k] for n, sd in trained) / total for k in start})
        state.end_round()
        accs.append(evaluate_model(join_segments(split.client, state.segment), ds.x_test, ds.y_test).accuracy)
    return accs


def test_logit_adjustment_keeps_skewed_fsl_off_chance(digits):
    """Dirichlet(0.1) over 5 clients: with plain cross entropy the shared server segment follows whichever
    client trained last and predicts its class for everything (chance); adjusted, it learns."""
    parts = [client_partition(digits, i, 5, scheme="dirichlet", alpha=0.1, seed=0) for i in range(5)]
    plain = _fsl_rounds(False, digits, parts, rounds=2)
    adjusted = _fsl_rounds(True, digits, parts, rounds=2)
    assert max(plain) < 0.2, plain
    assert adjusted[-1] > 0.4, adjusted  # 0.49 measured


def _ushaped_loss(adjust, y):
    from clients.trainer import train_segment_u
    from fsl.models import build_model, cut_shape, split_model_u
    from server.split_server import SplitServerState

    u = split_model_u(build_model("cnn", seed=0), "conv1", "fc1")
    state = SplitServerState(u.middle, cut_shape(u.bottom, (1, 28, 28)), 10, device="cpu", ushaped=True)
    x = torch.rand(len(y), 1, 28, 28, generator=torch.Generator().manual_seed(0))
    opts = TrainOptions(epochs=1, batch_size=len(y), lr=0.05, momentum=0.0, logit_adjust=adjust)
    return train_segment_u(u.bottom, u.top, x, y, InMemoryChannel(server=state), opts).loss


def test_a_ushaped_client_adjusts_its_own_loss_by_its_local_labels():
    """The server never sees U-shaped labels: the client shifts its logits by its own label prior."""
    balanced = torch.arange(10).repeat(2)
    assert _ushaped_loss(True, balanced) == pytest.approx(_ushaped_loss(False, balanced), abs=1e-6)
    one_class = torch.full((20,), 4)
    plain, adjusted = _ushaped_loss(False, one_class), _ushaped_loss(True, one_class)
    assert plain > 2.0 and adjusted < 0.5  # untrained logits: ~log(10) plain, -log(21/30) adjusted


def test_batched_requests_are_each_adjusted_by_their_own_clients_prior():
    """Two clients in one batched server step: each gets the cut gradient its own prior gives alone."""
    from test_batching import _request as request
    from test_batching import _run_concurrently as run_concurrently

    from clocks import ManualClock
    from fsl.wire import codec
    from server.batching import RequestBatcher
    from server.timeline import Timeline

    torch.manual_seed(0)
    _, split, state = make_state("cnn", "conv1", lr=0.1, momentum=0.0, logit_adjust=True)
    batcher = RequestBatcher(state, max_requests=2, adaptive=False, timeline=Timeline(ManualClock()))
    data = [(torch.randn(6, *state.sample_shape), y) for y in (torch.full((6,), 2), torch.tensor([0, 1] * 3))]
    oracle = []
    for h, y in data:  # a fresh copy of the segment, the client's prior from this one batch
        seg, hh = copy.deepcopy(state.segment), h.clone().requires_grad_(True)
        shift = label_log_prior(torch.bincount(y, minlength=10))
        torch.nn.functional.cross_entropy(seg(hh) + shift, y).backward()
        oracle.append(hh.grad)
    replies, errors = run_concurrently(batcher, [request(f"c{i}", h, y) for i, (h, y) in enumerate(data)])
    assert errors == [None, None] and batcher.batches == 1
    for rep, g in zip(replies, oracle, strict=True):
        assert torch.allclose(codec.decode(rep.grad), g, atol=1e-6, rtol=1e-5)


def test_a_clipped_server_step_moves_the_segment_at_most_lr_times_the_bound():
    """train.clip_norm on the split server: one step's gradient is scaled to the bound, so a batch
    with a huge loss (a client's classes the segment has never seen) moves it by lr * clip_norm."""
    y = torch.full((16,), 7)
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    moved = {}
    for clip in (0.0, 0.5):
        _, split, state = make_state("cnn", "conv1", lr=0.1, momentum=0.9, clip_norm=clip, seed=0)
        with torch.no_grad():
            state.segment[-1].bias[3] = 30.0  # the segment is sure of class 3: cross entropy ~30
        before = [p.detach().clone() for p in state.segment.parameters()]
        _train(state, split, x, y, batch_size=16)
        after = list(state.segment.parameters())
        moved[clip] = float(torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(after, before, strict=True))))
    assert moved[0.5] <= 0.1 * 0.5 + 1e-5  # the first step's momentum buffer is the (clipped) gradient
    assert moved[0.0] > 5 * moved[0.5]  # unclipped: 0.38


def test_a_clipped_client_step_is_bounded_and_dp_sgd_keeps_its_own_clipping():
    from fsl.optim import clip_grad_norm

    w = torch.zeros(3, requires_grad=True)
    w.grad = torch.tensor([3.0, 4.0, 0.0])
    assert clip_grad_norm([w], 1.0) == pytest.approx(5.0)
    assert float(w.grad.norm()) == pytest.approx(1.0, abs=1e-5)
    assert clip_grad_norm([w], 0.0) == pytest.approx(1.0, abs=1e-5) and float(w.grad.norm()) == pytest.approx(1.0)
    model = torch.nn.Linear(4, 2)
    x, y = torch.randn(8, 4) * 1e3, torch.zeros(8, dtype=torch.long)  # a huge gradient
    from fsl.training import train_local

    start = model.weight.detach().clone()
    train_local(model, x, y, TrainOptions(epochs=1, batch_size=8, lr=0.1, momentum=0.0, clip_norm=1.0))
    assert float((model.weight - start).norm()) <= 0.1 + 1e-5  # lr times the bound, bias included


@pytest.fixture(scope="module")
def fashion_small():
    from fsl.data import DatasetNotFound, load_dataset, subset

    try:
        return subset(load_dataset("fashion-mnist"), 6000, 2000, seed=0)
    except DatasetNotFound:
        pytest.skip("dataset-fashion-mnist is not installed (.ci/run installs it)")


def _dead_share(split, segment, x):
    """Share of the server segment's ReLU units (conv2 and fc1) that are zero on every sample of ``x``."""
    acts = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, o: acts.append(o))
        for m in segment.modules()
        if isinstance(m, torch.nn.ReLU)
    ]
    with torch.no_grad():
        segment(split.client(x))
    for h in hooks:
        h.remove()
    dead = sum(int(((a > 0).sum(0) == 0).sum()) for a in acts)
    return dead / sum(a[0].numel() for a in acts)


def _sl_on_shards(ds, clip, rounds):
    """sl: ten clients with two classes each train in turn against one server segment and hand the
    client segment on; test accuracy per round, the dead share of the server's ReLUs at the end and
    the largest server gradient norm of a client's first step against the median of all steps."""
    torch.manual_seed(0)
    parts = [client_partition(ds, i, 10, scheme="shards", seed=0) for i in range(10)]
    _, split, state = make_state(
        "cnn", "conv1", input_shape=ds.input_shape, lr=0.05, momentum=0.9, logit_adjust=True, clip_norm=clip
    )
    norms, first = [], []
    step = state.global_replica.step

    def recorded_step():
        norms.append(float(torch.sqrt(sum((p.grad**2).sum() for p in state.segment.parameters()))))
        step()

    state.global_replica.step = recorded_step
    accs = []
    for r in range(rounds):
        for i in torch.randperm(10, generator=torch.Generator().manual_seed(r)).tolist():
            first.append(len(norms))
            p = parts[i]
            ch = InMemoryChannel(server=state, identity=ChannelIdentity(client_id=str(i)))
            opts = TrainOptions(epochs=1, batch_size=64, lr=0.05, momentum=0.9, clip_norm=clip, seed=r)
            train_segment(split.client, p.x_train, p.y_train, ch, opts)
        state.end_round()
        accs.append(evaluate_model(join_segments(split.client, state.segment), ds.x_test, ds.y_test).accuracy)
    spike = max(norms[i] for i in first) / float(torch.tensor(norms).median())
    return accs, _dead_share(split, state.segment, ds.x_test[:500]), spike


def test_sl_on_two_class_shards_no_longer_dies_under_the_default_clip(fashion_small):
    """Clients in turn on two classes each: the first batches of each new client give a gradient many
    times the usual one; unclipped, with momentum, those steps kill the server's ReLUs and the model
    ends at chance. The default train.clip_norm bounds those steps and the model learns."""
    from fsl.config import ExperimentConfig

    plain_acc, plain_dead, plain_spike = _sl_on_shards(fashion_small, 0.0, rounds=2)
    assert plain_spike > 20  # measured: a client's first step about 200x the median step
    assert plain_acc[-1] < 0.15 and plain_dead > 0.6, (plain_acc, plain_dead)  # measured 0.10, 0.92 after 3 rounds
    acc, dead = _sl_on_shards(fashion_small, ExperimentConfig(mode="sl").clip_norm, rounds=2)[:2]
    assert acc[-1] > 0.25 and dead < 0.4, (acc, dead)  # measured 0.35, 0.16 after 3 rounds


def test_the_automatic_clip_bounds_the_modes_that_hand_one_server_segment_around():
    import dataclasses

    from fsl.config import AUTO_CLIP_NORM, ExperimentConfig, TrainConfig

    auto = {m: ExperimentConfig(mode=m).clip_norm for m in ("sl", "sflv2", "fsl", "sflv1", "psl", "hybrid", "fl")}
    assert auto == dict.fromkeys(("sl", "sflv2", "psl"), AUTO_CLIP_NORM) | dict.fromkeys(
        ("fsl", "sflv1", "hybrid", "fl"), 0.0
    )
    for mode, value, want in (("fsl", 0.5, 0.5), ("sl", 0, 0.0), ("fl", 0.5, 0.5), ("central", 1.0, 1.0)):
        cfg = dataclasses.replace(ExperimentConfig(mode=mode), train=TrainConfig(clip_norm=value))
        assert cfg.clip_norm == want
        assert TrainOptions.from_config(cfg, seed=0).clip_norm == want  # what the client loop uses


def test_a_sweep_row_without_a_bound_ran_unclipped():
    """skew.json rows written before the bound existed count as unclipped cells: the parallel modes
    keep them, the sequential ones (now clipped by default) run again."""
    from experiments.skew import _key

    old = {"mode": "sl", "partition": "shards", "alpha": None, "seed": 0, "rounds": 10}
    assert _key(old) == _key({**old, "clip_norm": 0.0}) != _key({**old, "clip_norm": 1.0})


def _request(h, y, counts):
    from fsl.wire import codec
    from fsl.wire import dataplane_pb2 as pb

    req = pb.TrainRequest(header=pb.Header(client_id="c", step=1))
    codec.encode_into(req.activations, h, torch.float32)
    codec.encode_into(req.labels, y, torch.int64)
    req.label_counts.extend(counts)
    return req


def test_declared_label_counts_give_the_exact_prior_from_the_first_batch():
    from server.validation import InvalidRequest

    _, split, state = make_state("cnn", "conv1", lr=0.05, logit_adjust=True)
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 0, 1, 1])  # a batch that looks balanced
    h = split.client(x).detach()
    job = state.admit_train(_request(h, y, [90, 10]))  # but the client holds 90 % class 0
    assert torch.allclose(job.log_prior, label_log_prior(torch.tensor([90, 10] + [0] * 8)))
    before = {k: v.clone() for k, v in state.segment.state_dict().items()}
    for bad in ([1] * 11, [-1, 9], [1, 1]):  # too many classes, negative, fewer than the batch
        with pytest.raises(InvalidRequest, match="label_counts"):
            state.admit_train(_request(h, y, bad))
    assert all(torch.equal(v, before[k]) for k, v in state.segment.state_dict().items())


def test_a_logit_adjusting_client_declares_its_label_counts():
    _, split, state = make_state("cnn", "conv1", lr=0.05, logit_adjust=True)
    seen = []
    ch = InMemoryChannel(server=state, identity=ChannelIdentity(client_id="a"))
    send = ch.train_step

    def spy(h, y, **kw):
        seen.append(kw.get("label_counts"))
        return send(h, y, **kw)

    ch.train_step = spy
    y = torch.tensor([0, 0, 0, 2, 2, 1, 0, 0])
    train_segment(split.client, torch.rand(8, 1, 28, 28), y, ch, TrainOptions(batch_size=4, logit_adjust=True))
    assert seen == [[5, 1, 2], [5, 1, 2]]


def test_a_bounded_baseline_gets_its_own_line_in_the_table():
    from experiments.skew import markdown

    def row(mode, acc, clip):
        return {"mode": mode, "partition": "shards", "alpha": None, "seed": 0, "rounds": 10,
                "final_accuracy": acc, "clip_norm": clip}  # fmt: skip

    md = markdown([row("fl", 0.1, 0.0), row("fl", 0.64, 1.0), row("sl", 0.66, 1.0), row("sl", 0.1, 0.0)])
    lines = {ln.split(" | ")[0].strip("| "): ln for ln in md.splitlines()[2:]}
    assert set(lines) == {"sl", "fl", "fl (clip_norm 1)"}
    assert "0.100 (1)" in lines["fl"] and "0.640 (1)" in lines["fl (clip_norm 1)"]
    assert "0.660 (1)" in lines["sl"]  # sl's default is bounded: its unbounded row is superseded
