"""The Flower ServerApp: owns the round loop of split training.

Per round it opens the round on the data plane (a fresh credential per
selected client), sends each client the current client segment and the
round's config, aggregates the returned segments with a Flower strategy
(FedAvg by default), asks clients for federated evaluation by split inference,
evaluates the joined model on the held-out test set, and writes metrics and a
checkpoint of both segments. The split server runs in this process on a port
the OS picks. A run directory with checkpoints resumes where it stopped.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp import strategy as fl_strategy

from clients.trainer import evaluate_model
from fsl.auth import RoundAuthority
from fsl.config import ExperimentConfig, load_experiment, to_toml
from fsl.data import load_dataset
from fsl.experiment import build_split, config_to_json
from fsl.models import cut_shape, join_segments
from fsl.rundir import Checkpoint, RunDir
from server.split_server import SplitServer, SplitServerState

__all__ = ["Reporter", "app", "make_server_app", "make_strategy", "run_fsl"]

log = logging.getLogger("fsl.server")


class Reporter(Protocol):
    """Receives progress of a run (the CLI shows it; the default logs it)."""

    def round_start(self, rnd: int, rounds: int, expected_samples: int, done: Callable[[], int]) -> None: ...

    def round_end(self, row: dict[str, Any]) -> None: ...


class LogReporter:
    def round_start(self, rnd: int, rounds: int, expected_samples: int, done: Callable[[], int]) -> None:
        log.info("round %d/%d: training on ~%d samples", rnd, rounds, expected_samples)

    def round_end(self, row: dict[str, Any]) -> None:
        log.info(
            "round %d: accuracy %.4f loss %.4f (%.1fs)", row["round"], row["accuracy"], row["loss"], row["seconds"]
        )


def make_strategy(cfg: ExperimentConfig) -> fl_strategy.FedAvg:
    """The Flower strategy named by ``cfg.train.strategy``, sampling as configured."""
    n = cfg.clients
    common: dict[str, Any] = {
        "fraction_train": cfg.train.fraction_train,
        "fraction_evaluate": cfg.train.fraction_evaluate,
        "min_train_nodes": max(1, min(cfg.train.min_clients, n)),
        "min_evaluate_nodes": 1 if cfg.train.fraction_evaluate > 0 else 0,
        "min_available_nodes": max(1, min(cfg.train.min_clients, n)),
    }
    name = cfg.train.strategy
    if name == "fedavg":
        return fl_strategy.FedAvg(**common)
    if name == "fedavgm":
        return fl_strategy.FedAvgM(**common, server_momentum=0.9)
    if name == "fedprox":
        return fl_strategy.FedProx(**common, proximal_mu=cfg.train.proximal_mu)
    if name == "fedadam":
        return fl_strategy.FedAdam(**common)
    if name == "fedyogi":
        return fl_strategy.FedYogi(**common)
    if name == "fedadagrad":
        return fl_strategy.FedAdagrad(**common)
    if name == "fedmedian":
        return fl_strategy.FedMedian(**common)
    if name == "fedtrimmedavg":
        return fl_strategy.FedTrimmedAvg(**common)
    raise ValueError(f"unknown strategy {name!r}")  # the config validator makes this unreachable


def _with_credentials(
    messages: Iterable[Message], base: dict[str, Any], authority: RoundAuthority, rnd: int
) -> list[Message]:
    """One message per node, each with its own data-plane credential (the strategy shares one record)."""
    out = []
    for m in messages:
        node = m.metadata.dst_node_id
        shared = m.content
        conf = dict(shared["config"]) if "config" in shared else {}
        conf.update(base)
        conf["dataplane-token"] = authority.issue(rnd, str(node))
        content = RecordDict({k: v for k, v in shared.items() if k != "config"})
        content["config"] = ConfigRecord(conf)
        out.append(Message(content=content, dst_node_id=node, message_type=m.metadata.message_type))
    return out


@dataclass
class _Round:
    replies: int = 0
    failures: int = 0
    examples: int = 0
    train_loss: float | None = None
    train_accuracy: float | None = None
    client_compute_s: float = 0.0
    control_up: int = 0


def _train_summary(replies: list[Message]) -> _Round:
    r = _Round()
    loss_sum = acc_sum = 0.0
    for m in replies:
        if m.has_error():
            r.failures += 1
            continue
        met = m.content["metrics"]
        n = int(met["num-examples"])  # type: ignore[arg-type]
        r.replies += 1
        r.examples += n
        loss_sum += float(met["train_loss"]) * n  # type: ignore[arg-type]
        acc_sum += float(met["train_accuracy"]) * n  # type: ignore[arg-type]
        r.client_compute_s += float(met["compute_s"])  # type: ignore[arg-type]
        r.control_up += m.content["arrays"].count_bytes()  # type: ignore[union-attr]
    if r.examples:
        r.train_loss, r.train_accuracy = loss_sum / r.examples, acc_sum / r.examples
    return r


def run_fsl(
    grid: Grid,
    cfg: ExperimentConfig,
    run: RunDir,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Run (or resume) experiment ``cfg`` in mode ``fsl`` on ``grid``; returns the summary."""
    reporter = reporter or LogReporter()
    random.seed(cfg.seed)  # Flower's node sampling draws from `random`
    if cfg.server.threads:
        torch.set_num_threads(cfg.server.threads)
    ds = load_dataset(cfg.data.name, cfg.data.path or None)
    split = build_split(cfg, ds.input_shape, ds.num_classes)
    eval_model = copy.deepcopy(join_segments(split.client, split.server))  # CPU copy for central evaluation
    run_id = run.path.name
    authority = RoundAuthority(run_id)
    state = SplitServerState(
        split.server,
        sample_shape=cut_shape(split.client, ds.input_shape),
        num_classes=ds.num_classes,
        lr=cfg.train.server_lr,
        momentum=cfg.train.momentum,
        weight_decay=cfg.train.weight_decay,
        device=cfg.server.device,
        max_batch=cfg.server.max_batch,
        authority=authority,
        model_name=cfg.model.name,
        cut=cfg.model.cut,
        mode=cfg.mode,
        max_message_bytes=cfg.server.max_message_mb * 1024 * 1024,
    )
    history: list[dict[str, Any]] = []
    start_round, wall_before = 1, 0.0
    ckpt = run.latest_checkpoint()
    if ckpt is not None:
        split.client.load_state_dict(ckpt.client)
        state.load_state_tensors(ckpt.server)
        start_round = ckpt.round + 1
        wall_before = float(ckpt.extra.get("wall_s", 0.0))
        history = run.read_metrics(ckpt.round)
        run.rewrite_metrics(history)  # drop rows of a round that did not finish
        log.info("resuming %s after round %d", run.path, ckpt.round)
    else:
        run.write_config(to_toml(cfg))

    strategy = make_strategy(cfg)
    arrays = ArrayRecord(split.client.state_dict())
    t_start = time.perf_counter()
    server = SplitServer(state, cfg.server.address).start()
    base = {"experiment": config_to_json(cfg), "run-id": run_id, "dataplane-address": server.address}
    n_train = int(round(len(ds.y_train) * (1 - cfg.data.val_fraction)))
    try:
        for rnd in range(start_round, cfg.train.rounds + 1):
            t0 = time.perf_counter()
            authority.open_round(rnd)
            traffic0 = state.traffic()
            samples0 = sum(s.samples for s in traffic0.values())
            reporter.round_start(
                rnd,
                cfg.train.rounds,
                int(n_train * cfg.train.fraction_train * cfg.train.local_epochs),
                lambda s0=samples0: sum(s.samples for s in state.traffic().values()) - s0,
            )
            # ---- training: configure_train -> clients -> aggregate_train
            msgs = _with_credentials(
                strategy.configure_train(rnd, arrays, ConfigRecord({}), grid), base, authority, rnd
            )
            replies = list(grid.send_and_receive(msgs, timeout=cfg.train.round_timeout_s))
            summary = _train_summary(replies)
            new_arrays, _ = strategy.aggregate_train(rnd, [m for m in replies if not m.has_error()])
            if new_arrays is not None:
                arrays = new_arrays
            control_down = arrays.count_bytes() * len(msgs)
            t_train = time.perf_counter() - t0
            # ---- federated evaluation: split inference on each client's own held-out data
            fed_rows: list[dict[str, Any]] = []
            if cfg.train.fraction_evaluate > 0:
                emsgs = _with_credentials(
                    strategy.configure_evaluate(rnd, arrays, ConfigRecord({}), grid), base, authority, rnd
                )
                control_down += arrays.count_bytes() * len(emsgs)
                for m in grid.send_and_receive(emsgs, timeout=cfg.train.round_timeout_s):
                    if m.has_error():
                        summary.failures += 1
                        continue
                    met = m.content["metrics"]
                    fed_rows.append(
                        {
                            "node_id": m.metadata.src_node_id,
                            "examples": int(met["num-examples"]),  # type: ignore[arg-type]
                            "accuracy": float(met["eval_accuracy"]),  # type: ignore[arg-type]
                            "loss": float(met["eval_loss"]),  # type: ignore[arg-type]
                        }
                    )
            authority.close_all()
            # ---- central evaluation of the joined model on the test set
            eval_model.load_state_dict({**arrays.to_torch_state_dict(), **state.segment_state_dict()})
            central = evaluate_model(eval_model, ds.x_test, ds.y_test, cfg.train.eval_batch_size)
            traffic1 = state.traffic()
            dp_up = sum(s.bytes_up for s in traffic1.values()) - sum(s.bytes_up for s in traffic0.values())
            dp_down = sum(s.bytes_down for s in traffic1.values()) - sum(s.bytes_down for s in traffic0.values())
            fed_n = sum(r["examples"] for r in fed_rows)
            row = {
                "round": rnd,
                "accuracy": central.accuracy,
                "loss": central.loss,
                "fed_accuracy": sum(r["accuracy"] * r["examples"] for r in fed_rows) / fed_n if fed_n else None,
                "fed_loss": sum(r["loss"] * r["examples"] for r in fed_rows) / fed_n if fed_n else None,
                "fed_clients": fed_rows,
                "train_loss": summary.train_loss,
                "train_accuracy": summary.train_accuracy,
                "clients": summary.replies,
                "failures": summary.failures,
                "examples": summary.examples,
                "bytes_up": dp_up + summary.control_up,
                "bytes_down": dp_down + control_down,
                "dataplane_bytes_up": dp_up,
                "dataplane_bytes_down": dp_down,
                "control_bytes_up": summary.control_up,
                "control_bytes_down": control_down,
                "client_compute_s": summary.client_compute_s,
                "train_s": t_train,
                "seconds": time.perf_counter() - t0,
            }
            history.append(row)
            run.append_metrics(row)
            run.save_checkpoint(
                Checkpoint(
                    round=rnd,
                    client=arrays.to_torch_state_dict(),
                    server=state.state_tensors(),
                    extra={"wall_s": wall_before + time.perf_counter() - t_start, "run_id": run_id},
                )
            )
            reporter.round_end(row)
    finally:
        server.stop()
    result = _summary(cfg, history, str(state.torch_device), wall_before + time.perf_counter() - t_start, run)
    run.write_summary(result)
    run.plot(history, f"{cfg.name}: {cfg.mode}, {cfg.model.name} cut at {cfg.model.cut}, {cfg.clients} clients")
    return result


