"""``fsl run skew``: every mode under label skew, from IID to two classes per client.

Each cell is one run of a mode (``fsl``, ``sl``, ``sflv1``, ``sflv2``, ``psl``, ``hybrid``,
``ushaped``, ``fl`` and ``fl`` with FedProx, named ``fl+fedprox``) on one partition (IID,
Dirichlet alpha 1.0, 0.5 and 0.1, two label-sorted shards per client) and one seed, on the data,
model and clients of ``experiments/skew.toml``. Results go to ``experiments/results/skew/``
(``--quick``: ``<output_dir>/skew-quick/``):

- ``skew.json``: one row per cell with ``mode``, ``partition``, ``alpha``, ``seed``, ``rounds``,
  ``final_accuracy``, ``best_accuracy`` and the accuracy per round;
- ``skew.md``: final accuracy per mode (rows) and partition (columns), the mean over seeds;
- ``skew.png``: final accuracy against skew, one line per mode.

The sweep is resumable: a cell already in ``skew.json`` is skipped, every finished cell is written
at once, and an interrupted cell resumes from its run directory's last checkpoint. Sweep keys pick
a slice: ``skew.modes=fsl,fl``, ``skew.partitions=dirichlet-0.1,iid``, ``skew.seeds=0``,
``skew.out=DIR`` (where the three files go); any other ``section.key=value`` changes every cell.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from experiments.compare import run_in_process
from fsl.config import AUTO_CLIP_MODES, AUTO_CLIP_NORM, ExperimentConfig, load_experiment

MODES = ("fsl", "sl", "sflv1", "sflv2", "psl", "hybrid", "ushaped", "fl", "fl+fedprox")
PARTITIONS = ("iid", "dirichlet-1.0", "dirichlet-0.5", "dirichlet-0.1", "shards")
SEEDS = (0, 1)
RESULTS = Path("experiments/results/skew")
# a slice that shows the effect in a few minutes: 2 rounds on a sixth of the data, the strongest skew
QUICK = ["data.train_limit=10000", "data.test_limit=2000", "train.rounds=2"]
QUICK_CELLS = {"modes": "fsl,fl", "partitions": "dirichlet-0.1,shards", "seeds": "0"}


def _partition(name: str) -> tuple[str, float | None]:
    """``dirichlet-0.1`` -> ("dirichlet", 0.1); ``iid`` / ``shards`` -> (name, None)."""
    if name.startswith("dirichlet-"):
        return "dirichlet", float(name.split("-", 1)[1])
    if name in ("iid", "shards"):
        return name, None
    raise ValueError(f"unknown partition {name!r}; choose from {list(PARTITIONS)}")


def cell_config(base: ExperimentConfig, mode: str, partition: str, seed: int) -> ExperimentConfig:
    """The configuration of one cell."""
    scheme, alpha = _partition(partition)
    data = dataclasses.replace(base.data, partition=scheme, alpha=alpha if alpha is not None else base.data.alpha)
    train = base.train
    if mode == "fl+fedprox":
        mode, train = "fl", dataclasses.replace(train, strategy="fedprox")
    return dataclasses.replace(base, mode=mode, seed=seed, data=data, train=train, name=f"skew-{mode}")


def _adjusted(cfg: ExperimentConfig) -> bool:
    """Whether the cell's loss is logit-adjusted (train.logit_adjust acts in the split modes only)."""
    return cfg.train.logit_adjust and cfg.mode not in ("fl", "central")


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (
        row["mode"],
        row["partition"],
        row["alpha"],
        row["seed"],
        row["rounds"],
        row.get("train_limit", 0),
        row.get("logit_adjust", True),
        row.get("clip_norm", 0.0),  # rows without it ran unclipped
    )


