"""Run directories: resolved config, per-round metrics, summary, checkpoints, plots.

``runs/<experiment>-<timestamp>/`` holds ``config.toml``, ``metrics.jsonl`` (one
JSON object per round), ``summary.json``, ``checkpoints/round-NNNN/`` (safetensors
and JSON only, never pickle) and ``curves.png``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["Checkpoint", "RunDir"]


@dataclass
class Checkpoint:
    """Everything needed to continue a run after round ``round``."""

    round: int
    client: dict[str, torch.Tensor]  # aggregated client segment
    server: dict[str, torch.Tensor]  # server segment + optimizer state
    extra: dict[str, Any]


class RunDir:
    """One run's directory on disk."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config_path = self.path / "config.toml"
        self.metrics_path = self.path / "metrics.jsonl"
        self.summary_path = self.path / "summary.json"
        self.plot_path = self.path / "curves.png"

    @classmethod
    def create(cls, output_dir: str | Path, name: str) -> RunDir:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(output_dir) / f"{name}-{stamp}"
        path, i = base, 1
        while path.exists():
            i += 1
            path = Path(f"{base}-{i}")
        (path / "checkpoints").mkdir(parents=True)
        return cls(path)

    # ------------------------------------------------------------------ files
    def write_config(self, toml_text: str) -> None:
        _atomic_write(self.config_path, toml_text)

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self, up_to_round: int | None = None) -> list[dict[str, Any]]:
        """Rounds recorded so far (a torn last line from a crash is ignored)."""
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if up_to_round is None or row.get("round", 0) <= up_to_round:
                rows.append(row)
        return rows

    def rewrite_metrics(self, rows: list[dict[str, Any]]) -> None:
        _atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    def write_summary(self, summary: dict[str, Any]) -> None:
        _atomic_write(self.summary_path, json.dumps(summary, indent=2) + "\n")

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self, ckpt: Checkpoint) -> Path:
        """Write round ``ckpt.round`` atomically (a crash mid-write leaves the previous one intact)."""
        from safetensors.torch import save_file

        final = self.path / "checkpoints" / f"round-{ckpt.round:04d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in ckpt.client.items()}, str(tmp / "client.safetensors"))
        save_file({k: v.contiguous() for k, v in ckpt.server.items()}, str(tmp / "server.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"round": ckpt.round, **ckpt.extra}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return final

    def latest_checkpoint(self) -> Checkpoint | None:
        """The newest complete checkpoint, or ``None``."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        done = sorted(p for p in (self.path / "checkpoints").glob("round-*") if not p.name.endswith(".tmp"))
        for p in reversed(done):
            try:
                state = json.loads((p / "state.json").read_text())
                client = load_file(str(p / "client.safetensors"))
                server = load_file(str(p / "server.safetensors"))
            except (OSError, ValueError, KeyError, SafetensorError):
                continue  # damaged: fall back to the one before
            rnd = int(state.pop("round"))
            return Checkpoint(round=rnd, client=client, server=server, extra=state)
        return None

    # ------------------------------------------------------------------ plots
    def plot(self, history: list[dict[str, Any]], title: str) -> Path | None:
        """Test accuracy and loss per round, as ``curves.png``."""
        if not history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        rounds = [h["round"] for h in history]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        panels = (  # (central key, clients' key, clients' label, y label, title)
            ("accuracy", "fed_accuracy", "federated (clients' own data)", "accuracy", "accuracy"),
            ("loss", "train_loss", "train (clients)", "cross-entropy", "loss"),
        )
        for ax, (central, clients, clients_label, ylabel, panel_title) in zip(axes, panels, strict=True):
            ax.plot(rounds, [h[central] for h in history], "o-", label="central test")
            pts = [(h["round"], h[clients]) for h in history if h.get(clients) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), "s--", label=clients_label)
            ax.set(xlabel="round", ylabel=ylabel, title=panel_title)
            ax.grid(alpha=0.3)
            ax.legend()
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(self.plot_path, dpi=110)
        plt.close(fig)
        return self.plot_path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
