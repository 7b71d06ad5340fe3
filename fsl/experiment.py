"""What the ServerApp and the ClientApp both derive from an experiment config."""

from __future__ import annotations

import json
from typing import Any

from torch import nn

from fsl.config import ExperimentConfig, from_dict, to_dict
from fsl.data import Dataset, Partition, client_partition, load_dataset, subset
from fsl.models import Split, build_model, model_spec, split_model, split_model_u

__all__ = [
    "build_model_for",
    "build_split",
    "client_part",
    "config_from_json",
    "config_to_json",
    "experiment_dataset",
    "local_partition",
]


def build_model_for(cfg: ExperimentConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """The experiment's whole model, seeded (the same initial weights on every node).

    With ``model.exits`` every cut point gets an exit classifier (:mod:`fsl.exits`).
    """
    model = build_model(
        cfg.model.name, input_shape, num_classes, norm=cfg.model.norm, seed=cfg.seed, options=cfg.model.options
    )
    if cfg.model.exits:
        from fsl.exits import add_exits

        model = add_exits(model, input_shape, num_classes, at=model_spec(cfg.model.name).cuts, seed=cfg.seed)
    return model


def build_split(cfg: ExperimentConfig, input_shape: tuple[int, ...], num_classes: int) -> Split:
    """The experiment's model, seeded, cut at ``cfg.model.cut``."""
    return split_model(build_model_for(cfg, input_shape, num_classes), cfg.model.cut)


def client_part(cfg: ExperimentConfig, input_shape: tuple[int, ...], num_classes: int) -> tuple[nn.Module, Any]:
    """What a client trains in ``cfg``'s mode: ``(module whose state dict travels, detail)``.

    ``fl``: the whole model (detail: the model). U-shaped: bottom and top together (detail:
    the :class:`~fsl.models.USplit`). Otherwise the client segment (detail: the :class:`Split`).
    """
    model = build_model_for(cfg, input_shape, num_classes)
    if cfg.mode in ("fl", "central"):
        return model, model
    if cfg.model.ushaped:
        u = split_model_u(model, cfg.model.cut, cfg.model.top_cut)
        return u.client_modules, u
    s = split_model(model, cfg.model.cut)
    return s.client, s


def config_to_json(cfg: ExperimentConfig) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True)


def config_from_json(text: str) -> ExperimentConfig:
    data: dict[str, Any] = json.loads(text)
    cfg: ExperimentConfig = from_dict(ExperimentConfig, data)
    return cfg


def experiment_dataset(cfg: ExperimentConfig, data_path: str | None = None) -> Dataset:
    """The experiment's dataset, with ``data.train_limit`` / ``data.test_limit`` applied."""
    ds = load_dataset(cfg.data.name, data_path or cfg.data.path or None, cfg.data.options)
    return subset(ds, cfg.data.train_limit, cfg.data.test_limit, cfg.seed)


def local_partition(
    cfg: ExperimentConfig, partition_id: int, num_partitions: int, data_path: str | None = None
) -> tuple[Dataset, Partition]:
    """The dataset and this client's share of it."""
    ds = experiment_dataset(cfg, data_path)
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
