"""Ground truth for scoring, written by the data owner and read only by the scorer.

The server never sees inputs, so it cannot write them. When recording is on in
an evaluation run, the client wraps its segment in a :class:`GroundTruthTap`
that keeps the inputs of its first ``max_batches`` training batches (the batch
that the i-th forward call sees is the batch of data-plane step i, because the
trainer makes exactly one request per forward), and writes them to
``ground_truth/round-NNNN/<client>.npz`` under the same (round, client, step)
keys the recorder uses. Attack modules never import this module; only
:mod:`attacks.report` does.

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

__all__ = [
    "GroundTruthTap",
    "client_hooks",
    "load_ground_truth",
    "load_ground_truth_labels",
    "sample_keys",
    "save_client_ground_truth",
    "write_ground_truth",
]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


class GroundTruthTap(nn.Module):
    """Wraps a client segment; remembers the inputs of its first ``max_batches`` training forwards.

    Parameters and ``state_dict`` stay the segment's own (``self.segment``); only the
    forward is observed, and only in training mode.
    """

    def __init__(self, segment: nn.Module, max_batches: int) -> None:
        super().__init__()
        self.segment = segment
        self.max_batches = max_batches
        self.calls = 0
        self.inputs: dict[int, torch.Tensor] = {}  # step -> (B, C, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls <= self.max_batches:
                self.inputs[self.calls] = x.detach().cpu().float().clone()
        return self.segment(x)

    def save(self, run_path: str | Path, rnd: int, client: str) -> Path | None:
        return write_ground_truth(run_path, rnd, client, self.inputs)


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
    extra = {}
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


def client_hooks(cfg: Any, conf: Mapping[str, Any], segment: nn.Module, rnd: int, seed: int) -> tuple[nn.Module, Any]:
    """What the ClientApp wraps around its training: (segment or a ground-truth tap, release transform).

    The tap is used only when the round's config carries ``record-dir`` (the ServerApp sets it when
    ``record.enabled``) and the round is one ``record.rounds`` names: then the data owner keeps its recorded batches'
    inputs for scoring. The release is the configured activation noise (``None`` when off).
    """
    from fsl.privacy import activation_release

    release = activation_release(getattr(cfg, "activation_noise", None), seed=seed)
    rounds = cfg.record.round_list(cfg.train.rounds) if str(conf.get("record-dir", "")) else None
    if rounds is not None and (not rounds or rnd in rounds):
        return GroundTruthTap(segment, int(cfg.record.max_batches)), release
    return segment, release


def save_client_ground_truth(segment: nn.Module, conf: Mapping[str, Any], rnd: int, client: str) -> None:
    """Write what a :class:`GroundTruthTap` from :func:`client_hooks` kept (nothing for a plain segment)."""
    if isinstance(segment, GroundTruthTap):
        segment.save(str(conf["record-dir"]), rnd, client)