def _summary(
    cfg: ExperimentConfig, history: list[dict[str, Any]], device: str, wall_s: float, run: RunDir
) -> dict[str, Any]:
    accs = [h["accuracy"] for h in history]
    rounds_clients = sum(h["clients"] for h in history) or 1
    return {
        "experiment": cfg.name,
        "dataset": cfg.data.name,
        "mode": cfg.mode,
        "model": cfg.model.name,
        "cut": cfg.model.cut,
        "clients": cfg.clients,
        "rounds": len(history),
        "device": device,
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max(accs) if accs else None,
        "final_loss": history[-1]["loss"] if history else None,
        "wall_s": wall_s,
        "bytes_up": sum(h["bytes_up"] for h in history),
        "bytes_down": sum(h["bytes_down"] for h in history),
        "bytes_up_per_client_round": sum(h["bytes_up"] for h in history) / rounds_clients,
        "bytes_down_per_client_round": sum(h["bytes_down"] for h in history) / rounds_clients,
        "run_dir": str(run.path),
        "history": [
            {
                k: h[k]
                for k in (
                    "round",
                    "accuracy",
                    "loss",
                    "fed_accuracy",
                    "train_loss",
                    "bytes_up",
                    "bytes_down",
                    "seconds",
                )
            }
            for h in history
        ],
    }


def make_server_app(cfg: ExperimentConfig, run: RunDir, reporter: Reporter | None = None) -> ServerApp:
    """A ServerApp bound to a config and run directory (what `fsl run` uses)."""
    sapp = ServerApp()
    out: dict[str, Any] = {}

    @sapp.main()
    def _main(grid: Grid, context: Context) -> None:
        out["summary"] = run_fsl(grid, cfg, run, reporter)

    sapp.result = out  # type: ignore[attr-defined]
    return sapp


# ------------------------------------------------------------------ `flwr run .`
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for Flower's engines: the experiment comes from the run config."""
    rc = context.run_config
    resume = str(rc.get("resume", ""))
    overrides = str(rc.get("overrides", "")).split()
    if resume:
        run = RunDir(resume)
        cfg = load_experiment(str(run.config_path), overrides)
    else:
        cfg = load_experiment(str(rc.get("experiment", "quickstart")), overrides)
        run = RunDir.create(cfg.output_dir, cfg.name)
    log.warning("run directory: %s", run.path.resolve())
    run_fsl(grid, cfg, run)
