"""DP-SGD on the client segment: per-sample gradients through the split, clipping, accounting, validation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from opacus.accountants.analysis import prv as prv_analysis
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from torch import nn

from clients.trainer import TrainHooks, TrainOptions, train_segment, train_segment_u
from fsl.channel import InMemoryChannel
from fsl.config import ConfigError, load_experiment
from fsl.models import build_model, cut_shape, split_model, split_model_u
from fsl.privacy.config import DPConfig
from fsl.privacy.dp import (
    DPValidationError,
    PrivacyLedger,
    compute_epsilon,
    make_dp_session,
    noise_for_target,
    validate_dp_module,
)
from server.split_server import SplitServerState
from tests.helpers import make_state


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook:UserWarning")


def _session(module, n, sigma=0.0, clip=1e6, **kw):
    dp = DPConfig(enabled=True, noise_multiplier=sigma, max_grad_norm=clip, **kw)
    return make_dp_session(
        module, n, dp=dp, batch_size=4, lr=0.1, momentum=0.0, weight_decay=0.0, seed=0, total_epochs=1
    )


def _per_sample_reference(model, cut, x, y):
    """Each sample's own loss gradient w.r.t. the client segment, one sample at a time, no Opacus."""
    out = []
    for i in range(len(y)):
        m = copy.deepcopy(model)
        client = split_model(m, cut).client
        loss = nn.functional.cross_entropy(m(x[i : i + 1]), y[i : i + 1])
        out.append([g.detach() for g in torch.autograd.grad(loss, list(client.parameters()))])
    return [torch.stack(gs) for gs in zip(*out, strict=True)]  # per parameter: (B, ...)


@pytest.mark.parametrize("cut", ["conv1", "conv2"])
def test_per_sample_gradients_through_the_split_match_a_loop_without_opacus(cut):
    reference, split, state = make_state("cnn", cut=cut)
    x, y = _batch(6)
    expected = _per_sample_reference(reference, cut, x, y)
    session = _session(split.client, 6)
    channel = InMemoryChannel(server=state)
    h = split.client(x)  # (B, ...) smashed
    step = channel.train_step(h.detach(), y)  # the server's dL/dh of its MEAN loss, passed unchanged
    h.backward(step.grad)
    got = [p.grad_sample for p in split.client.parameters()]
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    # and the wrong reduction is off by exactly the batch size: the scaling matters
    _, split2, state2 = make_state("cnn", cut=cut)
    from opacus import GradSampleModule

    gsm = GradSampleModule(split2.client, loss_reduction="sum")
    h2 = gsm(x)
    h2.backward(InMemoryChannel(server=state2).train_step(h2.detach(), y).grad)
    first = next(iter(split2.client.parameters())).grad_sample
    torch.testing.assert_close(first * 6, expected[0], rtol=1e-4, atol=1e-6)
    session.close()


def test_dp_step_clips_each_sample_and_averages_over_the_expected_batch():
    """noise 0: the update is lr * sum_i clip(g_i, C) / expected_batch_size, computed here without Opacus."""
    reference, split, state = make_state("cnn", cut="conv1")
    x, y = _batch(8, seed=1)
    per_sample = _per_sample_reference(reference, "conv1", x, y)
    flat = torch.cat([g.reshape(8, -1) for g in per_sample], 1)
    clip = float(flat.norm(dim=1).median())  # half the samples get clipped
    factor = (clip / flat.norm(dim=1)).clamp(max=1.0)
    before = [p.detach().clone() for p in split.client.parameters()]
    session = _session(split.client, 8, sigma=0.0, clip=clip)
    h = split.client(x)
    h.backward(InMemoryChannel(server=state).train_step(h.detach(), y).grad)
    session.optimizer.step()
    for p, p0, g in zip(split.client.parameters(), before, per_sample, strict=True):
        clipped = (g * factor.view(-1, *[1] * (g.ndim - 1))).sum(0) / 4  # expected batch = n * q = 8 * 1/2
        torch.testing.assert_close(p.detach(), p0 - 0.1 * clipped, rtol=1e-4, atol=1e-6)
    session.close()


