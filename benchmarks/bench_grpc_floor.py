"""What grpcio itself costs a server per request: the floor under the split server's overhead.

A bare gRPC server (no framing, no validation, no model) echoes raw bytes of the split server's
request size: the CNN's ``conv1`` activations of a batch of 32 (16 x 14 x 14 float32, 401,408 bytes)
up and a gradient of the same size down, as one training request and its reply carry. The server
runs in its own process and reports its process CPU time (every thread: gRPC's poller, the handler
pool or the asyncio loop) over ``--requests`` calls from one client in this process, for grpcio's
synchronous server and for ``grpc.aio``. The figure is the CPU per request no data plane built on
that server can go below, whatever its own code does; ``bench_scaling`` measures the split server's
whole overhead against the same 0.5 ms target.

    python -m benchmarks.bench_grpc_floor [--requests 3000] [--repeat 3] [--bytes 401408]

Writes ``benchmarks/results/grpc_floor.json``: per server kind the median CPU ms per request and
the round trip, beside the sizes and grpcio's version.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

SERVICE, METHOD = "fslbench.Echo", "Call"
STAT = b"STAT"  # a request asking the server for its process CPU time so far
OPTIONS = [("grpc.max_receive_message_length", 1 << 26), ("grpc.max_send_message_length", 1 << 26)]
RESULTS = Path(__file__).parent / "results" / "grpc_floor.json"
TARGET_MS = 0.5


def _reply(request: bytes) -> bytes:
    return str(time.process_time()).encode() if request[:4] == STAT else request


def _serve_sync(port: int) -> None:
    from concurrent import futures

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(lambda req, ctx: _reply(req))}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=OPTIONS)  # the ServerApp's 16 workers
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


def _serve_aio(port: int) -> None:
    async def call(req: bytes, ctx: Any) -> bytes:
        return _reply(req)

    async def main() -> None:
        handler = grpc.method_handlers_generic_handler(SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(call)})
        server = grpc.aio.server(options=OPTIONS)
        server.add_generic_rpc_handlers((handler,))
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print(bound, flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


def measure(kind: str, n_bytes: int, requests: int, warmup: int = 200) -> dict[str, float]:
    """One server process of ``kind`` (``sync`` | ``aio``): its CPU and the round trip per request."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_grpc_floor", "--serve", kind], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as channel:
            call = channel.unary_unary(f"/{SERVICE}/{METHOD}")
            body = os.urandom(n_bytes)
            for _ in range(warmup):
                call(body)
            cpu0, wall0 = float(call(STAT)), time.perf_counter()
            for _ in range(requests):
                call(body)
            cpu1, wall1 = float(call(STAT)), time.perf_counter()
    finally:
        proc.kill()
        proc.wait()
    return {"cpu_ms_per_request": (cpu1 - cpu0) / requests * 1e3, "round_trip_ms": (wall1 - wall0) / requests * 1e3}


def run(n_bytes: int, requests: int, repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "bytes_each_way": n_bytes,
        "requests": requests,
        "repeat": repeat,
        "grpcio": grpc.__version__,
        "target_ms": TARGET_MS,
        "servers": {},
    }
    for kind in ("sync", "aio"):
        rows = [measure(kind, n_bytes, requests) for _ in range(repeat)]
        out["servers"][kind] = {
            "cpu_ms_per_request": statistics.median(r["cpu_ms_per_request"] for r in rows),
            "round_trip_ms": statistics.median(r["round_trip_ms"] for r in rows),
            "runs": rows,
        }
        print(
            f"{kind:4s}: server CPU {out['servers'][kind]['cpu_ms_per_request']:.3f} ms/request, "
            f"round trip {out['servers'][kind]['round_trip_ms']:.3f} ms ({n_bytes:,} bytes each way)",
            flush=True,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--bytes", type=int, default=16 * 14 * 14 * 32 * 4, help="payload each way (default: the CNN's conv1, batch 32)"
    )
    ap.add_argument("--serve", choices=("sync", "aio"), help=argparse.SUPPRESS)  # the server process
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    if a.serve:
        (_serve_sync if a.serve == "sync" else _serve_aio)(0)
        return
    doc = run(a.bytes, a.requests, a.repeat)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"results: {a.out}")


if __name__ == "__main__":
    main()
