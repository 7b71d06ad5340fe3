"""``fsl attack RUN_DIR --attack NAME [--options]`` (a plugin of :mod:`fsl_cli`).

Reads what the server recorded in ``RUN_DIR/observations/``, runs the attack with a
progress bar, scores it against ``RUN_DIR/ground_truth/`` and writes ``attack.json``,
``reconstructions.npz`` and ``reconstructions.png`` to ``RUN_DIR/attacks/NAME/`` (or
``--out``). ``fsha`` is a training-time attack: it runs hijacked split training itself
and writes into ``RUN_DIR`` (created if needed).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["register"]


def _parse_option(text: str) -> tuple[str, Any]:
    import tomllib

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"option {text!r} must look like key=value (e.g. iters=300)")
    k, v = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {v}")["v"]
    except tomllib.TOMLDecodeError:
        value = v
    return k.strip().replace("-", "_"), value


def register(sub: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    p = sub.add_parser("attack", help="run a privacy attack on what the split server observed in a run")
    p.add_argument("run_dir", help="a run directory with observations/ (record.enabled=true)")
    p.add_argument(
        "--attack",
        required=True,
        help="rmle, inverse-network, query-free, label-inference, gradient-inversion, fsha",
    )
    p.add_argument("--round", type=int, default=None, help="recorded round to attack (default: the last)")
    p.add_argument("--n-images", type=int, default=64, help="attack at most this many recorded samples")
    p.add_argument(
        "--aux",
        default=None,
        choices=["none", "same-set", "same-distribution", "other"],
        help="auxiliary data the attacker holds (default: what the attack needs)",
    )
    p.add_argument("--aux-size", type=int, default=1000)
    p.add_argument("--no-client-weights", action="store_true", help="the attacker does not see the client segment")
    p.add_argument("--known-labels", type=int, default=1, help="label-inference: known labels per class")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/attacks/NAME)")
    p.add_argument("-o", "--option", action="append", default=[], type=_parse_option, help="attack option key=value")
    p.add_argument("--dataset", default="mnist5k", help="fsha: the victim's dataset")
    p.add_argument("--model", default="cnn", help="fsha: architecture")
    p.add_argument("--cut", default="conv1", help="fsha: cut point")
    return {"attack": _cmd_attack}


def _progress(console: Any) -> tuple[Any, Callable[[int, int, str], None]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )
    task = bar.add_task("attack", total=1)

    def update(done: int, total: int, text: str) -> None:
        bar.update(task, completed=done, total=max(1, total), description=text)

    return bar, update


def _cmd_attack(args: argparse.Namespace) -> int:
    from rich.console import Console

    from attacks.base import REGISTRY, get_attack

    console = Console(highlight=False)
    options = dict(args.option)
    if args.attack == "fsha":
        return _cmd_fsha(args, options, console)
    try:
        get_attack(args.attack, **options)
    except ValueError as e:
        console.print(f"error: {e}; registered: {sorted([*REGISTRY, 'fsha'])}", style="red")
        return 2
    from attacks.base import ThreatModel
    from attacks.observe import load_meta, load_observation
    from attacks.report import auxiliary_threat, score_and_write

    try:
        meta = load_meta(args.run_dir)
        obs = load_observation(args.run_dir, args.round, args.n_images)
    except (FileNotFoundError, ValueError) as e:
        console.print(f"error: {e}", style="red")
        return 2
    default_aux = {"inverse-network": "same-distribution"}.get(args.attack, "none")
    if args.attack == "query-free" and options.get("method") == "shadow":
        default_aux = "same-distribution"
    threat = auxiliary_threat(
        meta.get("dataset", ""), args.aux or default_aux, args.aux_size, not args.no_client_weights
    )
    if args.attack == "label-inference":
        from attacks.ground_truth import load_ground_truth_labels

        # the attacker's own (colluding-client) samples: the first `known_labels` of each class
        truth = load_ground_truth_labels(args.run_dir)
        known: dict[int, int] = {}
        for i, key in enumerate(obs.keys):
            y = truth.get(key)
            if y is not None and sum(1 for v in known.values() if v == y) < args.known_labels:
                known[i] = y
        threat = ThreatModel(knows_client_weights=threat.knows_client_weights, known_labels=known)
    out = Path(args.out or Path(args.run_dir) / "attacks" / args.attack)
    console.print(
        f"[bold]{args.attack}[/] on {len(obs)} samples at cut {obs.cut} ({meta.get('dataset', '?')}) -> {out}"
    )
    bar, update = _progress(console)
    try:
        with bar:
            row = score_and_write(
                args.run_dir,
                args.attack,
                obs,
                threat,
                out,
                options=options,
                dataset=meta.get("dataset", ""),
                progress=update,
            )
    except ValueError as e:  # what the attack needs and the observation lacks, said by the attack
        console.print(f"error: {e}", style="red")
        return 2
    _print_row(console, row)
    return 0


def _cmd_fsha(args: argparse.Namespace, options: dict[str, Any], console: Any) -> int:
    import numpy as np
    import torch

    from attacks.fsha import run_fsha
    from attacks.report import save_grid
    from fsl.data import DatasetNotFound, load_dataset

    try:
        ds = load_dataset(args.dataset)
    except DatasetNotFound as e:
        console.print(f"error: {e}", style="red")
        return 2
    out = Path(args.out or args.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    perm = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(0))
    n_priv = int(options.pop("private", 3000))
    bar, update = _progress(console)
    with bar:
        res = run_fsha(
            args.model,
            args.cut,
            ds.x_train[perm[:n_priv]],
            ds.y_train[perm[:n_priv]],
            ds.x_test,
            progress=update,
            **options,
        )
    last = res["curve"][-1]
    row = {
        "attack": "fsha",
        "cut": args.cut,
        "model": args.model,
        "dataset": args.dataset,
        "threat_model": {
            "malicious_server": True,
            "auxiliary": "same-distribution",
            "auxiliary_samples": len(ds.y_test),
        },
        "n_images": int(len(res["original"])),
        "mse_mean": last["mse"],
        "psnr_mean": last["psnr"],
        "ssim_mean": last["ssim"],
        "step": res["step"],
        "curve": res["curve"],
    }
    (out / "attack.json").write_text(json.dumps(row, indent=2) + "\n")
    np.savez(out / "reconstructions.npz", original=res["original"].numpy(), reconstructed=res["reconstructed"].numpy())
    save_grid(
        res["original"], res["reconstructed"], out / "reconstructions.png", f"fsha at {args.cut}, step {res['step']}"
    )
    _print_row(console, row)
    return 0


def _print_row(console: Any, row: dict[str, Any]) -> None:
    keys = ("n_images", "mse_mean", "psnr_mean", "ssim_mean", "label_accuracy", "auc")
    cells = [
        f"{k} {row[k]:.4f}" if isinstance(row.get(k), float) else f"{k} {row[k]}"
        for k in keys
        if row.get(k) is not None
    ]
    console.print(", ".join(cells))
