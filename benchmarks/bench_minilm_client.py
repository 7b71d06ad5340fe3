"""MiniLM client footprint: peak resident memory and per-batch time of the client segment at each cut.

all-MiniLM-L6-v2 (pretrained, from its wheel; 22.7 M parameters, 11.7 M of them the word-piece
embedding) is cut after its embeddings or after each of its six encoder layers. Each (cut, threads)
runs in a fresh Python process, so what a device's trainer imports is counted (torch,
transformers, ``fsl``, ``clients.trainer``, ``fsl.grpc_channel``): the process builds the model as
a client does (all its weights, then the split: the server's part is dropped), trains its client
segment on batches of 16 sequences of 32 tokens through the real :class:`GrpcChannel` to a split
server that this process runs on 127.0.0.1 (SGD with momentum on every client parameter, as
``fsl run`` trains without LoRA), and reports its peak RSS (VmHWM, the same figure as
``resource.getrusage(RUSAGE_SELF).ru_maxrss``) after the imports, after building the model and
after training, and the client-side compute per batch (forward + backward + optimizer step,
without the wire).

    python -m benchmarks.bench_minilm_client [--quick]

Writes ``benchmarks/results/minilm_client.json`` and ``benchmarks/results/minilm_client.md``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from benchmarks.common import RESULTS, bench_parser, machine, table, write_result

BATCH, SEQ = 16, 32
CUTS = ("bert.embeddings", *(f"bert.encoder.layer.{i}" for i in range(6)))
THREADS = (1, 2)

CHILD = r"""
import gc, json, os, resource, sys, time
cut, threads, address, batches, batch, seq = sys.argv[1], int(sys.argv[2]), sys.argv[3], *map(int, sys.argv[4:7])
import torch
torch.set_num_threads(threads)
from benchmarks.common import peak_rss_mb
from clients.trainer import TrainOptions, train_segment
from fsl.grpc_channel import GrpcChannel
from fsl.models import build_module, split_model
import transformers  # noqa: F401  - imported by the model's builder anyway; counted here with the imports
rss_import = peak_rss_mb()
t0 = time.perf_counter()
model = build_module("minilm", (seq,), 2, seed=0)
g = torch.Generator().manual_seed(0)
def tokens(n):
    ids = torch.randint(1000, 30000, (n, seq), generator=g)  # (N, T) word pieces
    ids[:, 0] = 101
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
dims = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}
split = split_model(model, cut, tokens(2), dynamic=dims, bounds={"seq": (2, seq)})
client = split.client
del split, model
gc.collect()
build_s = time.perf_counter() - t0
rss_model = peak_rss_mb()
n_params = sum(p.numel() for p in client.parameters())
x, y = tokens(batch * batches), torch.randint(0, 2, (batch * batches,), generator=g)
warm = {k: v[: 2 * batch] for k, v in x.items()}
opts = TrainOptions(batch_size=batch, lr=0.01)
with GrpcChannel(address=address) as ch:
    train_segment(client, warm, y[: 2 * batch], ch, opts)  # warm-up: first-call allocations, momentum buffers
    t0 = time.perf_counter()
    st = train_segment(client, x, y, ch, opts)
    wall = time.perf_counter() - t0
print(json.dumps({"rss_import_mb": rss_import, "rss_model_mb": rss_model, "rss_peak_mb": peak_rss_mb(),
                  "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "client_params_m": n_params / 1e6, "build_s": build_s,
                  "compute_ms_per_batch": st.compute_s / st.batches * 1e3, "batch_ms": wall / st.batches * 1e3,
                  "bytes_up_per_batch": st.bytes_up / st.batches, "batches": st.batches,
                  "load_avg_1m": os.getloadavg()[0]}))
"""

COLUMNS = [
    "cut",
    "threads",
    "client_params_m",
    "rss_import_mb",
    "rss_model_mb",
    "rss_peak_mb",
    "compute_ms_per_batch",
    "batch_ms",
    "bytes_up_per_batch",
    "load_avg_1m",
]


def _server(cut: str) -> Any:
    """A split server for MiniLM's server segment at ``cut``, on 127.0.0.1 (this process)."""
    import torch

    from fsl.models import build_module, split_model
    from server.split_server import SplitServer, SplitServerState

    ids = torch.randint(1000, 30000, (2, SEQ))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    dims = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}
    split = split_model(build_module("minilm", (SEQ,), 2, seed=0), cut, example, dynamic=dims, bounds={"seq": (2, SEQ)})
    assert split.graph is not None
    state = SplitServerState(split.server, (), 2, device="cpu", lr=0.01, signature=split.graph.signature(1))
    return SplitServer(state, "127.0.0.1:0").start()


def run(quick: bool = False, threads: tuple[int, ...] = THREADS) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # the split server's segment; the client's threads are the variable
    batches = 4 if quick else 12
    cuts = CUTS[:2] + CUTS[-1:] if quick else CUTS
    rows = []
    t0 = time.perf_counter()
    for cut in cuts:
        server = _server(cut)
        try:
            for n_threads in threads:
                out = subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        CHILD,
                        cut,
                        str(n_threads),
                        server.address,
                        str(batches),
                        str(BATCH),
                        str(SEQ),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=600,
                )
                row = {"cut": cut, "threads": n_threads, **json.loads(out.stdout.strip().splitlines()[-1])}
                rows.append(row)
                print(f"{cut} x{n_threads}: {row['rss_peak_mb']:.0f} MB, {row['compute_ms_per_batch']:.0f} ms/batch")
        finally:
            server.stop(grace=None)
    title = f"MiniLM client footprint (fresh process per row; batch {BATCH} x {SEQ} tokens; peak RSS = VmHWM)"
    md = table(rows, COLUMNS, title=title)
    print(md)
    result = {
        "machine": machine(),
        "model": "all-MiniLM-L6-v2 (pretrained), 2-class head, full fine-tuning of the client segment (SGD, momentum 0.9)",
        "batch": BATCH,
        "seq_len": SEQ,
        "batches_timed": batches,
        "rows": rows,
        "peak_rss_mb_max": max(r["rss_peak_mb"] for r in rows),
        "peak_rss_mb_by_cut": {c: max(r["rss_peak_mb"] for r in rows if r["cut"] == c) for c in cuts},
        "seconds": time.perf_counter() - t0,
        "quick": quick,
        "command": "python -m benchmarks.bench_minilm_client"
        + (" --quick" if quick else "")
        + ("" if tuple(threads) == THREADS else f" --threads {','.join(map(str, threads))}"),
    }
    write_result("minilm_client", result)
    m = result["machine"]
    (RESULTS / "minilm_client.md").write_text(
        md + f"\n{m['cpu']}, {m['cores']} cores, torch {m['torch']}, load average {m['load_avg_1m']:.1f} at the end; "
        f"{batches} timed batches per row after 2 warm-up batches; `{result['command']}`. Each row's last column "
        "is the host's 1-minute load average when it ended: on a shared 2-core host, a time measured at a load "
        "above 2 is mostly other jobs' time slices (and 2 threads then contend with them); peak RSS does not "
        "depend on it.\n"
    )
    return result


if __name__ == "__main__":
    ap = bench_parser(__doc__)
    ap.add_argument("--threads", default="1,2", help="torch thread counts to run, comma-separated")
    a = ap.parse_args()
    run(quick=a.quick, threads=tuple(int(t) for t in a.threads.split(",")))
