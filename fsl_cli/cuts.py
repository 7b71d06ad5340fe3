"""``fsl cuts MODEL``: every place a model can be split, with what crosses each cut.

MODEL is a zoo name, an import string (``package.module:factory``) or an experiment (a name under
``experiments/`` or a ``.toml`` path, whose model and data are used). The model is traced once and
every module path is tried as a cut; the table lists the legal ones with the tensors that cross
(name, shape of one sample, dtype), the bytes one sample sends, and the client's share of the
forward FLOPs and of the parameters. ``--why`` also lists the refused paths with the reason.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["register"]


def _example(args: argparse.Namespace) -> tuple[Any, str, Any, dict[str, dict[int, str]], dict[str, tuple[int, int]]]:
    """(model, its name, an example batch, dynamic dims, bounds) for the command line's MODEL."""
    import torch

    from fsl.config import load_experiment
    from fsl.experiment import build_model_for, experiment_dataset, model_example
    from fsl.models import model_spec

    target: str = args.model
    is_experiment = target.endswith(".toml") or Path(f"experiments/{target}.toml").exists()
    overrides = [] if is_experiment else [f"model.name={target}", "mode=fl"]
    if args.data:
        overrides.append(f"data.name={args.data}")
    elif not is_experiment:
        spec = model_spec(target)
        overrides.append("data.name=fortunes" if spec.input_kind == "tokens" else "data.name=digits")
    cfg = load_experiment(target if is_experiment else "quickstart", overrides)
    spec_shape = () if is_experiment or args.data else model_spec(target).input_shape
    if args.input_shape or spec_shape:
        shape: tuple[int, ...] = tuple(int(v) for v in args.input_shape.split(",")) if args.input_shape else spec_shape
        num_classes = 10
    else:
        ds = experiment_dataset(cfg)
        shape, num_classes = ds.input_shape, ds.num_classes
    if args.seq_len:
        shape = (args.seq_len,)
    model = build_model_for(cfg, shape, num_classes)
    example, dynamic, bounds = model_example(cfg, shape)
    if isinstance(example, torch.Tensor):
        example = example.uniform_()
    return model, cfg.model.name, example, dynamic, bounds


def _cmd_cuts(args: argparse.Namespace) -> int:
    from fsl.graphsplit import SplitError, cut_table, trace

    model, name, example, dynamic, bounds = _example(args)
    try:
        traced = trace(model, example, dynamic, bounds)
    except SplitError as e:
        print(f"fsl cuts: {e}")
        return 2
    rows, refused = cut_table(traced, example)
    if args.depth:
        rows = [r for r in rows if r.cut.count(".") < args.depth]
    from fsl.graphsplit import as_inputs

    shapes = {k: list(v.shape[1:]) for k, v in as_inputs(model, example).items()}
    if args.json:
        out = {
            "model": name,
            "inputs": shapes,
            "cuts": [
                {
                    "cut": r.cut,
                    "tensors": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in r.tensors],
                    "bytes_per_sample": r.bytes_per_sample,
                    "client_flops_share": round(r.client_flops, 4),
                    "client_params_share": round(r.client_params, 4),
                }
                for r in rows
            ],
            "refused": refused,
        }
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"cuts of {name} for one sample of {shapes}")
    for col in ("cut", "crossing tensors", "bytes/sample", "client FLOPs", "client params"):
        table.add_column(col, justify="right" if col.startswith(("bytes", "client")) else "left")
    for r in rows:
        tensors = "\n".join(f"{n} {list(s)} {d}" for n, s, d in r.tensors)
        table.add_row(r.cut, tensors, f"{r.bytes_per_sample:,}", f"{r.client_flops:.1%}", f"{r.client_params:.1%}")
    console = Console(width=160)
    console.print(table)
    if args.why:
        for path, why in refused.items():
            console.print(f"[dim]{path}[/dim]: {why}")
    else:
        console.print(f"{len(rows)} legal cuts; {len(refused)} module paths refused (--why lists them with the reason)")
    return 0


def register(sub: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    p = sub.add_parser("cuts", help="list every legal cut of a model with the tensors that cross it")
    p.add_argument("model", help="zoo name, package.module:factory, or an experiment name / .toml path")
    p.add_argument("--data", help="dataset whose inputs feed the trace (default: the experiment's)")
    p.add_argument("--input-shape", help="per-sample input shape C,H,W for an image model")
    p.add_argument("--seq-len", type=int, help="sequence length of the example for a token model")
    p.add_argument("--depth", type=int, default=0, help="only module paths at most this deep (0 = all)")
    p.add_argument("--why", action="store_true", help="also list the refused module paths and why")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    return {"cuts": _cmd_cuts}