def test_reported_epsilon_is_opacus_accountant_on_the_recorded_history():
    """Train through the split with DP-SGD; recompute epsilon from (sigma, q, steps) with Opacus' analysis."""
    _, split, state = make_state("cnn", cut="conv1")
    x, y = _batch(40, seed=2)
    session = _session(split.client, 40, sigma=1.1, clip=1.0)
    train_segment(
        split.client,
        x,
        y,
        InMemoryChannel(server=state),
        TrainOptions(epochs=2),
        session.train_hooks(),
    )
    m = session.metrics(1e-5)
    session.close()
    assert m["dp_steps"] == 2 * 10 and m["dp_sample_rate"] == pytest.approx(0.1)
    ledger = PrivacyLedger("rdp", 1e-5)
    ledger.record("0", m["dp_noise_multiplier"], m["dp_sample_rate"], int(m["dp_steps"]))
    ledger.record("0", m["dp_noise_multiplier"], m["dp_sample_rate"], int(m["dp_steps"]))  # a second round
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = compute_rdp(q=0.1, noise_multiplier=1.1, steps=40, orders=orders)
    independent, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert ledger.epsilon("0") == pytest.approx(independent, rel=1e-9)
    assert ledger.epsilon("0") > m["dp_round_epsilon"] > 0
    # the state a checkpoint stores gives the same epsilon after a restart
    again = PrivacyLedger("rdp", 1e-5)
    again.load(ledger.state())
    assert again.epsilon("0") == ledger.epsilon("0")
    s = again.summary(1.0)
    assert {"accountant", "noise_multiplier", "max_grad_norm", "sample_rate", "steps", "delta", "epsilon"} <= set(s)
    assert s["steps"] == {"0": 40}


def test_prv_accountant_is_selectable_and_tighter():
    hist = [(1.0, 0.05, 200)]
    rdp, prv = compute_epsilon(hist, 1e-5, "rdp"), compute_epsilon(hist, 1e-5, "prv")
    assert 0 < prv < rdp
    # independent: the PRV analysis composed by hand
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    for _ in range(200):
        acc.step(noise_multiplier=1.0, sample_rate=0.05)
    assert prv == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-6)
    assert prv_analysis is not None
    assert compute_epsilon([(0.0, 0.05, 3)], 1e-5) == math.inf and compute_epsilon([], 1e-5) == 0.0


@pytest.mark.parametrize("target", [1.0, 8.0])
def test_target_epsilon_mode_reaches_the_target_after_all_rounds(target):
    sigma = noise_for_target(target, 1e-5, 0.05, 5 * 20, "rdp")
    eps = compute_epsilon([(sigma, 0.05, 100)], 1e-5, "rdp")
    assert eps <= target and eps == pytest.approx(target, abs=0.02)


def test_validation_explains_batchnorm_and_how_to_fix_it():
    resnet = build_model("resnet", (3, 32, 32), 10, norm="batch", seed=0)
    client = split_model(resnet, "layer1").client
    problems = validate_dp_module(client)
    assert problems and all("GroupNorm" in p.fix or "group" in p.fix for p in problems)
    with pytest.raises(DPValidationError, match="per-sample clipping bounds nothing"):
        _session(client, 8)
    assert validate_dp_module(split_model(build_model("resnet", (3, 32, 32), 10, norm="group"), "layer1").client) == []
    with pytest.raises(ConfigError, match="model.norm = 'group'"):
        load_experiment("quickstart", ["privacy.dp.enabled=true", "model.name='resnet'", "model.cut='layer1'"])


def test_ushaped_dp_trains_both_client_segments():
    model = build_model("cnn", (1, 28, 28), 10, seed=0)
    u = split_model_u(model, "conv1", "fc1")
    state = SplitServerState(
        u.middle, sample_shape=cut_shape(u.bottom, (1, 28, 28)), num_classes=10, lr=0.1, device="cpu", ushaped=True
    )
    x, y = _batch(16, seed=3)
    both = u.client_modules
    before = [p.detach().clone() for p in both.parameters()]
    session = _session(both, 16, sigma=0.5, clip=1.0)
    stats = train_segment_u(u.bottom, u.top, x, y, InMemoryChannel(server=state), hooks=session.train_hooks())
    assert session.steps == 4 and stats.batches <= 4
    assert all(not torch.equal(p, p0) for p, p0 in zip(both.parameters(), before, strict=True))
    session.close()


def test_empty_poisson_batches_still_take_a_noise_only_step():
    """Tiny data and a small sample rate: some Poisson batches are empty; every step is counted and taken."""
    _, split, state = make_state("cnn", cut="conv1")
    x, y = _batch(4, seed=4)
    dp = DPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0)
    session = make_dp_session(
        split.client, 4, dp=dp, batch_size=1, lr=0.1, momentum=0.0, weight_decay=0.0, seed=0, total_epochs=1
    )
    sizes: list[int] = []

    def batches():
        for idx in session.batches():
            sizes.append(len(idx))
            yield idx

    dp = TrainHooks(optimizer=session.optimizer, batches=batches)
    stats = train_segment(split.client, x, y, InMemoryChannel(server=state), TrainOptions(epochs=5), dp)
    assert 0 in sizes  # (1 - 1/4)^4 = 32 %: about 6 of 20 batches are empty
    assert session.steps == 20 and stats.batches == 20 and stats.examples == sum(sizes)
    session.close()
