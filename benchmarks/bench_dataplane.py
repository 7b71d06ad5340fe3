"""Data-plane round trip: our gRPC data plane against a raw TCP socket echo, in the same run.

One activation batch goes up (activations + labels) and a gradient of the same shape comes down.
Ours: the real :class:`fsl.grpc_channel.GrpcChannel` -> real :class:`server.split_server.SplitServer`
(servicer, gRPC options, codec decode + validation + encode) on 127.0.0.1, with the server
segment replaced by an echo so that only the data plane is timed. Raw: the same bytes over a
plain TCP socket (length prefix, ``sendall`` from the tensor's memory, ``recv_into`` a
preallocated buffer, echoed by a thread). A third column is gRPC's own floor: grpcio with bytes in and
bytes out (no protobuf, no codec), same options. Wire bytes are counted on the socket by a byte-counting
TCP relay (HTTP/2 frames, gRPC prefixes, headers and protobuf framing all included).

    python -m benchmarks.bench_dataplane [--quick]
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Any

import numpy as np
import torch

from benchmarks.common import bench_parser, machine, median, table, timeit, write_result
from fsl.grpc_channel import DEFAULT_MAX_MESSAGE_BYTES, GrpcChannel, grpc_options
from fsl.wire import codec
from fsl.wire import dataplane_pb2 as pb
from fsl.wire.frame import Framed, as_framed, as_sent
from server.split_server import SplitServer

KB = 1024
SIZES = [16 * KB, 64 * KB, 256 * KB, 1024 * KB, 4096 * KB, 16384 * KB]
BATCH = 32


class EchoState:
    """A split-server state whose "segment" is the identity: decodes and validates the request
    exactly like :class:`SplitServerState` does (codec, dtype, shape, finiteness) and sends the
    activations back as the gradient, so only the data plane is measured."""

    max_message_bytes = DEFAULT_MAX_MESSAGE_BYTES
    torch_device = torch.device("cpu")
    accepts_frames = True  # as SplitServerState: framed requests in, framed replies out

    def train(self, request: pb.TrainRequest | Framed) -> pb.TrainReply | Framed:
        req = as_framed(request)
        h = req.tensor("activations")
        y = req.tensor("labels")
        if y.shape[0] != h.shape[0] or not codec.all_finite(h):  # the split server's own check
            raise codec.WireError("bad request")
        reply = Framed(pb.TrainReply(loss=0.0, correct=0, server_step=1))
        reply.set("grad", h)
        return as_sent(reply, req is request)

    def infer(self, request: pb.InferRequest) -> pb.InferReply:  # pragma: no cover - unused
        raise NotImplementedError

    def info(self) -> pb.InfoReply:  # pragma: no cover - unused
        return pb.InfoReply()


# ----------------------------------------------------------------------------- raw socket echo
def _recv_exact(sock: socket.socket, buf: memoryview) -> None:
    got = 0
    while got < len(buf):
        n = sock.recv_into(buf[got:])
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


class RawEcho:
    """A TCP echo server on 127.0.0.1: reads ``[u64 up][u64 down][up bytes]``, answers ``down`` bytes."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(64 * 1024 * 1024)
        view = memoryview(buf)
        head = bytearray(16)
        try:
            while True:
                _recv_exact(conn, memoryview(head))
                up, down = struct.unpack("<QQ", head)
                _recv_exact(conn, view[:up])
                conn.sendall(view[:down])  # the "gradient": as many bytes as the activations
        except (ConnectionError, OSError):
            conn.close()

    def client(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def close(self) -> None:
        self.listener.close()


def raw_round_trip(sock: socket.socket, h: torch.Tensor, y: torch.Tensor, out: bytearray) -> torch.Tensor:
    """Send h and y from their own memory, receive the gradient into ``out``, view it as a tensor."""
    hb = memoryview(h.numpy()).cast("B")
    yb = memoryview(y.numpy()).cast("B")
    sock.sendall(struct.pack("<QQ", len(hb) + len(yb), len(hb)))
    sock.sendall(hb)
    sock.sendall(yb)
    view = memoryview(out)[: len(hb)]
    _recv_exact(sock, view)
    return torch.from_numpy(np.frombuffer(view, dtype=np.float32)).view(h.shape)


# ----------------------------------------------------------------------------- gRPC's own floor
class GrpcBytesEcho:
    """gRPC itself with no protobuf and no codec: a generic method that echoes its request bytes,
    with the data plane's channel options. What grpcio costs before any of our code runs."""

    def __init__(self) -> None:
        from concurrent import futures

        import grpc

        opts = grpc_options(DEFAULT_MAX_MESSAGE_BYTES)

        def echo(req: bytes, ctx: Any) -> bytes:
            return req[: int.from_bytes(req[:8], "little")]

        handler = grpc.method_handlers_generic_handler(
            "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=opts)
        self.server.add_generic_rpc_handlers((handler,))
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=opts)
        self.call = self.channel.unary_unary("/bench.Echo/Echo")

    def round_trip(self, payload: bytes) -> bytes:
        return self.call(payload)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None)


