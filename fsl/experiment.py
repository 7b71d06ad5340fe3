"""What the ServerApp and the ClientApp both derive from an experiment config."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fsl.config import ExperimentConfig, from_dict, to_dict
from fsl.cutvalues import Signature
from fsl.data import Dataset, Partition, client_partition, load_dataset, subset
from fsl.lora import base_digest, inject_lora
from fsl.models import (
    Example,
    Split,
    USplit,
    build_model,
    build_module,
    cut_shape,
    model_spec,
    split_model,
    split_model_u,
)

__all__ = [
    "base_digests",
    "build_model_for",
    "build_split",
    "client_part",
    "config_from_json",
    "config_to_json",
    "exit_paths",
    "experiment_dataset",
    "local_partition",
    "model_example",
    "server_side",
    "ServerSide",
    "split_for",
    "usplit_for",
    "with_lora",
    "without_lora",
]


def build_model_for(cfg: ExperimentConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The experiment's whole model, seeded (the same initial weights on every node).

    With ``model.exits`` every cut point gets an exit classifier (:mod:`fsl.exits`; a model split by
    its graph: :func:`exit_paths`); with ``[model.lora]`` the model gets LoRA adapters and its base is
    frozen (:func:`with_lora`).
    """
    spec = model_spec(cfg.model.name)
    if spec.graph:
        model = build_module(
            cfg.model.name,
            input_shape or None,
            num_classes,
            norm=cfg.model.norm or None,
            seed=cfg.seed,
            options=cfg.model.options,
        )
        if cfg.model.exits:
            from fsl.exits import add_exits_at, exit_points

            example, _, _ = model_example(cfg, input_shape)
            at = exit_points(model, exit_paths(cfg), example)
            if not at:
                raise ValueError(f"model.exits: no exit can go after {list(exit_paths(cfg))} of {cfg.model.name!r}")
            model = add_exits_at(model, at, num_classes, example, seed=cfg.seed)
        return with_lora(cfg, model, input_shape)
    model = build_model(
        cfg.model.name, input_shape, num_classes, norm=cfg.model.norm, seed=cfg.seed, options=cfg.model.options
    )
    if cfg.model.exits:
        from fsl.exits import add_exits

        model = add_exits(model, input_shape, num_classes, at=model_spec(cfg.model.name).cuts, seed=cfg.seed)
    return with_lora(cfg, model, input_shape)


def exit_paths(cfg: ExperimentConfig) -> tuple[str, ...]:
    """Where ``model.exits`` may put the exits of a model split by its graph: after each cut the zoo
    suggests and after the experiment's cut(s); those where an exit can see which tokens are real
    get one (:func:`fsl.exits.exit_points`: not a transformer's embeddings).

    A module that holds a cut (``bert.encoder.layer.1`` for a cut at ``bert.encoder.layer.1.output``)
    gets no exit: wrapping it would move the cut's path (an exit's block sits at ``<path>.body``).
    """
    cuts = [cfg.model.cut, *([cfg.model.top_cut] if cfg.model.ushaped else [])]
    at = list(dict.fromkeys([*model_spec(cfg.model.name).cuts, *cuts]))
    return tuple(a for a in at if not any(b.startswith(f"{a}.") for b in at))


