"""The split server: hosts the server segment and serves the data plane.

:class:`SplitServerState` is a plain, thread-safe object: it validates a request
against what the server segment expects, runs forward, loss and backward, steps
its own optimizer and returns the gradient at the cut. Nothing is touched
before a request has passed every check, so bad input never changes the model.
:class:`SplitServicer` is the thin gRPC layer on top (message in, plain call,
exceptions to status codes) and :class:`SplitServer` runs it on a port.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch
from torch import nn

from fsl.auth import AuthError, ExpiredCredential, RoundAuthority
from fsl.grpc_channel import DEFAULT_MAX_MESSAGE_BYTES, grpc_options
from fsl.wire import codec
from fsl.wire import dataplane_pb2 as pb
from fsl.wire import dataplane_pb2_grpc as pb_grpc

__all__ = ["InvalidRequest", "SplitServer", "SplitServerState", "resolve_device"]

log = logging.getLogger(__name__)

ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")


class InvalidRequest(ValueError):
    """A request that is well-formed on the wire but not acceptable (maps to INVALID_ARGUMENT)."""


def resolve_device(device: str) -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    return dev


@dataclass
class ClientStats:
    """Data-plane traffic of one client, as the server counted it."""

    bytes_up: int = 0
    bytes_down: int = 0
    train_requests: int = 0
    infer_requests: int = 0
    samples: int = 0


@dataclass
class SplitServerState:
    """The server segment, its optimizer and the checks every request must pass."""

    segment: nn.Module
    sample_shape: tuple[int, ...]  # per-sample activation shape at the cut, e.g. (16, 14, 14)
    num_classes: int
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    device: str = "auto"
    max_batch: int = 4096
    authority: RoundAuthority | None = None
    model_name: str = ""
    cut: str = ""
    mode: str = "fsl"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # called with (header, activations, labels) of every accepted training request: what an
    # honest-but-curious server sees (the observation recorder of the attack suite hooks in here)
    observer: Callable[[pb.Header, torch.Tensor, torch.Tensor], None] | None = None
    steps: int = 0
    stats: dict[str, ClientStats] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.torch_device = resolve_device(self.device)
        self.segment.to(self.torch_device)
        self.optimizer = torch.optim.SGD(
            self.segment.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        self.loss_fn = nn.CrossEntropyLoss(reduction="mean")
        self._lock = threading.Lock()
        self._last: dict[str, tuple[int, int, pb.TrainReply]] = {}  # client -> (round, step, reply)
        self._max_elements = self.max_batch * max(1, _prod(self.sample_shape))

    # ---------------------------------------------------------------- checks
    def _authenticate(self, h: pb.Header) -> None:
        if self.authority is not None:
            self.authority.verify(h.run_id, h.round, h.client_id, h.token)

    def _activations(self, t: pb.Tensor) -> torch.Tensor:
        if t.dtype not in ACTIVATION_DTYPES:
            raise InvalidRequest(f"activations must be one of {ACTIVATION_DTYPES}, got {t.dtype!r}")
        shape = tuple(t.shape)  # checked against the segment before any buffer is touched
        if len(shape) != len(self.sample_shape) + 1 or shape[1:] != tuple(self.sample_shape):
            raise InvalidRequest(
                f"activations of shape {list(shape)} do not fit the server segment at cut {self.cut!r}: "
                f"expected (B, {', '.join(map(str, self.sample_shape))})"
            )
        if not 1 <= shape[0] <= self.max_batch:
            raise InvalidRequest(f"batch size {shape[0]} outside [1, {self.max_batch}]")
        h = codec.decode(t, name="activations", max_elements=self._max_elements)
        if not torch.isfinite(h).all():
            raise InvalidRequest("activations contain NaN or Inf")
        return h

    def _labels(self, t: pb.Tensor, batch: int) -> torch.Tensor:
        if t.dtype != "int64":
            raise InvalidRequest(f"labels must be int64, got {t.dtype!r}")
        y = codec.decode(t, name="labels", max_elements=self.max_batch)
        if tuple(y.shape) != (batch,):
            raise InvalidRequest(f"labels of shape {list(y.shape)} for a batch of {batch}: expected ({batch},)")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise InvalidRequest(f"labels must lie in [0, {self.num_classes})")
        return y

    def _count(self, client: str, up: int, down: int, *, train: bool, samples: int = 0) -> None:
        s = self.stats.setdefault(client, ClientStats())
        s.bytes_up += up
        s.bytes_down += down
        s.samples += samples
        if train:
            s.train_requests += 1
        else:
            s.infer_requests += 1

    # ---------------------------------------------------------------- calls
    def train(self, request: pb.TrainRequest) -> pb.TrainReply:
        """One training step of the server segment on a client's batch."""
        hdr = request.header
        self._authenticate(hdr)
        h = self._activations(request.activations)
        y = self._labels(request.labels, h.shape[0])
        with self._lock:
            last = self._last.get(hdr.client_id) if hdr.client_id else None
            if last is not None and last[:2] == (hdr.round, hdr.step):
                return last[2]  # a retry of a step we already took: answer it, do not train twice
            if self.observer is not None:
                self.observer(hdr, h, y)
            reply = self._train_locked(h, y, request.activations.dtype)
            if hdr.client_id:
                self._last[hdr.client_id] = (hdr.round, hdr.step, reply)
            self._count(hdr.client_id, request.ByteSize(), reply.ByteSize(), train=True, samples=h.shape[0])
        return reply

    def _train_locked(self, h_in: torch.Tensor, y: torch.Tensor, wire_dtype: str) -> pb.TrainReply:
        dev = self.torch_device
        h = h_in.to(dev, dtype=torch.float32, non_blocking=True).requires_grad_(True)  # (B, ...) smashed
        y = y.to(dev, non_blocking=True)
        self.segment.train()
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.segment(h)  # (B, num_classes)
        loss = self.loss_fn(logits, y)
        if not torch.isfinite(loss):
            raise InvalidRequest("the batch gives a non-finite loss; the server segment was not updated")
        loss.backward()
        assert h.grad is not None
        self.optimizer.step()
        self.steps += 1
        correct = int((logits.argmax(1) == y).sum())
        grad = codec.encode(h.grad, codec.DTYPES[wire_dtype])  # (B, ...) dL/dh, in the sender's dtype
        return pb.TrainReply(grad=grad, loss=float(loss.detach()), correct=correct, server_step=self.steps)

    def infer(self, request: pb.InferRequest) -> pb.InferReply:
        """Split inference: the rest of the model on a client's activations."""
        self._authenticate(request.header)
        h = self._activations(request.activations)
        with self._lock:
            self.segment.eval()
            with torch.no_grad():
                logits = self.segment(h.to(self.torch_device, dtype=torch.float32))
            reply = pb.InferReply(logits=codec.encode(logits.float()))
            self._count(request.header.client_id, request.ByteSize(), reply.ByteSize(), train=False)
        return reply

    def info(self) -> pb.InfoReply:
        return pb.InfoReply(
            model=self.model_name,
            cut=self.cut,
            sample_shape=list(self.sample_shape),
            dtypes=list(ACTIVATION_DTYPES),
            max_batch=self.max_batch,
            max_message_bytes=self.max_message_bytes,
            device=str(self.torch_device),
            mode=self.mode,
        )

    # ---------------------------------------------------------------- state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Segment weights and optimizer buffers, as CPU tensors (for safetensors checkpoints)."""
        with self._lock:
            out = {f"segment.{k}": v.detach().cpu().clone() for k, v in self.segment.state_dict().items()}
            names = {id(p): n for n, p in self.segment.named_parameters()}
            for p, st in self.optimizer.state.items():
                for key, val in st.items():
                    if isinstance(val, torch.Tensor):
                        out[f"optim.{names[id(p)]}.{key}"] = val.detach().cpu().clone()
            out["meta.steps"] = torch.tensor(self.steps, dtype=torch.int64)
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_tensors` produced."""
        with self._lock:
            seg = {k[len("segment.") :]: v for k, v in tensors.items() if k.startswith("segment.")}
            self.segment.load_state_dict(seg)
            params = dict(self.segment.named_parameters())
            self.optimizer.state.clear()
            for k, v in tensors.items():
                if k.startswith("optim."):
                    pname, key = k[len("optim.") :].rsplit(".", 1)
                    self.optimizer.state[params[pname]][key] = v.to(self.torch_device)
            self.steps = int(tensors.get("meta.steps", torch.tensor(0)))
            self._last.clear()

    def segment_state_dict(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the server segment's weights, taken under the lock."""
        with self._lock:
            return {k: v.detach().cpu().clone() for k, v in self.segment.state_dict().items()}

    def traffic(self) -> dict[str, ClientStats]:
        with self._lock:
            return {k: ClientStats(**vars(v)) for k, v in self.stats.items()}


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


_Req = TypeVar("_Req")
_Rep = TypeVar("_Rep")


class SplitServicer(pb_grpc.SplitDataPlaneServicer):
    """Thin gRPC layer: decode nothing itself, call the state, map errors to status codes."""

    def __init__(self, state: SplitServerState) -> None:
        self.state = state

    @staticmethod
    def _run(fn: Callable[[_Req], _Rep], request: _Req, context: grpc.ServicerContext) -> _Rep:
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

    def Train(self, request: pb.TrainRequest, context: grpc.ServicerContext) -> pb.TrainReply:  # noqa: N802
        return self._run(self.state.train, request, context)

    def Infer(self, request: pb.InferRequest, context: grpc.ServicerContext) -> pb.InferReply:  # noqa: N802
        return self._run(self.state.infer, request, context)

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoReply:  # noqa: N802
        return self._run(lambda _r: self.state.info(), request, context)


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
        certificate_chain: bytes | str | Path | None = None,
        private_key: bytes | str | Path | None = None,
    ) -> None:
        self.state = state
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="split-server"),
            options=grpc_options(state.max_message_bytes),
        )
        pb_grpc.add_SplitDataPlaneServicer_to_server(SplitServicer(state), self._server)
        host = address.rsplit(":", 1)[0]
        if certificate_chain is not None and private_key is not None:
            creds = grpc.ssl_server_credentials([(_pem(private_key), _pem(certificate_chain))])
            port = self._server.add_secure_port(address, creds)
            self.tls = True
        else:
            port = self._server.add_insecure_port(address)
            self.tls = False
        if port == 0:
            raise OSError(f"could not bind the split server to {address}")
        self.address = f"{host}:{port}"
        self.port = port

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


def _pem(x: bytes | str | Path) -> bytes:
    return x if isinstance(x, bytes) else Path(x).read_bytes()