def _row(mode: str, partition: str, cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    hist = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    scheme, alpha = _partition(partition)
    return {
        "mode": mode,
        "partition": scheme,
        "alpha": alpha,
        "seed": cfg.seed,
        "rounds": cfg.train.rounds,
        "final_accuracy": summary["final_accuracy"],
        "best_accuracy": summary["best_accuracy"],
        "accuracy_per_round": [h["accuracy"] for h in hist],
        "logit_adjust": _adjusted(cfg),
        "clip_norm": cfg.clip_norm,  # the gradient-norm bound the cell's steps ran under (0: none)
        # split modes adjust logits by the label counts each client declares (rows without the key
        # estimated the prior from the labels received so far in the round)
        "label_prior": "declared" if _adjusted(cfg) else None,
        "train_limit": cfg.data.train_limit,
        "wall_s": summary["wall_s"],
    }


def _label(row: dict[str, Any]) -> str:
    return f"dirichlet-{row['alpha']}" if row["partition"] == "dirichlet" else str(row["partition"])


def _default_clip(mode: str) -> float:
    return AUTO_CLIP_NORM if mode in AUTO_CLIP_MODES else 0.0


def current(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows that ran under the defaults of today's code: a cell rerun under a new default (the
    automatic gradient bound) supersedes its older run, which stays in ``skew.json``; a baseline
    run with a bound set (``fl`` with ``train.clip_norm``) is not a default cell."""
    return [r for r in rows if r.get("clip_norm", 0.0) == _default_clip(r["mode"])]


def markdown(rows: list[dict[str, Any]]) -> str:
    """Final accuracy per mode and partition under today's defaults (mean over the seeds run; their
    count in brackets)."""
    # the whole-model baselines also run bounded (train.clip_norm set): a line of their own each
    bounded = sorted({(r["mode"], r["clip_norm"]) for r in rows if r["mode"].startswith("fl") and r.get("clip_norm")})
    rows_now = current(rows)
    cols = [p for p in PARTITIONS if any(_label(r) == p for r in rows_now)]
    lines = [(m, m, 0.0) for m in MODES if any(r["mode"] == m for r in rows_now)]
    lines += [(f"{m} (clip_norm {c:g})", m, c) for m, c in bounded]
    out = "| mode | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    for name, m, c in lines:
        pool = rows_now if not c else [r for r in rows if r.get("clip_norm") == c]
        cells = []
        for p in cols:
            accs = [r["final_accuracy"] for r in pool if r["mode"] == m and _label(r) == p]
            cells.append(f"{sum(accs) / len(accs):.3f} ({len(accs)})" if accs else "-")
        out += f"| {name} | " + " | ".join(cells) + " |\n"
    return out


def _plot(path: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = current(rows)
    cols = [p for p in PARTITIONS if any(_label(r) == p for r in rows)]
    fig, ax = plt.subplots(figsize=(8, 5))
    for m in MODES:
        xs, ys = [], []
        for i, p in enumerate(cols):
            accs = [r["final_accuracy"] for r in rows if r["mode"] == m and _label(r) == p]
            if accs:
                xs.append(i)
                ys.append(sum(accs) / len(accs))
        if xs:
            ax.plot(xs, ys, "o-", label=m, ms=4)
    ax.set_xticks(range(len(cols)), cols)
    ax.set(xlabel="partition (more skew to the right)", ylabel="final test accuracy", ylim=(0, 1))
    ax.axhline(0.1, color="grey", ls=":", lw=1)  # chance on 10 balanced classes
    ax.set_title("every mode under label skew (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(out: Path, rows: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "skew.json.tmp"
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    tmp.replace(out / "skew.json")  # a crash never leaves a torn file: finished cells survive
    (out / "skew.md").write_text(markdown(rows))
    _plot(out / "skew.png", rows)


def main(args: argparse.Namespace) -> int:
    sweep = {**(QUICK_CELLS if args.quick else {})}
    overrides = []
    for o in args.overrides:
        k, _, v = o.partition("=")
        if k.startswith("skew."):
            sweep[k[len("skew.") :]] = v
        else:
            overrides.append(o)
    base = load_experiment("skew", [*(QUICK if args.quick else []), *overrides])
    modes = [m for m in sweep.get("modes", ",".join(MODES)).split(",") if m]
    parts = [p for p in sweep.get("partitions", ",".join(PARTITIONS)).split(",") if p]
    seeds = [int(s) for s in sweep.get("seeds", ",".join(map(str, SEEDS))).split(",") if s]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"skew.modes: unknown mode {m!r}; choose from {list(MODES)}")
    for p in parts:
        _partition(p)
    out = Path(sweep["out"]) if "out" in sweep else (Path(base.output_dir) / "skew-quick" if args.quick else RESULTS)
    runs = Path(base.output_dir) / ("skew-quick" if args.quick else "skew") / "runs"
    rows: list[dict[str, Any]] = json.loads((out / "skew.json").read_text()) if (out / "skew.json").exists() else []
    done = {_key(r) for r in rows}
    for seed in seeds:
        for p in parts:
            for m in modes:
                cfg = cell_config(base, m, p, seed)
                scheme, alpha = _partition(p)
                key = (m, scheme, alpha, seed, cfg.train.rounds, cfg.data.train_limit, _adjusted(cfg), cfg.clip_norm)
                if key in done:
                    continue
                print(f"skew: {m} {p} seed {seed}", flush=True)
                name = f"{m}-{p}-seed{seed}-r{cfg.train.rounds}" + (
                    "" if _adjusted(cfg) or m.startswith("fl") else "-plain"
                )
                # a clipped cell never resumes the run directory of an unclipped one
                name += f"-clip{cfg.clip_norm:g}" if cfg.clip_norm > 0 else ""
                run_dir = run_in_process(cfg, runs / name, quiet=args.quiet, label="skew")
                rows.append(_row(m, p, cfg, run_dir))
                write_results(out, rows)
    if rows:
        write_results(out, rows)
    print(markdown(rows))
    print(f"results: {out} (skew.json, skew.md, skew.png)")
    return 0
