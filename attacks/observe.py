"""Read what the recorder stored in a run directory back as an :class:`Observation`.

Only the server's view is read here (``observations/``); ground truth lives in
``ground_truth/`` and is read by the scorer alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from attacks.base import Observation, sample_keys
from server.recorder import update_file

__all__ = ["load_meta", "load_observation", "recorded_rounds"]


def load_meta(run_path: str | Path) -> dict[str, Any]:
    p = Path(run_path) / "observations" / "meta.json"
    if not p.exists():
        raise FileNotFoundError(
            f"{run_path} has no observations/: run the experiment with record.enabled=true "
            "(e.g. `fsl run quickstart record.enabled=true record.rounds=[1]`)"
        )
    meta: dict[str, Any] = json.loads(p.read_text())
    return meta


def recorded_rounds(run_path: str | Path) -> list[int]:
    base = Path(run_path) / "observations"
    return sorted(int(d.name.split("-")[1]) for d in base.glob("round-*") if (d / "index.json").exists())


def _load(path: Path) -> dict[str, torch.Tensor] | None:
    if not path.exists():
        return None
    from safetensors.torch import load_file

    return load_file(str(path))


def load_observation(
    run_path: str | Path, rnd: int | None = None, max_images: int | None = None, client: str | None = None
) -> Observation:
    """The recorded batches of round ``rnd`` (default: the last recorded), in arrival order."""
    meta = load_meta(run_path)
    rounds = recorded_rounds(run_path)
    if not rounds:
        raise FileNotFoundError(f"{run_path}/observations holds no recorded round")
    rnd = rounds[-1] if rnd is None else rnd
    if rnd not in rounds:
        raise ValueError(f"round {rnd} was not recorded; recorded rounds: {rounds}")
    d = Path(run_path) / "observations" / f"round-{rnd:04d}"
    index = json.loads((d / "index.json").read_text())
    data = _load(d / "data.safetensors") or {}
    names = ("activations", "labels", "gradients", "server_outputs", "cut_gradients")
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    keys: list[str] = []
    clients: set[str] = set()
    for row in index:
        if client is not None and row["client"] != client:
            continue
        clients.add(row["client"])
        prefix = f"{row['client']}/{row['step']}"
        for name, bucket in parts.items():
            t = data.get(f"{prefix}/{name}")
            if t is not None:
                bucket.append(t)
        keys += sample_keys(rnd, row["client"], row["step"], row["n"])
    if not parts["activations"]:
        raise ValueError(
            f"round {rnd} of {run_path} has no recorded batches" + (f" of client {client}" if client else "")
        )
    cat = {k: (torch.cat(v) if v else None) for k, v in parts.items()}
    n = len(keys) if max_images is None else min(len(keys), max_images)
    # the segment a client returned belongs to its rows only: loaded when every row is one client's
    only = next(iter(clients)) if len(clients) == 1 else None
    update = _load(update_file(d, only)) if only is not None else None
    obs = Observation(
        activations=cat["activations"],  # type: ignore[arg-type]
        model=meta["model"],
        cut=meta["cut"],
        input_shape=tuple(meta["input_shape"]),
        num_classes=int(meta.get("num_classes", 10)),
        norm=meta.get("norm", ""),
        labels=cat["labels"],
        gradients=cat["gradients"],
        server_outputs=cat["server_outputs"],
        client_segment=_load(d / "client_segment.safetensors"),
        server_segment=_load(d / "server_segment.safetensors"),
        keys=tuple(keys),
        cut_gradients=cat["cut_gradients"],
        client_update=update,
    )
    return obs.subset(slice(0, n))
