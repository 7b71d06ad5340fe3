"""What each attack achieves on a tiny, fast setting (digits 8x8, the zoo CNN cut at conv1).

Each attack is scored against what a mean image and a random image get: an attack that
"runs" but leaks nothing fails here.
"""

import json

import pytest
import torch

from attacks.base import ThreatModel, get_attack
from attacks.ground_truth import load_ground_truth, load_ground_truth_labels
from attacks.harness import activation_norm, record_round, train_split, ushaped_label_run
from attacks.metrics import image_scores
from attacks.observe import load_observation
from attacks.report import score_and_write
from fsl.config import load_experiment


def _run(tmp_path_factory, digits, name, overrides=()):
    """Train and record one split whose defenses are the leakage sweep's config with ``overrides``."""
    x, y = digits.x_train[:1200], digits.y_train[:1200]
    trained = train_split("cnn", "conv1", x, y, config=load_experiment("leakage", list(overrides)), epochs=3)
    d = tmp_path_factory.mktemp(name)
    record_round(trained, d, digits.x_train[1200:1232], digits.y_train[1200:1232], dataset="digits")
    return d, trained.task_accuracy(digits.x_test, digits.y_test)


@pytest.fixture(scope="module")
def digits_mod():
    from fsl.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="module")
def clean(tmp_path_factory, digits_mod):
    return _run(tmp_path_factory, digits_mod, "none")


@pytest.fixture(scope="module")
def noisy(tmp_path_factory, digits_mod):
    clip = activation_norm("cnn", "conv1", digits_mod.x_train[:1200])
    noise = ["activation_noise.mechanism='gaussian'", "activation_noise.noise_multiplier=0.3"]
    return _run(tmp_path_factory, digits_mod, "noise", [*noise, f"activation_noise.clip_norm={clip!r}"])


@pytest.fixture(scope="module")
def baselines(clean, digits_mod):
    d, _ = clean
    obs = load_observation(d)
    truth = load_ground_truth(d)
    orig = torch.stack([truth[k] for k in obs.keys])
    mean_img = digits_mod.x_test.mean(0, keepdim=True).expand_as(orig)
    gen = torch.Generator().manual_seed(0)
    return {
        "mean": float(image_scores(mean_img, orig)["ssim"].mean()),
        "random": float(image_scores(torch.rand(orig.shape, generator=gen), orig)["ssim"].mean()),
    }


def _threat(digits):
    return ThreatModel(auxiliary="same-distribution", auxiliary_data=digits.x_test, auxiliary_labels=digits.y_test)


def _attack(run_dir, name, threat, **options):
    obs = load_observation(run_dir)
    return score_and_write(run_dir, name, obs, threat, run_dir / "attacks" / name, options=options, dataset="digits")


def test_the_task_trains_and_noise_costs_accuracy(clean, noisy):
    assert clean[1] > 0.8
    assert noisy[1] < clean[1]


def test_rmle_reconstructs_far_better_than_a_mean_image(clean, baselines):
    row = _attack(clean[0], "rmle", ThreatModel(), iters=300)
    assert row["ssim_mean"] > 0.9 and row["ssim_mean"] > baselines["mean"] + 0.4
    assert row["psnr_mean"] > 25
    assert row["n_images"] == 32


def test_strong_activation_noise_pushes_rmle_down(clean, noisy, baselines):
    clean_row = _attack(clean[0], "rmle", ThreatModel(), iters=300)
    noisy_row = _attack(noisy[0], "rmle", ThreatModel(), iters=300)
    assert noisy_row["ssim_mean"] < clean_row["ssim_mean"] - 0.5
    assert noisy_row["ssim_mean"] < baselines["mean"]


def test_rmle_needs_the_client_weights(clean):
    obs = load_observation(clean[0])
    with pytest.raises(ValueError, match="white-box"):
        get_attack("rmle").run(obs, ThreatModel(knows_client_weights=False))


def test_inverse_network_beats_the_mean_image(clean, baselines, digits_mod):
    row = _attack(clean[0], "inverse-network", _threat(digits_mod), epochs=10)
    assert row["ssim_mean"] > baselines["mean"] + 0.2
    assert row["threat_model"]["auxiliary"] == "same-distribution"


def test_query_free_unsplit_beats_a_random_image(clean, baselines):
    # knows only the architecture: weaker on 8x8 digits than white-box, but far from random
    row = _attack(clean[0], "query-free", ThreatModel(knows_client_weights=False), iters=200)
    assert row["ssim_mean"] > baselines["random"] + 0.3


def test_query_free_restarts_pick_per_image_the_attempt_with_the_lowest_feature_loss(clean):
    """The attacker's own objective chooses among attempts (no ground truth involved)."""
    obs = load_observation(clean[0])
    target = obs.activations.float()
    q = get_attack("query-free", iters=60, restarts=3, seed=1)  # seed 1: its attempts win different images
    attempts = [q._unsplit_once(obs, target, q.seed + 2 + 1000 * r, lambda *a: None, r) for r in range(3)]
    xs = torch.stack([x for x, _ in attempts])  # (3, N, C, H, W)
    losses = torch.stack([loss for _, loss in attempts])  # (3, N)
    pick = losses.argmin(0)
    assert len(set(pick.tolist())) > 1  # different images are best explained by different attempts
    got = q.run(obs, ThreatModel(knows_client_weights=False)).reconstructed
    assert torch.allclose(got, xs[pick, torch.arange(xs.shape[1])])


