"""``fsl run any-model``: models split by their graph, trained federated and split, and centrally.

Each row is one model at one cut on one dataset, trained twice on the same data from the same
initial weights: split (the experiment's mode, 4 clients over the real gRPC data plane in Flower's
simulation engine) and centrally (``mode=central``: one process, the union of the clients'
training partitions, the same SGD settings and epochs). The rows:

- ``minilm-embeddings`` / ``minilm-layer2``: pretrained all-MiniLM-L6-v2 fine-tuned on the
  ``fortunes`` topics, cut after its embeddings and after encoder layer 2
  (``experiments/any-model-minilm.toml``), and after layer 2 in mode ``sl`` (``minilm-layer2-sl``:
  clients in turn, the client segment handed on instead of averaged); all three share one central run;
- ``regnet``: a RegNetX from ``transformers`` on Fashion-MNIST, cut after its first stage
  (``experiments/any-model-regnet.toml``);
- ``custom``: the plug-in model of ``examples/custom_model`` (a skip connection crosses its cut).

Results go to ``experiments/results/any-model/`` (``--quick``: ``<output_dir>/any-model-quick/``):
``results.json`` (one row per model and cut: ``model``, ``cut``, ``dataset``, ``clients``,
``rounds``, ``split_accuracy``, ``central_accuracy``, ``bytes_up_per_client_round``,
``bytes_down_per_client_round``, ``command``, and the detail below) and ``results.md``.

Bytes per client per round are a round's traffic between the server and all clients divided by the
clients and averaged over the rounds, and they count everything that moved: the data plane (per
batch: the tensors crossing the cut up, their gradients down; and the split inference of the
federated evaluation) and Flower's messages (the client segment's weights down for training and for
evaluation, the trained segment up). The two parts are also given apart:
``dataplane_bytes_*_per_client_round`` and ``segment_bytes_*_per_client_round``.

The sweep is resumable: a row already in ``results.json`` with the same settings is skipped, every
finished row is written at once, and an interrupted run resumes from its last checkpoint. Sweep
keys: ``any_model.rows=minilm-layer2,regnet`` picks rows, ``any_model.out=DIR`` where the files go;
any other ``section.key=value`` changes every run of the chosen rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shlex
from pathlib import Path
from typing import Any

from experiments.compare import run_in_process
from fsl.config import ExperimentConfig, load_experiment


@dataclasses.dataclass(frozen=True)
class Row:
    experiment: str  # a name in experiments/ or a path to a TOML file
    overrides: tuple[str, ...] = ()
    central: str = ""  # runs sharing this name share one central run (same model, same data)


ROWS: dict[str, Row] = {
    "minilm-embeddings": Row("any-model-minilm", ("model.cut=bert.embeddings",), central="minilm"),
    "minilm-layer2": Row("any-model-minilm", ("model.cut=bert.encoder.layer.2",), central="minilm"),
    # clients in turn, each handing the client segment to the next (vanilla split learning): no
    # averaging of the client's three transformer layers
    "minilm-layer2-sl": Row("any-model-minilm", ("model.cut=bert.encoder.layer.2", "mode=sl"), central="minilm"),
    "regnet": Row("any-model-regnet", central="regnet"),
    "custom": Row("examples/custom_model/experiment.toml", central="custom"),
}
RESULTS = Path("experiments/results/any-model")
# a CI slice: the plug-in model, one round
QUICK_ROWS = "custom"
QUICK = ["train.rounds=1"]


def row_configs(name: str, overrides: list[str]) -> tuple[ExperimentConfig, ExperimentConfig]:
    """(the split run, the central run) of row ``name`` with ``overrides`` applied to both."""
    if name not in ROWS:
        raise SystemExit(f"any_model.rows: unknown row {name!r}; choose from {list(ROWS)}")
    row = ROWS[name]
    split = load_experiment(row.experiment, [*row.overrides, *overrides])
    split = dataclasses.replace(split, name=f"any-model-{name}")
    central = dataclasses.replace(split, mode="central", name=f"any-model-{row.central or name}-central")
    return split, central


def _digest(cfg: ExperimentConfig) -> str:
    """A short digest of what a run computes, for its directory's name: a finished run is reused only
    for the same settings. The central run ignores the cut, the logit adjustment and the server's
    learning rate, so rows that differ only there share it."""
    import json

    from fsl.config import ExperimentConfig, to_dict

    if cfg.mode == "central":  # what central training ignores
        train = dataclasses.replace(cfg.train, logit_adjust=True, server_lr=cfg.train.lr)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, cut=""), train=train)
    # only the settings that differ from the defaults: a key added later at a default that keeps
    # what runs did before leaves the digest of every earlier run as it was
    settings = _changed(to_dict(dataclasses.replace(cfg, name="")), to_dict(ExperimentConfig()))
    # the gradient bound as this mode resolves it: the same `train.clip_norm` once meant no clipping
    # in the central baseline, so a run from then is never taken for a clipped one
    settings["resolved_clip_norm"] = cfg.clip_norm
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _changed(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that differ from ``defaults``, tables compared key by key."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        d = defaults.get(k)
        if isinstance(v, dict) and isinstance(d, dict):
            sub = _changed(v, d)
            if sub:
                out[k] = sub
        elif v != d:
            out[k] = v
    return out


def _history(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _per_client_round(hist: list[dict[str, Any]], key: str, clients: int) -> float:
    return sum(float(h.get(key) or 0) for h in hist) / max(1, len(hist)) / max(1, clients)


def _command(cfg: ExperimentConfig, name: str, overrides: list[str]) -> str:
    return " ".join(["fsl run any-model", f"any_model.rows={name}", *(shlex.quote(o) for o in overrides)])


def _run_command(row: Row, overrides: list[str], mode: str | None = None) -> str:
    extra = [*row.overrides, *overrides, *([f"mode={mode}"] if mode else [])]
    return " ".join(["fsl run", row.experiment, *(shlex.quote(o) for o in extra)])


def build_row(
    name: str, split: ExperimentConfig, split_dir: Path, central_dir: Path, overrides: list[str]
) -> dict[str, Any]:
    """One results row from a finished split run and its central run."""
    s_sum = json.loads((split_dir / "summary.json").read_text())
    c_sum = json.loads((central_dir / "summary.json").read_text())
    hist = _history(split_dir)
    k = split.clients
    return {
        "row": name,
        "model": split.model.name,
        "cut": split.model.cut,
        "dataset": split.data.name,
        "clients": k,
        "rounds": split.train.rounds,
        "mode": split.mode,
        "split_accuracy": s_sum["final_accuracy"],
        "central_accuracy": c_sum["final_accuracy"],
        "accuracy_gap": c_sum["final_accuracy"] - s_sum["final_accuracy"],
        "bytes_up_per_client_round": s_sum["bytes_up_per_client_round"],
        "bytes_down_per_client_round": s_sum["bytes_down_per_client_round"],
        "dataplane_bytes_up_per_client_round": _per_client_round(hist, "dataplane_bytes_up", k),
        "dataplane_bytes_down_per_client_round": _per_client_round(hist, "dataplane_bytes_down", k),
        "segment_bytes_up_per_client_round": _per_client_round(hist, "control_bytes_up", k),
        "segment_bytes_down_per_client_round": _per_client_round(hist, "control_bytes_down", k),
        "samples_per_round": sum(int(h.get("examples") or 0) for h in hist) / max(1, len(hist)),
        "split_accuracy_per_round": [h["accuracy"] for h in hist],
        "central_accuracy_per_round": [h["accuracy"] for h in _history(central_dir)],
        "train_limit": split.data.train_limit,
        "test_limit": split.data.test_limit,
        "model_options": dict(split.model.options),
        "data_options": dict(split.data.options),
        "batch_size": split.train.batch_size,
        "lr": split.train.lr,
        "server_lr": split.train.server_lr,
        "momentum": split.train.momentum,
        "local_epochs": split.train.local_epochs,
        "lr_schedule": split.train.lr_schedule,
        "logit_adjust": split.train.logit_adjust,
        "split_wall_s_per_round": s_sum["wall_s_per_round"],
        "central_wall_s_per_round": c_sum["wall_s_per_round"],
        "command": _command(split, name, overrides),
        "split_command": _run_command(ROWS[name], overrides) if name in ROWS else None,
        "central_command": _run_command(ROWS[name], overrides, "central") if name in ROWS else None,
        "split_run": str(split_dir),
        "central_run": str(central_dir),
    }


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (
        row["row"],
        row["mode"],
        row["cut"],
        row["rounds"],
        row["train_limit"],
        row["batch_size"],
        row["lr"],
        row["momentum"],
        row.get("lr_schedule", "constant"),
        row["logit_adjust"],
    )


def _fmt_bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| model | cut | mode | dataset | clients | rounds | split acc | central acc | bytes up / client / round "
        "(data plane + segment) | bytes down / client / round (data plane + segment) |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = ""
    for r in rows:
        body += (
            f"| {r['model']} | `{r['cut']}` | {r['mode']}{'' if r.get('logit_adjust', True) else ', plain CE'} | {r['dataset']} | {r['clients']} | {r['rounds']} | "
            f"{r['split_accuracy']:.4f} | {r['central_accuracy']:.4f} | "
            f"{_fmt_bytes(r['bytes_up_per_client_round'])} ({_fmt_bytes(r['dataplane_bytes_up_per_client_round'])}"
            f" + {_fmt_bytes(r['segment_bytes_up_per_client_round'])}) | "
            f"{_fmt_bytes(r['bytes_down_per_client_round'])} ({_fmt_bytes(r['dataplane_bytes_down_per_client_round'])}"
            f" + {_fmt_bytes(r['segment_bytes_down_per_client_round'])}) |\n"
        )
    return head + body


def write_results(out: Path, rows: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    tmp.replace(out / "results.json")  # a crash never leaves a torn file: finished rows survive
    (out / "results.md").write_text(markdown(rows))


def main(args: argparse.Namespace) -> int:
    sweep: dict[str, str] = {"rows": QUICK_ROWS} if args.quick else {}
    overrides: list[str] = [*(QUICK if args.quick else [])]
    for o in args.overrides:
        k, _, v = o.partition("=")
        if k.startswith("any_model."):
            sweep[k[len("any_model.") :]] = v
        else:
            overrides.append(o)
    names = [n for n in sweep.get("rows", ",".join(ROWS)).split(",") if n]
    configs = {n: row_configs(n, overrides) for n in names}  # every row's config is checked before any runs
    base = next(iter(configs.values()))[0] if configs else load_experiment("quickstart", [])
    tag = "any-model-quick" if args.quick else "any-model"
    out = Path(sweep["out"]) if "out" in sweep else (Path(base.output_dir) / tag if args.quick else RESULTS)
    runs = Path(base.output_dir) / tag / "runs"
    rows: list[dict[str, Any]] = (
        json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else []
    )
    for name in names:
        split, central = configs[name]
        t = split.train
        key = (name, split.mode, split.model.cut, t.rounds, split.data.train_limit, t.batch_size, t.lr, t.momentum)
        if any(_key(r) == (*key, t.lr_schedule, t.logit_adjust) for r in rows):
            continue
        central_name = central.name.removeprefix("any-model-")
        central_dir = run_in_process(
            central, runs / f"{central_name}-{_digest(central)}", quiet=args.quiet, label="any-model"
        )
        split_dir = run_in_process(split, runs / f"{name}-{_digest(split)}", quiet=args.quiet, label="any-model")
        rows.append(build_row(name, split, split_dir, central_dir, overrides))
        write_results(out, rows)
    print(markdown(rows))
    print(f"results: {out} (results.json, results.md)")
    return 0
