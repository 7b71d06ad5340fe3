"""The split server: hosts the server segment and serves the data plane.

:class:`SplitServerState` is a plain, thread-safe object: it validates a request
against what the server segment expects, runs forward, loss and backward, steps
its own optimizer and returns the gradient at the cut. Nothing is touched
before a request has passed every check, so bad input never changes the model.
:class:`SplitServicer` is the thin gRPC layer on top (message in, plain call,
exceptions to status codes) and :class:`SplitServer` runs it on a port.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import grpc
import torch
from torch import nn

from fsl.auth import AuthError, ExpiredCredential, RoundAuthority
from fsl.exits import exit_loss
from fsl.fastmath import flush_denormals
from fsl.grpc_channel import DEFAULT_MAX_MESSAGE_BYTES, grpc_options
from fsl.wire import codec, frame
from fsl.wire import dataplane_pb2 as pb
from fsl.wire import dataplane_pb2_grpc as pb_grpc
from fsl.wire.frame import Framed, as_framed, as_sent, wire_size

__all__ = ["InvalidRequest", "SplitServer", "SplitServerState", "resolve_device"]

log = logging.getLogger(__name__)

ACTIVATION_DTYPES = ("float32", "float16", "bfloat16", "int8")  # privacy: int8 = quantized (issue 5)


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


class Replica:
    """One copy of the server segment with its own optimizer and lock.

    ``fsl`` uses one (the global segment itself); SplitFed v1 gives every client its
    own copy and ``hybrid`` one per group; copies are averaged after the round.
    """

    def __init__(self, segment: nn.Module, lr: float, momentum: float, weight_decay: float) -> None:
        self.segment = segment
        self.optimizer = torch.optim.SGD(segment.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.lock = threading.Lock()
        self.steps = 0  # optimizer steps taken by this copy
        self.samples = 0  # samples trained on by this copy since it was made


@dataclass
class _Pending:
    """A U-shaped forward pass waiting for its backward."""

    round: int
    step: int
    h: torch.Tensor  # (B, ...) leaf at the first cut, requires grad
    out: torch.Tensor  # (B, ...) middle output, with its graph
    version: int  # replica.steps when the graph was built
    reply: pb.ForwardReply


@dataclass
class SplitServerState:
    """The server segment(s), the optimizer(s) and the checks every request must pass."""

    accepts_frames: ClassVar[bool] = True  # train() reads fsl.wire.frame.Framed requests in place

    segment: nn.Module  # the global server segment (in U-shaped splits: the middle segment)
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
    ushaped: bool = False  # train through Forward/Backward; the server never sees labels
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    inference_only: bool = False  # fsl serve: refuse Train/Forward/Backward (rounds belong to the ServerApp)
    exit_weight: float = 0.5  # multi-exit models: weight of each server-side exit's loss (fsl.exits)
    # called with (header, activations, labels) of every accepted training request: what an
    # honest-but-curious server sees (the observation recorder of the attack suite hooks in here);
    # in U-shaped splits labels is None
    observer: Callable[[pb.Header, torch.Tensor, torch.Tensor | None], None] | None = None
    # called after each accepted training step with (header, activations, labels, dL/dh sent back):
    # the whole exchange, for the gradient-inversion attack (server/recorder.py sets one or the other)
    exchange_observer: Callable[[pb.Header, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None
    stats: dict[str, ClientStats] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.torch_device = resolve_device(self.device)
        self.segment.to(self.torch_device)
        self.global_replica = Replica(self.segment, self.lr, self.momentum, self.weight_decay)
        self.optimizer = self.global_replica.optimizer
        self.loss_fn = nn.CrossEntropyLoss(reduction="mean")
        self._lock = threading.Lock()  # guards the tables below, never held during compute
        self._replicas: dict[str, Replica] = {}
        self._assignment: dict[str, str] = {}  # client -> replica id
        self._last: dict[str, tuple[int, int, Any]] = {}  # client -> (round, step, reply)
        self._pending: dict[str, _Pending] = {}  # client -> U-shaped forward awaiting backward
        self._max_elements = self.max_batch * max(1, _prod(self.sample_shape))
        self._retired_steps = 0
        with torch.no_grad():
            was = self.segment.training
            probe = self.segment.eval()(torch.zeros(1, *self.sample_shape, device=self.torch_device))
            self.segment.train(was)
        self.out_shape = tuple(probe.shape[1:])  # per-sample shape of the segment's output

    @property
    def steps(self) -> int:
        """Optimizer steps taken on the server side, over all copies."""
        with self._lock:
            live = sum(r.steps for r in self._replicas.values())
        return self.global_replica.steps + self._retired_steps + live

    # ------------------------------------------------------------- replicas
    def open_replicas(self, assignment: dict[str, str]) -> None:
        """Give each replica id in ``assignment`` (client -> replica) its own copy of the global
        segment for this round. A single replica id means: everyone trains the global segment."""
        ids = sorted(set(assignment.values()))
        with self._lock:
            self._assignment = dict(assignment)
            self._replicas = {}
            if len(ids) > 1:
                for rid in ids:
                    rep = Replica(copy.deepcopy(self.segment), self.lr, self.momentum, self.weight_decay)
                    rep.optimizer.load_state_dict(_remap_optimizer_state(self.optimizer, rep.optimizer))
                    self._replicas[rid] = rep

    def merge_replicas(self) -> dict[str, int]:
        """FedAvg the replicas into the global segment, weighted by the samples each trained on
        (optimizer momentum averaged the same way); returns the weights. No-op with one replica."""
        with self._lock:
            reps, self._replicas, self._assignment = self._replicas, {}, {}
        weights = {rid: r.samples for rid, r in reps.items()}
        total = sum(weights.values())
        if not reps or total == 0:
            return weights
        with self.global_replica.lock, torch.no_grad():
            g_state = self.segment.state_dict()
            for key, val in g_state.items():
                if val.is_floating_point():
                    val.copy_(sum(r.segment.state_dict()[key] * (weights[rid] / total) for rid, r in reps.items()))
                else:  # integer buffers (BatchNorm's batch counter): take the largest
                    val.copy_(max(r.segment.state_dict()[key] for r in reps.values()))
            g_params = list(self.segment.parameters())
            per_rep = {rid: list(r.segment.parameters()) for rid, r in reps.items()}
            for i, gp in enumerate(g_params):
                bufs = [
                    (rid, r.optimizer.state.get(per_rep[rid][i], {}).get("momentum_buffer")) for rid, r in reps.items()
                ]
                if all(b is not None for _, b in bufs):
                    self.optimizer.state[gp]["momentum_buffer"] = sum(b * (weights[rid] / total) for rid, b in bufs)
        self._retired_steps += sum(r.steps for r in reps.values())
        return weights

    def _replica_for(self, client_id: str) -> Replica:
        with self._lock:
            rid = self._assignment.get(client_id)
            return self._replicas.get(rid, self.global_replica) if rid is not None else self.global_replica

    # ---------------------------------------------------------------- checks
    def _check_trainable(self) -> None:
        if self.inference_only:
            raise InvalidRequest("this server serves inference only (fsl serve); training runs under the ServerApp")

    def _authenticate(self, h: pb.Header) -> None:
        if self.authority is not None:
            self.authority.verify(h.run_id, h.round, h.client_id, h.token)

    def _tensor(self, t: pb.Tensor, what: str, per_sample: tuple[int, ...], data: Any = None) -> torch.Tensor:
        if t.dtype not in ACTIVATION_DTYPES:
            raise InvalidRequest(f"{what} must be one of {ACTIVATION_DTYPES}, got {t.dtype!r}")
        shape = tuple(t.shape)  # checked against the segment before any buffer is touched
        if len(shape) != len(per_sample) + 1 or shape[1:] != tuple(per_sample):
            raise InvalidRequest(
                f"{what} of shape {list(shape)} do not fit the server segment at cut {self.cut!r}: "
                f"expected (B, {', '.join(map(str, per_sample))})"
            )
        if not 1 <= shape[0] <= self.max_batch:
            raise InvalidRequest(f"batch size {shape[0]} outside [1, {self.max_batch}]")
        h = codec.decode(t, name=what, max_elements=self.max_batch * max(1, _prod(per_sample)), data=data)
        if not codec.all_finite(h):  # perf (issue 8): one numpy pass, no thread-pool dispatch
            raise InvalidRequest(f"{what} contain NaN or Inf")
        return h

    def _activations(self, t: pb.Tensor, data: Any = None) -> torch.Tensor:
        return self._tensor(t, "activations", self.sample_shape, data)

    def _labels(self, t: pb.Tensor, batch: int, data: Any = None) -> torch.Tensor:
        if t.dtype != "int64":
            raise InvalidRequest(f"labels must be int64, got {t.dtype!r}")
        y = codec.decode(t, name="labels", max_elements=self.max_batch, data=data)
        if tuple(y.shape) != (batch,):
            raise InvalidRequest(f"labels of shape {list(y.shape)} for a batch of {batch}: expected ({batch},)")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise InvalidRequest(f"labels must lie in [0, {self.num_classes})")
        return y

    def _count(self, client: str, up: int, down: int, *, train: bool, samples: int = 0) -> None:
        with self._lock:
            s = self.stats.setdefault(client, ClientStats())
            s.bytes_up += up
            s.bytes_down += down
            s.samples += samples
            if train:
                s.train_requests += 1
            else:
                s.infer_requests += 1

    def _cached(self, hdr: pb.Header) -> Any:
        with self._lock:
            last = self._last.get(hdr.client_id) if hdr.client_id else None
        return last[2] if last is not None and last[:2] == (hdr.round, hdr.step) else None

    def _remember(self, hdr: pb.Header, reply: Any) -> None:
        if hdr.client_id:
            with self._lock:
                self._last[hdr.client_id] = (hdr.round, hdr.step, reply)

    # ---------------------------------------------------------------- calls
    def train(self, request: pb.TrainRequest | Framed) -> pb.TrainReply | Framed:
        """One training step of the server segment on a client's batch (activations + labels).

        A framed request (:mod:`fsl.wire.frame`, what :class:`GrpcChannel` sends) is answered with a
        framed reply whose gradient is sent from the tensor's own memory; a protobuf request with a
        protobuf reply.
        """
        req = as_framed(request)
        framed, msg = req is request, req.msg
        self._check_trainable()
        if self.ushaped:
            raise InvalidRequest("this split is U-shaped: labels must not be sent; use Forward/Backward")
        hdr = msg.header
        self._authenticate(hdr)
        h = self._activations(msg.activations, req.payloads.get("activations"))
        y = self._labels(msg.labels, h.shape[0], req.payloads.get("labels"))
        cached = self._cached(hdr)
        if cached is not None:
            return as_sent(cached, framed)  # a retry of a step we already took
        rep = self._replica_for(hdr.client_id)
        with rep.lock:
            cached = self._cached(hdr)  # a retry that waited here while its first attempt trained
            if cached is not None:
                return as_sent(cached, framed)
            if self.observer is not None:
                self.observer(hdr, h, y)
            reply = self._train_locked(rep, h, y, codec.format_of(msg.activations))  # privacy: + top-k
            self._remember(hdr, reply)
            if self.exchange_observer is not None:  # attacks: the dL/dh as the client receives it
                self.exchange_observer(hdr, h, y, reply.tensor("grad").float())
        out = as_sent(reply, framed)
        self._count(hdr.client_id, wire_size(request), wire_size(out), train=True, samples=h.shape[0])
        return out

    def _train_locked(self, rep: Replica, h_in: torch.Tensor, y: torch.Tensor, wire_dtype: str) -> Framed:
        flush_denormals()  # perf (issue 8): this gRPC worker thread's float unit (fsl/fastmath.py)
        dev = self.torch_device
        h = h_in.to(dev, dtype=torch.float32, non_blocking=True).requires_grad_(True)  # (B, ...) smashed
        y = y.to(dev, non_blocking=True)
        rep.segment.train()
        rep.optimizer.zero_grad(set_to_none=True)
        logits = rep.segment(h)  # (B, num_classes)
        loss = self.loss_fn(logits, y)
        extra = exit_loss(rep.segment, y, self.exit_weight)  # exits in the server segment, if any
        if extra is not None:
            loss = loss + extra
        if not torch.isfinite(loss):
            raise InvalidRequest("the batch gives a non-finite loss; the server segment was not updated")
        loss.backward()
        assert h.grad is not None
        rep.optimizer.step()
        rep.steps += 1
        rep.samples += h.shape[0]
        correct = int((logits.argmax(1) == y).sum())
        reply = Framed(pb.TrainReply(loss=float(loss.detach()), correct=correct, server_step=self.steps))
        reply.set("grad", h.grad.cpu(), codec.wire_format(wire_dtype))  # (B, ...) dL/dh, sender's format
        codec.encode_into(reply.msg.confidence, true_label_probability(logits.detach(), y).cpu())  # (B,) cartography
        return reply

    def forward(self, request: pb.ForwardRequest) -> pb.ForwardReply:
        """U-shaped step 1: run the middle segment and keep its graph for the backward."""
        self._check_trainable()
        if not self.ushaped:
            raise InvalidRequest("this split is not U-shaped: use Train")
        hdr = request.header
        self._authenticate(hdr)
        h_in = self._activations(request.activations)
        with self._lock:
            p = self._pending.get(hdr.client_id)
        if p is not None and (p.round, p.step) == (hdr.round, hdr.step):
            return p.reply  # retried forward
        rep = self._replica_for(hdr.client_id)
        with rep.lock:
            if self.observer is not None:
                self.observer(hdr, h_in, None)
            h = h_in.to(self.torch_device, dtype=torch.float32).requires_grad_(True)
            rep.segment.train()
            out = rep.segment(h)  # (B, ...) at the second cut
            fmt = codec.wire_format(codec.format_of(request.activations))  # privacy: the sender's format
            reply = pb.ForwardReply(activations=codec.encode(out, fmt))
            version = rep.steps
        with self._lock:  # a client has at most one forward in flight; a new one replaces the old
            self._pending[hdr.client_id] = _Pending(hdr.round, hdr.step, h, out, version, reply)
        up, down = codec.message_size(request), codec.message_size(reply)  # perf (issue 8): == ByteSize()
        self._count(hdr.client_id, up, down, train=True, samples=h.shape[0])
        return reply

    def backward(self, request: pb.BackwardRequest) -> pb.BackwardReply:
        """U-shaped step 2: backprop the client's gradient through the middle and take a step."""
        if not self.ushaped:
            raise InvalidRequest("this split is not U-shaped: use Train")
        hdr = request.header
        self._authenticate(hdr)
        cached = self._cached(hdr)
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        with self._lock:
            p = self._pending.get(hdr.client_id)
        if p is None or (p.round, p.step) != (hdr.round, request.forward_step):
            raise InvalidRequest(f"no pending forward step {request.forward_step} for this client in round {hdr.round}")
        g = self._tensor(request.grad, "grad", self.out_shape)
        if g.shape[0] != p.h.shape[0]:
            raise InvalidRequest(f"grad for a batch of {g.shape[0]}, but the forward had {p.h.shape[0]}")
        rep = self._replica_for(hdr.client_id)
        with rep.lock:
            flush_denormals()  # perf (issue 8): as in Train
            out = p.out
            if p.version != rep.steps:
                # another client stepped this segment since our forward: rebuild the graph with the
                # current weights (restoring BatchNorm statistics so they are updated only once)
                buffers = {k: b.clone() for k, b in rep.segment.named_buffers()}
                h = p.h.detach().requires_grad_(True)
                out = rep.segment(h)
                with torch.no_grad():
                    for k, b in rep.segment.named_buffers():
                        b.copy_(buffers[k])
                p = _Pending(p.round, p.step, h, out, rep.steps, p.reply)
            rep.optimizer.zero_grad(set_to_none=True)
            out.backward(g.to(self.torch_device, dtype=torch.float32))
            rep.optimizer.step()
            rep.steps += 1
            rep.samples += p.h.shape[0]
            assert p.h.grad is not None
            reply = pb.BackwardReply(
                grad=codec.encode(p.h.grad, codec.wire_format(codec.format_of(request.grad))),  # privacy: format
                server_step=self.steps,
            )
        with self._lock:
            self._pending.pop(hdr.client_id, None)
        self._remember(hdr, reply)
        self._count(hdr.client_id, codec.message_size(request), codec.message_size(reply), train=True)
        return reply

    def infer(self, request: pb.InferRequest | Framed) -> pb.InferReply | Framed:
        """Split inference: the rest of the model (the middle, if U-shaped) on a client's activations.

        A framed request (:mod:`fsl.wire.frame`) is read in place and answered with a frame.
        """
        req = as_framed(request)
        self._authenticate(req.msg.header)
        h = self._activations(req.msg.activations, req.payloads.get("activations"))
        rep = self._replica_for(req.msg.header.client_id)
        t0 = time.perf_counter()
        with rep.lock:
            rep.segment.eval()
            with torch.no_grad():
                out = rep.segment(h.to(self.torch_device, dtype=torch.float32)).float().cpu()
        ms = (time.perf_counter() - t0) * 1000.0
        reply = pb.InferReply(compute_ms=ms, batch=int(h.shape[0]))
        codec.encode_into(reply.logits, out)  # (B, num_classes): small, inside the message
        out = as_sent(reply, req is request)
        self._count(req.msg.header.client_id, wire_size(request), wire_size(out), train=False)
        return out

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
            ushaped=self.ushaped,
        )

    def end_round(self) -> None:
        """Forget per-round state: pending U-shaped forwards and retry caches."""
        with self._lock:
            self._pending.clear()
            self._last.clear()

    # ---------------------------------------------------------------- state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Global segment weights and optimizer buffers, as CPU tensors (for safetensors checkpoints)."""
        with self.global_replica.lock:
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
        with self.global_replica.lock:
            seg = {k[len("segment.") :]: v for k, v in tensors.items() if k.startswith("segment.")}
            self.segment.load_state_dict(seg)
            params = dict(self.segment.named_parameters())
            self.optimizer.state.clear()
            for k, v in tensors.items():
                if k.startswith("optim."):
                    pname, key = k[len("optim.") :].rsplit(".", 1)
                    self.optimizer.state[params[pname]][key] = v.to(self.torch_device)
            self.global_replica.steps = int(tensors.get("meta.steps", torch.tensor(0)))
        with self._lock:
            self._retired_steps = 0
            self._last.clear()
            self._pending.clear()

    def segment_state_dict(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the global server segment's weights."""
        with self.global_replica.lock:
            return {k: v.detach().cpu().clone() for k, v in self.segment.state_dict().items()}

    def traffic(self) -> dict[str, ClientStats]:
        with self._lock:
            return {k: ClientStats(**vars(v)) for k, v in self.stats.items()}


def true_label_probability(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) float32 softmax probability of each sample's label: data cartography's confidence."""
    return torch.softmax(logits.float(), dim=1).gather(1, y.view(-1, 1)).view(-1)


def _remap_optimizer_state(src: torch.optim.Optimizer, dst: torch.optim.Optimizer) -> dict[str, Any]:
    """``src``'s state dict (momentum buffers copied) for an optimizer over a deep copy of its params."""
    sd = copy.deepcopy(src.state_dict())
    sd["param_groups"] = [
        {**g_src, "params": g_dst["params"]}
        for g_src, g_dst in zip(sd["param_groups"], dst.state_dict()["param_groups"], strict=True)
    ]
    return sd


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


_Req = TypeVar("_Req")
_Rep = TypeVar("_Rep")


class SplitServicer(pb_grpc.SplitDataPlaneServicer):
    """Thin gRPC layer: decode nothing itself, call the state, map errors to status codes."""

    def __init__(self, state: SplitServerState, batcher: Any | None = None, infer_batcher: Any | None = None) -> None:
        self.state = state
        self.train_fn = state.train if batcher is None else batcher.train  # issue 8: server.batching.RequestBatcher
        # issue 9: server.infer_batching.InferBatcher batches Infer under the requests' latency budgets
        self.infer_fn = state.infer if infer_batcher is None else infer_batcher.infer
        # issue 8: TrainFrame/InferFrame hand frames on as they are to what reads them (no copy of the
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

    def Train(self, request: pb.TrainRequest, context: grpc.ServicerContext) -> pb.TrainReply:  # noqa: N802
        return self._run(self.train_fn, request, context)

    def TrainFrame(self, request: Framed, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """``Train`` with the tensors framed beside the message (:mod:`fsl.wire.frame`), both ways."""
        return self._run(self.train_frame_fn, request, context)

    def Infer(self, request: pb.InferRequest, context: grpc.ServicerContext) -> pb.InferReply:  # noqa: N802
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


def _add_servicer(servicer: SplitServicer, server: grpc.Server) -> None:
    """Register the data plane's methods (as the generated code does, with lenient parsing)."""
    methods = {
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
        batcher: Any | None = None,  # issue 8: a server.batching.RequestBatcher serves Train in batches
        infer_batcher: Any | None = None,  # issue 9: a server.infer_batching.InferBatcher serves Infer in batches
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
        codec.tune_allocator()  # issue 8: reuse large message buffers (see fsl.wire.codec.tune_allocator)
        _add_servicer(SplitServicer(state, batcher, infer_batcher), self._server)
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
