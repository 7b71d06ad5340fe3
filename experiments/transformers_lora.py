"""The LoRA section of ``fsl run transformers``: split LoRA fine-tuning of MiniLM against central.

Two runs of ``experiments/transformers-lora.toml`` from the same pretrained weights and the same
adapters' initial values: split (4 clients over the real gRPC data plane in Flower's simulation
engine, ``mode = "fsl"``) and central (``mode = "central"``: one process, the union of the clients'
training partitions, the same adapters, head, optimizer and epochs). :func:`lora_section` runs both
(or reuses finished runs with the same settings; an interrupted one resumes) and returns the
section's keys:

- ``lora_split_accuracy``, ``lora_central_accuracy``: final test accuracy of each (all 625 test texts;
  ``*_best_accuracy``: the best round's);
- ``adapter_bytes_per_round``: the control plane's bytes in one round of the split run, every client
  together, measured (Flower's messages: the client segment's trained tensors down for training, back
  up, and down again for federated evaluation), averaged over the rounds;
- ``full_segment_bytes``: one copy of the whole client segment (the pretrained embeddings and layers
  0-2 of MiniLM), what each of those messages would carry without LoRA; ``full_segment_bytes_per_round``
  is the round's control plane at that size, and ``adapter_bytes`` one copy of what LoRA sends;
- the dataset, model, cut, LoRA settings, per-round accuracies, run directories and commands.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fsl.config import ExperimentConfig, load_experiment

__all__ = ["EXPERIMENT", "QUICK", "lora_configs", "lora_section"]

EXPERIMENT = "transformers-lora"
# a CI slice: two clients, one round on a few texts (the numbers then mean nothing; the plumbing runs)
QUICK = ("clients=2", "train.rounds=1", "data.train_limit=100", "data.test_limit=50")


def lora_configs(overrides: Sequence[str] = ()) -> tuple[ExperimentConfig, ExperimentConfig]:
    """(the split run, the central run) of the LoRA experiment with ``overrides`` applied to both."""
    split = load_experiment(EXPERIMENT, list(overrides))
    split = dataclasses.replace(split, name="transformers-lora-split")
    central = dataclasses.replace(split, mode="central", name="transformers-lora-central")
    return split, central


def _history(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _dataplane_per_round(hist: Sequence[dict[str, Any]]) -> float:
    """The data plane's bytes (up and down, every client) per round of a run's metrics rows."""
    total = sum(int(h.get("dataplane_bytes_up") or 0) + int(h.get("dataplane_bytes_down") or 0) for h in hist)
    return total / max(1, len(hist))


def _segment_bytes(cfg: ExperimentConfig) -> tuple[int, int]:
    """(one copy of what the split run's client segment sends with LoRA, one copy of the whole
    client segment), as Flower counts an ``ArrayRecord``'s bytes."""
    from flwr.app import ArrayRecord

    from fsl.experiment import build_model_for, experiment_dataset, server_side
    from fsl.lora import adapter_names, carried_state

    ds = experiment_dataset(cfg)
    model = build_model_for(cfg, ds.input_shape, ds.num_classes)
    client, _ = server_side(cfg, model, ds.input_shape)
    adapters = adapter_names(model)
    # the plain segment: every tensor but the adapters, under the model's own names
    whole = {k.replace(".base_layer.", "."): v for k, v in client.state_dict().items() if k not in adapters}
    return ArrayRecord(carried_state(client)).count_bytes(), ArrayRecord(whole).count_bytes()


def _command(overrides: Sequence[str], mode: str | None = None) -> str:
    extra = [*overrides, *([f"mode={mode}"] if mode else [])]
    return " ".join(["fsl run", EXPERIMENT, *(shlex.quote(o) for o in extra)])


def lora_section(
    runs: str | Path = "runs/transformers/runs",
    overrides: Sequence[str] = (),
    *,
    quick: bool = False,
    quiet: bool = True,
) -> dict[str, Any]:
    """Run (or reuse) the split and the central LoRA fine-tune into ``runs`` and return the section.

    ``overrides`` (``section.key=value``) change both runs; ``quick`` runs the CI slice :data:`QUICK`.
    Each run goes in its own process (:func:`experiments.compare.run_in_process`) into a directory
    named by a digest of its settings, so a finished run is reused and an interrupted one resumes.
    """
    from experiments.any_model import _digest
    from experiments.compare import run_in_process

    overrides = [*(QUICK if quick else ()), *overrides]
    split, central = lora_configs(overrides)
    runs = Path(runs)
    central_dir = run_in_process(central, runs / f"lora-central-{_digest(central)}", quiet=quiet, label="lora")
    split_dir = run_in_process(split, runs / f"lora-split-{_digest(split)}", quiet=quiet, label="lora")
    s_sum = json.loads((split_dir / "summary.json").read_text())
    c_sum = json.loads((central_dir / "summary.json").read_text())
    hist = _history(split_dir)
    per_round = [int(h.get("control_bytes_up") or 0) + int(h.get("control_bytes_down") or 0) for h in hist]
    adapter_bytes_per_round = sum(per_round) / max(1, len(per_round))
    adapter_bytes, full_bytes = _segment_bytes(split)
    lora = split.model.lora
    return {
        "dataset": split.data.name,
        "model": split.model.name,
        "lora_model": "sentence-transformers/all-MiniLM-L6-v2" if split.model.name == "minilm" else split.model.name,
        "cut": split.model.cut,
        "clients": split.clients,
        "rounds": split.train.rounds,
        "mode": split.mode,
        "lora_split_accuracy": s_sum["final_accuracy"],
        "lora_central_accuracy": c_sum["final_accuracy"],
        "lora_accuracy_gap_points": 100.0 * (c_sum["final_accuracy"] - s_sum["final_accuracy"]),
        "lora_split_best_accuracy": s_sum["best_accuracy"],
        "lora_central_best_accuracy": c_sum["best_accuracy"],
        "lora_split_accuracy_per_round": [h["accuracy"] for h in hist],
        "lora_central_accuracy_per_round": [h["accuracy"] for h in _history(central_dir)],
        "adapter_bytes_per_round": adapter_bytes_per_round,
        "adapter_bytes": adapter_bytes,
        "full_segment_bytes": full_bytes,
        "full_segment_bytes_per_round": adapter_bytes_per_round / max(1, adapter_bytes) * full_bytes,
        "dataplane_bytes_per_round": _dataplane_per_round(hist),
        "lora": {
            "r": lora.r,
            "alpha": lora.alpha,
            "dropout": lora.dropout,
            "targets": list(lora.targets),
            "segments": lora.segments,
            "trainable": list(lora.trainable),
        },
        "train_limit": split.data.train_limit,
        "test_limit": split.data.test_limit,
        "data_options": dict(split.data.options),
        "batch_size": split.train.batch_size,
        "lr": split.train.lr,
        "server_lr": split.train.server_lr,
        "momentum": split.train.momentum,
        "local_epochs": split.train.local_epochs,
        # the split run clips each segment's steps (train.clip_norm); the central baseline never clips
        "split_clip_norm": split.clip_norm,
        "central_clip_norm": central.clip_norm,
        "split_wall_s_per_round": s_sum.get("wall_s_per_round"),
        "central_wall_s_per_round": c_sum.get("wall_s_per_round"),
        "lora_split_command": _command(overrides),
        "lora_central_command": _command(overrides, "central"),
        "lora_split_run": str(split_dir),
        "lora_central_run": str(central_dir),
    }
