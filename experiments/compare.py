"""``fsl run compare``: every split-learning architecture side by side.

Runs each mode on the same data, model, cut point, clients, partition and seed
(``experiments/compare.toml``), then writes into one run directory:

- ``<mode>/``: each mode's own run directory (metrics, summary, checkpoints);
- ``compare.json`` / ``compare.md``: one row per mode (accuracy, rounds and time to
  the target accuracy, time per round, client FLOPs per sample against the full
  model's, client parameters and activation memory, bytes per client per round,
  server FLOPs per round, how many clients really trained at once);
- ``accuracy.png`` (accuracy per round, every mode on one chart) and
  ``traffic.png`` (bytes per client per round against the number of clients, ``fl``
  against the split modes, projected from the measured per-sample traffic);
- without ``--quick``: ``cuts.json`` (a cut-point sweep of ``fsl``) and
  ``noniid.json`` (Dirichlet alpha 0.5 and 0.1 for ``fsl`` and ``fl``).

``--quick`` runs the same comparison on a small subset in a few minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from fsl.config import ExperimentConfig, load_experiment

MODES = ("central", "fl", "sl", "sflv1", "sflv2", "fsl", "psl", "hybrid", "ushaped")
TARGET = {"fashion-mnist": 0.85, "mnist5k": 0.9, "mnist": 0.95, "digits": 0.8, "cifar10": 0.5}
QUICK = ["data.train_limit=2000", "data.test_limit=1000", "clients=4", "train.rounds=3", "train.batch_size=16"]


def _rounds_to(history: list[dict[str, Any]], target: float) -> tuple[int | None, float | None]:
    wall = 0.0
    for h in history:
        wall += h["seconds"]
        if h["accuracy"] >= target:
            return h["round"], wall
    return None, None


def _row(
    cfg: ExperimentConfig, run_dir: Path, target: float, input_shape: tuple[int, ...], num_classes: int
) -> dict[str, Any]:
    from fsl.costs import split_costs

    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    costs = split_costs(cfg, input_shape, num_classes)
    rounds, wall = _rounds_to(rows, target)
    examples = sum(r["examples"] for r in rows) / max(1, len(rows))
    return {
        "mode": cfg.mode,
        "final_accuracy": summary["final_accuracy"],
        "best_accuracy": summary["best_accuracy"],
        "target_accuracy": target,
        "rounds_to_target": rounds,
        "wall_s_to_target": wall,
        "wall_s_per_round": summary["wall_s_per_round"],
        "client_flops_per_sample": costs.client_flops_per_sample,
        "full_model_flops_per_sample": costs.full_model_flops_per_sample,
        "client_flops_fraction": costs.client_flops_per_sample / costs.full_model_flops_per_sample,
        "client_params": costs.client_params,
        "client_activation_bytes_per_sample": costs.client_activation_bytes_per_sample,
        "bytes_up_per_client_round": summary["bytes_up_per_client_round"],
        "bytes_down_per_client_round": summary["bytes_down_per_client_round"],
        "server_flops_per_round": costs.server_flops_per_sample * examples,
        "samples_per_round": examples,
        "max_concurrent_clients": max((r.get("max_concurrent_clients") or 0) for r in rows) if rows else 0,
        "sequential": bool(rows and rows[0].get("sequential")),
        "cut": cfg.model.cut if cfg.mode not in ("fl", "central") else None,
        "partition": cfg.data.partition if cfg.data.partition == "iid" else f"dirichlet({cfg.data.alpha})",
        "run_dir": str(run_dir),
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v == 0:
            return "0"
        for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(v) >= div:
                return f"{v / div:.2f}{unit}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


COLUMNS = [
    ("mode", "mode"),
    ("final_accuracy", "final acc"),
    ("best_accuracy", "best acc"),
    ("rounds_to_target", "rounds to target"),
    ("wall_s_to_target", "s to target"),
    ("wall_s_per_round", "s / round"),
    ("max_concurrent_clients", "clients at once"),
    ("client_flops_per_sample", "client FLOPs / sample"),
    ("client_flops_fraction", "of full model"),
    ("client_params", "client params"),
    ("client_activation_bytes_per_sample", "client act. bytes / sample"),
    ("bytes_up_per_client_round", "bytes up / client / round"),
    ("bytes_down_per_client_round", "bytes down / client / round"),
    ("server_flops_per_round", "server FLOPs / round"),
]


def markdown(rows: list[dict[str, Any]], columns: list[tuple[str, str]] = COLUMNS) -> str:
    head = "| " + " | ".join(t for _, t in columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |\n" for r in rows)


def _plots(out: Path, rows: list[dict[str, Any]], base: ExperimentConfig, n_train: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        hist = [json.loads(x) for x in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines() if x.strip()]
        ax.plot([h["round"] for h in hist], [h["accuracy"] for h in hist], "o-", label=r["mode"], ms=3)
    ax.set(xlabel="round (= epochs over the data)", ylabel="test accuracy", title=f"{base.data.name}: every mode")
    ax.grid(alpha=0.3)
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)

    # bytes per client per round against the number of clients, total data fixed: split modes
    # move ~ (data per client) x (cut width); fl moves the model, whatever the data
    k_measured = base.clients
    ks = [k for k in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)]
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        if r["mode"] == "central":
            continue
        per_client = r["bytes_up_per_client_round"] + r["bytes_down_per_client_round"]
        if r["mode"] == "fl":
            proj = [per_client for _ in ks]
        else:
            samples_per_client = r["samples_per_round"] / k_measured
            fixed = 2 * 4 * r["client_params"] * 2  # segment down and up, train + evaluate messages
            per_sample = max(0.0, per_client - fixed) / max(1.0, samples_per_client)
            proj = [per_sample * n_train * base.train.local_epochs / k + fixed for k in ks]
        ax.plot(ks, proj, "-" if r["mode"] == "fl" else "--", label=r["mode"])
        ax.plot([k_measured], [per_client], "ko", ms=4)
    ax.set(
        xscale="log", yscale="log", xlabel="number of clients (total data fixed)", ylabel="bytes per client per round"
    )
    ax.set_title("traffic: fl scales with the model, split modes with data per client (dots: measured)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "traffic.png", dpi=110)
    plt.close(fig)


def run_in_process(cfg: ExperimentConfig, path: Path, *, quiet: bool, label: str) -> Path:
    """Run one configuration in its own process (Ray and Flower keep per-process state that does not
    survive many simulations in one interpreter, and a process's peak memory is then its own) into
    run directory ``path``. A finished run is reused and an interrupted one resumes from its last
    checkpoint, so a sweep that stopped carries on where it was."""
    import subprocess
    import sys

    from fsl.config import to_toml

    if (path / "summary.json").exists():
        return path
    (path / "checkpoints").mkdir(parents=True, exist_ok=True)
    if not (path / "config.toml").exists():
        (path / "config.toml").write_text(to_toml(cfg))
    print(f"{label}: {path.name}", flush=True)
    cmd = [sys.executable, "-m", "fsl_cli", "run", "--resume", str(path), *(["--quiet"] if quiet else [])]
    subprocess.run(cmd, check=True)
    return path


def main(args: argparse.Namespace) -> int:
    from fsl.experiment import experiment_dataset
    from fsl.rundir import RunDir

    overrides = [*(QUICK if args.quick else []), *args.overrides]
    base = load_experiment("compare", overrides)
    ds = experiment_dataset(base)
    target = TARGET.get(base.data.name, 0.8)
    if getattr(args, "resume", None):  # `fsl run compare --resume DIR`: finished modes are reused
        root = Path(args.resume)
    else:
        root = RunDir.create(base.output_dir, "compare-quick" if args.quick else "compare").path
    print(f"run directory: {root}")
    rows = []
    for mode in MODES:
        cfg = dataclasses.replace(base, mode=mode, name=f"compare-{mode}")
        rows.append(
            _row(
                cfg,
                run_in_process(cfg, root / mode, quiet=args.quiet, label="compare"),
                target,
                ds.input_shape,
                ds.num_classes,
            )
        )
        (root / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")  # partial results survive a crash
    (root / "compare.md").write_text(markdown(rows))
    n_train = int(len(ds.y_train) * (1 - base.data.val_fraction))
    _plots(root, rows, base, n_train)
    if not args.quick:
        cut_rows = []
        for cut in ("conv1", "conv2", "fc1"):
            cfg = dataclasses.replace(
                base, mode="fsl", model=dataclasses.replace(base.model, cut=cut), name=f"cut-{cut}"
            )
            cut_rows.append(
                _row(
                    cfg,
                    run_in_process(cfg, root / f"cut-{cut}", quiet=args.quiet, label="compare"),
                    target,
                    ds.input_shape,
                    ds.num_classes,
                )
            )
            (root / "cuts.json").write_text(json.dumps(cut_rows, indent=2) + "\n")
        noniid = []
        for alpha in (0.5, 0.1):
            for mode in ("fsl", "fl"):
                data = dataclasses.replace(base.data, partition="dirichlet", alpha=alpha)
                cfg = dataclasses.replace(base, mode=mode, data=data, name=f"noniid-{alpha}-{mode}")
                noniid.append(
                    _row(
                        cfg,
                        run_in_process(cfg, root / f"noniid-{alpha}-{mode}", quiet=args.quiet, label="compare"),
                        target,
                        ds.input_shape,
                        ds.num_classes,
                    )
                )
                (root / "noniid.json").write_text(json.dumps(noniid, indent=2) + "\n")
        extra_cols = [("cut", "cut"), ("partition", "partition")] + COLUMNS[1:]
        (root / "cuts.md").write_text(markdown(cut_rows, extra_cols))
        (root / "noniid.md").write_text(markdown(noniid, [("mode", "mode"), ("partition", "partition")] + COLUMNS[1:6]))
    print(markdown(rows))
    print(f"results: {root} (compare.json, compare.md, accuracy.png, traffic.png)")
    return 0
