"""The attack x defense x cut matrix: the image, label and text leakage studies in one table.

Each study keeps its own result file and keys (``leakage.json``, ``label_leakage.json``,
``text_leakage.json``, ``label_inference.json``); :func:`load` reads them into one row per
(family, attack, cut, defense) with one leakage score each, higher meaning more leaked:

- ``image``: SSIM of the reconstructions on [0, 1] (rMLE, inverse network, query-free; LeNet,
  MNIST-5k and Fashion-MNIST);
- ``label``: ROC AUC of the attacker's scores for the minority class (norm, direction, model
  completion; U-shaped ``cnn`` on an imbalanced binary Fashion-MNIST task); ``label-inference``
  rows score label accuracy (10 classes, direction with one known label per class);
- ``text``: token accuracy of the recovered tokens (split MiniLM).

Beside each score: the task accuracy of the defended model (``task_metric`` says which), and the
epsilon where the defense has one (``epsilon_kind`` says what it bounds). ``DEFENSES`` says what
each of the framework's defenses protects, including those no attack here can measure.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["DEFENSES", "load", "markdown", "plot", "write"]

# what each defense the framework ships protects, and where the matrix measures it
DEFENSES: dict[str, dict[str, str]] = {
    "none": {"protects": "nothing", "config": "-"},
    "noise": {
        "protects": "one release of one sample's activation (per-release epsilon, analytic Gaussian)",
        "config": "[activation_noise] mechanism, noise_multiplier, clip_norm",
    },
    "nopeek": {
        "protects": "activations, empirically (distance correlation with the input); no epsilon",
        "config": "privacy.nopeek_weight",
    },
    "dpsgd": {
        "protects": "the client segment's updates (epsilon over all its steps); not the activations",
        "config": "[privacy.dp]",
    },
    "compression": {"protects": "bandwidth (top-k); any privacy is incidental", "config": "privacy.compression='topk'"},
    "int8": {"protects": "bandwidth (8-bit); any privacy is incidental", "config": "privacy.compression='int8'"},
    "float16": {"protects": "bandwidth (half precision)", "config": "train.wire_dtype='float16'"},
    "bfloat16": {"protects": "bandwidth (bfloat16)", "config": "train.wire_dtype='bfloat16'"},
    "marvell-noise": {
        "protects": "labels in the gradients a U-shaped client returns (Marvell-style noise)",
        "config": "attacks.label_leakage.GradientNoise (the study's own; not a run key yet)",
    },
    "label-dp": {
        "protects": "labels (randomized response once per run, epsilon-label-DP); costs accuracy",
        "config": "privacy.label_dp_epsilon",
    },
    "secure_aggregation": {
        "protects": "each client's segment update from the server (only the sum is seen); not measured "
        "here: no attack in the matrix reads segment updates",
        "config": "privacy.secure_aggregation",
    },
    "central_dp": {
        "protects": "the aggregated update (clip + noise on the server); not measured here",
        "config": "privacy.central_dp_noise, central_dp_clip",
    },
    "splitguard": {
        "protects": "detects a hijacking server (detector.json); not a leakage defense",
        "config": "privacy.splitguard",
    },
}

FAMILIES = ("image", "label", "text")
_LABEL = re.compile(r"^([a-z0-9-]+)(?:\((.*)\))?$")


def _defense(name: str) -> tuple[str, float]:
    """``noise(0.01)`` -> ("noise", 0.01); ``nopeek(3)`` -> ("nopeek", 3.0); ``int8`` -> ("int8", 0.0)."""
    m = _LABEL.match(name)
    if not m:
        return name, 0.0
    try:
        return m.group(1), float(m.group(2)) if m.group(2) else 0.0
    except ValueError:
        return name, 0.0


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


def image_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if not r.get("attack"):  # a diverged cell: kept, with no score
            out.append(_row("image", r["dataset"], "lenet-he", None, r["cut"], r["defense"], r["defense_param"],
                            metric="ssim", task_metric="test accuracy", diverged=True))  # fmt: skip
            continue
        eps_kind = {"noise": "per release (activation noise)", "dpsgd": "DP-SGD, all steps"}.get(r["defense"])
        out.append(
            _row("image", r["dataset"], r.get("model", "lenet-he"), r["attack"], r["cut"], r["defense"],
                 r["defense_param"], metric="ssim", leakage=_finite(r.get("ssim_mean")),
                 task_accuracy=r.get("task_accuracy"), task_metric="test accuracy",
                 epsilon=_finite(r.get("epsilon")), epsilon_kind=eps_kind, psnr=_finite(r.get("psnr_mean")),
                 n=r.get("n_images"))
        )  # fmt: skip
    return out


def label_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        eps = float(r["defense_param"]) if r["defense"] == "label-dp" else None
        out.append(
            _row("label", "fashion-mnist (binary, ~10% positive)", "cnn (U-shaped)", r["attack"], "conv1/fc1",
                 r["defense"], r["defense_param"], metric="auc", leakage=r["auc"],
                 task_accuracy=r.get("task_accuracy"), task_metric="test accuracy", epsilon=eps,
                 epsilon_kind="randomized response, per label" if eps is not None else None, n=r.get("n_scored"))
        )  # fmt: skip
    return out


def label_inference_rows(row: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not row:
        return []
    return [
        _row("label", row.get("dataset", "mnist5k"), "cnn (U-shaped)", "label-inference (direction)", "conv1/fc1",
             "none", 0.0, metric="label_accuracy", leakage=row.get("label_accuracy"), n=row.get("n_images"))
    ]  # fmt: skip


def text_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        kind, param = _defense(r["defense"])
        eps = _finite(r.get("epsilon_per_release"))
        out.append(
            _row("text", "fortunes (5 topics)", r.get("model", "minilm"), r.get("attack"), r["cut"], kind, param,
                 metric="token_accuracy", leakage=r["token_accuracy"], task_accuracy=r.get("task_accuracy"),
                 task_metric="topic probe on what the server receives", epsilon=eps,
                 epsilon_kind="per release (activation noise)" if eps is not None else None, n=r.get("n_tokens"),
                 model_accuracy=r.get("model_accuracy"))
        )  # fmt: skip
    return out


def _row(family: str, dataset: str, model: str, attack: str | None, cut: str, defense: str, param: float,
         **rest: Any) -> dict[str, Any]:  # fmt: skip
    """One matrix row; ``rest``: ``metric``, ``leakage``, ``task_accuracy``, ``task_metric``,
    ``epsilon``, ``epsilon_kind`` (None when absent) and study-specific extras (dropped when None)."""
    row = {"family": family, "dataset": dataset, "model": model, "attack": attack, "cut": cut, "defense": defense,
           "defense_param": float(param)}  # fmt: skip
    for k in ("metric", "leakage", "task_accuracy", "task_metric", "epsilon", "epsilon_kind"):
        row[k] = rest.pop(k, None)
    row.update({k: v for k, v in rest.items() if v is not None})
    return row


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def load(root: str | Path) -> list[dict[str, Any]]:
    """Every matrix row from the study files found in ``root`` (a missing study adds none)."""
    root = Path(root)
    rows: list[dict[str, Any]] = []
    rows += image_rows(_read(root / "leakage.json") or [])
    rows += label_rows(_read(root / "label_leakage.json") or [])
    rows += label_inference_rows(_read(root / "label_inference.json"))
    rows += text_rows(_read(root / "text_leakage.json") or [])
    return rows


def _cell(r: dict[str, Any]) -> str:
    if r.get("diverged"):
        return "diverged"
    s = "–" if r["leakage"] is None else f"{r['leakage']:.3f}"
    if r["task_accuracy"] is not None:
        s += f" ({r['task_accuracy']:.2f})"
    if r["epsilon"] is not None:
        s += f" ε={r['epsilon']:.3g}"
    return s


def _dlabel(r: dict[str, Any]) -> str:
    # nopeek 0 is a control (the same fine-tuning without the penalty), not "no defense"
    shown = r["defense_param"] or r["defense"] == "nopeek"
    return f"{r['defense']} {r['defense_param']:g}" if shown else r["defense"]


def _with_diverged(fr: list[dict[str, Any]], rows: Sequence[dict[str, Any]], fam: str) -> list[dict[str, Any]]:
    """``fr`` plus, for a cell whose training diverged, a row per attack line of its dataset and cut."""
    out = list(fr)
    for d in (r for r in rows if r["family"] == fam and r.get("diverged")):
        attacks = dict.fromkeys(r["attack"] for r in fr if (r["dataset"], r["cut"]) == (d["dataset"], d["cut"]))
        out += [{**d, "attack": a} for a in attacks]
    return out


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One table per family: a line per (dataset, attack, cut), a column per defense."""
    out = []
    for fam in FAMILIES:
        fr = _with_diverged([r for r in rows if r["family"] == fam and r["attack"]], rows, fam)
        if not fr:
            continue
        metrics = sorted({r["metric"] for r in fr})
        defenses = list(dict.fromkeys(_dlabel(r) for r in fr))
        lines = list(dict.fromkeys((r["dataset"], r["attack"], r["cut"]) for r in fr))
        cell = {(r["dataset"], r["attack"], r["cut"], _dlabel(r)): _cell(r) for r in fr}
        task = {r["task_metric"] for r in fr if r["task_metric"]}
        out.append(f"### {fam}: {', '.join(metrics)} (task: {', '.join(sorted(task)) or '-'})\n")
        out.append("| dataset | attack | cut | " + " | ".join(defenses) + " |")
        out.append("|---" * (3 + len(defenses)) + "|")
        for ln in lines:
            out.append(
                f"| {ln[0]} | {ln[1]} | `{ln[2]}` | " + " | ".join(cell.get((*ln, d), "") for d in defenses) + " |"
            )
        out.append("")
    out.append("### what each defense protects\n")
    out.append("| defense | protects | config |\n|---|---|---|")
    out += [f"| {k} | {v['protects']} | `{v['config']}` |" for k, v in DEFENSES.items()]
    return "\n".join(out) + "\n"


