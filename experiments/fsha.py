"""Feature-space hijacking (FSHA) run long, with the paper's settings, against the authors' published curve.

Pasquini, Ateniese, Bernaschi, "Unleashing the Tiger: Inference Attacks on Split Learning" (CCS 2021).
The settings below are read from the authors' public code (github.com/pasquini-dario/SplitNN_FSHA,
``FSHA.py``, ``architectures.py``, ``datasets.py``, ``defense.py`` and the notebooks ``FSHA.ipynb`` and
``FSHA_with_distance_cor.ipynb``): MNIST resized to 32x32, tiled to three channels, pixels in [-1, 1];
split level 4 (a ResNet client, (256, 4, 4) activations); Adam with lr_f = lr_tilde = 1e-5 and
lr_D = 1e-4; WGAN loss with gradient penalty 500; batch 64; 10,000 iterations; the logged error is
the mean squared error between the client's batch and the decoder's output on its activations, in
[-1, 1], averaged over the 500 iterations before each log line.

What is ours: the client is the framework's honest trainer (:func:`clients.trainer.train_segment`,
its optimizer hook carrying the paper's Adam) over the real data-plane codec, against
:class:`attacks.fsha.HijackingServer` with the paper's networks (:mod:`attacks.models`, ``fsha_*``)
at a fraction of their width, which one CPU thread can run for thousands of steps. The private data
is the dataset's train split and the attacker's public data its test split, as in the paper.

``python -m experiments.fsha [--quick] [--out DIR]`` writes ``fsha.json`` (``runs``: one row per
run with ``dataset``, ``pixel_range``, ``metric``, ``curve`` [[iteration, error]], and the settings,
iterations reached, wall seconds), ``fsha.png`` (ours beside the published points) and one
``fsha-<run>.npz`` per run (``original``, ``reconstructed``: 16 images in [0, 1], float32).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

RESULTS = Path("experiments/results/leakage")
SOURCE = "github.com/pasquini-dario/SplitNN_FSHA"

# The paper's hyperparameters as its MNIST notebooks set them (FSHA.ipynb: hparams, batch_size, id_setup).
PAPER: dict[str, Any] = {
    "split_level": 4,
    "batch_size": 64,
    "iterations": 10_000,
    "lr_f": 1e-5,
    "lr_tilde": 1e-5,
    "lr_D": 1e-4,
    "gradient_penalty": 500.0,
    "loss": "WGAN",
    "input": "32x32, 3 channels (grey tiled), pixels in [-1, 1]",
    "log_frequency": 500,
    "dcor_alpha1": 10_000.0,  # FSHA_with_distance_cor.ipynb: the client's distance-correlation weight
    "dcor_alpha2": 50.0,  # the attacker scales its adversarial loss by this to overwrite alpha1
}

# The notebooks' printed logs ("validation": the mean reconstruction MSE in [-1, 1] over the 500 iterations
# before the line; the line at 0 is the first iteration's), MNIST, split level 4, full-width networks.
PUBLISHED = {
    "mnist": {
        "source": f"{SOURCE}, FSHA.ipynb, printed output of the run cell (commit 6d61041)",
        "curve": [
            [0, 0.1628],
            [500, 0.1511],
            [1000, 0.1102],
            [1500, 0.0852],
            [2000, 0.0728],
            [2500, 0.0580],
            [3000, 0.0476],
            [3500, 0.0415],
            [4000, 0.0374],
            [4500, 0.0337],
            [5000, 0.0320],
            [5500, 0.0285],
            [6000, 0.0274],
            [6500, 0.0247],
            [7000, 0.0240],
            [7500, 0.0220],
            [8000, 0.0205],
            [8500, 0.0196],
            [9000, 0.0192],
            [9500, 0.0193],
        ],
    },
    "mnist-dcor": {
        "source": f"{SOURCE}, FSHA_with_distance_cor.ipynb, printed output (alpha1 = 10000, alpha2 = 50)",
        "curve": [
            [0, 0.8722],
            [500, 0.5172],
            [1000, 0.1891],
            [1500, 0.1582],
            [2000, 0.1086],
            [2500, 0.0798],
            [3000, 0.0654],
            [3500, 0.0558],
            [4000, 0.0518],
            [4500, 0.0472],
            [5000, 0.0436],
            [5500, 0.0396],
            [6000, 0.0416],
            [6500, 0.0376],
            [7000, 0.0338],
            [7500, 0.0339],
            [8000, 0.0326],
            [8500, 0.0309],
            [9000, 0.0292],
            [9500, 0.0267],
        ],
    },
}


def paper_images(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, 28, 28) in [0, 1] -> (N, 3, 32, 32) in [-1, 1]: bilinear resize, grey tiled, as the paper's loader."""
    x = F.interpolate(x.float(), size=(32, 32), mode="bilinear", align_corners=False)
    return (x.repeat(1, 3, 1, 1) * 2 - 1).clamp(-1, 1)


