"""The ``leakage`` sweep: attacks x cut points x defenses, on MNIST-5k and Fashion-MNIST.

``fsl run leakage [--quick] [section.key=value ...]`` writes ``runs/leakage-<time>/`` (the image
part below; the run also holds the label and text studies and the matrix over all three, see
:func:`main`):

* ``leakage.json`` — one row per cell: ``dataset``, ``attack``, ``cut``, ``defense``,
  ``defense_param``, ``task_accuracy``, ``mse_mean``, ``psnr_mean``, ``ssim_mean`` (plus
  ``epsilon`` for activation noise, ``threat_model``, ``seconds``);
* ``leakage.md`` — the same as a table; ``label_inference.json`` — the U-shaped label attack;
* ``figure-<dataset>.png`` — reconstructions per attack and cut (no defense);
* one run directory per (dataset, cut, defense) cell with ``observations/``, ``ground_truth/``
  and ``attacks/<name>/`` (``attack.json``, ``reconstructions.npz``, ``reconstructions.png``),
  so every number can be re-derived with ``fsl attack``.

Defenses are the framework's own, switched on by the experiment-config keys a run uses
(:func:`defense_overrides`): ``noise`` is ``[activation_noise]`` (Gaussian, clip norm the median
activation norm at the cut of the fresh model), ``nopeek`` ``privacy.nopeek_weight``, ``dpsgd``
``[privacy.dp]`` (Opacus, clip 1, Poisson batches; ``epsilon`` over all its steps),
``compression`` ``privacy.compression = "topk"`` (activations and the returned gradients travel
top-k sparse on the data plane) and ``int8`` ``privacy.compression = "int8"``.

Private data: training images the client sends in the recorded round (``n_images`` of them,
never seen before by the model). Auxiliary data (inverse network): the dataset's test split.
Both datasets use ``train_size`` = 3,500 training images (Fashion-MNIST subsampled from 60k) so a cell
takes about a minute; the private images are 32 further training images.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from fsl.config import load_experiment

DATASETS = ("mnist5k", "fashion-mnist")
MODEL = "lenet-he"
CUTS = ("conv1", "relu2")
ATTACKS: dict[str, tuple[dict[str, Any], str]] = {  # name -> (options, auxiliary data)
    "rmle": ({"iters": 600}, "none"),
    "inverse-network": ({"epochs": 10}, "same-distribution"),
    # He et al.'s query-free attack: shadow client segments trained through the frozen server segment on
    # the auxiliary data. UnSplit (no data) stays available as {"method": "unsplit", "iters": 1000, "restarts": 2}.
    "query-free": ({"method": "shadow"}, "same-distribution"),
}
BLIND = {"query-free"}  # attacks that never read the client segment's weights (their threat model says so)
# Per-cut options on top of ATTACKS: at conv1 the shadows alone miss the client's filters (SSIM 0.46 on
# MNIST-5k), UnSplit's refinement from them fixes that; at relu2 the same refinement overfits (0.43 -> 0.25).
CUT_OPTIONS: dict[str, dict[str, dict[str, Any]]] = {"query-free": {"conv1": {"refine": 500}}}
DEFENSES: tuple[tuple[str, float], ...] = (
    ("none", 0.0),
    ("noise", 0.003),
    ("noise", 0.01),
    ("noise", 0.03),
    ("nopeek", 1.0),
    ("dpsgd", 1.0),
    ("compression", 0.1),
    ("int8", 0.0),
)
QUICK = {
    "datasets": ("mnist5k",),
    "defenses": (("none", 0.0), ("noise", 0.01), ("compression", 0.1)),
    "attacks": {"rmle": ({"iters": 300}, "none"), "inverse-network": ({"epochs": 4}, "same-distribution")},
}


def _data(name: str, train_size: int, n_images: int, seed: int) -> tuple[torch.Tensor, ...]:
    from fsl.data import load_dataset

    ds = load_dataset(name)
    perm = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(seed))
    tr, priv = perm[:train_size], perm[train_size : train_size + n_images]
    return ds.x_train[tr], ds.y_train[tr], ds.x_train[priv], ds.y_train[priv], ds.x_test, ds.y_test


def defense_overrides(kind: str, param: float, clip_norm: float = 1.0) -> list[str]:
    """The ``section.key=value`` overrides that turn on defense ``kind`` at strength ``param``.

    ``clip_norm`` is the activation-noise clip norm (``noise`` only).
    """
    if kind == "none":
        return []
    if kind == "noise":
        return [
            "activation_noise.mechanism='gaussian'",
            f"activation_noise.noise_multiplier={param!r}",
            f"activation_noise.clip_norm={clip_norm!r}",
        ]
    if kind == "nopeek":
        return [f"privacy.nopeek_weight={param!r}"]
    if kind == "dpsgd":
        return ["privacy.dp.enabled=true", f"privacy.dp.noise_multiplier={param!r}", "privacy.dp.max_grad_norm=1.0"]
    if kind == "compression":
        return ["privacy.compression='topk'", f"privacy.topk_ratio={param!r}"]
    if kind == "int8":  # linear 8-bit activations and gradients, one scale per tensor
        return ["privacy.compression='int8'"]
    raise ValueError(f"unknown defense {kind!r}; choose one of none, noise, nopeek, dpsgd, compression, int8")


def _num(v: float | None, spec: float) -> str:
    return "nan" if v is None else f"{v:{spec}f}"


def run_sweep(
    root: Path,
    *,
    datasets: tuple[str, ...] = DATASETS,
    cuts: tuple[str, ...] = CUTS,
    defenses: tuple[tuple[str, float], ...] = DEFENSES,
    attacks: dict[str, tuple[dict[str, Any], str]] | None = None,
    epochs: int = 3,
    batch_size: int = 32,
    lr: float = 0.05,
    train_size: int = 3500,
    n_images: int = 32,
    seed: int = 0,
    overrides: tuple[str, ...] = (),
    log: Any = print,
) -> list[dict[str, Any]]:
    """Every cell; rows are appended to ``root/leakage.json`` as they finish (a crash keeps them).

    Each cell's defenses come from ``experiments/leakage.toml`` with ``overrides`` and the cell's
    :func:`defense_overrides` applied, read by the harness as a run's ClientApp reads them.
    """
    from attacks.harness import activation_norm, defense_label, record_round, train_split
    from attacks.observe import load_observation
    from attacks.report import auxiliary_threat, score_and_write
    from server.split_server import InvalidRequest

    attacks = ATTACKS if attacks is None else attacks
    rows: list[dict[str, Any]] = []
    for dsname in datasets:
        x, y, xp, yp, xt, yt = _data(dsname, train_size, n_images, seed)
        for cut in cuts:
            for kind, param in defenses:
                clip = activation_norm(MODEL, cut, x, seed=seed) if kind == "noise" else 1.0
                cfg = load_experiment("leakage", [*overrides, *defense_overrides(kind, param, clip)])
                label = defense_label(cfg)
                cell = root / f"{dsname}-{cut}-{label.replace('(', '-').replace(')', '')}"
                t0 = time.perf_counter()
                try:
                    trained = train_split(
                        MODEL, cut, x, y, config=cfg, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed
                    )
                except InvalidRequest as e:  # training diverged (non-finite activations): a finding, kept
                    log(f"  {dsname} {cut} {label}: training diverged ({e}); cell skipped")
                    rows.append(
                        {
                            "dataset": dsname,
                            "cut": cut,
                            "defense": kind,
                            "defense_param": param,
                            "attack": None,
                            "task_accuracy": None,
                            "mse_mean": None,
                            "psnr_mean": None,
                            "ssim_mean": None,
                            "diverged": True,
                        }
                    )
                    continue
                acc = trained.task_accuracy(xt, yt)
                record_round(trained, cell, xp, yp, batch_size=batch_size, dataset=dsname, lr=lr)
                obs = load_observation(cell)
                eps = None
                if kind == "noise" and trained.release is not None:
                    eps = trained.release.guarantee(1e-5).epsilon  # type: ignore[attr-defined]
                elif kind == "dpsgd":  # over every training step, the recorded round's included
                    eps = trained.dp_epsilon()
                for name, (options, aux) in attacks.items():
                    options = {**options, **CUT_OPTIONS.get(name, {}).get(cut, {})}
                    threat = auxiliary_threat(dsname, aux, 1000, knows_client_weights=name not in BLIND, seed=seed)
                    res = score_and_write(
                        cell, name, obs, threat, cell / "attacks" / name, options=options, dataset=dsname
                    )
                    row = {
                        "dataset": dsname,
                        "attack": name,
                        "cut": cut,
                        "defense": kind,
                        "defense_param": param,
                        "task_accuracy": acc,
                        "mse_mean": res["mse_mean"],
                        "psnr_mean": res["psnr_mean"],
                        "ssim_mean": res["ssim_mean"],
                        "epsilon": eps,
                        "model": MODEL,
                        "n_images": res["n_images"],
                        "threat_model": res["threat_model"],
                        "run_dir": str(cell),
                    }
                    rows.append(row)
                    log(
                        f"{dsname:14s} {cut:6s} {label:18s} {name:16s} acc {acc:.3f} "
                        f"psnr {_num(res['psnr_mean'], 6.2)} ssim {_num(res['ssim_mean'], 0.3)}"
                    )
                    (root / "leakage.json").write_text(json.dumps(rows, indent=2) + "\n")
                log(f"  cell {cell.name}: {time.perf_counter() - t0:.0f}s")
    return rows


def label_inference(root: Path, *, epochs: int = 2, n_private: int = 256, seed: int = 0) -> dict[str, Any]:
    """The direction attack on a U-shaped cnn (cut conv1, top fc1) on MNIST-5k, no defense."""
    from attacks.base import ThreatModel
    from attacks.ground_truth import load_ground_truth_labels
    from attacks.harness import ushaped_label_run
    from attacks.observe import load_observation
    from attacks.report import score_and_write

    x, y, xp, yp, _xt, _yt = _data("mnist5k", 3000, n_private, seed)
    cell = root / "mnist5k-ushaped-label"
    ushaped_label_run(cell, x, y, xp, yp, epochs=epochs, dataset="mnist5k", seed=seed)
    obs = load_observation(cell)
    truth = load_ground_truth_labels(cell)
    known: dict[int, int] = {}
    for i, key in enumerate(obs.keys):  # one known sample per class: a colluding client's own
        if truth[key] not in known.values():
            known[i] = truth[key]
    row = score_and_write(
        cell,
        "label-inference",
        obs,
        ThreatModel(known_labels=known),
        cell / "attacks" / "label-inference",
        dataset="mnist5k",
    )
    (root / "label_inference.json").write_text(json.dumps(row, indent=2) + "\n")
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| dataset | cut | defense | param | task acc | attack | PSNR dB | SSIM |\n|---|---|---|---|---|---|---|---|\n"
    )
    rows = [r for r in rows if r.get("attack")]
    body = "".join(
        f"| {r['dataset']} | {r['cut']} | {r['defense']} | {r['defense_param']:g} | {r['task_accuracy']:.3f} | "
        f"{r['attack']} | {_num(r['psnr_mean'], 0.2)} | {_num(r['ssim_mean'], 0.3)} |\n"
        for r in rows
    )
    return head + body


def cell_key(row: dict[str, Any]) -> str:
    """The name of a cell's reconstructions in ``reconstructions-<dataset>.npz``: ``relu2/noise-0.01/rmle``."""
    return f"{row['cut']}/{row['defense']}-{row['defense_param']:g}/{row['attack']}"


