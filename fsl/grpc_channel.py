"""The gRPC implementation of :class:`fsl.channel.SplitChannel`."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from fsl.channel import SplitChannel
from fsl.wire import codec, frame
from fsl.wire import dataplane_pb2 as pb
from fsl.wire import dataplane_pb2_grpc as pb_grpc
from fsl.wire.frame import Framed

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "DataPlaneError", "GrpcChannel", "grpc_options"]

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE}


def grpc_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Channel/server options shared by both ends of the data plane."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
        # data-plane speed (benchmarks/bench_dataplane.py): a stream's HTTP/2 flow-control window
        # starts as large as the largest message instead of 64 KiB grown by BDP probes, so a
        # megabyte batch is not held up by WINDOW_UPDATE round trips (about 2x faster at 1-4 MB)
        ("grpc.http2.lookahead_bytes", max_message_bytes),
        ("grpc.http2.bdp_probe", 0),
    ]


class DataPlaneError(RuntimeError):
    """The split server refused or failed a request; carries the gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"split server: {code.name}: {details}")
        self.code = code
        self.details = details


@dataclass
class GrpcChannel(SplitChannel):
    """Talks to a split server over gRPC (TLS when ``root_certificates`` is given).

    Requests that fail with UNAVAILABLE are retried with backoff; the server
    recognises a retried (round, step) and answers it without training twice.
    """

    address: str = "127.0.0.1:0"
    root_certificates: bytes | str | Path | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    timeout_s: float = 120.0
    retries: int = 3
    _channel: grpc.Channel | None = field(default=None, init=False, repr=False)
    _stub: pb_grpc.SplitDataPlaneStub | None = field(default=None, init=False, repr=False)
    _train_frame: Any = field(default=None, init=False, repr=False)
    _infer_frame: Any = field(default=None, init=False, repr=False)
    _frames: bool = field(default=True, init=False, repr=False)  # the server answers TrainFrame

    def __post_init__(self) -> None:
        codec.tune_allocator()  # data-plane speed: reuse large message buffers (see codec.tune_allocator)
        opts = grpc_options(self.max_message_bytes)
        if self.root_certificates is None:
            self._channel = grpc.insecure_channel(self.address, options=opts)
        else:
            roots = self.root_certificates
            if isinstance(roots, (str, Path)):
                roots = Path(roots).read_bytes()
            creds = grpc.ssl_channel_credentials(root_certificates=roots)
            self._channel = grpc.secure_channel(self.address, creds, options=opts)
        self._stub = pb_grpc.SplitDataPlaneStub(self._channel)
        self._train_frame, self._infer_frame = (  # Train and Infer with framed tensors (fsl/wire/frame.py)
            self._channel.unary_unary(
                f"/fsl.dataplane.v1.SplitDataPlane/{name}Frame",
                request_serializer=frame.frame_bytes,
                response_deserializer=functools.partial(frame.parse, reply),
            )
            for name, reply in (("Train", pb.TrainReply), ("Infer", pb.InferReply))
        )

    def _invoke(self, method: Any, req: Any) -> Any:
        delay = 0.2
        for attempt in range(self.retries + 1):
            try:
                return method(req, timeout=self.timeout_s, wait_for_ready=attempt > 0)
            except grpc.RpcError as err:
                code = err.code()
                if code in _RETRYABLE and attempt < self.retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                raise DataPlaneError(code, err.details() or "") from None
        raise AssertionError("unreachable")

    def _call_framed(self, framed: Any, plain: Any, req: Framed) -> Framed:
        if self._frames:
            try:
                return self._invoke(framed, req)  # type: ignore[no-any-return]
            except DataPlaneError as e:
                if e.code != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                self._frames = False  # a split server from before frames: protobuf from now on
        return Framed(self._invoke(plain, req.message()))

    def _call_train(self, req: Framed) -> Framed:
        assert self._stub is not None
        return self._call_framed(self._train_frame, self._stub.Train, req)

    def _call_infer(self, req: Framed) -> Framed:
        assert self._stub is not None
        return self._call_framed(self._infer_frame, self._stub.Infer, req)

    def _call_info(self) -> pb.InfoReply:
        assert self._stub is not None
        return self._invoke(self._stub.Info, pb.InfoRequest())  # type: ignore[no-any-return]

    def _call_forward(self, req: pb.ForwardRequest) -> pb.ForwardReply:
        assert self._stub is not None
        return self._invoke(self._stub.Forward, req)  # type: ignore[no-any-return]

    def _call_backward(self, req: pb.BackwardRequest) -> pb.BackwardReply:
        assert self._stub is not None
        return self._invoke(self._stub.Backward, req)  # type: ignore[no-any-return]

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
