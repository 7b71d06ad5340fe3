"""The host end of the aarch64 smoke test: a split server on 127.0.0.1 for the Pi clients.

It serves the server segment of a model (the CNN, or a token model such as ``minilm`` split by its
traced graph) with data-plane authentication on (round 1 open, one
token per client id), writes what a client needs to connect (address, tokens) to a JSON file,
optionally writes a small dataset as ``.npz`` for the clients, and serves until SIGTERM/SIGINT
(or ``--timeout``); on the way out it writes what the server counted. The device end and the
report are ``clients/pi/smoke_driver.py``; this end needs the server role, so it sits above both.

    python -m fsl_cli.pi_smoke_host --ready /tmp/ready.json --data-out /tmp/data.npz
"""

from __future__ import annotations

import argparse
import platform
import signal
import sys
import threading
from pathlib import Path

from clients.pi.smoke_driver import ROUND, RUN_ID, build_split, is_token_model, smoke_data, write_json

__all__ = ["cmd_host", "main"]


def cmd_host(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from fsl.auth import RoundAuthority
    from fsl.models import cut_shape, model_spec
    from server.split_server import SplitServer, SplitServerState

    torch.set_num_threads(args.threads)
    seq = args.seq_len if is_token_model(args.model) else 0
    split = build_split(args.model, args.cut, args.seed, seq or 32)
    graph = split.graph
    authority = RoundAuthority(RUN_ID)
    authority.open_round(ROUND)
    state = SplitServerState(
        split.server,
        sample_shape=() if graph else cut_shape(split.client, model_spec(args.model).input_shape),
        signature=graph.signature(1) if graph else None,
        num_classes=2 if seq else 10,
        lr=args.lr,
        momentum=args.momentum,
        device="cpu",
        authority=authority,
        model_name=args.model,
        cut=args.cut,
    )
    server = SplitServer(state, f"127.0.0.1:{args.port}").start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        dataset = ""
        if args.data_out:
            dataset, arrays = smoke_data(args.train, args.test, args.seed, seq)
            tmp = Path(args.data_out + ".tmp.npz")
            np.savez(tmp, allow_pickle=False, **arrays)
            tmp.replace(args.data_out)
        clients = [c for c in args.clients.split(",") if c]
        ready = {
            "address": server.address,
            "run_id": RUN_ID,
            "round": ROUND,
            "tokens": {c: authority.issue(ROUND, c) for c in clients},
            "model": args.model,
            "cut": args.cut,
            "seed": args.seed,
            "seq_len": seq,
            "dataset": dataset,
            "host": {"machine": platform.machine(), "torch": torch.__version__, "python": platform.python_version()},
        }
        write_json(Path(args.ready), ready)
        print(f"split server ({args.model}, cut {args.cut}) on {server.address}", flush=True)
        stopped = stop.wait(args.timeout if args.timeout > 0 else None)
        if not stopped:
            print(f"host: no stop signal within {args.timeout} s, shutting down", file=sys.stderr)
    finally:
        server.stop(grace=None)
        if args.stats:
            traffic = {c: vars(s) for c, s in state.traffic().items()}
            write_json(Path(args.stats), {"steps": state.steps, "traffic": traffic})
    return 0


def main(argv: list[str] | None = None) -> int:
    h = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    h.add_argument("--ready", required=True, help="write the address and tokens here once serving")
    h.add_argument("--data-out", default="", help="also write a small dataset (.npz) for the clients")
    h.add_argument("--stats", default="", help="on exit, write the server's step and traffic counts here")
    h.add_argument("--clients", default="pi4,pi5", help="comma-separated client ids to issue tokens for")
    h.add_argument("--model", default="cnn")
    h.add_argument("--cut", default="conv1")
    h.add_argument("--seq-len", type=int, default=32, help="token models: tokens per sequence")
    h.add_argument("--port", type=int, default=0)
    h.add_argument("--train", type=int, default=160, help="training samples in --data-out")
    h.add_argument("--test", type=int, default=256, help="held-out samples in --data-out")
    h.add_argument("--lr", type=float, default=0.05)
    h.add_argument("--momentum", type=float, default=0.9)
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--threads", type=int, default=1)
    h.add_argument("--timeout", type=float, default=3600.0, help="serve at most this long (0: until a signal)")
    return cmd_host(h.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
