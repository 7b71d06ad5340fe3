"""What a run reports: progress to a :class:`Reporter`, one ``metrics.jsonl`` row per round, ``summary.json``.

The round loop (:mod:`server.rounds`) and the ``central`` baseline (:mod:`server.central`) both write
their results through here, so the two kinds of run have one summary format.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fsl import tasks
from fsl.config import ExperimentConfig
from fsl.rundir import RunDir

__all__ = ["LogReporter", "Reporter", "RoundNumbers", "max_overlap", "metrics_row", "run_title", "summarize_run"]

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


def max_overlap(intervals: Sequence[tuple[float, float]]) -> int:
    """The largest number of (start, end) intervals that overlap at one instant."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = cur = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


@dataclass
class RoundNumbers:
    """What one round measured, as the phases of :class:`server.rounds.RoundRunner` collected it."""

    rnd: int
    mode: str
    accuracy: float  # central evaluation on the test set (mean over clients' own segments in psl)
    loss: float
    per_client: list[float]  # psl: each client's own segment on the test set; empty otherwise
    fed_rows: list[dict[str, Any]]  # federated evaluation: node_id, examples, accuracy, loss
    eval_failures: int
    train_metrics: list[Any]  # the MetricRecord of every successful train reply
    selected: int  # clients the plan asked to train
    answered: int  # replies received, errors included
    sequential: bool
    replicas: int
    dataplane_up: int
    dataplane_down: int
    control_up: int
    control_down: int
    train_s: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)  # what round hooks add (e.g. ``privacy``)
    task: str = "classify"  # fsl.tasks: a language model's rows add its perplexities
    exit_accuracies: dict[str, float] = field(default_factory=dict)  # multi-exit models: test accuracy by exit


def _weighted(mets: Sequence[Any], key: str, examples: int) -> float | None:
    if not examples:
        return None
    return sum(float(x[key]) * int(x["num-examples"]) for x in mets) / examples


def metrics_row(n: RoundNumbers) -> dict[str, Any]:
    """The round's ``metrics.jsonl`` row (keys and meanings as README's "What a run writes")."""
    mets = n.train_metrics
    examples = sum(int(x["num-examples"]) for x in mets)
    # each client's loss and accuracy are means over its targets (samples, or tokens), so the
    # federated means weigh the clients by them: over all tokens, not a mean of per-client means
    fed_w = [int(r.get("targets", r["examples"])) for r in n.fed_rows]
    fed_n = sum(fed_w)
    row: dict[str, Any] = {
        "round": n.rnd,
        "mode": n.mode,
        "accuracy": n.accuracy,
        "loss": n.loss,
        "client_accuracies": n.per_client,
        "client_accuracy_std": statistics.pstdev(n.per_client) if len(n.per_client) > 1 else None,
        "fed_accuracy": sum(r["accuracy"] * w for r, w in zip(n.fed_rows, fed_w, strict=True)) / fed_n
        if fed_n
        else None,
        "fed_loss": sum(r["loss"] * w for r, w in zip(n.fed_rows, fed_w, strict=True)) / fed_n if fed_n else None,
        "fed_clients": n.fed_rows,
        "train_loss": _weighted(mets, "train_loss", examples),
        "train_accuracy": _weighted(mets, "train_accuracy", examples),
        "clients": len(mets),
        "failures": n.selected - len(mets),  # error replies and clients that never answered (timeout)
        "timeouts": n.selected - n.answered,
        "eval_failures": n.eval_failures,
        "examples": examples,
        "sequential": n.sequential,
        "replicas": n.replicas,
        "max_concurrent_clients": max_overlap([(float(x["started_at"]), float(x["finished_at"])) for x in mets]),
        "bytes_up": n.dataplane_up + n.control_up,
        "bytes_down": n.dataplane_down + n.control_down,
        "dataplane_bytes_up": n.dataplane_up,
        "dataplane_bytes_down": n.dataplane_down,
        "control_bytes_up": n.control_up,
        "control_bytes_down": n.control_down,
        "client_compute_s": sum(float(x["compute_s"]) for x in mets),
        # the device's own peak resident memory: deployment sizes devices by it
        "client_peak_rss_mb": max((float(x["peak_rss_mb"]) for x in mets if "peak_rss_mb" in x), default=None),
        "train_s": n.train_s,
        "seconds": n.seconds,
    }
    if n.task == "causal-lm":  # exp of the mean token negative log-likelihood: test set, clients' held-out text
        row["perplexity"] = tasks.perplexity(n.loss)
        row["fed_perplexity"] = tasks.perplexity(row["fed_loss"]) if row["fed_loss"] is not None else None
    if n.exit_accuracies:  # where a device could stop early, and how good that would be
        row["exit_accuracies"] = n.exit_accuracies
    row.update(n.extra)
    return row


def run_title(cfg: ExperimentConfig) -> str:
    """The title of a run's ``curves.png``."""
    split = "full model" if cfg.mode in ("fl", "central") else f"{cfg.model.name} cut at {cfg.model.cut}"
    if cfg.model.ushaped:
        split += f" and {cfg.model.top_cut} (U-shaped)"
    return f"{cfg.name}: {cfg.mode}, {split}, {cfg.clients} clients"


_HISTORY_KEYS = ("round", "accuracy", "loss", "fed_accuracy", "train_loss", "bytes_up", "bytes_down", "seconds")


def summarize_run(
    cfg: ExperimentConfig, history: list[dict[str, Any]], device: str, wall_s: float, run: RunDir
) -> dict[str, Any]:
    """``summary.json`` of a run from its per-round rows."""
    accs = [h["accuracy"] for h in history]
    rounds_clients = sum(h["clients"] for h in history) or 1
    return {
        "experiment": cfg.name,
        "dataset": cfg.data.name,
        "mode": cfg.mode,
        "model": cfg.model.name,
        "cut": cfg.model.cut if cfg.mode not in ("fl", "central") else None,
        "ushaped": cfg.model.ushaped,
        "clients": cfg.clients,
        "rounds": len(history),
        "device": device,
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max(accs) if accs else None,
        "final_loss": history[-1]["loss"] if history else None,
        "wall_s": wall_s,
        "wall_s_per_round": statistics.fmean(h["seconds"] for h in history) if history else None,
        "bytes_up": sum(h["bytes_up"] for h in history),
        "bytes_down": sum(h["bytes_down"] for h in history),
        "bytes_up_per_client_round": sum(h["bytes_up"] for h in history) / rounds_clients,
        "bytes_down_per_client_round": sum(h["bytes_down"] for h in history) / rounds_clients,
        "run_dir": str(run.path),
        "history": [{k: h.get(k) for k in _HISTORY_KEYS} for h in history],
    }
