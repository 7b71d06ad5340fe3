"""Memory a client needs per model, cut and batch size: the ClientApp's estimate next to a measurement.

Each row runs in a fresh process (so its peak resident memory is its own): import torch,
build the client segment, then train it for 3 steps with a gradient of the right shape
standing in for the server's (what the data plane would return). ``peak MB`` is the
process's VmHWM after that; ``estimate MB`` is what ``clients.resources`` predicts before
training (and what ``memory-mb`` is checked against). Run it on the board itself:

    python -m clients.pi.memory_table            # the default table
    python -m clients.pi.memory_table --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

ROWS = [
    ("cnn", "conv1", (1, 28, 28), 32),
    ("cnn", "conv1", (1, 28, 28), 128),
    ("cnn", "conv2", (1, 28, 28), 32),
    ("cnn", "fc1", (1, 28, 28), 32),
    ("cnn", "fc1", (1, 28, 28), 128),
    ("resnet", "stem", (3, 32, 32), 32),
    ("resnet", "layer1", (3, 32, 32), 32),
    ("resnet", "layer2", (3, 32, 32), 32),
    ("resnet", "layer3", (3, 32, 32), 32),
]


def measure(model: str, cut: str, shape: tuple[int, ...], batch: int) -> dict[str, float | str | int]:
    import torch

    from clients.resources import estimate_training_memory, peak_rss_mb, rss_mb
    from fsl.models import build_model, split_model
    from fsl.optim import SGD

    torch.set_num_threads(1)
    seg = split_model(build_model(model, shape, 10), cut).client.train()
    est = estimate_training_memory([seg], shape, batch)
    before = rss_mb()
    opt = SGD(seg.parameters(), lr=0.01, momentum=0.9)  # what the trainer uses
    for _ in range(3):
        h = seg(torch.rand(batch, *shape))  # (B, ...) smashed
        opt.zero_grad(set_to_none=True)
        h.backward(torch.randn_like(h))  # stands in for dL/dh from the split server
        opt.step()
    peak = peak_rss_mb()
    return {
        "model": model,
        "cut": cut,
        "batch": batch,
        "resident_mb": round(before, 1),
        "estimate_mb": round(est.total_mb, 1),
        "peak_mb": round(peak, 1),
        "training_estimate_mb": round(est.training_mb, 1),
        "training_measured_mb": round(peak - before, 1),
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--one", nargs=4, metavar=("MODEL", "CUT", "SHAPE", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        m, c, s, b = args.one
        print(json.dumps(measure(m, c, tuple(int(x) for x in s.split("x")), int(b))))
        return 0
    rows = []
    print(
        f"{'model':>7} {'cut':>7} {'batch':>5} {'resident':>9} {'train est':>9} {'train meas':>10} {'estimate':>9} {'peak':>7}"
    )
    for model, cut, shape, batch in ROWS:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "clients.pi.memory_table",
                "--one",
                model,
                cut,
                "x".join(map(str, shape)),
                str(batch),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        rows.append(r)
        print(
            f"{model:>7} {cut:>7} {batch:>5} {r['resident_mb']:>9} {r['training_estimate_mb']:>9} "
            f"{r['training_measured_mb']:>10} {r['estimate_mb']:>9} {r['peak_mb']:>7}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
