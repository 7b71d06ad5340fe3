"""``fsl run transformers``: pretrained and from-scratch transformers over the real data plane.

One results file, ``experiments/results/transformers/results.json``, that other tools read, made of
sections; each section runs (or reuses) its own runs and its keys are merged into the file, so a
section can be rerun alone and a sweep that stopped keeps what finished:

``lora``
    split LoRA fine-tuning of pretrained all-MiniLM-L6-v2 by 4 clients over gRPC against the same
    adapters trained centrally (:func:`experiments.transformers_lora.lora_section`):
    ``lora_split_accuracy``, ``lora_central_accuracy``, ``adapter_bytes_per_round``,
    ``full_segment_bytes``.
``lm``
    a GPT-2-style decoder trained from scratch on the Debian fortunes, U-shaped (tokens and
    next-token labels stay on the client), against a unigram model of the same text
    (:func:`lm_section`): ``lm_perplexity_by_round``, ``lm_unigram_perplexity``.
``compression``
    what the hidden states and their gradients travel as on the data plane (float32, float16,
    bfloat16, int8) and what each costs in accuracy and saves in bytes, on the LoRA fine-tune
    (:func:`compression_section`): ``compression``.
``lengths``
    the same fine-tune with batches of uniformly drawn texts (each trimmed to its longest) and of
    texts of about one length (``train.length_buckets``): accuracy, bytes, seconds
    (:func:`lengths_section`): ``lengths``, ``lengths_bytes_saved``.
``dc``
    data-cartography routing of a multi-exit MiniLM between device, edge and cloud against the
    seed's baselines (:mod:`experiments.transformers_routing`): ``dc_cost_reduction_vs_cloud``,
    ``dc_accuracy_drop_points``.
``sched``
    the mobile-cloud scheduler on the measured per-block profiles of RegNetX-400MF and MiniLM
    (:func:`experiments.transformers_sched.scheduler_section`, on the saved profiles unless
    ``transformers.measure=true``): ``scheduler_server_compute_reduction_vs_cloud``,
    ``scheduler_sla_attainment``.

Usage::

    fsl run transformers                                  # every section
    fsl run transformers transformers.sections=lm,sched   # some of them
    fsl run transformers --quick                          # every section on a CI-sized slice

Other ``section.key=value`` overrides apply to the LoRA runs (``lora`` and ``compression``), e.g.
``seed=1``. ``--quick`` writes to ``<output_dir>/transformers-quick/results.json`` and never
touches the committed results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from experiments.transformers_lora import _dataplane_per_round, _history
from fsl.config import ExperimentConfig, load_experiment

__all__ = [
    "RESULTS",
    "SECTIONS",
    "compression_section",
    "falling_rounds",
    "lengths_section",
    "lm_section",
    "main",
    "merge_results",
]

RESULTS = Path("experiments/results/transformers")
LM_EXPERIMENT = "transformers-lm"
# a CI slice of the language model: 2 clients, 2 rounds on a few hundred texts
LM_QUICK = ("clients=2", "train.rounds=2", "data.train_limit=200", "data.test_limit=100")
# the data plane's encodings compared by the compression section, as overrides of the LoRA runs
CODECS: dict[str, tuple[str, ...]] = {
    "float32": (),
    "float16": ("train.wire_dtype=float16",),
    "bfloat16": ("train.wire_dtype=bfloat16",),
    "int8": ("privacy.compression=int8",),
}


def merge_results(path: Path, section: dict[str, Any]) -> dict[str, Any]:
    """Merge ``section``'s keys into the JSON object at ``path`` (created if missing) and return it.

    Written to a temporary file and renamed, so a crash never leaves a torn file and the other
    sections' keys survive."""
    doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    doc.update(section)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=float) + "\n")
    tmp.replace(path)
    return doc


def falling_rounds(values: Sequence[float]) -> int:
    """How many rounds, from the first, each end strictly below the one before (the first counts):
    ``[5, 4, 3, 3.5]`` -> 3."""
    n = 1 if values else 0
    while n < len(values) and values[n] < values[n - 1]:
        n += 1
    return n


def _command(experiment: str, overrides: Sequence[str]) -> str:
    return " ".join(["fsl run", experiment, *(shlex.quote(o) for o in overrides)])