def save_reconstructions(root: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """Every scored cell's reconstructions in one file per dataset, for re-scoring without the run.

    ``reconstructions-<dataset>.npz`` holds ``original`` (the private images, float32 in [0, 1], the
    same for every cell of a dataset but those whose recorded round drew others, which keep theirs
    under ``<cell_key>/original``) and one float16 array per cell under :func:`cell_key`, aligned
    with its originals; half precision keeps the file small and moves an SSIM by about 1e-4. A row
    whose run directory is gone (a row carried over from an older run) is skipped.
    """
    import numpy as np

    out = []
    for dsname in sorted({r["dataset"] for r in rows}):
        arrays: dict[str, Any] = {}
        for r in rows:
            src = Path(r.get("run_dir") or "-") / "attacks" / str(r.get("attack")) / "reconstructions.npz"
            if r.get("reconstructions"):  # a cell saved on its own (``reconstructions`` key)
                src = Path(r["reconstructions"])
            if r["dataset"] != dsname or not r.get("attack") or not src.exists():
                continue
            with np.load(src, allow_pickle=False) as z:
                original, rec = z["original"].astype(np.float32), z["reconstructed"].astype(np.float16)
            arrays.setdefault("original", original)
            if not np.array_equal(arrays["original"], original):
                # DP-SGD's Poisson batches record another draw of the private images: kept with the cell
                arrays[cell_key(r) + "/original"] = original
            arrays[cell_key(r)] = rec
        if arrays:
            path = root / f"reconstructions-{dsname}.npz"
            np.savez_compressed(path, **arrays)
            out.append(path)
    return out


def figure(root: Path, rows: list[dict[str, Any]], dataset: str, n: int = 8) -> Path | None:
    """Originals, then one row of reconstructions per (attack, cut), without defense.

    Read from ``root/reconstructions-<dataset>.npz`` (:func:`save_reconstructions`) when it is there,
    so a committed result directory redraws its figure without the runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = [r for r in rows if r["dataset"] == dataset and r["defense"] == "none" and r.get("attack")]
    if not cells:
        return None
    lines: list[tuple[str, Any]] = []
    packed_path = root / f"reconstructions-{dataset}.npz"
    packed = None
    if packed_path.exists():  # every cell of the dataset, read once
        with np.load(packed_path, allow_pickle=False) as z:
            packed = dict(z)
    for r in cells:
        label = f"{r['attack']} @ {r['cut']}\nSSIM {r['ssim_mean']:.2f}"
        if packed is not None:
            own = cell_key(r) + "/original"
            original, rec = packed.get(own, packed["original"]), packed[cell_key(r)].astype(np.float32)
        else:
            with np.load(Path(r["run_dir"]) / "attacks" / r["attack"] / "reconstructions.npz", allow_pickle=False) as z:
                original, rec = z["original"], z["reconstructed"]
        if not lines:
            lines.append(("original", original[:n]))
        lines.append((label, rec[:n]))
    fig, axes = plt.subplots(len(lines), n, figsize=(1.0 * n + 1.5, 1.05 * len(lines)), squeeze=False)
    for i, (label, imgs) in enumerate(lines):
        for j in range(n):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(imgs):
                ax.imshow(imgs[j][0], cmap="gray", vmin=0, vmax=1)
        axes[i][0].text(-0.15, 0.5, label, transform=axes[i][0].transAxes, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    path = root / f"figure-{dataset}.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


FAMILIES = ("image", "label", "text")


def main(args: argparse.Namespace) -> int:
    """``fsl run leakage [--quick] [leakage.families=image,label,text] [section.key=value ...]``.

    Runs the image sweep, the label study (:mod:`experiments.label_leakage`), the U-shaped label
    inference and the text study (:mod:`experiments.text_leakage`) into one run directory, each in
    its own result file, then the matrix over all of them (:mod:`experiments.leakage_matrix`).
    ``section.key=value`` overrides change the image sweep's base config.
    """
    from experiments import label_leakage, leakage_matrix, text_leakage
    from fsl.config import ConfigError
    from fsl.rundir import RunDir

    quick = bool(getattr(args, "quick", False))
    own = {o.split("=", 1)[0][len("leakage.") :]: o.split("=", 1)[1] for o in getattr(args, "overrides", []) or []
           if o.startswith("leakage.") and "=" in o}  # fmt: skip
    overrides = tuple(o for o in getattr(args, "overrides", []) or [] if not o.startswith("leakage."))
    unknown = sorted(set(own) - {"families", "text_aux"})
    families = [f for f in own.get("families", ",".join(FAMILIES)).split(",") if f]
    if unknown or not set(families) <= set(FAMILIES):
        raise ConfigError(
            f"fsl run leakage takes leakage.families (a comma list of {list(FAMILIES)}) and leakage.text_aux "
            f"(kjv or fortunes); got {own}"
        )
    aux = own.get("text_aux", "fortunes" if quick else "kjv")  # the quick slice needs no Bible package
    if "text" in families and aux == "kjv" and shutil.which("bible") is None:  # say so before an hour of images
        raise ConfigError(
            "the text study's public texts are King James Bible verses (`apt-get install -y bible-kjv`); "
            "or pass leakage.text_aux=fortunes, or leave text out of leakage.families"
        )
    if aux not in ("kjv", "fortunes"):
        raise ConfigError(f"leakage.text_aux must be kjv or fortunes, not {aux!r}")
    base = load_experiment("leakage", list(overrides))
    torch.manual_seed(base.seed)
    root = RunDir.create(base.output_dir, "leakage-quick" if quick else "leakage").path
    print(f"run directory: {root}")
    t0 = time.perf_counter()
    if "image" in families:
        kw: dict[str, Any] = {"epochs": base.train.rounds, "batch_size": base.train.batch_size, "lr": base.train.lr}
        if quick:
            kw.update(datasets=QUICK["datasets"], defenses=QUICK["defenses"], attacks=QUICK["attacks"], train_size=2000)
        rows = run_sweep(root, seed=base.seed, overrides=overrides, **kw)
        (root / "leakage.md").write_text(markdown(rows))
        for dsname in {r["dataset"] for r in rows}:
            figure(root, rows, dsname)
        save_reconstructions(root, rows)
        print(f"[image] {len(rows)} rows ({time.perf_counter() - t0:.0f} s)")
    if "label" in families:
        label = label_leakage.run(quick=quick, seed=base.seed)
        (root / "label_leakage.json").write_text(json.dumps(label, indent=2) + "\n")
        lab = label_inference(root, seed=base.seed, n_private=128 if quick else 512)
        print(f"label-inference (U-shaped, direction): accuracy {lab['label_accuracy']:.3f}, AUC {lab['auc']:.3f}")
        print(f"[label] {len(label) + 1} rows ({time.perf_counter() - t0:.0f} s)")
    if "text" in families:
        text = text_leakage.run(quick=quick, aux=aux, seed=base.seed)
        (root / "text_leakage.json").write_text(json.dumps(text, indent=2) + "\n")
        print(f"[text] {len(text)} rows ({time.perf_counter() - t0:.0f} s)")
    matrix = leakage_matrix.write(root)
    print(leakage_matrix.markdown(matrix))
    print(f"results: {root} (matrix.json, matrix.md, matrix.png and each study's own file)")
    return 0


def _cli() -> int:
    """``python -m experiments.leakage [--defenses none,noise] [--datasets mnist5k] [--cuts relu2] [--attacks query-free] [--out DIR]``.

    A slice of the sweep; the label-inference run only when every attack is selected.
    """
    p = argparse.ArgumentParser(prog="python -m experiments.leakage")
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--defenses", default="all", help="comma list of defense kinds (none, noise, ...) or 'all'")
    p.add_argument("--attacks", default="all", help=f"comma list of {', '.join(ATTACKS)} or 'all'")
    p.add_argument("--cuts", default=",".join(CUTS), help=f"comma list of {', '.join(CUTS)}")
    p.add_argument("--out", default="runs/leakage-slice")
    a = p.parse_args()
    names = list(ATTACKS) if a.attacks == "all" else a.attacks.split(",")
    unknown = sorted(set(names) - set(ATTACKS))
    if unknown:
        p.error(f"unknown attacks {unknown}; choose from {list(ATTACKS)}")
    kinds = None if a.defenses == "all" else set(a.defenses.split(","))
    base = load_experiment("leakage")
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    rows = run_sweep(
        root,
        datasets=tuple(a.datasets.split(",")),
        cuts=tuple(a.cuts.split(",")),
        defenses=tuple(d for d in DEFENSES if kinds is None or d[0] in kinds),
        attacks={n: ATTACKS[n] for n in names},
        epochs=base.train.rounds,
        batch_size=base.train.batch_size,
        lr=base.train.lr,
        seed=base.seed,
    )
    (root / "leakage.md").write_text(markdown(rows))
    for dsname in {r["dataset"] for r in rows}:
        figure(root, rows, dsname)
    if a.attacks == "all":
        lab = label_inference(root, seed=base.seed, n_private=512)
        print(f"label-inference (U-shaped, direction): accuracy {lab['label_accuracy']:.3f}, AUC {lab['auc']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_cli())
