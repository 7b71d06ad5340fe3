"""Where a shared-mode training batch spends its time: clients, split server, data plane.

One split server (CNN cut ``conv1``, the quickstart's, one torch thread, this process) and K
client processes (one torch thread each) that train the client segment on MNIST-5k through the
real :class:`GrpcChannel` (batch 32), K = 1, 2, 4, all at once. Per batch: the clients' CPU
(forward, the data-plane call, backward + SGD) and the server process's CPU, of which the time
in the segment's locked step (forward, backward, SGD step, reply). Baseline in the same run: the
unsplit CNN trained the same way in one process, one thread (what a centralized step costs).

It answers why the shared mode's throughput stays where it does on a small machine: the server
segment's step is serial (one lock) and so is the server process's Python (one GIL), so the
server's CPU per batch bounds the samples per second, whatever the number of clients.

    python -m benchmarks.bench_breakdown [--quick]
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from typing import Any

import torch

from benchmarks.common import bench_parser, machine, table, write_result

BATCH = 32


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from fsl.data import load_dataset

    ds = load_dataset("mnist5k")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(ds.y_train), generator=g)
    out = []
    for i in range(n):
        idx = perm[(i * BATCH) % (len(perm) - BATCH) :][:BATCH]
        out.append((ds.x_train[idx], ds.y_train[idx]))
    return out


def client_main(address: str, cid: str, steps: int) -> None:
    """One client: ``steps`` batches through the split server; prints its timings as JSON."""
    torch.set_num_threads(1)
    from fsl.channel import ChannelIdentity
    from fsl.fastmath import flush_denormals
    from fsl.grpc_channel import GrpcChannel
    from fsl.models import build_model, split_model
    from fsl.optim import SGD

    flush_denormals()
    seg = split_model(build_model("cnn", seed=0), "conv1").client
    opt = SGD(seg.parameters(), lr=0.05, momentum=0.9)
    data = _batches(steps + 10, seed=int(cid[1:]))
    ch = GrpcChannel(address=address, identity=ChannelIdentity(client_id=cid, round=1))
    for x, y in data[:10]:  # warm-up: first calls, allocator, the server's first steps
        h = seg(x)
        r = ch.train_step(h.detach(), y)
        opt.zero_grad(set_to_none=True)
        (h * r.grad).sum().backward()
        opt.step()
    data = data[10:]
    print("ready", flush=True)
    sys.stdin.readline()
    t = {"fwd": 0.0, "rpc": 0.0, "bwd": 0.0}
    c0, w0 = _cpu_s(), time.time()
    for x, y in data:
        t0 = time.perf_counter()
        h = seg(x)
        t1 = time.perf_counter()
        r = ch.train_step(h.detach(), y)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        (h * r.grad).sum().backward()
        opt.step()
        t3 = time.perf_counter()
        t["fwd"] += t1 - t0
        t["rpc"] += t2 - t1
        t["bwd"] += t3 - t2
    print(json.dumps({"t0": w0, "t1": time.time(), "cpu_s": _cpu_s() - c0, **t}), flush=True)
    ch.close()


def shared(k: int, steps: int) -> dict[str, Any]:
    """K clients at once against one split server in this process."""
    from fsl.models import build_model, cut_shape, split_model
    from server.split_server import SplitServer, SplitServerState

    locked = {"s": 0.0, "n": 0, "s0": 0.0}

    class TimedState(SplitServerState):
        def run_train(self, *a: Any, **kw: Any) -> Any:  # the step under the segment's lock
            t0 = time.thread_time()
            try:
                return super().run_train(*a, **kw)
            finally:
                locked["s"] += time.thread_time() - t0
                locked["n"] += 1

    split = split_model(build_model("cnn", seed=0), "conv1")
    state = TimedState(split.server, cut_shape(split.client, (1, 28, 28)), 10, lr=0.05, momentum=0.9, device="cpu")
    server = SplitServer(state, "127.0.0.1:0").start()
    cmd = [sys.executable, "-m", "benchmarks.bench_breakdown", "--client", server.address]
    procs = [
        subprocess.Popen([*cmd, f"c{i}", str(steps)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for i in range(k)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        c0 = _cpu_s()
        locked["s0"] = locked["s"]  # the warm-up steps are not counted
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        res = [json.loads(p.stdout.readline()) for p in procs]  # type: ignore[union-attr]
        server_cpu = _cpu_s() - c0
        locked_steps = locked["n"] - 10 * k
    finally:
        for p in procs:
            p.wait(timeout=60)
        server.stop(grace=None)
    n = k * steps
    wall = max(r["t1"] for r in res) - min(r["t0"] for r in res)
    return {
        "clients": k,
        "samples_per_s": n * BATCH / wall,
        "client_cpu_ms": 1e3 * sum(r["cpu_s"] for r in res) / n,
        "client_fwd_ms": 1e3 * sum(r["fwd"] for r in res) / n,
        "client_bwd_ms": 1e3 * sum(r["bwd"] for r in res) / n,
        "client_rpc_wall_ms": 1e3 * sum(r["rpc"] for r in res) / n,
        "server_cpu_ms": 1e3 * server_cpu / n,
        "server_locked_ms": 1e3 * (locked["s"] - locked["s0"]) / max(1, locked_steps),
        "server_steps": locked_steps,
    }


def central(steps: int) -> dict[str, Any]:
    """The unsplit CNN, same batches, one thread, one process: a centralized step."""
    from fsl.fastmath import flush_denormals
    from fsl.models import build_model
    from fsl.optim import SGD

    flush_denormals()
    model = build_model("cnn", seed=0)
    opt = SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = _batches(steps, seed=0)
    c0, t0 = _cpu_s(), time.perf_counter()
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    wall = time.perf_counter() - t0
    return {"clients": 0, "samples_per_s": steps * BATCH / wall, "central_cpu_ms": 1e3 * (_cpu_s() - c0) / steps}


def run(quick: bool = False) -> dict[str, Any]:
    steps = 100 if quick else 300
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the split server's one thread, as `server.threads = 0` picks with 2 clients on 2 cores
    try:
        base = central(steps)
        rows = [shared(k, steps) for k in ((1, 2) if quick else (1, 2, 4))]
    finally:
        torch.set_num_threads(threads)
    for r in rows:
        r["vs_central_1_thread"] = r["samples_per_s"] / base["samples_per_s"]
    print(
        table(
            rows,
            [
                "clients",
                "samples_per_s",
                "vs_central_1_thread",
                "client_cpu_ms",
                "client_fwd_ms",
                "client_bwd_ms",
                "client_rpc_wall_ms",
                "server_cpu_ms",
                "server_locked_ms",
            ],
            title=(
                f"Per batch of {BATCH} (CNN @ conv1, 1 thread per process): clients vs split server; "
                f"centralized step {base['central_cpu_ms']:.2f} ms CPU, {base['samples_per_s']:.0f} samples/s"
            ),
        )
    )
    result = {"machine": machine(), "central": base, "rows": rows}
    write_result("breakdown", result)
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    ap = bench_parser(__doc__)
    run(**vars(ap.parse_args()))


if __name__ == "__main__":
    main()
