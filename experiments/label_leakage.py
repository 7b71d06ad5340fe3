"""Label leakage on the U-shaped split's wire, and label protection: AUC per attack and defense.

Task: Fashion-MNIST, one class (``--positive``, default 0: T-shirt/top) against the other nine,
about 10% positives. The ``cnn`` is split U-shaped at ``conv1`` and ``fc1``: the client keeps the
bottom, the linear top and the loss; the real :class:`server.split_server.SplitServerState`
(``ushaped=True``) holds the middle, reached through :class:`fsl.channel.InMemoryChannel` (the
real codec). :class:`attacks.label_leakage.WireTap` keeps what the server receives in the last
epoch: each sample's ``dL/dz`` and its own output ``z``. The attacks of
:mod:`attacks.label_leakage` score every sample; AUC is scikit-learn's ``roc_auc_score``
against the true labels (positive = the minority class). Task accuracy and task AUC are the
joined model's on 2,000 test images.

``python -m experiments.label_leakage [--quick]`` writes
``experiments/results/leakage/label_leakage.json``: rows with ``attack``, ``defense``,
``defense_param``, ``auc``, ``task_accuracy``, ``task_auc``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path("experiments/results/leakage")
DEFENSES: tuple[tuple[str, float], ...] = (
    ("none", 0.0),
    ("marvell-noise", 0.25),
    ("marvell-noise", 1.0),
    ("marvell-noise", 4.0),
    ("label-dp", 4.0),
    ("label-dp", 2.0),
    ("label-dp", 1.0),
)
ATTACKS = ("norm", "direction", "model-completion")


def binary_task(
    positive: int, n_train: int, n_test: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as ``positive`` against the rest (about 10% positives), seeded subsets."""
    from fsl.data import load_dataset

    ds = load_dataset("fashion-mnist")
    gen = torch.Generator().manual_seed(seed)
    tr = torch.randperm(len(ds.y_train), generator=gen)[:n_train]
    te = torch.randperm(len(ds.y_test), generator=gen)[:n_test]
    return (
        ds.x_train[tr],
        (ds.y_train[tr] == positive).long(),
        ds.x_test[te],
        (ds.y_test[te] == positive).long(),
    )


def run_cell(
    data: tuple[torch.Tensor, ...],
    defense: str,
    param: float,
    *,
    epochs: int = 2,
    batch_size: int = 64,
    lr: float = 0.05,
    n_known: int = 20,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Train one U-shaped split under ``defense`` and score the three attacks on the last epoch's wire."""
    from sklearn.metrics import roc_auc_score

    from attacks.label_leakage import (
        GradientNoise,
        LabelledBatches,
        NoisyGradChannel,
        WireTap,
        direction_scores,
        model_completion_scores,
        norm_scores,
    )
    from clients.trainer import train_segment_u
    from fsl.channel import ChannelIdentity
    from fsl.models import build_model, cut_shape, split_model_u
    from fsl.privacy.labels import randomized_response
    from fsl.training import TrainHooks, TrainOptions
    from server.split_server import SplitServerState

    x, y, xt, yt = data
    input_shape = tuple(x.shape[1:])
    u = split_model_u(build_model("cnn", input_shape, 2, seed=seed), "conv1", "fc1")
    state = SplitServerState(
        u.middle, cut_shape(u.bottom, input_shape), 2, lr=lr, momentum=0.9, device="cpu", ushaped=True
    )
    tap = WireTap(state)
    y_train = randomized_response(y, param, 2, seed=seed) if defense == "label-dp" else y
    batches = LabelledBatches(y, batch_size, seed)  # the true labels, for the scorer (and the noise)
    noise = GradientNoise(param, batches, seed=seed) if defense == "marvell-noise" else None
    options = TrainOptions(epochs=1, batch_size=batch_size, lr=lr, momentum=0.9, seed=seed)
    for epoch in range(1, epochs + 1):
        tap.recording = epoch == epochs
        channel = NoisyGradChannel(
            server=tap, identity=ChannelIdentity(run_id="label-leakage", round=epoch, client_id="c"), grad_noise=noise
        )
        start = len(batches.order)
        train_segment_u(u.bottom, u.top, x, y_train, channel, options, TrainHooks(batches=batches))
    truth = torch.cat(batches.order[start:]).numpy()
    g, z = torch.cat(tap.gradients), torch.cat(tap.outputs)
    assert len(g) == len(truth) == len(z)
    # task quality of the joined model (the server's middle as trained)
    with torch.no_grad():
        for m in (u.bottom, u.middle, u.top):
            m.eval()
        logits = u.top(state.replica_for("c").segment(u.bottom(xt)))
    task_acc = float((logits.argmax(1) == yt).float().mean())
    task_auc = float(roc_auc_score(yt.numpy(), logits.softmax(1)[:, 1].numpy()))
    # the attacker's side knowledge: the first positive observed, and n_known labels (half positive)
    pos, neg = np.flatnonzero(truth == 1), np.flatnonzero(truth == 0)
    known = {int(i): 1 for i in pos[: n_known // 2]} | {int(i): 0 for i in neg[: n_known // 2]}
    rest = np.array([i for i in range(len(truth)) if i not in known])
    scores = {
        "norm": norm_scores(g),
        "direction": direction_scores(g, int(pos[0])),
        "model-completion": model_completion_scores(z, known, seed=seed),
    }
    rows = []
    for attack in ATTACKS:
        auc = float(roc_auc_score(truth[rest], scores[attack][rest]))
        rows.append(
            {
                "attack": attack,
                "defense": defense,
                "defense_param": param,
                "auc": round(auc, 4),
                "task_accuracy": round(task_acc, 4),
                "task_auc": round(task_auc, 4),
                "n_scored": len(rest),
                "positive_fraction": round(float(truth.mean()), 4),
            }
        )
    return rows


def run(
    *,
    quick: bool = False,
    positive: int = 0,
    seed: int = 0,
    defenses: tuple[tuple[str, float], ...] = DEFENSES,
) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    n_train, n_test = (2000, 1000) if quick else (8000, 2000)
    data = binary_task(positive, n_train, n_test, seed)
    if quick:
        defenses = (("none", 0.0), ("marvell-noise", 4.0), ("label-dp", 1.0))
    rows: list[dict[str, Any]] = []
    for defense, param in defenses:
        cell = run_cell(data, defense, param, seed=seed, epochs=2)
        for r in cell:
            print(
                f"{defense:14s} {param:5g}  {r['attack']:17s} AUC {r['auc']:.3f}   "
                f"task acc {r['task_accuracy']:.3f} / AUC {r['task_auc']:.3f}",
                flush=True,
            )
        rows += cell
    return rows


def main(args: argparse.Namespace | None = None) -> int:
    """``python -m experiments.label_leakage [flags]``, or ``fsl run label-leakage [--quick] label_leakage.KEY=VALUE ...``."""
    from experiments import argv_from_run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2,000 training images, three defense cells (about a minute)")
    p.add_argument("--positive", type=int, default=0, help="the Fashion-MNIST class that is the positive label")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(None if args is None else argv_from_run(args, "label_leakage"))
    rows = run(quick=a.quick, positive=a.positive, seed=a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "label_leakage.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
