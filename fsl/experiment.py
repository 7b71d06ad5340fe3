"""What the ServerApp and the ClientApp both derive from an experiment config."""

from __future__ import annotations

import json
from typing import Any

from fsl.config import ExperimentConfig, from_dict, to_dict
from fsl.data import Dataset, Partition, client_partition, load_dataset
from fsl.models import Split, build_model, split_model

__all__ = ["build_split", "config_from_json", "config_to_json", "local_partition"]


def build_split(cfg: ExperimentConfig, input_shape: tuple[int, ...], num_classes: int) -> Split:
    """The experiment's model, seeded, cut at ``cfg.model.cut``."""
    model = build_model(cfg.model.name, input_shape, num_classes, norm=cfg.model.norm, seed=cfg.seed)
    return split_model(model, cfg.model.cut)


def config_to_json(cfg: ExperimentConfig) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True)


def config_from_json(text: str) -> ExperimentConfig:
    data: dict[str, Any] = json.loads(text)
    cfg: ExperimentConfig = from_dict(ExperimentConfig, data)
    return cfg


def local_partition(
    cfg: ExperimentConfig, partition_id: int, num_partitions: int, data_path: str | None = None
) -> tuple[Dataset, Partition]:
    """The dataset and this client's share of it."""
    ds = load_dataset(cfg.data.name, data_path or cfg.data.path or None)
    part = client_partition(
        ds,
        partition_id,
        num_partitions,
        scheme=cfg.data.partition,
        alpha=cfg.data.alpha,
        seed=cfg.seed,
        val_fraction=cfg.data.val_fraction,
    )
    return ds, part
