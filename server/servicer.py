"""The split server's gRPC face: lenient parsing, status mapping, TLS, the port.

:class:`SplitServicer` is the thin layer over a :class:`server.state.SplitServerState` (or a
batcher in front of it): message in, plain call, exceptions to status codes.
:class:`SplitServer` runs it on ``host:port``, with TLS when given a certificate and key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc

from fsl.auth import AuthError, ExpiredCredential
from fsl.grpc_channel import grpc_options
from fsl.wire import codec, frame
from fsl.wire import dataplane_pb2 as pb
from fsl.wire import dataplane_pb2_grpc as pb_grpc
from fsl.wire.frame import Framed
from server.state import SplitServerState
from server.validation import InvalidRequest

__all__ = ["SplitServer", "SplitServicer", "add_servicer"]

log = logging.getLogger(__name__)

_Req = TypeVar("_Req")
_Rep = TypeVar("_Rep")


class SplitServicer(pb_grpc.SplitDataPlaneServicer):
    """Thin gRPC layer: decode nothing itself, call the state, map errors to status codes."""

    def __init__(self, state: SplitServerState, batcher: Any | None = None, infer_batcher: Any | None = None) -> None:
        self.state = state
        # a server.batching.RequestBatcher serves Train in batches; a server.infer_batching.InferBatcher
        # serves Infer in batches under the requests' latency budgets
        self.train_fn: Callable[[Any], pb.TrainReply | Framed] = state.train if batcher is None else batcher.train
        self.infer_fn: Callable[[Any], pb.InferReply | Framed] = (
            state.infer if infer_batcher is None else infer_batcher.infer
        )
        # TrainFrame/InferFrame hand frames on as they are to what reads them (no copy of the
        # tensors); anything else gets the plain message back
        takes_frames = getattr(state if batcher is None else batcher, "accepts_frames", False)
        self.train_frame_fn = self.train_fn if takes_frames else (lambda r: self.train_fn(r.message()))
        takes_frames = getattr(state if infer_batcher is None else infer_batcher, "accepts_frames", False)
        self.infer_frame_fn = self.infer_fn if takes_frames else (lambda r: self.infer_fn(r.message()))

    @staticmethod
    def _run(fn: Callable[[_Req], _Rep], request: _Req, context: grpc.ServicerContext) -> _Rep:
        if isinstance(request, _Undecodable):  # bytes that are not the method's message
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request))
        try:
            return fn(request)
        except (codec.WireError, InvalidRequest) as e:
            code, text = grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except AuthError as e:
            code, text = grpc.StatusCode.UNAUTHENTICATED, str(e)
        except ExpiredCredential as e:
            code, text = grpc.StatusCode.PERMISSION_DENIED, str(e)
        except Exception as e:  # noqa: BLE001 - the server must survive anything a request triggers
            log.exception("split server failed on a request")
            code, text = grpc.StatusCode.INTERNAL, f"split server error: {type(e).__name__}: {e}"
        context.abort(code, text)
        raise AssertionError("unreachable")  # abort raises

    def Train(self, request: pb.TrainRequest, context: grpc.ServicerContext) -> pb.TrainReply | Framed:  # noqa: N802
        return self._run(self.train_fn, request, context)

    def TrainFrame(self, request: Framed, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """``Train`` with the tensors framed beside the message (:mod:`fsl.wire.frame`), both ways."""
        return self._run(self.train_frame_fn, request, context)

    def Infer(self, request: pb.InferRequest, context: grpc.ServicerContext) -> pb.InferReply | Framed:  # noqa: N802
        return self._run(self.infer_fn, request, context)

    def InferFrame(self, request: Framed, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """``Infer`` with the activations framed beside the message (:mod:`fsl.wire.frame`)."""
        return self._run(self.infer_frame_fn, request, context)

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoReply:  # noqa: N802
        return self._run(lambda _r: self.state.info(), request, context)

    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext) -> pb.ForwardReply:  # noqa: N802
        return self._run(self.state.forward, request, context)

    def Backward(self, request: pb.BackwardRequest, context: grpc.ServicerContext) -> pb.BackwardReply:  # noqa: N802
        return self._run(self.state.backward, request, context)


class _Undecodable:
    """What a request's bytes became when they do not parse as the method's message."""

    def __init__(self, message: str, error: Exception) -> None:
        self.text = f"the request is not a valid {message}: {error}"

    def __str__(self) -> str:
        return self.text


def _lenient(cls: Any) -> Callable[[bytes], Any]:
    """``cls.FromString`` that hands undecodable bytes to the servicer instead of raising.

    gRPC answers a deserializer's exception with INTERNAL ("Exception deserializing request!"),
    which reads like a server bug; the servicer answers INVALID_ARGUMENT with what was wrong.
    """

    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
            return _Undecodable(cls.DESCRIPTOR.full_name, e)

    return parse


def _lenient_frame(cls: Any) -> Callable[[bytes], Any]:
    """:func:`fsl.wire.frame.parse` that hands a malformed frame to the servicer (as :func:`_lenient`)."""

    def parse(data: bytes) -> Any:
        try:
            return frame.parse(cls, data)
        except codec.WireError as e:
            return _Undecodable(f"{cls.DESCRIPTOR.full_name} frame", e)

    return parse


def add_servicer(servicer: SplitServicer, server: grpc.Server) -> None:
    """Register the data plane's methods (as the generated code does, with lenient parsing)."""
    methods: dict[str, tuple[Any, Any, Any]] = {
        "Train": (servicer.Train, pb.TrainRequest, pb.TrainReply),
        "Infer": (servicer.Infer, pb.InferRequest, pb.InferReply),
        "Info": (servicer.Info, pb.InfoRequest, pb.InfoReply),
        "Forward": (servicer.Forward, pb.ForwardRequest, pb.ForwardReply),
        "Backward": (servicer.Backward, pb.BackwardRequest, pb.BackwardReply),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=_lenient(req), response_serializer=rep.SerializeToString
        )
        for name, (fn, req, rep) in methods.items()
    }
    for name, fn, req in (
        ("TrainFrame", servicer.TrainFrame, pb.TrainRequest),
        ("InferFrame", servicer.InferFrame, pb.InferRequest),
    ):  # not in the .proto: frames of its messages (fsl/wire/frame.py)
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=_lenient_frame(req), response_serializer=frame.frame_bytes
        )
    service = pb.DESCRIPTOR.services_by_name["SplitDataPlane"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


class SplitServer:
    """Runs a :class:`SplitServerState` behind gRPC on ``host:port`` (port 0: the OS picks).

    With ``certificate_chain`` and ``private_key`` (PEM bytes or paths) it serves TLS.
    """

    def __init__(
        self,
        state: SplitServerState,
        address: str = "127.0.0.1:0",
        *,
        max_workers: int = 16,
        batcher: Any | None = None,  # a server.batching.RequestBatcher: Train in batches
        infer_batcher: Any | None = None,  # a server.infer_batching.InferBatcher: Infer in batches under budgets
        certificate_chain: bytes | str | Path | None = None,
        private_key: bytes | str | Path | None = None,
        interceptors: Sequence[grpc.ServerInterceptor] = (),
    ) -> None:
        self.state = state
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="split-server"),
            options=grpc_options(state.max_message_bytes),
            interceptors=list(interceptors),
        )
        codec.tune_allocator()  # reuse large message buffers (see fsl.wire.codec.tune_allocator)
        add_servicer(SplitServicer(state, batcher, infer_batcher), self._server)
        self.address, self.port, self.tls = bind(self._server, address, certificate_chain, private_key)

    def start(self) -> SplitServer:
        self._server.start()
        log.info("split server on %s (device %s, tls %s)", self.address, self.state.torch_device, self.tls)
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        self._server.stop(grace).wait()

    def wait(self) -> None:
        self._server.wait_for_termination()

    def __enter__(self) -> SplitServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def bind(
    server: grpc.Server,
    address: str,
    certificate_chain: bytes | str | Path | None = None,
    private_key: bytes | str | Path | None = None,
) -> tuple[str, int, bool]:
    """Bind ``server`` to ``address`` (port 0: the OS picks), with TLS when both PEMs are given;
    returns the bound ``host:port``, the port and whether it serves TLS."""
    if certificate_chain is not None and private_key is not None:
        creds = grpc.ssl_server_credentials([(_pem(private_key), _pem(certificate_chain))])
        port, tls = server.add_secure_port(address, creds), True
    else:
        port, tls = server.add_insecure_port(address), False
    if port == 0:
        raise OSError(f"could not bind the split server to {address}")
    return f"{address.rsplit(':', 1)[0]}:{port}", port, tls


def _pem(x: bytes | str | Path) -> bytes:
    return x if isinstance(x, bytes) else Path(x).read_bytes()