@pytest.mark.slow
def test_query_free_shadow_reconstructs_from_auxiliary_data_alone(clean, baselines, digits_mod):
    """He et al.'s construction: shadows trained through the frozen server segment, rMLE through them,
    then UnSplit's refinement (the conv1 setting of the leakage sweep); no client weights, no queries."""
    # 359 auxiliary digits: the shadows need more passes than on MNIST's 1,000 images
    options = {"method": "shadow", "shadows": 2, "shadow_epochs": 20, "iters": 300, "refine": 200}
    threat = ThreatModel(
        knows_client_weights=False,
        auxiliary="same-distribution",
        auxiliary_data=digits_mod.x_test,
        auxiliary_labels=digits_mod.y_test,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # its many tiny steps: one thread runs ~2x faster than two on a shared host
    try:
        row = _attack(clean[0], "query-free", threat, **options)
    finally:
        torch.set_num_threads(threads)
    assert row["threat_model"]["knows_client_weights"] is False
    assert row["ssim_mean"] > baselines["mean"] + 0.3  # measured 0.775 against the mean image's 0.409
    assert row["extra"]["shadow_train_accuracy"] > 0.25  # above chance: the shadows learnt through the server segment


def test_query_free_shadow_needs_labelled_auxiliary_data(clean):
    obs = load_observation(clean[0])
    with pytest.raises(ValueError, match="auxiliary"):
        get_attack("query-free", method="shadow").run(obs, ThreatModel(knows_client_weights=False))


def test_label_inference_in_a_ushaped_split(tmp_path, digits_mod):
    d = ushaped_label_run(
        tmp_path,
        digits_mod.x_train[:1200],
        digits_mod.y_train[:1200],
        digits_mod.x_test[:160],
        digits_mod.y_test[:160],
        epochs=4,
    )
    obs = load_observation(d)
    assert obs.labels is None and obs.gradients is not None  # labels never reached the server
    truth = load_ground_truth_labels(d)
    known: dict[int, int] = {}
    for i, k in enumerate(obs.keys):
        if truth[k] not in known.values():
            known[i] = truth[k]
    row = score_and_write(d, "label-inference", obs, ThreatModel(known_labels=known), d / "li")
    assert row["label_accuracy"] >= 0.95
    assert row["auc"] > 0.97
    assert row["n_labels"] == 160 - len(known)  # the attacker's own known samples are not scored


def test_fsha_reconstruction_error_falls_with_iterations(digits_mod):
    from attacks.fsha import run_fsha

    out = run_fsha(
        "cnn",
        "conv1",
        digits_mod.x_train[:1000],
        digits_mod.y_train[:1000],
        digits_mod.x_test,
        iters=300,
        batch_size=32,
        eval_every=50,
    )
    curve = out["curve"]
    assert curve[0]["step"] == 1 and curve[-1]["step"] >= 300
    assert curve[-1]["mse"] < 0.3 * curve[0]["mse"]
    assert curve[-1]["ssim"] > 0.7


def test_fsl_attack_cli_writes_the_results(clean):
    import numpy as np

    from fsl_cli import main

    out = clean[0] / "cli-rmle"
    assert main(["attack", str(clean[0]), "--attack", "rmle", "--out", str(out), "-o", "iters=100"]) == 0
    row = json.loads((out / "attack.json").read_text())
    for key in ("attack", "cut", "dataset", "threat_model", "n_images", "mse_mean", "psnr_mean", "ssim_mean"):
        assert key in row
    assert row["attack"] == "rmle" and row["cut"] == "conv1" and row["dataset"] == "digits"
    with np.load(out / "reconstructions.npz", allow_pickle=False) as z:
        assert z["original"].shape == z["reconstructed"].shape == (32, 1, 8, 8)
        assert z["reconstructed"].min() >= 0 and z["reconstructed"].max() <= 1
    assert (out / "reconstructions.png").stat().st_size > 1000
    assert main(["attack", str(clean[0]), "--attack", "nope"]) == 2


def test_dp_sgd_cell_records_after_an_evaluation_and_accounts_every_step(tmp_path, digits_mod):
    """The sweep's DP-SGD cell: train, evaluate, then record one more round; epsilon covers every step."""
    from opacus.accountants import RDPAccountant

    x, y = digits_mod.x_train[:256], digits_mod.y_train[:256]
    cfg = load_experiment("leakage", ["privacy.dp.enabled=true", "privacy.dp.noise_multiplier=1.0"])
    trained = train_split("cnn", "conv1", x, y, config=cfg, epochs=2)
    eps_trained = trained.dp_epsilon()
    trained.task_accuracy(digits_mod.x_test, digits_mod.y_test)  # leaves the segment in eval mode
    record_round(trained, tmp_path, digits_mod.x_train[256:288], digits_mod.y_train[256:288], dataset="digits")
    assert load_observation(tmp_path).keys  # the recorded round ran
    # the ledger's epsilon is Opacus' own over the same steps: 2 epochs of 256 samples in batches of 32
    # (sample rate 1/8, 8 steps each), then the recorded round of 32 samples (rate 1, one step)
    acc = RDPAccountant()
    acc.history = [(1.0, 32 / 256, 16), (1.0, 1.0, 1)]
    assert eps_trained is not None and 0 < eps_trained < trained.dp_epsilon()
    assert trained.dp_epsilon() == pytest.approx(acc.get_epsilon(1e-5))
    assert train_split("cnn", "conv1", x, y, epochs=1).dp_epsilon() is None  # no DP-SGD, no epsilon
