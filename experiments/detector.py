"""SplitGuard against honest and hijacking split servers: detection and false-alarm rates.

Each run is one client training its ``cnn`` segment (cut ``conv1``) over the real data plane
codec (:class:`fsl.channel.InMemoryChannel`) under :class:`clients.splitguard.SplitGuard`, against
either the honest split server (:class:`server.split_server.SplitServerState`) or the
feature-space hijacking server (:class:`attacks.fsha.HijackingServer`, public data: the test
split). A run is *flagged* when the detector stops training (:class:`clients.splitguard.HijackingDetected`).

``python -m experiments.detector [--seeds 4] [--steps 300] [--quick]`` writes
``experiments/results/leakage/detector.json``: ``detector``, ``detection_rate`` (hijacked runs
flagged), ``false_alarm_rate`` (honest runs flagged), ``runs`` (one row per run with its scores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path("experiments/results/leakage")


def run_one(
    server_kind: str,
    x: torch.Tensor,
    y: torch.Tensor,
    x_public: torch.Tensor,
    *,
    seed: int,
    steps: int,
    model: str = "cnn",
    cut: str = "conv1",
    batch_size: int = 32,
    p_fake: float = 0.2,
    window: int = 3,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """One client run of at most ``steps`` batches under SplitGuard against ``server_kind`` (``honest`` | ``fsha``)."""
    from attacks.fsha import HijackingServer
    from attacks.models import segments
    from clients.splitguard import HijackingDetected, SplitGuard, train_segment_guarded
    from fsl.channel import ChannelIdentity, InMemoryChannel
    from fsl.models import cut_shape
    from fsl.training import TrainOptions
    from server.split_server import SplitServerState

    input_shape = tuple(x.shape[1:])
    num_classes = int(y.max()) + 1
    client, server = segments(model, cut, input_shape, num_classes, seed=seed)
    srv: Any
    if server_kind == "honest":
        srv = SplitServerState(
            server,
            sample_shape=cut_shape(client, input_shape),
            num_classes=num_classes,
            lr=0.05,
            momentum=0.9,
            device="cpu",
            model_name=model,
            cut=cut,
        )
    elif server_kind == "fsha":
        srv = HijackingServer(model, cut, input_shape, x_public, num_classes=num_classes, lr=1e-3, seed=seed)
    else:
        raise ValueError(f"server kind must be 'honest' or 'fsha', not {server_kind!r}")
    channel = InMemoryChannel(server=srv, identity=ChannelIdentity(run_id="splitguard", round=1, client_id="c"))
    guard = SplitGuard(num_classes=num_classes, p_fake=p_fake, window=window, threshold=threshold, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    passes = -(-steps * batch_size // len(y))  # whole shuffled passes over the data, cut to `steps` batches
    perm = torch.cat([torch.randperm(len(y), generator=gen) for _ in range(passes)])[: steps * batch_size]
    options = TrainOptions(epochs=1, batch_size=batch_size, lr=0.05, momentum=0.9, seed=seed)
    t0 = time.perf_counter()
    reason = ""
    try:
        train_segment_guarded(client, x[perm], y[perm], channel, guard, options)
    except HijackingDetected as e:
        reason = str(e)
    return {
        "server": server_kind,
        "seed": seed,
        "flagged": bool(reason),
        "flagged_at_batch": guard.flagged_at,
        "batches": guard.batches,
        "fake_batches": len(guard.scores),
        "scores": [round(s, 4) for s in guard.scores],
        "reason": reason,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def run(*, seeds: int, steps: int, dataset: str = "mnist5k", **kw: Any) -> dict[str, Any]:
    from fsl.data import load_dataset

    torch.set_num_threads(1)  # the hijacking server's small convs are faster on one thread than on shared cores
    ds = load_dataset(dataset)
    x_public = ds.x_test[:1000]
    runs = []
    for kind in ("honest", "fsha"):
        for seed in range(seeds):
            row = run_one(kind, ds.x_train, ds.y_train, x_public, seed=seed, steps=steps, **kw)
            print(
                f"{kind:6s} seed {seed}: flagged={row['flagged']} at batch {row['flagged_at_batch']} "
                f"({row['fake_batches']} fake batches, {row['seconds']} s)",
                flush=True,
            )
            runs.append(row)

    def rate(kind: str) -> float:
        rows = [r for r in runs if r["server"] == kind]
        return sum(r["flagged"] for r in rows) / len(rows)

    return {
        "detector": "splitguard",
        "detection_rate": rate("fsha"),
        "false_alarm_rate": rate("honest"),
        "runs": runs,
        "setting": {
            "dataset": dataset,
            "model": "cnn",
            "cut": "conv1",
            "max_batches": steps,
            "batch_size": kw.get("batch_size", 32),
            "p_fake": kw.get("p_fake", 0.2),
            "warmup": 20,
            "mult": 5.0,
            "exp": 2.0,
            "decision": f"mean of the last {kw.get('window', 3)} scores < {kw.get('threshold', 0.5)}",
            "attack": "fsha (attacks/fsha.py, server lr 1e-3, public data: 1,000 test images)",
        },
    }


def main(args: argparse.Namespace | None = None) -> int:
    """``python -m experiments.detector [flags]``, or ``fsl run detector [--quick] detector.KEY=VALUE ...``."""
    from experiments import argv_from_run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--quick", action="store_true", help="2 seeds, 150 batches")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(None if args is None else argv_from_run(args, "detector"))
    seeds, steps = (2, 150) if a.quick else (a.seeds, a.steps)
    res = run(seeds=seeds, steps=steps, dataset=a.dataset)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "detector.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"SplitGuard: detection rate {res['detection_rate']:.2f}, false-alarm rate {res['false_alarm_rate']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
