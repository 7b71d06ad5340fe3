"""Scaling of one split server: samples/s and step latency against concurrent clients.

One split server (CNN cut at ``conv1``, batch 32, one torch thread, real gRPC on 127.0.0.1, the
ServerApp's defaults: 16 gRPC workers, and with batching ``server.max_batch_requests`` and
``server.max_batch_wait_ms``) in this process, and K = 1, 2, 4, ... 64 clients that each send
``steps`` training requests back to back, with and without :class:`server.batching.RequestBatcher`.

The clients are threads in ONE separate process. A separate process, so that the clients' Python
(framing, gRPC's client side) does not take this process's GIL and CPU time, which is what is
measured; threads, not processes, because 64 client processes would each import torch (about 2 s
and 200 MB apiece) on a machine with 2 cores. The clients are cheap on purpose: each sends
activations computed once beforehand (random values of the right shape, a fresh step number every
request), so what limits the samples per second is the server, not a client segment's forward.
Latency is per request, client side; samples/s over the whole run.

The server's CPU per request outside the model: this process's CPU time (every thread: gRPC's
own and its workers, all of it the server's) per request, minus the thread CPU time spent inside
:func:`server.step.train_step` (forward, loss, backward, optimizer step and the reply's tensors).
It is measured with one client, unbatched, ``--repeat`` times, the median kept. A second
measurement serves the same framed requests in this thread without gRPC and times each stage
(parse, admission, the step, commit, framing the reply), so what is left of the per-request CPU
is gRPC's; ``--profile`` prints where the Python time goes (cProfile of that loop).

    python -m benchmarks.bench_scaling [--quick] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from benchmarks.common import bench_parser, machine, median, table, write_result
from fsl.channel import ChannelIdentity
from fsl.config import ServerConfig
from fsl.grpc_channel import GrpcChannel
from fsl.models import build_model, cut_shape, split_model
from fsl.wire import codec, frame
from fsl.wire import dataplane_pb2 as pb
from fsl.wire.frame import Framed

BATCH = 32
CUT = "conv1"
CLIENTS = (1, 2, 4, 8, 16, 32, 64)
OVERHEAD_TARGET_MS = 0.5


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _state() -> Any:
    from server.state import SplitServerState

    split = split_model(build_model("cnn", seed=0), CUT)
    return SplitServerState(
        split.server, cut_shape(split.client, (1, 28, 28)), 10, lr=0.01, momentum=0.9, device="cpu", cut=CUT
    )


class StepMeter:
    """Thread CPU time inside :func:`server.step.train_step`, over all threads that call it."""

    def __init__(self) -> None:
        self.cpu_s = 0.0
        self.calls = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def installed(self) -> Iterator[StepMeter]:
        import server.state as st

        inner = st.train_step

        def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.thread_time()
            try:
                return inner(*a, **kw)
            finally:
                dt = time.thread_time() - t0
                with self._lock:
                    self.cpu_s += dt
                    self.calls += 1

        st.train_step = timed  # type: ignore[assignment]  # the name run_train calls
        try:
            yield self
        finally:
            st.train_step = inner


# ----------------------------------------------------------------------------- client process
def client_main() -> None:
    """Reads one JSON command per line (``address``, ``k``, ``steps``, ``shape``) and runs it."""
    torch.set_num_threads(1)
    for line in sys.stdin:
        _run_clients(json.loads(line))


def _run_clients(cmd: dict[str, Any]) -> None:
    """K client threads: connect and warm up, print ``ready``, wait for ``go``, run, print the latencies."""
    k, steps, shape = int(cmd["k"]), int(cmd["steps"]), tuple(cmd["shape"])
    chans = [
        GrpcChannel(address=cmd["address"], identity=ChannelIdentity(client_id=f"c{i}", round=1)) for i in range(k)
    ]
    g = torch.Generator().manual_seed(k)
    data = [(torch.rand(BATCH, *shape, generator=g), torch.randint(0, 10, (BATCH,), generator=g)) for _ in range(k)]
    lat: list[list[float]] = [[] for _ in range(k)]
    ready = threading.Barrier(k + 1)
    go = threading.Event()
    spans: list[tuple[float, float]] = [(0.0, 0.0)] * k

    def run(i: int) -> None:
        h, y = data[i]
        for _ in range(2):  # connect, and the server's first steps
            chans[i].train_step(h, y)
        ready.wait()
        go.wait()
        t_first = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            chans[i].train_step(h, y)
            lat[i].append(time.perf_counter() - t0)
        spans[i] = (t_first, time.perf_counter())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    ready.wait()
    print("ready", flush=True)
    sys.stdin.readline()
    go.set()
    for t in threads:
        t.join()
    for c in chans:
        c.close()
    wall = max(e for _, e in spans) - min(s for s, _ in spans)
    print(json.dumps({"wall_s": wall, "latencies": lat}), flush=True)


class Clients:
    """The client process, kept for every configuration."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_scaling", "--client"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the client process ended (exit {self.proc.wait()})")
        return line.strip()

    def _send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def measure(self, address: str, k: int, steps: int, shape: tuple[int, ...], window: Any) -> dict[str, Any]:
        """Run K clients of ``steps`` requests; ``window`` opens (returns its closer) when they are ready."""
        self._send(json.dumps({"address": address, "k": k, "steps": steps, "shape": list(shape)}))
        if self._line() != "ready":
            raise RuntimeError("the client process did not get ready")
        close = window()
        self._send("go")
        res: dict[str, Any] = json.loads(self._line())
        res["window"] = close()
        return res

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def serve(clients: Clients, k: int, steps: int, batched: bool, *, workers: int, max_requests: int) -> dict[str, Any]:
    """One configuration on a fresh server; the row of the table."""
    from server.batching import RequestBatcher
    from server.split_server import SplitServer

    sc = ServerConfig()
    state = _state()
    batcher = RequestBatcher(state, max_requests=max_requests, max_wait_ms=sc.max_batch_wait_ms) if batched else None
    server = SplitServer(state, "127.0.0.1:0", batcher=batcher, max_workers=workers).start()
    meter = StepMeter()
    try:
        with meter.installed():

            def window() -> Any:
                c0, s0, n0, st0 = _cpu_s(), meter.cpu_s, meter.calls, state.steps

                def close() -> dict[str, float]:
                    return {
                        "cpu_s": _cpu_s() - c0,
                        "step_s": meter.cpu_s - s0,
                        "step_calls": meter.calls - n0,
                        "steps": state.steps - st0,
                    }

                return close

            res = clients.measure(server.address, k, steps, state.sample_shape, window)
    finally:
        server.stop(grace=None)
    lats = sorted(x for per in res["latencies"] for x in per)
    n = k * steps
    w = res["window"]
    return {
        "clients": k,
        "batching": batched,
        "samples_per_s": n * BATCH / res["wall_s"],
        "p50_ms": _pct(lats, 0.5) * 1e3,
        "p99_ms": _pct(lats, 0.99) * 1e3,
        "requests": n,
        "requests_per_step": n / max(1, w["steps"]),
        "server_cpu_ms_per_request": 1e3 * w["cpu_s"] / n,
        "step_cpu_ms_per_request": 1e3 * w["step_s"] / n,
        "outside_step_cpu_ms_per_request": 1e3 * (w["cpu_s"] - w["step_s"]) / n,
    }


