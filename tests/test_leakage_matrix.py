"""``fsl run leakage``: the studies run into one directory and the matrix reads them all."""

import argparse
import json
from pathlib import Path

import pytest

from experiments import leakage, leakage_matrix
from fsl.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"family", "dataset", "model", "attack", "cut", "defense", "defense_param", "metric", "leakage",
        "task_accuracy", "task_metric", "epsilon", "epsilon_kind"}  # fmt: skip


def test_the_matrix_reads_every_committed_study(tmp_path):
    committed = ROOT / "experiments/results/leakage"
    for f in ("leakage.json", "label_leakage.json", "label_inference.json", "text_leakage.json"):
        (tmp_path / f).write_text((committed / f).read_text())
    rows = leakage_matrix.write(tmp_path)
    assert {r["family"] for r in rows} == {"image", "label", "text"}
    assert all(set(r) >= KEYS for r in rows)
    assert {r["defense"] for r in rows} <= set(leakage_matrix.DEFENSES)  # every defense says what it protects
    by = {(r["family"], r["attack"], r["cut"], r["defense"], r["defense_param"], r["dataset"]): r for r in rows}
    # the figures each study file holds, carried over unchanged
    image = json.loads((committed / "leakage.json").read_text())
    first = next(r for r in image if r.get("attack"))
    key = ("image", first["attack"], first["cut"], first["defense"], first["defense_param"], first["dataset"])
    assert by[key]["leakage"] == first["ssim_mean"] and by[key]["task_accuracy"] == first["task_accuracy"]
    noise = [r for r in rows if r["defense"] == "noise" and not r.get("diverged")]
    assert noise and all(r["epsilon"] > 0 and r["epsilon_kind"].startswith("per release") for r in noise)
    # a cell whose training diverged shows as such under each attack of its dataset and cut
    md = (tmp_path / "matrix.md").read_text()
    assert "diverged" in md and "### text: token_accuracy" in md and "### label: auc" in md
    assert (tmp_path / "matrix.png").stat().st_size > 0


@pytest.mark.slow
def test_quick_label_slice_writes_the_matrix_and_the_defenses_lower_the_auc(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert leakage.main(argparse.Namespace(quick=True, overrides=["leakage.families=label"])) == 0
    (run,) = (tmp_path / "runs").iterdir()
    doc = json.loads((run / "matrix.json").read_text())
    assert doc["families"] == ["image", "label", "text"] and set(doc["defenses"]) >= {"noise", "label-dp"}
    auc = {(r["attack"], r["defense"]): r["leakage"] for r in doc["rows"] if r["metric"] == "auc"}
    # measured: undefended norm / direction AUC 0.999 / 1.000; Marvell-style noise (power 4) 0.52 / 0.66,
    # label DP at epsilon 1 0.75 / 0.73 on the 2,000-image slice
    assert auc[("norm", "none")] > 0.9 and auc[("direction", "none")] > 0.9
    for defense in ("marvell-noise", "label-dp"):
        assert auc[("norm", defense)] < auc[("norm", "none")] - 0.1
        assert auc[("direction", defense)] < auc[("direction", "none")] - 0.1
    eps = {r["defense"]: r["epsilon"] for r in doc["rows"] if r["metric"] == "auc"}
    assert eps["label-dp"] == 1.0 and eps["none"] is None
    assert (run / "label_leakage.json").exists() and (run / "label_inference.json").exists()
    assert not (run / "leakage.json").exists()  # the image family was not asked for


def test_unknown_families_are_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="leakage.families"):
        leakage.main(argparse.Namespace(quick=True, overrides=["leakage.families=image,audio"]))
    assert not (tmp_path / "runs").exists()


def test_every_committed_image_figure_rescores_with_scikit_image():
    """The SSIM of each image cell in leakage.json, recomputed by scikit-image from the saved
    reconstructions (``reconstructions-<dataset>.npz``, float16: within 2e-3 of the float32 score)."""
    import numpy as np
    from skimage.metrics import structural_similarity

    committed = ROOT / "experiments/results/leakage"
    rows = [r for r in json.loads((committed / "leakage.json").read_text()) if r.get("attack")]
    checked = 0
    for dataset in sorted({r["dataset"] for r in rows}):
        with np.load(committed / f"reconstructions-{dataset}.npz", allow_pickle=False) as z:
            for r in (r for r in rows if r["dataset"] == dataset and r["ssim_mean"] is not None):
                own = leakage.cell_key(r) + "/original"  # a DP-SGD cell's own draw of the private images
                original = z[own if own in z else "original"].astype(np.float64)
                rec = z[leakage.cell_key(r)].astype(np.float64)
                assert rec.shape == original.shape == (r["n_images"], 1, 28, 28)
                scores = [
                    structural_similarity(a[0], b[0], data_range=1.0, win_size=7, gaussian_weights=True,
                                          sigma=1.5, use_sample_covariance=False)
                    for a, b in zip(rec, original, strict=True)
                ]  # fmt: skip
                assert abs(float(np.mean(scores)) - r["ssim_mean"]) < 2e-3, leakage.cell_key(r)
                checked += 1
    assert checked == sum(r["ssim_mean"] is not None for r in rows) > 60