def without_lora(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with ``[model.lora]`` off: the plain model it adapts."""
    from fsl.config import LoraConfig

    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=LoraConfig()))


def with_lora(cfg: ExperimentConfig, model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """``model`` with the adapters ``[model.lora]`` asks for (in place), or as it is when LoRA is off.

    Adapters on one segment only: the plain model is split at the experiment's cut first (traced
    once per process and cached) to learn which weights that segment holds; the adapters go there
    and the other segment's weights all train. In every mode, ``central`` included, so that a
    baseline trains exactly what the split run trains.
    """
    lora = cfg.model.lora
    if not lora.enabled:
        return model
    side: set[str] | None = None
    if lora.segments != "both":
        client, server = server_side(without_lora(cfg), model, input_shape)
        seg = client if lora.segments == "client" else server.segment
        side = {n for n, _ in seg.named_parameters(remove_duplicate=False)}
    return inject_lora(
        model,
        r=lora.r,
        alpha=lora.alpha,
        dropout=lora.dropout,
        targets=lora.targets,
        trainable=lora.trainable,
        side=side,
        seed=cfg.seed,
    )


def base_digests(client: nn.Module, server: nn.Module | None = None) -> dict[str, str]:
    """The frozen base of each segment, fingerprinted (:func:`fsl.lora.base_digest`; ``""``: nothing frozen)."""
    out = {"client": base_digest(client)}
    if server is not None:
        out["server"] = base_digest(server)
    return out


def model_example(
    cfg: ExperimentConfig, input_shape: tuple[int, ...]
) -> tuple[Example, dict[str, dict[int, str]], dict[str, tuple[int, int]]]:
    """A batch of two inputs of the experiment's kind, to trace the model with, and which input
    dimensions vary between batches within which bounds (:func:`fsl.graphsplit.graph_split`).

    Token models take ``input_ids`` and ``attention_mask`` of any length up to the data's.
    """
    spec = model_spec(cfg.model.name)
    if spec.input_kind == "tokens":
        (length,) = input_shape
        ids = torch.zeros(2, length, dtype=torch.long)
        seq = {1: "seq"}
        example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return example, {"input_ids": seq, "attention_mask": seq}, {"seq": (2, length)}
    return torch.zeros(2, *input_shape), {}, {}


def split_for(cfg: ExperimentConfig, model: nn.Module, input_shape: tuple[int, ...]) -> Split:
    """``model`` cut at ``cfg.model.cut`` (traced on an example of the experiment's inputs when it is
    not a Sequential's block)."""
    example, dynamic, bounds = model_example(cfg, input_shape)
    key = _trace_key(cfg, input_shape)
    return split_model(model, cfg.model.cut, example, dynamic=dynamic, bounds=bounds, cache_key=key)


def usplit_for(cfg: ExperimentConfig, model: nn.Module, input_shape: tuple[int, ...]) -> USplit:
    """``model`` cut at ``cfg.model.cut`` and ``cfg.model.top_cut`` for a U-shaped split."""
    example, dynamic, bounds = model_example(cfg, input_shape)
    key = _trace_key(cfg, input_shape)
    return split_model_u(
        model, cfg.model.cut, cfg.model.top_cut, example, dynamic=dynamic, bounds=bounds, cache_key=key
    )


def _trace_key(cfg: ExperimentConfig, input_shape: tuple[int, ...]) -> str:
    """What decides the traced graph of the experiment's model: its section of the config and the input."""
    return json.dumps([to_dict(cfg)["model"], list(input_shape)], sort_keys=True, default=str)


@dataclass
class ServerSide:
    """What the split server runs for an experiment, and what it accepts at the cut."""

    segment: nn.Module  # the server segment (U-shaped: the middle)
    sample_shape: tuple[int, ...]  # one tensor at the cut: its per-sample shape; () with a signature
    signature: Signature | None  # the named tensors at a traced cut (None: one float tensor)
    task: str  # what the labels are (fsl.tasks)


def server_side(cfg: ExperimentConfig, model: nn.Module, input_shape: tuple[int, ...]) -> tuple[nn.Module, ServerSide]:
    """Split ``model`` as ``cfg`` says: (the client's part, whose state dict travels; the server's side)."""
    task = model_spec(cfg.model.name).task
    if cfg.model.ushaped:
        u = usplit_for(cfg, model, input_shape)
        if u.graph is not None:
            return u.client_modules, ServerSide(u.middle, (), u.graph.signature(1), task)
        return u.client_modules, ServerSide(u.middle, cut_shape(u.bottom, input_shape), None, task)
    sp = split_for(cfg, model, input_shape)
    if sp.graph is not None:
        return sp.client, ServerSide(sp.server, (), sp.graph.signature(1), task)
    return sp.client, ServerSide(sp.server, cut_shape(sp.client, input_shape), None, task)


def build_split(cfg: ExperimentConfig, input_shape: tuple[int, ...], num_classes: int) -> Split:
    """The experiment's model, seeded, cut at ``cfg.model.cut``."""
    return split_for(cfg, build_model_for(cfg, input_shape, num_classes), input_shape)


def client_part(cfg: ExperimentConfig, input_shape: tuple[int, ...], num_classes: int) -> tuple[nn.Module, Any]:
    """What a client trains in ``cfg``'s mode: ``(module whose state dict travels, detail)``.

    ``fl``: the whole model (detail: the model). U-shaped: bottom and top together (detail:
    the :class:`~fsl.models.USplit`). Otherwise the client segment (detail: the :class:`Split`).
    """
    model = build_model_for(cfg, input_shape, num_classes)
    if cfg.mode in ("fl", "central"):
        return model, model
    if cfg.model.ushaped:
        u = usplit_for(cfg, model, input_shape)
        return u.client_modules, u
    s = split_for(cfg, model, input_shape)
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
