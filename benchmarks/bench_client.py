"""Client footprint: peak resident memory and per-batch time of a client at each cut point.

Each (cut, threads) runs in a fresh Python process, so importing torch, numpy and grpc is counted:
the process imports what a device's trainer imports (``torch``, ``fsl``, ``clients.trainer``,
``fsl.grpc_channel``), trains its segment on MNIST-shaped batches of 32 through the real
:class:`GrpcChannel` to a split server that this process runs on 127.0.0.1, and reports VmHWM
(peak RSS) and the client-side compute per batch (forward + backward + SGD step, without the wire).
It then imports ``flwr.clientapp`` too (what a SuperNode's ClientApp adds) and reports that peak.

    python -m benchmarks.bench_client [--quick]
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from benchmarks.common import bench_parser, machine, table, write_result

CHILD = r"""
import json, sys, time
cut, threads, address, batches = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
import torch
torch.set_num_threads(threads)
from benchmarks.common import peak_rss_mb
from clients.trainer import TrainOptions, train_segment
from fsl.grpc_channel import GrpcChannel
from fsl.models import build_model, split_model
rss_import = peak_rss_mb()
split = split_model(build_model("cnn", seed=0), cut)
g = torch.Generator().manual_seed(0)
x = torch.rand(32 * batches, 1, 28, 28, generator=g)
y = torch.randint(0, 10, (32 * batches,), generator=g)
with GrpcChannel(address=address) as ch:
    train_segment(split.client, x[:64], y[:64], ch, TrainOptions(batch_size=32))  # warm-up
    t0 = time.perf_counter()
    st = train_segment(split.client, x, y, ch, TrainOptions(batch_size=32))
    wall = time.perf_counter() - t0
rss_train = peak_rss_mb()
import flwr.clientapp  # noqa: F401  - what the ClientApp process adds
print(json.dumps({"rss_import_mb": rss_import, "rss_peak_mb": rss_train, "rss_with_flwr_mb": peak_rss_mb(),
                  "compute_ms_per_batch": st.compute_s / st.batches * 1e3, "batch_ms": wall / st.batches * 1e3,
                  "bytes_up_per_batch": st.bytes_up / st.batches}))
"""


def run(quick: bool = False) -> dict[str, Any]:
    from fsl.models import build_model, cut_shape, split_model
    from server.split_server import SplitServer, SplitServerState

    rows = []
    batches = 20 if quick else 60
    for cut in ("conv1", "conv2", "fc1"):
        split = split_model(build_model("cnn", seed=0), cut)
        state = SplitServerState(split.server, cut_shape(split.client, (1, 28, 28)), 10, device="cpu")
        server = SplitServer(state, "127.0.0.1:0").start()
        try:
            for threads in (1, 2):
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, cut, str(threads), server.address, str(batches)],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=300,
                )
                rows.append({"cut": cut, "threads": threads, **json.loads(out.stdout.strip().splitlines()[-1])})
        finally:
            server.stop(grace=None)
    print(
        table(
            rows,
            [
                "cut",
                "threads",
                "rss_import_mb",
                "rss_peak_mb",
                "rss_with_flwr_mb",
                "compute_ms_per_batch",
                "batch_ms",
                "bytes_up_per_batch",
            ],
            title="Client footprint (fresh process; CNN, batch 32; peak RSS = VmHWM)",
        )
    )
    first = [r for r in rows if r["cut"] == "conv1"]
    result = {
        "machine": machine(),
        "rows": rows,
        "client_peak_rss_mb": max(r["rss_peak_mb"] for r in first),
        "client_peak_rss_with_flwr_mb": max(r["rss_with_flwr_mb"] for r in first),
    }
    write_result("client", result)
    return result


if __name__ == "__main__":
    run(**vars(bench_parser(__doc__).parse_args()))