# ----------------------------------------------------------------------------- byte-counting relay
class CountingRelay:
    """A TCP relay 127.0.0.1:port -> target that counts the bytes it forwards each way."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = 0
        self.down = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            b = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pump, args=(a, b, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(b, a, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while data := src.recv(1 << 20):
                with self._lock:
                    setattr(self, direction, getattr(self, direction) + len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.up, self.down

    def close(self) -> None:
        self.listener.close()


def wire_overhead(server_port: int, h: torch.Tensor, y: torch.Tensor, calls: int = 5) -> dict[str, float]:
    """Bytes on the TCP connection per round trip, over the raw tensor bytes (activations, labels, gradient)."""
    relay = CountingRelay(server_port)
    ch = GrpcChannel(address=f"127.0.0.1:{relay.port}")
    try:
        for _ in range(3):  # connection setup, settings, window updates
            ch.train_step(h, y)
        up0, down0 = relay.counts()
        for _ in range(calls):
            ch.train_step(h, y)
        up1, down1 = relay.counts()
    finally:
        ch.close()
        relay.close()
    wire = (up1 - up0 + down1 - down0) / calls
    raw = 2 * h.numel() * h.element_size() + y.numel() * y.element_size()
    return {"wire_bytes": wire, "tensor_bytes": raw, "overhead_fraction": (wire - raw) / raw}


# ----------------------------------------------------------------------------- main
def run(quick: bool = False) -> dict[str, Any]:
    torch.manual_seed(0)
    sizes = SIZES[:5] if quick else SIZES
    server = SplitServer(EchoState(), "127.0.0.1:0").start()  # type: ignore[arg-type]
    ch = GrpcChannel(address=server.address)
    raw = RawEcho()
    sock = raw.client()
    floor = GrpcBytesEcho()
    out = bytearray(64 * 1024 * 1024)
    rows = []
    try:
        for size in sizes:
            h = torch.randn(BATCH, size // 4 // BATCH)  # (B, D) float32 activations of `size` bytes
            y = torch.randint(0, 10, (BATCH,))
            assert torch.equal(ch.train_step(h, y).grad, h)
            assert torch.equal(raw_round_trip(sock, h, y, out), h)
            number = max(2, min(200, (4 * 1024 * 1024) // size))
            rounds = 3 if quick else 7
            # the floor's request: an 8-byte reply length, then as many bytes as activations + labels
            blob = (h.numel() * 4).to_bytes(8, "little") + bytes(h.numel() * 4 + y.numel() * 8 - 8)
            t_ours, t_raw, t_floor = [], [], []
            for _ in range(rounds):  # interleaved, so all see the same machine load
                t_ours += timeit(lambda h=h, y=y: ch.train_step(h, y), repeat=1, number=number)
                t_raw += timeit(lambda h=h, y=y: raw_round_trip(sock, h, y, out), repeat=1, number=number)
                t_floor += timeit(lambda b=blob: floor.round_trip(b), repeat=1, number=number)
            ours, base, grpc_floor = median(t_ours), median(t_raw), median(t_floor)
            ov = wire_overhead(server.port, h, y)
            rows.append(
                {
                    "payload_kb": size // KB,
                    "ours_ms": ours * 1e3,
                    "raw_ms": base * 1e3,
                    "grpc_bytes_ms": grpc_floor * 1e3,
                    "ratio": ours / base,
                    "grpc_floor_ratio": grpc_floor / base,
                    "ours_MBps": 2 * size / ours / 1e6,
                    "raw_MBps": 2 * size / base / 1e6,
                    "wire_overhead": ov["overhead_fraction"],
                    "wire_bytes": ov["wire_bytes"],
                    "tensor_bytes": ov["tensor_bytes"],
                }
            )
    finally:
        floor.close()
        sock.close()
        raw.close()
        ch.close()
        server.stop(grace=None)
    print(
        table(
            rows,
            [
                "payload_kb",
                "ours_ms",
                "raw_ms",
                "grpc_bytes_ms",
                "ratio",
                "grpc_floor_ratio",
                "ours_MBps",
                "raw_MBps",
                "wire_overhead",
            ],
            title="Data plane round trip (activations up, gradient down) vs raw TCP echo, loopback",
        )
    )
    mb = min(rows, key=lambda r: abs(r["payload_kb"] - 1024))
    big = [r for r in rows if r["payload_kb"] >= 1024]
    result = {
        "machine": machine(),
        "rows": rows,
        "rtt_ratio_1mb": mb["ratio"],
        "rtt_ratio_max_ge_1mb": max(r["ratio"] for r in big),
        "grpc_floor_ratio_1mb": mb["grpc_floor_ratio"],
        # ours over grpcio's bytes-in/bytes-out echo: what the codec, the frames, validation and the
        # servicer add to the transport they run on (1.0 = nothing)
        "over_grpc_floor_1mb": mb["ours_ms"] / mb["grpc_bytes_ms"],
        "over_grpc_floor_max_ge_1mb": max(r["ours_ms"] / r["grpc_bytes_ms"] for r in big),
        "wire_overhead_fraction_1mb": mb["wire_overhead"],
        "wire_overhead_fraction_max_ge_1mb": max(r["wire_overhead"] for r in big),
    }
    write_result("dataplane", result)
    return result


if __name__ == "__main__":
    run(**vars(bench_parser(__doc__, quick_help="fewer sizes and repeats").parse_args()))