# ----------------------------------------------------------------------------- without gRPC
def _request(h: torch.Tensor, y: torch.Tensor, step: int) -> bytes:
    """A framed Train request of one client as it arrives on the wire."""
    req = Framed(pb.TrainRequest(header=pb.Header(round=1, client_id="c0", step=step)))
    req.set("activations", h)
    codec.encode_into(req.msg.labels, y, torch.int64)
    return frame.frame_bytes(req)


STAGES = ("parse", "admit", "run", "commit", "frame_reply")


def stages(n: int, profile: bool = False) -> dict[str, Any]:
    """The server's path of a framed Train request in this thread, without gRPC: CPU ms per stage.

    ``run`` is ``state.run_train`` (the step under the lock); ``train_step`` is the part of it
    inside :func:`server.step.train_step`; ``ours`` is everything but ``train_step``.
    """
    state = _state()
    g = torch.Generator().manual_seed(0)
    h, y = torch.rand(BATCH, *state.sample_shape, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    for step in range(1, 6):  # warm-up
        frame.frame_bytes(state.train(frame.parse(pb.TrainRequest, _request(h, y, step))))
    t = dict.fromkeys(STAGES, 0.0)
    meter = StepMeter()
    prof = cProfile.Profile() if profile else None
    with meter.installed():
        if prof is not None:
            prof.enable()
        for step in range(6, n + 6):
            data = _request(h, y, step)  # the client's work, not timed: the bytes are fresh, as from a socket
            t0 = time.thread_time()
            req = frame.parse(pb.TrainRequest, data)
            t1 = time.thread_time()
            job = state.admit_train(req)
            t2 = time.thread_time()
            state.run_train([job])
            t3 = time.thread_time()
            state.commit(job)
            t4 = time.thread_time()
            frame.frame_bytes(job.result())
            t5 = time.thread_time()
            for key, dt in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                t[key] += dt
        if prof is not None:
            prof.disable()
    out = {f"{k}_ms": 1e3 * v / n for k, v in t.items()}
    out["train_step_ms"] = 1e3 * meter.cpu_s / n
    out["ours_ms"] = sum(out[f"{k}_ms"] for k in STAGES) - out["train_step_ms"]
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return out


def overhead(clients: Clients, steps: int, repeat: int, workers: int) -> dict[str, Any]:
    """CPU per request outside ``train_step``: one client, unbatched, median of ``repeat`` runs."""
    rows = [serve(clients, 1, steps, False, workers=workers, max_requests=1) for _ in range(repeat)]
    inproc = [stages(steps) for _ in range(repeat)]
    out: dict[str, Any] = {
        "server_overhead_ms_per_request": median([r["outside_step_cpu_ms_per_request"] for r in rows]),
        "server_cpu_ms_per_request": median([r["server_cpu_ms_per_request"] for r in rows]),
        "train_step_cpu_ms_per_request": median([r["step_cpu_ms_per_request"] for r in rows]),
    }
    stage = {k: median([s[k] for s in inproc]) for k in inproc[0]}
    out["stages_without_grpc_ms"] = stage
    out["grpc_ms_per_request"] = out["server_overhead_ms_per_request"] - stage["ours_ms"]
    return out


# ----------------------------------------------------------------------------- main
def run(quick: bool = False, *, repeat: int | None = None, profile: bool = False) -> dict[str, Any]:
    sc = ServerConfig()
    workers, max_requests = 16, sc.max_batch_requests  # SplitServer's and the config's defaults
    counts = (1, 4) if quick else CLIENTS
    total = 16 if quick else 256  # requests per configuration (at least 4 per client)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the split server's one thread on 2 shared cores (as bench_breakdown)
    clients = Clients()
    try:
        ov = overhead(clients, 16 if quick else 300, repeat or (1 if quick else 3), workers)
        rows = [
            serve(clients, k, max(4, total // k), batched, workers=workers, max_requests=max_requests)
            for k in counts
            for batched in (False, True)
        ]
        if profile:
            stages(200, profile=True)
    finally:
        clients.close()
        torch.set_num_threads(threads)
    print(
        table(
            rows,
            [
                "clients",
                "batching",
                "samples_per_s",
                "p50_ms",
                "p99_ms",
                "requests_per_step",
                "server_cpu_ms_per_request",
                "outside_step_cpu_ms_per_request",
            ],
            title=(
                f"One split server (CNN @ {CUT}, batch {BATCH}, 1 torch thread, {workers} gRPC workers, "
                f"batches of up to {max_requests} requests): K client threads in one client process"
            ),
        )
    )
    st = ov["stages_without_grpc_ms"]
    print(
        f"server CPU per request outside train_step: {ov['server_overhead_ms_per_request']:.3f} ms "
        f"(target <= {OVERHEAD_TARGET_MS}); server CPU {ov['server_cpu_ms_per_request']:.3f} ms, "
        f"train_step {ov['train_step_cpu_ms_per_request']:.3f} ms; without gRPC: "
        + ", ".join(f"{k} {st[f'{k}_ms']:.3f}" for k in STAGES)
        + f" ms (ours {st['ours_ms']:.3f} ms), so gRPC about {ov['grpc_ms_per_request']:.3f} ms"
    )
    result = {
        "machine": machine(),
        "cut": CUT,
        "batch": BATCH,
        "grpc_workers": workers,
        "max_batch_requests": max_requests,
        "max_batch_wait_ms": sc.max_batch_wait_ms,
        "clients_are": "threads in one separate process, sending precomputed activations",
        "rows": rows,
        **ov,
        "server_overhead_target_ms": OVERHEAD_TARGET_MS,
        "quick": quick,
    }
    write_result("scaling", result)
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main()
        return
    ap = bench_parser(__doc__)
    ap.add_argument("--repeat", type=int, default=None, help="overhead runs (median kept)")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the server path without gRPC")
    ap.add_argument("--stages", type=int, default=0, help=argparse.SUPPRESS)  # only the in-process stages
    ap.add_argument("--overhead", type=int, default=0, help="only the overhead, with this many requests (JSON)")
    a = ap.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if a.stages or a.overhead:
        torch.set_num_threads(1)
        if a.stages:
            print(json.dumps(stages(a.stages, profile=a.profile), indent=1))
            return
        clients = Clients()
        try:
            print(json.dumps(overhead(clients, a.overhead, a.repeat or 1, 16)))
        finally:
            clients.close()
        return
    run(quick=a.quick, repeat=a.repeat, profile=a.profile)


if __name__ == "__main__":
    main()
