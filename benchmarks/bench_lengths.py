"""Sequences of different lengths on one split server: bucketing on the client, padding on the server.

The server segment is pretrained all-MiniLM-L6-v2 after encoder layer 2 (layers 3-5, pooler, a
5-topic head), the requests real Debian fortunes: each of K client threads sends batches of 16
texts that its client segment (embeddings and layers 0-2) turned into hidden states and the
additive attention mask, each batch trimmed to its longest text. Batches are drawn two ways:
``uniform`` (shuffled; almost every batch holds a text of the full 32 tokens) and ``bucketed``
(``train.length_buckets = 16``: pools of 16 batches sorted by length). The server takes them
unbatched (one request a step), batched with one batch per length (``server.batching``), or
batched with padding (``server.pad_lengths``). The requests are precomputed and handed to the
server's own entry points in this process (``SplitServerState.train`` / ``RequestBatcher.train``
on framed bytes, as gRPC hands them over), so the figures are the server's and the wire's, not
the clients' compute; one torch thread.

Reported per setting: tokens and bytes per sample on the wire, server steps and requests per step,
samples/s and its ratio against uniform batches served unbatched in the same run.

    python -m benchmarks.bench_lengths [--quick]
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from benchmarks.common import bench_parser, machine, table, write_result
from fsl.config import load_experiment
from fsl.data import take, trim_padding
from fsl.training import _bucketed, _shuffled, lengths
from fsl.wire import codec, frame
from fsl.wire import dataplane_pb2 as pb
from fsl.wire.frame import Framed
from server.batching import RequestBatcher
from server.state import SplitServerState

BATCH = 16
SETTINGS = (
    ("uniform", "unbatched"),
    ("uniform", "batched"),
    ("bucketed", "unbatched"),
    ("bucketed", "batched"),
    ("bucketed", "batched+pad"),
)


def _setup() -> tuple[Any, Any, Any, Any]:
    from fsl.experiment import build_model_for, experiment_dataset, server_side

    cfg = load_experiment("any-model-minilm", ["model.cut=bert.encoder.layer.2", "data.options={max_length=32}"])
    ds = experiment_dataset(cfg)
    model = build_model_for(cfg, ds.input_shape, ds.num_classes)
    model.eval()  # no dropout: the same request gives the same work in every setting
    client, side = server_side(cfg, model, ds.input_shape)
    return ds, client, side, cfg


def _requests(ds: Any, client: Any, k: int, steps: int, how: str) -> list[list[bytes]]:
    """Per client, ``steps`` framed Train requests of its own texts, batches drawn ``how``."""
    n = lengths(ds.x_train)
    assert n is not None
    out: list[list[bytes]] = []
    per = len(ds.y_train) // k
    for c in range(k):
        own = torch.arange(c * per, (c + 1) * per)
        gen = torch.Generator().manual_seed(c)
        batches = _bucketed(n[own], BATCH, 16, gen) if how == "bucketed" else list(_shuffled(per, BATCH, gen))
        reqs = []
        for step, idx in enumerate(batches[:steps]):
            x, y = trim_padding(take(ds.x_train, own[idx]), ds.y_train[own[idx]])
            with torch.no_grad():
                cut = client(x)
            req = Framed(pb.TrainRequest(header=pb.Header(client_id=f"c{c}", round=1, step=step + 1)))
            req.add_all("tensors", {name: t.contiguous() for name, t in cut.items()})
            codec.encode_into(req.msg.labels, y)
            reqs.append(frame.frame_bytes(req))
        out.append(reqs)
    return out


def _serve(side: Any, num_classes: int, requests: list[list[bytes]], how: str) -> dict[str, Any]:
    import copy

    state = SplitServerState(
        copy.deepcopy(side.segment),
        (),
        num_classes,
        lr=0.001,
        momentum=0.9,
        device="cpu",
        signature=side.signature,
        task=side.task,
    )
    target: Any = state
    if how != "unbatched":
        target = RequestBatcher(state, max_requests=len(requests), max_wait_ms=20.0, pad_lengths=how == "batched+pad")
    start = threading.Barrier(len(requests) + 1)

    def run(reqs: list[bytes]) -> None:
        start.wait()
        for raw in reqs:
            target.train(frame.parse(pb.TrainRequest, raw))

    threads = [threading.Thread(target=run, args=(r,)) for r in requests]
    for th in threads:
        th.start()
    start.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    n_req = sum(len(r) for r in requests)
    return {"server_steps": state.steps, "requests_per_step": n_req / max(1, state.steps), "wall_s": wall}


def run(quick: bool = False) -> dict[str, Any]:
    k, steps = (4, 4) if quick else (8, 8)  # 1,000 training texts: 7-8 batches of 16 per client
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ds, client, side, cfg = _setup()
        reqs = {how: _requests(ds, client, k, steps, how) for how in ("uniform", "bucketed")}
        rows = []
        for batches, server in SETTINGS:
            r = _serve(side, ds.num_classes, reqs[batches], server)
            sent = [frame.parse(pb.TrainRequest, raw) for per in reqs[batches] for raw in per]
            hidden = side.signature.grad_names[0]  # (B, T, H): T is what the batch carries per text
            shapes = [m.named("tensors")[hidden].shape for m in sent]
            tokens = sum(int(sh[0]) * int(sh[1]) for sh in shapes)
            wire = sum(len(raw) for per in reqs[batches] for raw in per)
            samples = sum(int(sh[0]) for sh in shapes)
            rows.append(
                {
                    "batches": batches,
                    "server": server,
                    "tokens_per_sample": tokens / samples,
                    "kb_per_sample": wire / samples / 1e3,
                    "requests": len(sent),
                    "server_steps": r["server_steps"],
                    "requests_per_step": r["requests_per_step"],
                    "samples_per_s": samples / r["wall_s"],
                }
            )
    finally:
        torch.set_num_threads(threads)
    base = rows[0]["samples_per_s"]
    for r in rows:
        r["speedup"] = r["samples_per_s"] / base
    n = lengths(ds.x_train)
    real = float(n.float().mean()) if n is not None else 0.0
    print(
        table(
            rows,
            title=f"MiniLM server segment after layer 2, {k} clients x up to {steps} batches of {BATCH} fortunes "
            f"(mean real length {real:.1f} tokens of 32), one torch thread",
        )
    )
    result = {
        "machine": machine(),
        "clients": k,
        "steps_per_client": steps,
        "batch": BATCH,
        "mean_real_tokens": real,
        "rows": rows,
    }
    write_result("lengths", result)
    return result


def main() -> None:
    ap = bench_parser(__doc__, quick_help="4 clients x 4 batches")
    run(quick=ap.parse_args().quick)


if __name__ == "__main__":
    main()