def lm_config(overrides: Sequence[str] = ()) -> ExperimentConfig:
    return dataclasses.replace(load_experiment(LM_EXPERIMENT, list(overrides)), name="transformers-lm")


def lm_section(runs: Path, overrides: Sequence[str] = (), *, quiet: bool = True) -> dict[str, Any]:
    """Train the U-shaped GPT-2 of ``experiments/transformers-lm.toml`` (or reuse its finished run) and
    compare its test perplexity per round with a unigram model counted from the same training text.

    The unigram model is fitted on every client's training labels together (the text the federation
    learnt from) and scored on the same test labels, padding left out as the model's loss leaves it
    out (:func:`fsl.tasks.unigram_perplexity`, add-one smoothing over the 30,522-token vocabulary).
    """
    from experiments.any_model import _digest
    from experiments.compare import run_in_process
    from fsl.experiment import experiment_dataset
    from fsl.tasks import unigram_perplexity

    cfg = lm_config(overrides)
    run = run_in_process(cfg, runs / f"lm-{_digest(cfg)}", quiet=quiet, label="lm")
    hist = _history(run)
    ppl = [float(h["perplexity"]) for h in hist]
    ds = experiment_dataset(cfg)
    unigram = unigram_perplexity(ds.y_train, ds.y_test, ds.num_classes)
    summary = json.loads((run / "summary.json").read_text())
    return {
        "lm_dataset": cfg.data.name,
        "lm_model": (
            f"GPT-2 ({cfg.model.options.get('num_layers')} blocks, width {cfg.model.options.get('hidden_size')}, "
            f"{cfg.model.options.get('num_heads')} heads, from a transformers config, random init), "
            f"U-shaped: client {cfg.model.cut} and below + the blocks after {cfg.model.top_cut}, server between"
        ),
        "lm_mode": cfg.mode,
        "lm_clients": cfg.clients,
        "lm_rounds": cfg.train.rounds,
        "lm_perplexity_by_round": ppl,
        "lm_fed_perplexity_by_round": [h.get("fed_perplexity") for h in hist],
        "lm_unigram_perplexity": unigram,
        "lm_rounds_falling": falling_rounds(ppl),
        "lm_below_unigram": bool(ppl and ppl[-1] < unigram),
        "lm_train_texts": len(ds.y_train),
        "lm_test_texts": len(ds.y_test),
        "lm_test_tokens": int((ds.y_test >= 0).sum()),
        "lm_wall_s_per_round": summary.get("wall_s_per_round"),
        "lm_dataplane_bytes_per_round": _dataplane_per_round(hist),
        "lm_command": _command(LM_EXPERIMENT, overrides),
        "lm_run": str(run),
    }


def _split_run(
    runs: Path, prefix: str, overrides: Sequence[str], *, label: str, quiet: bool
) -> tuple[dict[str, Any], ExperimentConfig, list[dict[str, Any]]]:
    """The split LoRA fine-tune with ``overrides`` (run, or reused from ``runs/PREFIX-DIGEST``):
    its row of common figures, its config and its metrics rows. The split run only: some variants
    (a compressed data plane) have no central counterpart."""
    from experiments.any_model import _digest
    from experiments.compare import run_in_process
    from experiments.transformers_lora import EXPERIMENT

    split = dataclasses.replace(load_experiment(EXPERIMENT, list(overrides)), name="transformers-lora-split")
    run = run_in_process(split, runs / f"{prefix}-{_digest(split)}", quiet=quiet, label=label)
    summary = json.loads((run / "summary.json").read_text())
    hist = _history(run)
    row = {
        "accuracy": summary["final_accuracy"],
        "best_accuracy": summary["best_accuracy"],
        "accuracy_per_round": [h["accuracy"] for h in hist],
        "dataplane_bytes_per_round": _dataplane_per_round(hist),
        "command": _command(EXPERIMENT, overrides),
        "run": str(run),
    }
    return row, split, hist


