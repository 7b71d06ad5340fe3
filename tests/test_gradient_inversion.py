"""What ``gradient-inversion`` achieves on real MNIST-5k images through a real split step.

Setting (a), split learning: the ``cnn`` is trained by split learning for one epoch on 1,000
MNIST-5k images (real split-server state behind the in-memory data plane, task accuracy about
0.58: an early round), then the client takes one plain-SGD step on a private batch while the
server records what it sees (:func:`attacks.harness.record_gradient_step`). Setting (b),
federated learning: the whole ``cnn`` after one local epoch on the same 1,000 images, one more
local step on the private batch (:func:`attacks.harness.fl_step_observation`).

Every bar below sits under what was measured over two seeds (seed = attack initialisation and
image choice) and above the mean-image baseline (SSIM of the test-set mean image against the
originals, 0.09-0.23 per image, about 0.15 on average). Measured values are in the comments.
"""

from __future__ import annotations

import json

import pytest
import torch

from attacks.base import Observation, ThreatModel, get_attack
from attacks.gradient_inversion import infer_labels, observed_gradient
from attacks.ground_truth import load_ground_truth
from attacks.harness import fl_step_observation, record_gradient_step, train_split
from attacks.metrics import image_scores, match_by_assignment
from attacks.observe import load_observation
from fsl.config import load_experiment
from fsl.models import build_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def mnist():
    from fsl.data import load_dataset

    ds = load_dataset("mnist5k")
    perm = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(0))  # the set is class-sorted
    return ds.x_train[perm], ds.y_train[perm], ds.x_test.mean(0, keepdim=True)


# A fresh split per test (about 1 s to train): record_gradient_step takes a real step on the model it
# is given, so a shared one would make each test's figures depend on which tests ran before it in
# its pytest worker (with two workers that changes from run to run).
@pytest.fixture
def split_conv2(mnist):
    x, y, _ = mnist
    return train_split("cnn", "conv2", x[:1000], y[:1000], epochs=1)


@pytest.fixture
def split_conv1(mnist):
    x, y, _ = mnist
    return train_split("cnn", "conv1", x[:1000], y[:1000], epochs=1)


def _step(trained, tmp_path, mnist, rows, config=None):
    """One recorded client step on private images ``rows``; (observation, originals in observation order)."""
    x, y, _ = mnist
    d = record_gradient_step(trained, tmp_path, x[rows], y[rows], config=config, dataset="mnist5k")
    obs = load_observation(d)
    truth = load_ground_truth(d)
    return obs, torch.stack([truth[k] for k in obs.keys])


def _ssim(obs, orig, **options):
    result = get_attack("gradient-inversion", **options).run(obs, ThreatModel())
    return image_scores(result.reconstructed, orig), result


def _mean_image_ssim(mnist, orig):
    return float(image_scores(mnist[2].expand_as(orig), orig)["ssim"].mean())


# ---------------------------------------------------------------- what the server records


def test_the_server_records_its_own_dl_dh_and_the_returned_segment(split_conv1, mnist, tmp_path):
    obs, orig = _step(split_conv1, tmp_path, mnist, slice(3500, 3504))
    assert obs.cut_gradients is not None and obs.cut_gradients.shape == obs.activations.shape == (4, 16, 14, 14)
    assert obs.client_segment is not None and obs.client_update is not None
    # the recorded dL/dh is the server segment's gradient at the received activations, as it was before the step
    # and the update is lr * (dh/dW)^T dL/dh: one plain-SGD step
    grad = observed_gradient(obs, ["conv1.0.weight", "conv1.0.bias"])
    from attacks.models import segments

    client, _ = segments("cnn", "conv1", (1, 28, 28))
    client.load_state_dict(obs.client_segment)
    h = client(orig)
    assert torch.allclose(h, obs.activations, atol=1e-5)
    (h * obs.cut_gradients).sum().backward()
    assert torch.allclose(grad["conv1.0.weight"], 0.05 * client[0][0].weight.grad, rtol=1e-3, atol=1e-7)
    # a retried or repeated step does not reuse a cached reply: two steps, two different gradients
    obs2, _ = _step(split_conv1, tmp_path / "again", mnist, slice(3510, 3514))
    assert not torch.allclose(obs2.cut_gradients, obs.cut_gradients)
    # the update belongs to the whole batch: a subset of rows drops it
    assert obs.subset(slice(0, 4)).client_update is not None
    assert obs.subset(slice(0, 2)).client_update is None and obs.subset(slice(0, 2)).cut_gradients.shape[0] == 2


