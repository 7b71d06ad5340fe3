"""The ``central`` baseline: the same model trained on the pooled data of all clients.

It goes through the same runner, metrics and summary as the federated modes: a
"round" is ``train.local_epochs`` passes over the pooled training data, so
``rounds`` means the same number of epochs over the data as in the other modes.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from fsl import tasks
from fsl.config import ExperimentConfig, to_toml
from fsl.data import cat_inputs, client_partition
from fsl.experiment import base_digests, build_model_for, experiment_dataset
from fsl.lora import carried_state, check_base, load_carried
from fsl.models import model_spec
from fsl.rundir import Checkpoint, RunDir
from fsl.training import TrainOptions, evaluate_model, train_local
from server.results import Reporter, summarize_run

__all__ = ["run_central"]


def run_central(cfg: ExperimentConfig, run: RunDir, reporter: Reporter | None = None) -> dict[str, Any]:
    """Train on the union of the clients' training partitions; evaluate after every round."""
    if cfg.server.threads:
        torch.set_num_threads(cfg.server.threads)
    ds = experiment_dataset(cfg)
    parts = [
        client_partition(
            ds,
            i,
            cfg.clients,
            scheme=cfg.data.partition,
            alpha=cfg.data.alpha,
            seed=cfg.seed,
            val_fraction=cfg.data.val_fraction,
        )
        for i in range(cfg.clients)
    ]
    xs = [p.x_train for p in parts]
    x = cat_inputs(xs)
    y = torch.cat([p.y_train for p in parts])
    model = build_model_for(cfg, ds.input_shape, ds.num_classes)
    digests = base_digests(model)  # "client": the whole model here
    task = model_spec(cfg.model.name).task
    history: list[dict[str, Any]] = []
    start, wall_before = 1, 0.0
    ckpt = run.latest_checkpoint()
    if ckpt is not None:
        check_base(ckpt.extra.get("base_digest"), digests, str(run.path))
        load_carried(model, ckpt.client, "model")
        start, wall_before = ckpt.round + 1, float(ckpt.extra.get("wall_s", 0.0))
        history = run.read_metrics(ckpt.round)
        run.rewrite_metrics(history)
    else:
        run.write_config(to_toml(cfg))
    t_start = time.perf_counter()
    for rnd in range(start, cfg.train.rounds + 1):
        t0 = time.perf_counter()
        if reporter is not None:
            reporter.round_start(rnd, cfg.train.rounds, 0, lambda: 0)
        stats = train_local(model, x, y, TrainOptions.from_config(cfg, seed=cfg.seed * 100_003 + rnd, rnd=rnd))
        ev = evaluate_model(model, ds.x_test, ds.y_test, cfg.train.eval_batch_size, task)
        row = {
            "round": rnd,
            "mode": "central",
            "accuracy": ev.accuracy,
            "loss": ev.loss,
            "fed_accuracy": None,
            "train_loss": stats.loss,
            "train_accuracy": stats.accuracy,
            "clients": 1,
            "failures": 0,
            "examples": stats.examples,
            "sequential": True,
            "max_concurrent_clients": 1,
            "bytes_up": 0,
            "bytes_down": 0,
            "client_compute_s": stats.compute_s,
            "train_s": stats.compute_s,
            "seconds": time.perf_counter() - t0,
        }
        if task == "causal-lm":
            row["perplexity"] = tasks.perplexity(ev.loss)
        history.append(row)
        run.append_metrics(row)
        extra: dict[str, Any] = {"wall_s": wall_before + time.perf_counter() - t_start}
        if digests["client"]:  # adapters only (LoRA): the base they adapt, by fingerprint
            extra["base_digest"] = digests
        run.save_checkpoint(
            Checkpoint(rnd, {k: v.detach().clone() for k, v in carried_state(model).items()}, {}, extra)
        )
        if reporter is not None:
            reporter.round_end(row)
    result = summarize_run(cfg, history, "cpu", wall_before + time.perf_counter() - t_start, run)
    result["clients"] = cfg.clients
    run.write_summary(result)
    run.plot(history, f"{cfg.name}: central (pooled data of {cfg.clients} clients)")
    return result
