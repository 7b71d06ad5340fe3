"""``fsl run privacy-utility``: what each privacy defense costs in accuracy.

Every point runs the same experiment (``experiments/privacy_utility.toml``) with one defense turned
up, each in its own process (``fsl run --resume DIR``), and the results go into one run directory:

- ``privacy-utility.json`` / ``privacy-utility.md``: one row per point with ``mechanism``
  (``none``, ``dp-sgd``, ``activation-noise``, ``nopeek``, ``compression``), ``param`` (its strength:
  target epsilon, noise multiplier, NoPeek weight, wire format), ``epsilon`` where one is defined
  (DP-SGD: over the whole training, per client, the largest; activation noise: *per release* of one
  sample's activation, which composes over every batch and epoch), ``final_accuracy``,
  ``bytes_up_per_client_round`` (control + data plane) and ``dataplane_bytes_up_per_client_round``,
  and ``dcor`` (distance correlation between test inputs and the final client segment's activations:
  lower = less of the input visible in what is sent);
- ``privacy-utility.png``: accuracy against each defense's strength.

What each protects: DP-SGD the client-segment updates (not the activations); activation noise the
activations (not the updates); NoPeek lowers dCor empirically (no guarantee); compression nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from fsl.config import ExperimentConfig, load_experiment

QUICK = ["data.name=digits", "data.train_limit=0", "data.test_limit=0", "train.rounds=1", "train.batch_size=16"]

# (mechanism, param, overrides)
POINTS: list[tuple[str, Any, list[str]]] = [
    ("none", None, []),
    ("dp-sgd", 8.0, ["privacy.dp.enabled=true", "privacy.dp.target_epsilon=8.0"]),
    ("dp-sgd", 3.0, ["privacy.dp.enabled=true", "privacy.dp.target_epsilon=3.0"]),
    ("dp-sgd", 1.0, ["privacy.dp.enabled=true", "privacy.dp.target_epsilon=1.0"]),
    ("activation-noise", 0.01, ["activation_noise.mechanism='gaussian'", "activation_noise.noise_multiplier=0.01"]),
    ("activation-noise", 0.03, ["activation_noise.mechanism='gaussian'", "activation_noise.noise_multiplier=0.03"]),
    ("activation-noise", 0.1, ["activation_noise.mechanism='gaussian'", "activation_noise.noise_multiplier=0.1"]),
    ("nopeek", 0.1, ["privacy.nopeek_weight=0.1"]),
    ("nopeek", 0.5, ["privacy.nopeek_weight=0.5"]),
    ("nopeek", 2.0, ["privacy.nopeek_weight=2.0"]),
    ("compression", "float16", ["train.wire_dtype='float16'"]),
    ("compression", "bfloat16", ["train.wire_dtype='bfloat16'"]),
    ("compression", "int8", ["privacy.compression='int8'"]),
    ("compression", "topk:0.1", ["privacy.compression='topk'", "privacy.topk_ratio=0.1"]),
]
QUICK_POINTS = [p for p in POINTS if (p[0], p[1]) in {("none", None), ("dp-sgd", 3.0), ("compression", "int8")}]
CLIP = ["activation_noise.clip_norm=10.0"]  # about the activation norm at conv1 (11.5 at initialisation)


def _dcor(cfg: ExperimentConfig, run_dir: Path, n: int = 500) -> float:
    """dCor(test inputs, activations of the final client segment) on ``n`` test samples."""
    import torch

    from fsl.experiment import build_split, experiment_dataset
    from fsl.privacy.nopeek import distance_correlation
    from fsl.rundir import RunDir

    ds = experiment_dataset(cfg)
    split = build_split(cfg, ds.input_shape, ds.num_classes)
    ckpt = RunDir(run_dir).latest_checkpoint()
    assert ckpt is not None
    split.client.load_state_dict(ckpt.client)
    with torch.no_grad():
        x = ds.x_test[:n]
        return float(distance_correlation(x, split.client.eval()(x)))


def _row(mechanism: str, param: Any, cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    s = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    client_rounds = sum(r["clients"] for r in rows) or 1
    priv = s.get("privacy", {})
    eps: float | None = None
    if mechanism == "dp-sgd":
        eps = priv["epsilon"]
    elif mechanism == "activation-noise":
        eps = priv["activation_noise"]["epsilon_per_release"]
    elif mechanism == "none":
        eps = math.inf
    return {
        "mechanism": mechanism,
        "param": param,
        "epsilon": eps,
        "epsilon_scope": {
            "dp-sgd": "whole training, client-segment updates, largest over clients",
            "activation-noise": "one release of one sample's activation (composes over batches and epochs)",
        }.get(mechanism),
        "noise_multiplier": priv.get("noise_multiplier")
        if mechanism == "dp-sgd"
        else cfg.activation_noise.noise_multiplier
        if mechanism == "activation-noise"
        else None,
        "final_accuracy": s["final_accuracy"],
        "bytes_up_per_client_round": s["bytes_up_per_client_round"],
        "dataplane_bytes_up_per_client_round": sum(r["dataplane_bytes_up"] for r in rows) / client_rounds,
        "dcor": _dcor(cfg, run_dir),
        "wall_s": s["wall_s"],
        "run_dir": str(run_dir),
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        if abs(v) >= 1e6:
            return f"{v / 1e6:.2f}M"
        if abs(v) >= 1e3:
            return f"{v / 1e3:.1f}k"
        return f"{v:.3f}"
    return str(v)


COLUMNS = [
    ("mechanism", "mechanism"),
    ("param", "param"),
    ("epsilon", "epsilon"),
    ("final_accuracy", "final acc"),
    ("dcor", "dCor(x, h)"),
    ("bytes_up_per_client_round", "bytes up / client / round"),
    ("dataplane_ratio", "data-plane bytes up vs float32"),
]


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(t for _, t in COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join("| " + " | ".join(_fmt(r.get(k)) for k, _ in COLUMNS) + " |\n" for r in rows)


def _plot(out: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next((r["final_accuracy"] for r in rows if r["mechanism"] == "none"), None)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    panels = [
        ("dp-sgd", "DP-SGD: epsilon (whole training)", True),
        ("activation-noise", "activation noise: noise multiplier", True),
        ("nopeek", "NoPeek weight", True),
        ("compression", "wire format", False),
    ]
    for ax, (mech, label, numeric) in zip(axes, panels, strict=True):
        pts = [r for r in rows if r["mechanism"] == mech]
        if numeric:
            xs = [r["epsilon"] if mech == "dp-sgd" else r["param"] for r in pts]
            ax.plot(xs, [r["final_accuracy"] for r in pts], "o-")
            ax.set_xscale("log")
        else:
            ax.bar([str(r["param"]) for r in pts], [r["final_accuracy"] for r in pts])
        if base is not None:
            ax.axhline(base, ls="--", c="gray", label="no defense")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)  # one scale for every panel: differences of a few points are within run-to-run noise
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "privacy-utility.png", dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    from experiments.compare import run_in_process
    from fsl.rundir import RunDir

    overrides = [*(QUICK if args.quick else []), *args.overrides]
    points = QUICK_POINTS if args.quick else POINTS
    base = load_experiment("privacy_utility", overrides)
    root = RunDir.create(base.output_dir, "privacy-utility-quick" if args.quick else "privacy-utility").path
    print(f"run directory: {root}")
    rows: list[dict[str, Any]] = []
    for mechanism, param, extra in points:
        cfg = load_experiment("privacy_utility", [*overrides, *CLIP, *extra])
        name = mechanism if param is None else f"{mechanism}-{param}"
        cfg = dataclasses.replace(cfg, name=f"privacy-utility-{name}")
        rows.append(
            _row(mechanism, param, cfg, run_in_process(cfg, root / name, quiet=args.quiet, label="privacy-utility"))
        )
        f32 = next((r["dataplane_bytes_up_per_client_round"] for r in rows if r["mechanism"] == "none"), None)
        for r in rows:
            r["dataplane_ratio"] = r["dataplane_bytes_up_per_client_round"] / f32 if f32 else None
        (root / "privacy-utility.json").write_text(json.dumps(rows, indent=2) + "\n")  # partial results survive
    (root / "privacy-utility.md").write_text(markdown(rows))
    _plot(root, rows)
    print(markdown(rows))
    print(f"results: {root}  (privacy-utility.json, privacy-utility.md, privacy-utility.png)")
    return 0
