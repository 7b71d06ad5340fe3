"""Run an attack on a run directory, score it against the ground truth, write the results.

This is the only place where ground truth meets a reconstruction: the attack
gets the :class:`Observation` (the server's view) and the :class:`ThreatModel`;
the scorer then reads ``ground_truth/``, matches reconstructions to originals by
key (or by assignment for batch-order-free attacks) and writes

* ``attack.json`` — ``attack``, ``cut``, ``dataset``, ``threat_model``, ``n_images``, ``mse_mean``,
  ``psnr_mean``, ``ssim_mean`` (+ ``*_std``), ``label_accuracy`` and ``auc`` for label attacks, the
  attack's options and extra figures;
* ``reconstructions.npz`` — ``original`` and ``reconstructed`` (N, C, H, W) float32 in [0, 1], aligned;
* ``reconstructions.png`` — originals above reconstructions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.base import AttackResult, Observation, Progress, ThreatModel, get_attack
from attacks.ground_truth import load_ground_truth, load_ground_truth_labels
from attacks.metrics import (
    image_scores,
    label_accuracy,
    label_multiset_accuracy,
    match_by_assignment,
    match_by_key,
    roc_auc,
    summarize_scores,
)

__all__ = ["auxiliary_threat", "save_grid", "score_and_write", "score_images"]

OTHER_DATASET = {"mnist5k": "fashion-mnist", "fashion-mnist": "mnist5k", "mnist": "fashion-mnist"}


def auxiliary_threat(
    dataset: str,
    auxiliary: str = "same-distribution",
    size: int = 1000,
    knows_client_weights: bool = True,
    seed: int = 0,
) -> ThreatModel:
    """A threat model whose auxiliary data comes from the offline datasets.

    The private data are training images, so ``same-distribution`` draws from the dataset's *test*
    split (disjoint), ``same-set`` from its training split, and ``other`` from a different dataset of
    the same shape (MNIST-5k <-> Fashion-MNIST).
    """
    from fsl.data import load_dataset

    if auxiliary == "none":
        return ThreatModel(knows_client_weights=knows_client_weights)
    if auxiliary == "other":
        if dataset not in OTHER_DATASET:
            raise ValueError(f"no 'other' auxiliary dataset is defined for {dataset!r}")
        ds = load_dataset(OTHER_DATASET[dataset])
        x, y = ds.x_train, ds.y_train
    else:
        ds = load_dataset(dataset)
        x, y = (ds.x_test, ds.y_test) if auxiliary == "same-distribution" else (ds.x_train, ds.y_train)
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:size]
    return ThreatModel(
        knows_client_weights=knows_client_weights,
        auxiliary=auxiliary,  # type: ignore[arg-type]
        auxiliary_data=x[idx],
        auxiliary_labels=y[idx],
    )


def score_images(result: AttackResult, obs: Observation, truth: dict[str, torch.Tensor], by_assignment: bool = False):
    """(original, reconstructed, metrics) with reconstructions matched to their originals first."""
    assert result.reconstructed is not None
    rec, orig = match_by_key(result.reconstructed, obs.keys, truth)
    if by_assignment:
        rec = match_by_assignment(rec, orig)
    rec = rec.detach().float().clamp(0, 1)
    return orig, rec, summarize_scores(image_scores(rec, orig))


def save_grid(original: torch.Tensor, reconstructed: torch.Tensor, path: str | Path, title: str = "", n: int = 16):
    """A PNG with up to ``n`` originals (top row) above their reconstructions (bottom row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = min(n, len(original))
    fig, axes = plt.subplots(2, max(k, 1), figsize=(1.1 * max(k, 1), 2.6), squeeze=False)
    for row, imgs in enumerate((original, reconstructed)):
        for j in range(max(k, 1)):
            ax = axes[row][j]
            ax.axis("off")
            if j < k:
                img = imgs[j].detach().float().clamp(0, 1)
                ax.imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray", vmin=0, vmax=1)
    axes[0][0].set_title("original", fontsize=7, loc="left")
    axes[1][0].set_title("reconstructed", fontsize=7, loc="left")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _json_ready(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_ready(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_ready(x) for x in v]
    return v


def score_and_write(
    run_path: str | Path,
    attack_name: str,
    obs: Observation,
    threat: ThreatModel,
    out_dir: str | Path,
    *,
    options: dict[str, Any] | None = None,
    dataset: str = "",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run ``attack_name`` on ``obs``, score against ``run_path``'s ground truth, write the three files."""
    options = options or {}
    attack = get_attack(attack_name, **options)
    t0 = time.perf_counter()
    result = attack.run(obs, threat, progress)
    seconds = time.perf_counter() - t0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {
        "attack": attack_name,
        "cut": obs.cut,
        "model": obs.model,
        "dataset": dataset,
        "threat_model": threat.describe(),
        "options": {
            f.name: getattr(attack, f.name) for f in dataclasses.fields(attack) if f.name not in ("name", "needs")
        }
        if dataclasses.is_dataclass(attack)
        else options,
        "seconds": seconds,
    }
    if result.reconstructed is not None:
        truth = load_ground_truth(run_path)
        orig, rec, metrics = score_images(result, obs, truth, by_assignment=bool(result.extra.get("unordered")))
        row.update({"n_images": int(len(orig)), **metrics})
        np.savez(out / "reconstructions.npz", original=orig.numpy().astype(np.float32), reconstructed=rec.numpy())
        save_grid(orig, rec, out / "reconstructions.png", f"{attack_name} at {obs.cut} ({dataset})")
    else:
        row.update({"n_images": 0, "mse_mean": None, "psnr_mean": None, "ssim_mean": None})
    if result.labels is not None:
        truth_y = load_ground_truth_labels(run_path)
        rows = [i for i, k in enumerate(obs.keys) if k in truth_y and i not in threat.known_labels]
        y = torch.tensor([truth_y[obs.keys[i]] for i in rows])
        if result.extra.get("unordered"):  # a batch's labels without their order (gradient inversion, FL)
            row["label_accuracy"] = label_multiset_accuracy(result.labels[rows], y)
            row["auc"] = None
        else:
            row["label_accuracy"] = label_accuracy(result.labels[rows], y)
            row["auc"] = roc_auc(result.scores[rows], y) if result.scores is not None else None
        row["n_labels"] = len(rows)
    row["extra"] = {k: v for k, v in result.extra.items() if k != "unordered"}
    row = _json_ready(row)
    (out / "attack.json").write_text(json.dumps(row, indent=2) + "\n")
    return row