def compression_section(
    runs: Path, overrides: Sequence[str] = (), *, codecs: Sequence[str] = tuple(CODECS), quiet: bool = True
) -> dict[str, Any]:
    """The split LoRA fine-tune once per data-plane encoding of the hidden states and their gradients:
    final and best test accuracy, the data plane's bytes per round, and the accuracy cost against
    float32 in points (positive: the encoding lost accuracy)."""
    rows: dict[str, dict[str, Any]] = {}
    for codec in codecs:
        if codec not in CODECS:
            raise ValueError(f"unknown encoding {codec!r}; choose from {list(CODECS)}")
        over = [*overrides, *CODECS[codec]]
        rows[codec], _, _ = _split_run(runs, "lora-split", over, label=f"compression {codec}", quiet=quiet)
    base = rows.get("float32")
    for r in rows.values():
        if base is not None:
            r["accuracy_cost_points"] = 100.0 * (base["accuracy"] - r["accuracy"])
            r["bytes_ratio_vs_float32"] = r["dataplane_bytes_per_round"] / max(1.0, base["dataplane_bytes_per_round"])
    return {"compression": rows}


def lengths_section(
    runs: Path, overrides: Sequence[str] = (), *, buckets: int = 16, quiet: bool = True
) -> dict[str, Any]:
    """The split LoRA fine-tune with batches drawn uniformly (each trimmed to its longest text) and
    from pools sorted by length (``train.length_buckets``): accuracy, the data plane's bytes and
    the seconds per round of each. Both runs are made here, with the same code, in directories of
    their own."""
    rows: dict[str, dict[str, Any]] = {}
    for tag, extra in (("uniform", ()), ("bucketed", (f"train.length_buckets={buckets}",))):
        row, split, hist = _split_run(runs, f"lengths-{tag}", [*overrides, *extra], label=f"lengths {tag}", quiet=quiet)
        row["length_buckets"] = split.train.length_buckets
        # the first round also starts Flower's engine and builds the segments
        row["seconds_per_round_after_first"] = sum(float(h["seconds"]) for h in hist[1:]) / max(1, len(hist) - 1)
        rows[tag] = row
    u, b = rows["uniform"], rows["bucketed"]
    return {
        "lengths": rows,
        "lengths_bytes_saved": 1.0 - b["dataplane_bytes_per_round"] / max(1.0, u["dataplane_bytes_per_round"]),
        "lengths_accuracy_change_points": 100.0 * (b["accuracy"] - u["accuracy"]),
    }


LORA_SEEDS = (0, 1)


def _lora(runs: Path, overrides: Sequence[str], quick: bool, quiet: bool, measure: bool) -> dict[str, Any]:
    """The LoRA section once per seed (one seed if the overrides name one): the headline keys are
    the means over the seeds, ``lora_by_seed`` holds each seed's whole section."""
    from experiments.transformers_lora import lora_section

    seeds = [None] if quick or any(o.startswith("seed=") for o in overrides) else list(LORA_SEEDS)
    per = {
        str(seed if seed is not None else "given"): lora_section(
            runs, [*overrides, *([f"seed={seed}"] if seed is not None else [])], quick=quick, quiet=quiet
        )
        for seed in seeds
    }
    first = next(iter(per.values()))
    mean = {
        k: sum(float(p[k]) for p in per.values()) / len(per)
        for k in ("lora_split_accuracy", "lora_central_accuracy", "lora_accuracy_gap_points")
    }
    return {
        **{k: v for k, v in first.items() if not k.startswith(("lora_split", "lora_central", "lora_accuracy"))},
        **mean,
        "lora_accuracy_gap_points_max": max(float(p["lora_accuracy_gap_points"]) for p in per.values()),
        "lora_seeds": [int(k) for k in per if k != "given"],
        "lora_by_seed": per,
    }


def _lm(runs: Path, overrides: Sequence[str], quick: bool, quiet: bool, measure: bool) -> dict[str, Any]:
    return lm_section(runs, LM_QUICK if quick else (), quiet=quiet)


def _compression(runs: Path, overrides: Sequence[str], quick: bool, quiet: bool, measure: bool) -> dict[str, Any]:
    from experiments.transformers_lora import QUICK

    return compression_section(runs, [*(QUICK if quick else ()), *overrides], quiet=quiet)


def _lengths(runs: Path, overrides: Sequence[str], quick: bool, quiet: bool, measure: bool) -> dict[str, Any]:
    from experiments.transformers_lora import QUICK

    return lengths_section(runs, [*(QUICK if quick else ()), *overrides], quiet=quiet)