def test_it_explains_what_is_missing(split_conv1, mnist, tmp_path):
    obs, _ = _step(split_conv1, tmp_path, mnist, slice(3500, 3501))
    attack = get_attack("gradient-inversion", iters=1)
    no_update = Observation(**{**_fields(obs), "client_update": None})
    with pytest.raises(ValueError, match="secure aggregation"):
        attack.run(no_update, ThreatModel())
    with pytest.raises(ValueError, match="cut_gradients"):
        attack.run(Observation(**{**_fields(obs), "cut_gradients": None}), ThreatModel())
    with pytest.raises(ValueError, match="white-box"):
        attack.run(obs, ThreatModel(knows_client_weights=False))
    with pytest.raises(ValueError, match="mode"):
        get_attack("gradient-inversion", mode="fedavg")


def _fields(obs: Observation) -> dict:
    import dataclasses

    return {f.name: getattr(obs, f.name) for f in dataclasses.fields(obs)}


# ---------------------------------------------------------------- (a) split learning


@pytest.mark.slow
def test_split_update_and_dl_dh_reconstruct_single_images(split_conv2, mnist, tmp_path):
    # cut conv2 (4,800 client parameters), one image per step, iters 3000 x 2 restarts, ~9 s an image.
    # Measured mean SSIM over two images on a fresh model: 0.741 (this seed: images 3000, 3010, attack
    # seed 0); on a model stepped further, 0.744 and 0.588 (seed 1: images 3100, 3110); mean-image
    # baseline 0.142 / 0.159.
    ssims, baseline = [], []
    for k, row in enumerate((3000, 3010)):
        obs, orig = _step(split_conv2, tmp_path / str(k), mnist, slice(row, row + 1))
        scores, result = _ssim(obs, orig, iters=3000)
        assert result.extra["parameters"] == 4800 and "unordered" not in result.extra  # rows stay in order
        ssims += scores["ssim"].tolist()
        baseline.append(_mean_image_ssim(mnist, orig))
    assert sum(ssims) / len(ssims) > 0.5
    assert sum(ssims) / len(ssims) > sum(baseline) / len(baseline) + 0.3


@pytest.mark.slow
def test_dp_sgd_on_the_client_step_stops_it(split_conv2, mnist, tmp_path):
    # The framework's DP-SGD step (Opacus, the leakage sweep's dpsgd), chosen by the config keys a run
    # uses: each sample's gradient clipped to norm 1, N(0, sigma^2) added per coordinate. Measured on a
    # fresh model (images 3000, 3010): sigma = 0.1 (noise norm ~7 over 4,800 parameters against a
    # clipped signal <= 1) gives 0.086 / 0.106; sigma = 0.01 only dents the attack (0.579 / 0.512);
    # undefended 0.765 / 0.717. (A bar at sigma = 0.01 holds only on a model trained further.)
    dp = load_experiment("leakage", ["privacy.dp.enabled=true", "privacy.dp.noise_multiplier=0.1"])
    ssims = []
    for k, row in enumerate((3000, 3010)):
        obs, orig = _step(split_conv2, tmp_path / str(k), mnist, slice(row, row + 1), config=dp)
        scores, _ = _ssim(obs, orig, iters=3000)
        ssims += scores["ssim"].tolist()
    assert sum(ssims) / len(ssims) < 0.25


@pytest.mark.slow
def test_at_conv1_the_update_alone_leaks_little_and_the_activations_everything(split_conv1, mnist, tmp_path):
    # The conv1 client segment has 160 parameters for 784 pixels: matching its update is
    # underdetermined. Measured (two images, iters 3000): 0.225 (this seed) and 0.322 (seed 1)
    # against a mean-image baseline of 0.142 / 0.159. The activations the server receives anyway
    # pin the image down: with use_activations=True, 0.989 / 0.874.
    alone, both, baseline = [], [], []
    for k, row in enumerate((3000, 3010)):
        obs, orig = _step(split_conv1, tmp_path / str(k), mnist, slice(row, row + 1))
        scores, result = _ssim(obs, orig, iters=3000)
        assert result.extra["parameters"] == 160
        alone += scores["ssim"].tolist()
        both += _ssim(obs, orig, iters=1000, use_activations=True)[0]["ssim"].tolist()
        baseline.append(_mean_image_ssim(mnist, orig))
    # (a loaded CI host once measured 0.42 for the update alone against a 0.14 baseline: the
    # fixture's training is not bit-reproducible across thread schedules)
    assert sum(alone) / 2 < sum(baseline) / 2 + 0.35
    assert sum(both) / 2 > 0.8
    assert sum(alone) / 2 < sum(both) / 2 - 0.25


