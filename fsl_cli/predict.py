"""``fsl predict RUN_DIR --server HOST:PORT --token T``: the client of ``fsl serve``.

It runs the client segment of the run's newest checkpoint on the run's test data, sends the
activations (or answers on the device when a multi-exit segment is sure enough) and prints
accuracy and latency percentiles as one JSON line. It loads the checkpoint the way the server
does (:func:`server.serve.load_served_model`), so it lives here, above both roles.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

__all__ = ["cmd_predict", "register"]


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from clients.predictor import SplitPredictor
    from fsl.channel import ChannelIdentity
    from fsl.config import load_experiment
    from fsl.data import as_tensor
    from fsl.experiment import experiment_dataset
    from fsl.grpc_channel import GrpcChannel
    from fsl.rundir import RunDir
    from server.serve import load_served_model

    cfg = load_experiment(str(RunDir(args.run_dir).config_path))
    ds = experiment_dataset(cfg)
    m = load_served_model(args.run_dir, dataset=ds)
    ident = ChannelIdentity(run_id=m.run_id, round=args.epoch, client_id=args.client, token=args.token)
    ch = GrpcChannel(address=args.server, identity=ident, root_certificates=args.root_certificates)
    pred = SplitPredictor(m.client, ch, exit_threshold=args.exit_threshold)
    n = min(args.n, len(ds.y_test))
    x_test = as_tensor(ds.x_test, "fsl predict")
    lat, correct, exited = [], 0, 0
    t0 = time.perf_counter()
    try:
        for i in range(0, n, args.batch_size):
            xb, yb = x_test[i : i + args.batch_size], ds.y_test[i : i + args.batch_size]
            p = pred.predict(xb, budget_ms=args.budget_ms)
            lat.append(p.latency_ms)
            correct += int((p.logits.argmax(1) == yb).sum())
            exited += int(p.exited.sum())
    finally:
        ch.close()
    q = np.percentile(np.array(lat), [50, 95, 99]).tolist()
    out = {
        "samples": n,
        "accuracy": correct / max(1, n),
        "exited_on_device": exited / max(1, n),
        "latency_ms_p50": q[0],
        "latency_ms_p95": q[1],
        "latency_ms_p99": q[2],
        "wall_s": time.perf_counter() - t0,
    }
    print(json.dumps(out))
    return 0


def register(sub: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    r = sub.add_parser("predict", help="split inference on a run's test data against `fsl serve`")
    r.add_argument("run_dir")
    r.add_argument("--server", required=True, help="host:port of `fsl serve`")
    r.add_argument("--client", default="client-0")
    r.add_argument("--token", required=True, help="from `fsl serve-token RUN_DIR CLIENT`")
    r.add_argument("--epoch", type=int, default=0)
    r.add_argument("--root-certificates", default=None, help="CA PEM when the server uses TLS")
    r.add_argument("--n", type=int, default=1000, help="test samples")
    r.add_argument("--batch-size", type=int, default=1)
    r.add_argument("--budget-ms", type=float, default=0.0, help="latency target per request (0: none)")
    r.add_argument("--exit-threshold", type=float, default=None, help="answer on the device above this confidence")
    return {"predict": cmd_predict}