def _sched(runs: Path, overrides: Sequence[str], quick: bool, quiet: bool, measure: bool) -> dict[str, Any]:
    from experiments.transformers_sched import scheduler_section

    out = runs.parent if quick else RESULTS
    # the committed profiles were measured on a quiet host; timing again is opt-in
    return scheduler_section(out, quick=quick, reuse=not measure and not quick)


DC_SEEDS = {0: "routing.json", 1: "routing-seed1.json"}


def _dc(runs: Path, overrides: Sequence[str], quick: bool, quiet: bool, measure: bool) -> dict[str, Any]:
    """The text routing study per seed (:func:`experiments.transformers_routing.text_routing`), read
    from its saved result where one exists unless ``measure`` (about 9 minutes a seed): the
    headline keys are seed 0's, the mean over the seeds beside them."""
    from experiments.transformers_routing import QUICK, text_routing

    out = runs.parent if quick else RESULTS
    per: dict[str, dict[str, Any]] = {}
    for seed, name in DC_SEEDS.items():
        path = out / name
        if quick or measure or not path.exists():
            mapname = name.replace(".json", "-data-map.png")
            doc = text_routing(
                out,
                seed=seed,
                json_name=name,
                map_name=mapname,
                **(QUICK if quick else {}),  # type: ignore[arg-type]
            )
        else:
            doc = json.loads(path.read_text())
        per[str(seed)] = doc
        if quick:
            break
    head = per["0"]
    keys = ("dc_cost_reduction_vs_cloud", "dc_accuracy_drop_points", "dc_accuracy", "dc_cloud_accuracy")
    return {
        **{k: head[k] for k in (*keys, "dc_router_accuracy", "dc_vs_baselines", "meets_seed_headline")},
        "dc_model": head["model_name"],
        "dc_dataset": head["dataset"],
        "dc_seed_headline": head["seed_headline"],
        "dc_mean_over_seeds": {k: sum(float(d[k]) for d in per.values()) / len(per) for k in keys},
        "dc_by_seed": {
            s: {k: d[k] for k in (*keys, "meets_seed_headline")} | {"file": str(out / DC_SEEDS[int(s)])}
            for s, d in per.items()
        },
        "dc_cost_model": head["cost_model"],
        "dc_trained": "in one process (record_epochs), not split: fsl run cannot train exits of a graph-split model",
        "dc_command": head["command"],
    }


Section = Callable[[Path, Sequence[str], bool, bool, bool], dict[str, Any]]
SECTIONS: dict[str, Section] = {
    "lora": _lora,
    "lm": _lm,
    "compression": _compression,
    "lengths": _lengths,
    "dc": _dc,
    "sched": _sched,
}


def main(args: argparse.Namespace) -> int:
    opts: dict[str, str] = {}
    overrides: list[str] = []
    for o in args.overrides:
        k, _, v = o.partition("=")
        if k.startswith("transformers."):
            opts[k[len("transformers.") :]] = v
        else:
            overrides.append(o)
    unknown = set(opts) - {"sections", "out", "measure"}
    if unknown:
        print(f"error: unknown option(s) {sorted('transformers.' + k for k in unknown)}", flush=True)
        return 2
    names = [n for n in opts.get("sections", ",".join(SECTIONS)).split(",") if n]
    bad = [n for n in names if n not in SECTIONS]
    if bad:
        print(f"error: unknown section(s) {bad}; choose from {list(SECTIONS)}", flush=True)
        return 2
    quick = bool(args.quick)
    # where quick runs go: the output_dir an override names, else the default one
    base = load_experiment("quickstart", [o for o in overrides if o.startswith("output_dir=")])
    root = Path(base.output_dir) / ("transformers-quick" if quick else "transformers")
    out = Path(opts["out"]) if "out" in opts else (root if quick else RESULTS)
    runs = root / "runs"
    measure = opts.get("measure", "false").lower() in ("1", "true", "yes")
    path = out / "results.json"
    doc: dict[str, Any] = {}
    for name in names:
        print(f"transformers: section {name}", flush=True)
        section = SECTIONS[name](runs, overrides, quick, bool(args.quiet), measure)
        doc = merge_results(path, section)
    shown = {k: v for k, v in doc.items() if not isinstance(v, dict | list) or k == "lm_perplexity_by_round"}
    print(json.dumps(shown, indent=2, default=float))
    print(f"results: {path}")
    return 0
