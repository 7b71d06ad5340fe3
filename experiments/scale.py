"""``fsl run scale``: many clients, a few per round, in Flower's simulation engine.

Runs ``experiments/scale.toml`` with 10, 100 and 1,000 clients, 10 of them training (and 10
evaluating) in each round, each setting in its own process (``fsl run --resume DIR``), and writes
into one run directory:

- ``clients-<N>/``: each setting's own run directory;
- ``scale.json`` / ``scale.md``: one row per setting: ``clients``, ``clients_per_round``,
  ``rounds``, ``seconds_per_round``, ``serverapp_peak_rss_mb`` (the peak resident memory of the
  process the ServerApp runs in: in simulation the engine's driver and the split server run in it
  too), ``final_accuracy``, and ``startup_s`` (the run's time outside its rounds: the engine's start
  and the one query of every node for what it holds), ``client_peak_rss_mb`` (the largest Ray
  worker's), ``split_server_held_clients`` (the split server's per-client tables after the last round);
  and from a probe of the split server alone in a process of its own (:func:`split_server_probe`:
  the same client count, every client in exactly one round, through the in-memory channel):
  ``split_server_peak_rss_mb``, ``split_server_rss_growth_mb`` (what its rounds added to the
  process) and ``split_server_held_in_round`` / ``split_server_held_after_round`` (entries of its
  per-client tables at a round's end, before and after ``end_round``).

Every setting trains and evaluates 10 clients per round on the same 60,000 images cut into more,
smaller partitions (5,400 training samples a client at 10 clients, 54 at 1,000): a round's work
shrinks with the partition, and what could grow with the client count is what the ServerApp, the
engine and the split server keep per client. ``--quick``: 10 and 100 clients, 2 rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from experiments.compare import run_in_process
from fsl.config import ExperimentConfig, load_experiment

CLIENTS = (10, 100, 1000)
QUICK_CLIENTS = (10, 100)
PER_ROUND = 10
QUICK = ["train.rounds=2"]

COLUMNS = [
    ("clients", "clients"),
    ("clients_per_round", "per round"),
    ("rounds", "rounds"),
    ("seconds_per_round", "s / round"),
    ("startup_s", "startup s"),
    ("serverapp_peak_rss_mb", "ServerApp peak RSS MB"),
    ("client_peak_rss_mb", "Ray worker peak RSS MB"),
    ("split_server_peak_rss_mb", "split server probe: peak RSS MB"),
    ("split_server_rss_growth_mb", "split server probe: growth over the rounds MB"),
    ("final_accuracy", "final accuracy"),
]


def setting(base: ExperimentConfig, clients: int, per_round: int = PER_ROUND) -> ExperimentConfig:
    """``base`` with ``clients`` clients, ``per_round`` of them training and evaluating in each round."""
    share = min(1.0, per_round / clients)
    train = dataclasses.replace(base.train, fraction_train=share, fraction_evaluate=share)
    return dataclasses.replace(base, clients=clients, train=train, name=f"scale-{clients}")


def row(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """The ``scale.json`` row of a finished setting."""
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    in_rounds = sum(r["seconds"] for r in rounds)
    return {
        "clients": cfg.clients,
        "clients_per_round": max((r["clients"] for r in rounds), default=0),
        "rounds": len(rounds),
        "seconds_per_round": in_rounds / max(1, len(rounds)),
        "serverapp_peak_rss_mb": summary.get("serverapp_peak_rss_mb"),
        "final_accuracy": summary["final_accuracy"],
        "startup_s": summary["wall_s"] - in_rounds,
        "client_peak_rss_mb": max((r["client_peak_rss_mb"] or 0.0 for r in rounds), default=None),
        "split_server_held_clients": summary.get("split_server_held_clients"),
        "dataplane_bytes_per_round": sum(r["dataplane_bytes_up"] + r["dataplane_bytes_down"] for r in rounds)
        / max(1, len(rounds)),
        "run_dir": str(run_dir),
    }


def split_server_probe(
    cfg: ExperimentConfig, clients: int, per_round: int = PER_ROUND, batches: int = 2
) -> dict[str, Any]:
    """The split server alone, in this process: ``clients`` clients on their own Fashion-MNIST
    partitions, ``per_round`` in each round, every client in exactly one round (so a table that
    kept every client ever seen would end with all of them). Each client sends its first
    ``batches`` batches (a 1,000-client partition's whole epoch) through the in-memory channel (the
    data plane's codec, no sockets); returns this process's peak RSS and the split server's
    per-client tables in and after the rounds."""
    import torch

    from fsl.auth import RoundAuthority
    from fsl.channel import ChannelIdentity, InMemoryChannel
    from fsl.data import client_partition
    from fsl.experiment import build_split, experiment_dataset
    from fsl.memory import peak_rss_mb, rss_mb
    from fsl.models import cut_shape
    from server.split_server import SplitServerState

    torch.manual_seed(cfg.seed)
    ds = experiment_dataset(cfg)
    split = build_split(cfg, ds.input_shape, ds.num_classes)
    auth = RoundAuthority("probe")
    state = SplitServerState(
        split.server,
        sample_shape=cut_shape(split.client, ds.input_shape),
        num_classes=ds.num_classes,
        lr=cfg.train.server_lr,
        momentum=cfg.train.momentum,
        device="cpu",
        authority=auth,
        mode=cfg.mode,
    )
    before = rss_mb()  # the process with its dataset loaded and the segment built, before any round
    held_in, held_after = 0, 0
    bs = cfg.train.batch_size
    for rnd, first in enumerate(range(0, clients, per_round), start=1):
        auth.open_round(rnd)
        members = [str(c) for c in range(first, min(clients, first + per_round))]
        state.open_replicas({c: "g0" for c in members})
        for c in members:
            part = client_partition(ds, int(c), clients, scheme=cfg.data.partition, alpha=cfg.data.alpha, seed=cfg.seed)
            ident = ChannelIdentity(run_id="probe", round=rnd, client_id=c, token=auth.issue(rnd, c))
            ch = InMemoryChannel(server=state, identity=ident)
            for i in range(0, min(len(part.y_train), batches * bs), bs):
                h = split.client(part.x_train[i : i + bs])
                r = ch.train_step(h.detach(), part.y_train[i : i + bs])
                (h * r.grad).sum().backward()  # the client's own backward (its optimizer is irrelevant here)
        held_in = max(held_in, sum(state.held_clients().values()))
        state.merge_replicas()
        auth.close_all()
        state.end_round()
        held_after = max(held_after, sum(state.held_clients().values()))
    return {
        "clients": clients,
        "split_server_peak_rss_mb": peak_rss_mb(),
        # what the rounds added to the process: the split server's own growth (segment copies, optimizer
        # state, per-client tables, the allocator's pools), the dataset and interpreter excluded
        "split_server_rss_growth_mb": rss_mb() - before,
        "split_server_held_in_round": held_in,
        "split_server_held_after_round": held_after,
        "split_server_steps": state.steps,
    }


def _probe(cfg: ExperimentConfig, clients: int) -> dict[str, Any]:
    """:func:`split_server_probe` in a process of its own (its peak memory is the split server's alone)."""
    import subprocess
    import sys

    from fsl.experiment import config_to_json

    print(f"scale: split server alone, {clients} clients", flush=True)
    cmd = [sys.executable, "-m", "experiments.scale", str(clients)]
    out = subprocess.run(cmd, input=config_to_json(cfg), capture_output=True, text=True, check=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if v < 10 else f"{v:.0f}"
    return "-" if v is None else str(v)


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "|".join("---:" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k)) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join([head, rule, *body]) + "\n"


def main(args: argparse.Namespace) -> int:
    from fsl.rundir import RunDir

    base = load_experiment("scale", [*(QUICK if args.quick else []), *args.overrides])
    if getattr(args, "resume", None):  # `fsl run scale --resume DIR`: finished settings are reused
        root = Path(args.resume)
    else:
        root = RunDir.create(base.output_dir, "scale-quick" if args.quick else "scale").path
    print(f"run directory: {root}")
    rows = []
    for n in QUICK_CLIENTS if args.quick else CLIENTS:
        cfg = setting(base, n)
        out = row(cfg, run_in_process(cfg, root / f"clients-{n}", quiet=args.quiet, label="scale"))
        probe = _probe(cfg, n)
        out.update({k: v for k, v in probe.items() if k != "clients"})
        rows.append(out)
        (root / "scale.json").write_text(json.dumps(rows, indent=2) + "\n")  # partial results survive a crash
    (root / "scale.md").write_text(markdown(rows))
    print(markdown(rows))
    print(f"results: {root} (scale.json, scale.md)")
    return 0


if __name__ == "__main__":  # the split-server probe of one client count, the config as JSON on stdin
    import sys

    from fsl.experiment import config_from_json

    print(json.dumps(split_server_probe(config_from_json(sys.stdin.read()), int(sys.argv[1]))))
