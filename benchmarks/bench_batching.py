"""Server batching: K clients training concurrently against one split server.

Part 1 (shared ``fsl`` segment): a real :class:`SplitServer` on 127.0.0.1 in this process, K client
threads in ONE separate client process (so client-side encoding does not share this process's
GIL), each sending batches of precomputed activations for a fixed number of steps through the real
:class:`GrpcChannel`. Unbatched (``state.train`` per request, one at a time on the segment's lock)
against :class:`server.batching.RequestBatcher`. Samples per second over the whole run (server
side) and the median / p90 per-request latency (client side).

Part 2 (``sflv1``: a copy of the server segment per client): K copies built here, one batch each;
a Python loop over the copies (forward, backward, SGD step each) against one ``torch.func`` call
over stacked parameters (``stack_module_state`` + ``vmap(grad)``); the results are checked equal.

    python -m benchmarks.bench_batching [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import torch
from torch import nn

from benchmarks.common import bench_parser, machine, median, table, write_result
from fsl.channel import ChannelIdentity
from fsl.grpc_channel import GrpcChannel
from fsl.models import build_model, cut_shape, split_model
from server.batching import RequestBatcher
from server.split_server import SplitServer, SplitServerState

BATCH = 32


def _state(cut: str, device: str) -> SplitServerState:
    model = build_model("cnn", seed=0)
    split = split_model(model, cut)
    return SplitServerState(
        split.server, cut_shape(split.client, (1, 28, 28)), 10, lr=0.01, momentum=0.9, device=device, cut=cut
    )


# ----------------------------------------------------------------------------- client process
def client_main(address: str, k: int, steps: int, shape: list[int]) -> None:
    """K threads, each one client: ``steps`` training requests; prints JSON with latencies."""
    torch.set_num_threads(1)
    lat: list[list[float]] = [[] for _ in range(k)]
    start = threading.Barrier(k)

    def run(i: int) -> None:
        ch = GrpcChannel(address=address, identity=ChannelIdentity(client_id=f"c{i}", round=1))
        g = torch.Generator().manual_seed(i)
        h = torch.rand(BATCH, *shape, generator=g)  # (B, ...) smashed, reused: the server is measured
        y = torch.randint(0, 10, (BATCH,), generator=g)
        ch.train_step(h, y)  # connect
        start.wait()
        for _ in range(steps):
            t0 = time.perf_counter()
            ch.train_step(h, y)
            lat[i].append(time.perf_counter() - t0)
        ch.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(k)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"wall_s": time.perf_counter() - t0, "latencies": lat}))


def serve_and_measure(cut: str, k: int, steps: int, batched: bool, device: str) -> dict[str, Any]:
    state = _state(cut, device)
    batcher = RequestBatcher(state, max_requests=k, max_wait_ms=20.0) if batched else None
    server = SplitServer(state, "127.0.0.1:0", batcher=batcher).start()
    cmd = [sys.executable, "-m", "benchmarks.bench_batching", "--client", server.address, "--k", str(k)]
    cmd += ["--steps", str(steps), "--shape", ",".join(map(str, state.sample_shape))]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
    finally:
        server.stop(grace=None)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    lats = sorted(x for per in res["latencies"] for x in per)
    samples = k * steps * BATCH
    return {
        "cut": cut,
        "clients": k,
        "batching": batched,
        "samples_per_s": samples / res["wall_s"],
        "latency_ms_p50": median(lats) * 1e3,
        "latency_ms_p90": lats[int(0.9 * (len(lats) - 1))] * 1e3,
        "server_steps": state.steps,
        "requests_per_step": (k * (steps + 1)) / max(1, state.steps),
    }


# ----------------------------------------------------------------------------- sflv1: copies
def sflv1_copies(cut: str, k: int, device: str, repeat: int) -> dict[str, Any]:
    """K copies of the server segment, one batch each: a loop over copies vs one vmapped call."""
    from torch.func import functional_call, grad, stack_module_state, vmap

    dev = torch.device(device)
    model = build_model("cnn", seed=0)
    split = split_model(model, cut)
    shape = cut_shape(split.client, (1, 28, 28))
    base = split.server.to(dev)
    copies = [copy.deepcopy(base) for _ in range(k)]  # SplitFed v1: one copy per client
    g = torch.Generator().manual_seed(0)
    h = torch.rand(k, BATCH, *shape, generator=g).to(dev)  # (K, B, ...) one batch per client
    y = torch.randint(0, 10, (k, BATCH), generator=g).to(dev)
    lr = 0.01

    def loop_step(mods: list[nn.Module]) -> torch.Tensor:
        grads_h = []
        for m, hi, yi in zip(mods, h, y, strict=True):
            hi = hi.clone().requires_grad_(True)
            for p in m.parameters():
                p.grad = None
            nn.functional.cross_entropy(m(hi), yi).backward()
            with torch.no_grad():
                for p in m.parameters():
                    p -= lr * p.grad
            grads_h.append(hi.grad)
        return torch.stack(grads_h)  # (K, B, ...) dL/dh per client

    skeleton = copy.deepcopy(base).to("meta")

    def loss_fn(params: dict[str, torch.Tensor], hi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(skeleton, params, (hi,))  # (B, num_classes) for one copy
        return nn.functional.cross_entropy(logits, yi)

    per_copy = vmap(grad(loss_fn, argnums=(0, 1)))  # over the copy axis of params, h and y

    def vmap_step(params: dict[str, torch.Tensor]) -> torch.Tensor:
        gp, gh = per_copy(params, h, y)
        with torch.no_grad():
            for name, p in params.items():
                p -= lr * gp[name]
        return gh  # (K, B, ...)

    # equivalence on one step from the same weights
    ref = [copy.deepcopy(m) for m in copies]
    params, _ = stack_module_state([copy.deepcopy(m) for m in copies])
    params = {n: p.detach() for n, p in params.items()}
    gh_loop, gh_vmap = loop_step(ref), vmap_step(params)
    same = torch.allclose(gh_loop, gh_vmap, atol=1e-5, rtol=1e-4) and all(
        torch.allclose(params[n][i], dict(ref[i].named_parameters())[n], atol=1e-5) for i in range(k) for n in params
    )

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    t_loop, t_vmap = [], []
    for _ in range(repeat):  # interleaved
        sync()
        t0 = time.perf_counter()
        loop_step(copies)
        sync()
        t_loop.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        vmap_step(params)
        sync()
        t_vmap.append(time.perf_counter() - t0)
    lo, vm = median(t_loop), median(t_vmap)
    return {
        "cut": cut,
        "copies": k,
        "loop_ms": lo * 1e3,
        "vmap_ms": vm * 1e3,
        "speedup": lo / vm,
        "loop_samples_per_s": k * BATCH / lo,
        "vmap_samples_per_s": k * BATCH / vm,
        "equal": same,
    }


# ----------------------------------------------------------------------------- main
def run(quick: bool = False, device: str = "cpu") -> dict[str, Any]:
    steps = 15 if quick else 40
    configs = [("conv1", 8), ("fc1", 8)] if quick else [("conv1", 1), ("conv1", 4), ("conv1", 8), ("fc1", 8)]
    rows = []
    for cut, k in configs:
        for batched in (False, True):
            rows.append(serve_and_measure(cut, k, steps if k > 1 else 4 * steps, batched, device))
    for r in rows:
        base = next(x for x in rows if x["cut"] == r["cut"] and x["clients"] == r["clients"] and not x["batching"])
        r["speedup"] = r["samples_per_s"] / base["samples_per_s"]
    print(
        table(
            rows,
            [
                "cut",
                "clients",
                "batching",
                "samples_per_s",
                "speedup",
                "latency_ms_p50",
                "latency_ms_p90",
                "requests_per_step",
            ],
            title=f"Server batching: K gRPC clients, batch {BATCH} each, one shared server segment ({device})",
        )
    )
    threads = torch.get_num_threads()
    if device == "cpu":  # one thread: torch's pool of 2 on 2 shared cores swings 20x with the neighbours' load
        torch.set_num_threads(1)
    try:
        copies = [sflv1_copies(cut, 8, device, repeat=5 if quick else 15) for cut in ("conv1", "fc1")]
    finally:
        torch.set_num_threads(threads)
    print(table(copies, title=f"sflv1: 8 copies of the server segment, loop vs torch.func vmap ({device})"))
    conv8 = next(r for r in rows if r["cut"] == "conv1" and r["clients"] == 8 and r["batching"])
    fc8 = next(r for r in rows if r["cut"] == "fc1" and r["clients"] == 8 and r["batching"])
    result = {
        "machine": machine(device),
        "rows": rows,
        "sflv1_copies": copies,
        "batching_speedup_8_clients": conv8["speedup"],
        "batching_speedup_8_clients_fc1": fc8["speedup"],
        "sflv1_vmap_speedup_conv1": copies[0]["speedup"],
    }
    write_result("batching" if device == "cpu" else f"batching-{device.split(':')[0]}", result)
    return result


def main() -> None:
    ap = bench_parser(__doc__, device=True)
    ap.add_argument("--client", help=argparse.SUPPRESS)  # internal: run as the client process
    ap.add_argument("--k", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=20, help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.client:
        client_main(a.client, a.k, a.steps, [int(s) for s in a.shape.split(",")])
        return
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    run(quick=a.quick, device=a.device)


if __name__ == "__main__":
    main()
