"""Ground truth for scoring, written by the data owner and read only by the scorer.

The server never sees inputs, so it cannot write them. When recording is on in
an evaluation run, the client keeps the inputs of its first ``max_batches``
training batches and writes them to ``ground_truth/round-NNNN/<client>.npz``
under the same (round, client, step) keys the recorder uses: the i-th batch
the split trainer sends is data-plane step i, one request per batch.

In a Flower run the ClientApp gets this capture as training hooks from
:func:`capture_hooks`, which ``record.ground_truth`` names by import string
(``clients`` never imports ``attacks``); the attack harness wraps its segment
in a :class:`GroundTruthTap` instead. Attack modules never import this module;
only :mod:`attacks.report` does.

Files are plain ``.npz`` arrays (``x``: (N, C, H, W) float32 in [0, 1];
``steps``: (N,) step of each row; ``index``: (N,) row within its batch), read
with ``allow_pickle=False``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from attacks.base import sample_keys
from fsl.training import TrainHooks, TrainStats

__all__ = [
    "GroundTruthCapture",
    "GroundTruthTap",
    "capture_hooks",
    "load_ground_truth",
    "load_ground_truth_labels",
    "sample_keys",
    "write_ground_truth",
]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


class GroundTruthCapture:
    """Keeps the inputs of the first ``max_batches`` batches it is called with: ``{step: (B, C, H, W)}``."""

    def __init__(self, max_batches: int) -> None:
        self.max_batches = max_batches
        self.calls = 0
        self.inputs: dict[int, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> None:
        self.calls += 1
        if self.calls <= self.max_batches:
            self.inputs[self.calls] = x.detach().cpu().float().clone()

    def save(self, run_path: str | Path, rnd: int, client: str) -> Path | None:
        return write_ground_truth(run_path, rnd, client, self.inputs)


class GroundTruthTap(nn.Module):
    """Wraps a client segment; remembers the inputs of its first ``max_batches`` training forwards.

    Parameters and ``state_dict`` stay the segment's own (``self.segment``); only the
    forward is observed, and only in training mode.
    """

    def __init__(self, segment: nn.Module, max_batches: int) -> None:
        super().__init__()
        self.segment = segment
        self.capture = GroundTruthCapture(max_batches)

    @property
    def inputs(self) -> dict[int, torch.Tensor]:
        return self.capture.inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.capture(x)
        return self.segment(x)

    def save(self, run_path: str | Path, rnd: int, client: str) -> Path | None:
        return self.capture.save(run_path, rnd, client)


def write_ground_truth(
    run_path: str | Path,
    rnd: int,
    client: str,
    inputs: dict[int, torch.Tensor],
    labels: dict[int, torch.Tensor] | None = None,
) -> Path | None:
    """Write ``{step: inputs}`` (and ``{step: labels}``) of one client and round; None when there is nothing."""
    if not inputs:
        return None
    steps = sorted(inputs)
    x = np.concatenate([inputs[s].numpy().astype(np.float32) for s in steps])
    step_col = np.concatenate([np.full(len(inputs[s]), s, dtype=np.int64) for s in steps])
    index_col = np.concatenate([np.arange(len(inputs[s]), dtype=np.int64) for s in steps])
    path = Path(run_path) / "ground_truth" / f"round-{rnd:04d}" / f"{_safe(client)}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    extra: dict[str, Any] = {}
    if labels is not None:
        extra["y"] = np.concatenate([labels[s].numpy().astype(np.int64) for s in steps])
    np.savez(tmp, x=x, steps=step_col, index=index_col, client=np.array(client), **extra)
    tmp.replace(path)
    return path


def load_ground_truth(run_path: str | Path, rnd: int | None = None) -> dict[str, torch.Tensor]:
    """Every ground-truth image (of round ``rnd``, or of all rounds) by ``round/client/step/index`` key."""
    base = Path(run_path) / "ground_truth"
    out: dict[str, torch.Tensor] = {}
    dirs = [base / f"round-{rnd:04d}"] if rnd is not None else sorted(base.glob("round-*"))
    for d in dirs:
        r = int(d.name.split("-")[1])
        for f in sorted(d.glob("*.npz")):
            with np.load(f, allow_pickle=False) as z:
                client = str(z["client"])
                for x, s, i in zip(z["x"], z["steps"], z["index"], strict=True):
                    out[f"{r}/{client}/{int(s)}/{int(i)}"] = torch.from_numpy(np.array(x))
    return out


def load_ground_truth_labels(run_path: str | Path, rnd: int | None = None) -> dict[str, int]:
    """The true label of every ground-truth sample that has one, by key."""
    base = Path(run_path) / "ground_truth"
    out: dict[str, int] = {}
    dirs = [base / f"round-{rnd:04d}"] if rnd is not None else sorted(base.glob("round-*"))
    for d in dirs:
        r = int(d.name.split("-")[1])
        for f in sorted(d.glob("*.npz")):
            with np.load(f, allow_pickle=False) as z:
                if "y" not in z:
                    continue
                client = str(z["client"])
                for y, s, i in zip(z["y"], z["steps"], z["index"], strict=True):
                    out[f"{r}/{client}/{int(s)}/{int(i)}"] = int(y)
    return out


def capture_hooks(cfg: Any, conf: Mapping[str, Any], client: str) -> TrainHooks | None:
    """The data owner's ground-truth capture for one training round, as hooks for the client's loop.

    ``cfg`` is the ``ExperimentConfig``, ``conf`` the round's config record, ``client`` this node's id.
    Capture is on when the round's config carries ``record-dir`` (the ServerApp sets it when
    ``record.enabled``) and the round is one ``record.rounds`` names. Only the plain split records
    steps one per batch: a U-shaped client makes two requests per batch and ``fl`` none, so their
    inputs would not line up with the recorder's steps (``None``: nothing to capture).
    """
    run_dir = str(conf.get("record-dir", ""))
    if not run_dir or cfg.mode == "fl" or cfg.model.ushaped:
        return None
    rnd = int(conf["server-round"])
    rounds = cfg.record.round_list(cfg.train.rounds)
    if rounds and rnd not in rounds:
        return None
    capture = GroundTruthCapture(int(cfg.record.max_batches))

    def save(_stats: TrainStats) -> None:
        capture.save(run_dir, rnd, client)

    return TrainHooks(inputs=capture, on_end=save)