def windowed(points: list[list[float]], every: int) -> list[list[float]]:
    """The paper's log: the first point, then at each multiple of ``every`` the mean of the points in the
    ``every`` iterations before it (and a last window if the run stops between multiples)."""
    if not points:
        return []
    out = [[points[0][0], points[0][1]]]
    last = int(points[-1][0])
    ends = list(range(every, last + 1, every)) + ([last] if last % every else [])
    for end in ends:
        vals = [e for s, e in points[1:] if end - every < s <= end]
        if vals:
            out.append([end, float(np.mean(vals))])
    return out


def run_one(
    name: str,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_public: torch.Tensor,
    *,
    iters: int,
    width: float,
    blocks: int,
    dcor: float = 0.0,
    alpha2: float = 1.0,
    score_every: int = 10,
    log_every: int = 500,
    lr_scale: float = 1.0,
    dcor_steps: str = "joint",
    seed: int = 0,
) -> dict[str, Any]:
    """One hijacked training run; ``dcor > 0`` puts the framework's NoPeek penalty on the client."""
    from attacks.fsha import HijackingServer, hijack
    from attacks.metrics import image_scores
    from attacks.models import fsha_client, fsha_critic, fsha_decoder, fsha_pilot
    from fsl.models import cut_shape
    from fsl.privacy.nopeek import NoPeek

    level = PAPER["split_level"]
    x_priv, x_pub = paper_images(x_train), paper_images(x_public)
    shape = tuple(x_priv.shape[1:])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        client = fsha_client(level, width)
        pilot = fsha_pilot(level, width)
        z = cut_shape(pilot, shape)
        decoder, critic = fsha_decoder(z[0], level, width), fsha_critic(z[0], width, blocks)
    server = HijackingServer(
        "fsha-resnet",
        f"level{level}",
        shape,
        x_pub,
        gp=PAPER["gradient_penalty"],
        seed=seed,
        eval_every=score_every,
        nets=(pilot, decoder, critic),
        lr_pilot=PAPER["lr_tilde"] * lr_scale,
        lr_critic=PAPER["lr_D"] * lr_scale,
        gp_per_channel=True,
        simultaneous=True,
        grad_scale=alpha2,
        pixel_range=(-1.0, 1.0),
    )
    res = hijack(
        client,
        server,
        x_priv,
        y_train,
        iters=iters,
        batch_size=PAPER["batch_size"],
        optimizer=torch.optim.Adam(client.parameters(), lr=PAPER["lr_f"] * lr_scale),
        penalty=NoPeek(dcor) if dcor > 0 else None,
        penalty_steps=dcor_steps,
        seed=seed,
        progress=lambda done, total, _text: (
            None if done % log_every else print(f"  {name}: {done}/{total}", flush=True)
        ),
    )
    points = res["curve"]
    original, reconstructed = (res["original"][:16] + 1) / 2, (res["reconstructed"][:16] + 1) / 2
    scores = image_scores(reconstructed, original)  # in [0, 1], as the saved arrays
    return {
        "name": name,
        "dataset": "",
        "pixel_range": [-1, 1],
        "metric": "mse",
        "metric_detail": (
            "mean squared error over all pixels and channels between the client's training batch and the "
            f"attacker's decoding of its activations, in [-1, 1]; each curve point after the first is the mean of "
            f"the scored batches (every {score_every}th) in the {log_every} iterations before it, as the paper's log"
        ),
        "curve": windowed(points, log_every),
        "curve_points": points,
        "iterations": res["steps"],
        "wall_seconds": round(res["wall_s"], 1),
        "seconds_per_iteration": round(res["wall_s"] / max(1, res["steps"]), 4),
        "final_mse": points[-1][1],
        "saved_images": {
            "iteration": points[-1][0],
            "n": int(len(original)),
            "mse_01": float(scores["mse"].mean()),
            "ssim_01": float(scores["ssim"].mean()),
        },
        "settings": {
            "split_level": level,
            "width": width,
            "critic_blocks": blocks,
            "batch_size": PAPER["batch_size"],
            "lr_f": PAPER["lr_f"] * lr_scale,
            "lr_tilde": PAPER["lr_tilde"] * lr_scale,
            "lr_D": PAPER["lr_D"] * lr_scale,
            "gradient_penalty": PAPER["gradient_penalty"],
            "dcor_weight": dcor,
            "dcor_steps": dcor_steps if dcor > 0 else None,
            "adversarial_scale": alpha2,
            "private_samples": len(y_train),
            "public_samples": len(x_public),
            "seed": seed,
            "threads": torch.get_num_threads(),
        },
        "_images": (original.numpy().astype(np.float32), reconstructed.numpy().astype(np.float32)),
    }


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.6))
    colours = {"mnist": "tab:blue", "mnist-dcor": "tab:red", "fashion-mnist": "tab:green"}
    for key, pub in PUBLISHED.items():
        it, err = zip(*pub["curve"], strict=True)
        ax.plot(it, err, "--", marker="o", ms=3, color=colours[key], alpha=0.6, label=f"paper: {key} (full width)")
    for r in runs:
        it, err = zip(*r["curve"], strict=True)
        st = r["settings"]
        base, separate = _base(r["name"]), st.get("dcor_steps") == "separate"
        scale = st["lr_f"] / PAPER["lr_f"]
        c = colours.get(base, "black")
        style = "-." if separate else (":" if scale != 1 else "-")
        width = f"width 1/{round(1 / st['width'])}" if st["width"] < 1 else "full width"
        lr = f", lr x{scale:g}" if scale != 1 else ""
        steps = ", 2 client steps" if separate else ""
        ax.plot(it, err, style, marker="s", ms=3, color=c, label=f"ours: {base} ({r['dataset']}, {width}{lr}{steps})")
    ax.set(xlabel="iteration", ylabel="reconstruction MSE, pixels in [-1, 1]", yscale="log")
    ax.set_title("FSHA at split level 4: reconstruction error of the client's batches")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the curves fill the axes
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