def plot(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path | None:
    """A heat map per family: leakage per (attack, cut) line and defense column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fams = [f for f in FAMILIES if any(r["family"] == f and r["attack"] for r in rows)]
    if not fams:
        return None
    fig, axes = plt.subplots(len(fams), 1, figsize=(11, 2.2 + 2.4 * len(fams)), squeeze=False)
    for ax, fam in zip(axes[:, 0], fams, strict=True):
        fr = _with_diverged([r for r in rows if r["family"] == fam and r["attack"]], rows, fam)
        defenses = list(dict.fromkeys(_dlabel(r) for r in fr))
        lines = list(dict.fromkeys((r["dataset"], r["attack"], r["cut"]) for r in fr))
        grid = np.full((len(lines), len(defenses)), np.nan)
        for r in fr:
            i, j = lines.index((r["dataset"], r["attack"], r["cut"])), defenses.index(_dlabel(r))
            if r.get("diverged"):
                ax.text(j, i, "diverged", ha="center", va="center", fontsize=6, color="gray")
            elif r["leakage"] is not None:
                grid[i, j] = r["leakage"]
        lo = 0.5 if fam == "label" else 0.0  # an AUC of 0.5 is chance
        im = ax.imshow(grid, vmin=lo, vmax=1.0, cmap="magma", aspect="auto")
        for i in range(len(lines)):
            for j in range(len(defenses)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if grid[i, j] < (lo + 1) / 2 else "black")  # fmt: skip
        ax.set_xticks(range(len(defenses)), defenses, rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(len(lines)), [f"{d.split(' ')[0]} {a} @ {c}" for d, a, c in lines], fontsize=6)
        ax.set_title(f"{fam}: {fr[0]['metric']} (higher = more leaked)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.02)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write(root: str | Path) -> list[dict[str, Any]]:
    """``matrix.json``, ``matrix.md`` and ``matrix.png`` in ``root`` from the study files there."""
    root = Path(root)
    rows = load(root)
    doc = {"rows": rows, "defenses": DEFENSES, "families": list(FAMILIES)}
    (root / "matrix.json").write_text(json.dumps(doc, indent=2) + "\n")
    (root / "matrix.md").write_text(markdown(rows))
    plot(root / "matrix.png", rows)
    return rows


if __name__ == "__main__":
    import sys

    for d in sys.argv[1:] or ["experiments/results/leakage"]:
        print(markdown(write(d)))