# ---------------------------------------------------------------- (b) federated learning


def _fl_model(mnist):
    from clients.trainer import TrainOptions, train_local

    x, y, _ = mnist
    model = build_model("cnn", (1, 28, 28), seed=0)
    train_local(model, x[:1000], y[:1000], TrainOptions(epochs=1))
    return model


def _distinct_labels(y: torch.Tensor, start: int, n: int) -> list[int]:
    rows: list[int] = []
    for i in range(start, len(y)):
        if int(y[i]) not in {int(y[r]) for r in rows}:
            rows.append(i)
        if len(rows) == n:
            return rows
    raise AssertionError("not enough distinct labels")


def test_fl_labels_from_the_last_layer_are_exact_for_distinct_labels(mnist):
    # label inference only (no reconstruction): measured 1.0 on every batch of distinct labels tried
    x, y, _ = mnist
    model = _fl_model(mnist)
    for start, n in ((3000, 1), (3000, 4), (3050, 4), (3100, 10)):
        rows = _distinct_labels(y, start, n)
        obs = fl_step_observation(model, "cnn", x[rows], y[rows])
        grad = observed_gradient(obs, [k for k, _ in model.named_parameters()])
        labels, scores = infer_labels(model, grad, n)
        assert sorted(labels.tolist()) == sorted(y[rows].tolist()), (start, n)
        assert scores.shape == (n, 10)


def _fl_attack(model, mnist, rows, **options):
    x, y, mean_img = mnist
    obs = fl_step_observation(model, "cnn", x[rows], y[rows])
    result = get_attack("gradient-inversion", mode="fl", iters=2000, **options).run(obs, ThreatModel())
    assert sorted(result.labels.tolist()) == sorted(y[rows].tolist()) and result.extra["unordered"]
    rec = match_by_assignment(result.reconstructed, x[rows])  # the batch order is not recoverable
    base = image_scores(mean_img.expand_as(x[rows]), x[rows])["ssim"].tolist()
    return image_scores(rec, x[rows])["ssim"].tolist(), base


@pytest.mark.slow
def test_fl_update_reconstructs_a_single_image(mnist):
    # whole cnn (~206k parameters), iters 2000 x 2 restarts, ~8 s an image. Measured mean SSIM over
    # two images: 0.763 (this seed) and 0.838 (seed 1: batches from 3100, 3150, attack seed 1);
    # baseline 0.170 / 0.187. Labels right every time.
    model = _fl_model(mnist)
    ssims, base = [], []
    for start in (3000, 3050):
        s, b = _fl_attack(model, mnist, _distinct_labels(mnist[1], start, 1))
        ssims += s
        base += b
    assert sum(ssims) / len(ssims) > 0.6
    assert sum(ssims) / len(ssims) > sum(base) / len(base) + 0.35


@pytest.mark.slow
def test_fl_update_reconstructs_a_batch_of_four(mnist):
    # four distinct labels, ~14 s. Measured mean SSIM 0.674 / 0.608 over two batches each at seeds
    # 0 and 1 (this batch alone: 0.716); baseline 0.155 / 0.179.
    model = _fl_model(mnist)
    ssims, base = _fl_attack(model, mnist, _distinct_labels(mnist[1], 3000, 4))
    assert sum(ssims) / 4 > 0.45
    assert sum(ssims) / 4 > sum(base) / 4 + 0.25


# ---------------------------------------------------------------- the CLI


def test_fsl_attack_runs_gradient_inversion_on_a_recorded_step(split_conv1, mnist, tmp_path):
    from fsl_cli import main

    x, y, _ = mnist
    d = record_gradient_step(split_conv1, tmp_path, x[3000:3002], y[3000:3002], dataset="mnist5k")
    out = tmp_path / "gi"
    args = ["attack", str(d), "--attack", "gradient-inversion", "--out", str(out), "-o", "iters=20", "-o", "restarts=1"]
    assert main(args) == 0
    row = json.loads((out / "attack.json").read_text())
    assert row["attack"] == "gradient-inversion" and row["n_images"] == 2 and row["cut"] == "conv1"
    assert row["extra"]["parameters"] == 160 and row["options"]["use_activations"] is False
    # fewer images than the recorded batch: the update is dropped, and the attack says why
    assert main([*args[:4], "--n-images", "1", "--out", str(tmp_path / "gi1"), "-o", "iters=1"]) == 2