RUNS = ("mnist", "mnist-dcor", "fashion-mnist")


def _base(name: str) -> str:
    """The paper's run a variant (``-lr<scale>``, ``-separate``) belongs to."""
    return max((r for r in RUNS if name.startswith(r)), key=len, default=name)


def _run_order(run: dict[str, Any]) -> tuple[int, str]:
    """Each paper-settings run first, its variants after it."""
    base = _base(run["name"])
    return (RUNS.index(base) if base in RUNS else len(RUNS), run["name"])


def main(argv: list[str] | None = None) -> int:
    from fsl.data import load_dataset

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="a tiny slice: 120 iterations, narrow nets, 100x learning rates"
    )
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--iters", type=int, default=6000, help="MNIST-5k iterations (the paper: 10,000)")
    p.add_argument("--fashion-iters", type=int, default=2000, help="Fashion-MNIST iterations (0: skip)")
    p.add_argument("--dcor-iters", type=int, default=2000, help="MNIST-5k under dCor (0: skip)")
    p.add_argument("--width", type=float, default=0.125, help="channel width of every network (1: the paper's)")
    p.add_argument("--blocks", type=int, default=6, help="residual blocks of the critic (the paper: 6)")
    p.add_argument(
        "--lr-scale",
        type=float,
        default=1.0,
        help="multiplies the paper's three learning rates (not with --quick); a run at any other value is "
        "named <run>-lr<scale> and kept beside the paper-settings run",
    )
    p.add_argument(
        "--dcor-steps",
        choices=("joint", "separate"),
        default="joint",
        help="the defended client's steps: joint (the framework's NoPeek: one step on penalty plus gradient) "
        "or separate (the authors' client: one on each); a separate run is named mnist-dcor-separate",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", default="mnist,mnist-dcor,fashion-mnist", help="which runs; others already in --out stay")
    p.add_argument("--plot-only", action="store_true", help="redraw fsha.png from the fsha.json in --out")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.plot_only:
        plot(json.loads((out / "fsha.json").read_text())["runs"], out / "fsha.png")
        return 0
    if a.quick:
        plan: list[tuple[str, str, int, float, float]] = [("mnist", "mnist5k", 120, 0.0, 1.0)]
        kw: dict[str, Any] = {"width": 0.0625, "blocks": 1, "score_every": 5, "log_every": 40, "lr_scale": 100.0}
        n_priv: int | None = 512
        n_pub: int | None = 256
    else:
        plan = [
            ("mnist", "mnist5k", a.iters, 0.0, 1.0),
            ("mnist-dcor", "mnist5k", a.dcor_iters, PAPER["dcor_alpha1"], PAPER["dcor_alpha2"]),
            ("fashion-mnist", "fashion-mnist", a.fashion_iters, 0.0, 1.0),
        ]
        kw = {"width": a.width, "blocks": a.blocks, "lr_scale": a.lr_scale}
        n_priv = n_pub = None
    wanted = set(a.runs.split(","))
    plan = [row for row in plan if a.quick or row[0] in wanted]
    old = out / "fsha.json"
    kept = json.loads(old.read_text())["runs"] if old.exists() and not a.quick else []

    def steps(dcor: float) -> str:  # only a defended run has a penalty to step on
        return a.dcor_steps if dcor > 0 and not a.quick else "joint"

    def tag(name: str, dcor: float) -> str:
        # a variant of the paper's settings never replaces the paper-settings run
        name += "-separate" if steps(dcor) == "separate" else ""
        return name if a.quick or a.lr_scale == 1.0 else f"{name}-lr{a.lr_scale:g}"

    runs = [r for r in kept if r["name"] not in {tag(row[0], row[3]) for row in plan}]
    for name, dataset, iters, dcor, alpha2 in plan:
        if iters <= 0:
            continue
        ds = load_dataset(dataset)
        assert isinstance(ds.x_train, torch.Tensor) and isinstance(ds.x_test, torch.Tensor)  # images, not tokens
        x_tr, y_tr, x_te = ds.x_train[:n_priv], ds.y_train[:n_priv], ds.x_test[:n_pub]
        row = run_one(
            tag(name, dcor), x_tr, y_tr, x_te, iters=iters, dcor=dcor, alpha2=alpha2, dcor_steps=steps(dcor), **kw
        )
        row["dataset"] = dataset
        original, reconstructed = row.pop("_images")
        np.savez_compressed(out / f"fsha-{row['name']}.npz", original=original, reconstructed=reconstructed)
        runs.append(row)
        first, final = row["curve"][0][1], row["curve"][-1][1]
        print(
            f"{row['name']}: {row['iterations']} iterations in {row['wall_seconds']:.0f} s, "
            f"MSE [-1, 1] {first:.4f} -> {final:.4f}",
            flush=True,
        )
        # written after every run, so a long sweep leaves its finished runs behind
        res = {
            "attack": "fsha",
            "paper": "Pasquini, Ateniese, Bernaschi, Unleashing the Tiger: Inference Attacks on Split Learning, CCS 2021",
            "paper_settings": {**PAPER, "source": f"{SOURCE} (FSHA.py, architectures.py, datasets.py, notebooks)"},
            "published": PUBLISHED,
            "quick": a.quick,
            "runs": sorted(runs, key=_run_order),
        }
        (out / "fsha.json").write_text(json.dumps(res, indent=2, allow_nan=False) + "\n")
    plot(runs, out / "fsha.png")
    return 0 if runs and all(math.isfinite(r["final_mse"]) for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
