"""The client's one seam to the split server.

A :class:`SplitChannel` sends smashed activations (and labels) for one batch and
returns the gradient at the cut; for inference it returns logits. Client
training code depends only on this interface: :class:`InMemoryChannel` calls a
split-server object in the same process through the real codec (unit tests),
and :class:`fsl.grpc_channel.GrpcChannel` talks real gRPC. Neither the trainer
nor this module imports ``grpc``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fsl.cutvalues import Activations, batch_size
from fsl.wire import codec, frame
from fsl.wire import dataplane_pb2 as pb
from fsl.wire.frame import Framed

__all__ = ["ChannelIdentity", "DataPlaneServer", "InMemoryChannel", "InferInfo", "SplitChannel", "StepResult"]


@dataclass(frozen=True)
class StepResult:
    """What the server sends back for one training batch."""

    # (B, ...) dL/dh at the cut, same shape as the activations; for a cut of named tensors a dict
    # with the gradients of those that take one (none for integer or bool tensors)
    grad: Activations
    loss: float  # mean loss over the batch
    correct: int
    confidence: torch.Tensor | None = None  # (B,) p(true label) under the server's classifier, if sent


@dataclass(frozen=True)
class InferInfo:
    """What the server reported about one inference call."""

    queue_ms: float = 0.0  # waited on the server for its batch
    compute_ms: float = 0.0  # server-segment compute of that batch
    batch: int = 0  # samples in that batch


@dataclass
class ChannelIdentity:
    """Who the client is on the data plane for the current round."""

    run_id: str = ""
    round: int = 0
    client_id: str = ""
    token: str = ""


class DataPlaneServer(Protocol):
    """The server-side object both channels reach (the split server's state)."""

    def train(self, request: pb.TrainRequest | Framed) -> pb.TrainReply | Framed: ...

    def forward(self, request: pb.ForwardRequest) -> pb.ForwardReply: ...

    def backward(self, request: pb.BackwardRequest) -> pb.BackwardReply: ...

    def infer(self, request: pb.InferRequest | Framed) -> pb.InferReply | Framed: ...

    def info(self) -> pb.InfoReply: ...


@dataclass
class SplitChannel:
    """Base of both channels: builds requests, counts bytes, decodes replies."""

    identity: ChannelIdentity = field(default_factory=ChannelIdentity)
    wire_dtype: torch.dtype = torch.float32
    bytes_up: int = 0
    bytes_down: int = 0
    requests: int = 0
    last_infer: InferInfo = field(default_factory=lambda: InferInfo())
    _step: int = 0

    def _header(self) -> pb.Header:
        self._step += 1
        i = self.identity
        return pb.Header(run_id=i.run_id, round=i.round, client_id=i.client_id, step=self._step, token=i.token)

    def set_identity(self, identity: ChannelIdentity) -> None:
        """Use ``identity`` (new round, new credential) for the following requests."""
        self.identity = identity
        self._step = 0

    def _put_cut(self, req: Framed, h: Activations) -> None:
        """``h`` into ``req``: one tensor as ``activations``, a dict as named ``tensors`` (floats in
        the channel's wire dtype, integer and bool tensors exact)."""
        if isinstance(h, torch.Tensor):
            req.set("activations", h, self.wire_dtype)
        else:
            req.add_all("tensors", h, self.wire_dtype)

    @staticmethod
    def _grads_back(rep: Framed, sent: Activations, single: str = "grad", named: str = "grads") -> Activations:
        """The gradients a reply carries for the tensors ``sent``, in their kind and dtypes, shapes checked."""
        if isinstance(sent, torch.Tensor):
            grad = rep.tensor(single)
            if grad.shape != sent.shape:
                raise codec.WireError(
                    f"server returned a gradient of shape {tuple(grad.shape)} for {tuple(sent.shape)}"
                )
            return grad.to(sent.dtype)
        got = rep.named(named)
        for n, g in got.items():
            t = sent.get(n)
            if t is None or not t.is_floating_point():
                raise codec.WireError(f"server returned a gradient for {n!r}, which has none to take")
            if g.shape != t.shape:
                raise codec.WireError(
                    f"server returned a gradient of shape {tuple(g.shape)} for {n!r} {tuple(t.shape)}"
                )
            got[n] = g.to(t.dtype)
        return got

    def train_step(
        self,
        h: Activations,
        y: torch.Tensor,
        *,
        want_confidence: bool = False,
        label_counts: Sequence[int] | None = None,
    ) -> StepResult:
        """Send activations ``h`` (B, ...) and labels ``y`` (B,) (or (B, T) token targets); return the
        gradient at the cut. ``h`` may be a dict of named tensors (a graph cut): the gradients come back
        as a dict, for the float tensors that take one.

        ``want_confidence`` asks the server for each sample's p(true label) (data cartography);
        ``label_counts`` (per class, over the client's local data) gives a logit-adjusting server the
        client's exact label prior."""
        # the tensors travel framed beside the message (fsl/wire/frame.py), sent from their own
        # memory and received as views of the reply's bytes: no protobuf copies of the activations
        req = Framed(pb.TrainRequest(header=self._header(), want_confidence=want_confidence))
        if label_counts is not None:
            req.msg.label_counts.extend(int(c) for c in label_counts)
        self._put_cut(req, h)
        codec.encode_into(req.msg.labels, y, torch.int64)  # (B,) small: inline
        rep = self._call_train(req)
        self.bytes_up += req.nbytes()
        self.bytes_down += rep.nbytes()
        self.requests += 1
        grad = self._grads_back(rep, h)
        conf = None
        b = batch_size(h)
        if rep.msg.HasField("confidence"):
            conf = rep.tensor("confidence")
            if conf.shape != (b,):
                raise codec.WireError(f"server returned confidences of shape {tuple(conf.shape)} for a batch of {b}")
        return StepResult(grad=grad, loss=rep.msg.loss, correct=int(rep.msg.correct), confidence=conf)

    def infer(self, h: Activations, budget_ms: float = 0.0) -> Activations:
        """Send activations ``h`` (B, ...) or a dict of named tensors; return the logits (B, num_classes)
        (a U-shaped middle that returns named tensors: those, as a dict).

        ``budget_ms`` is the latency the request may still spend (0: none): a batching server
        holds it for company only while that budget allows. What the server reports about the
        call (its queueing and compute time, the batch it ran in) is kept in :attr:`last_infer`.
        """
        req = Framed(pb.InferRequest(header=self._header(), budget_ms=budget_ms))  # framed as train_step's
        self._put_cut(req, h)
        rep = self._call_infer(req)
        self.bytes_up += req.nbytes()
        self.bytes_down += rep.nbytes()
        self.requests += 1
        msg = rep.msg
        self.last_infer = InferInfo(queue_ms=msg.queue_ms, compute_ms=msg.compute_ms, batch=int(msg.batch))
        b = batch_size(h)
        out: Activations = rep.named("outputs") if len(msg.outputs) else rep.tensor("logits").float()
        if batch_size(out) != b:
            raise codec.WireError(f"server returned {batch_size(out)} rows of logits for a batch of {b}")
        return out

    def forward(self, h: Activations) -> tuple[Activations, int]:
        """U-shaped step 1: bottom activations ``h`` (or named tensors) up, the middle's output down
        (no labels). Returns the middle output (a dict when the server sends named tensors) and the
        step id that :meth:`backward` must quote."""
        hdr = self._header()
        req = pb.ForwardRequest(header=hdr)
        if isinstance(h, torch.Tensor):
            codec.encode_into(req.activations, h, self.wire_dtype)
        else:
            codec.encode_named(req.tensors, h, self.wire_dtype)
        rep = self._call_forward(req)
        self.bytes_up += codec.message_size(req)
        self.bytes_down += codec.message_size(rep)
        self.requests += 1
        if len(rep.tensors):
            return codec.decode_named(rep.tensors), hdr.step
        dtype = h.dtype if isinstance(h, torch.Tensor) else torch.float32
        return codec.decode(rep.activations, name="activations").to(dtype), hdr.step

    def backward(self, grad: Activations, forward_step: int, sent: Activations | None = None) -> Activations:
        """U-shaped step 2: dL/d(middle output) up (a dict for named outputs), dL/d(bottom output)
        down, in the kind of ``sent`` (what :meth:`forward` sent; a dict when the server answers by name)."""
        req = pb.BackwardRequest(header=self._header(), forward_step=forward_step)
        if isinstance(grad, torch.Tensor):
            codec.encode_into(req.grad, grad, self.wire_dtype)
        else:
            codec.encode_named(req.grads, grad, self.wire_dtype)
        rep = self._call_backward(req)
        self.bytes_up += codec.message_size(req)
        self.bytes_down += codec.message_size(rep)
        self.requests += 1
        if sent is not None:
            return self._grads_back(Framed(rep), sent)
        if len(rep.grads):
            return codec.decode_named(rep.grads, what="grads")
        return codec.decode(rep.grad, name="grad").to(grad.dtype if isinstance(grad, torch.Tensor) else torch.float32)

    def info(self) -> pb.InfoReply:
        """What the server segment expects (shape, dtypes, limits, device)."""
        return self._call_info()

    def close(self) -> None:
        """Release the connection (no-op in memory)."""

    def __enter__(self) -> SplitChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # transport hooks
    def _call_train(self, req: Framed) -> Framed:
        raise NotImplementedError

    def _call_infer(self, req: Framed) -> Framed:
        raise NotImplementedError

    def _call_info(self) -> pb.InfoReply:
        raise NotImplementedError

    def _call_forward(self, req: pb.ForwardRequest) -> pb.ForwardReply:
        raise NotImplementedError

    def _call_backward(self, req: pb.BackwardRequest) -> pb.BackwardReply:
        raise NotImplementedError


@dataclass
class InMemoryChannel(SplitChannel):
    """A channel to a split server in this process; messages are serialized and parsed
    exactly as on the network, so the codec and the validation run for real."""

    server: DataPlaneServer | None = None

    def _roundtrip(self, fn: Callable[[Any], Any], req: Any, reply_type: Any) -> Any:
        assert self.server is not None, "InMemoryChannel needs a server"
        rep = fn(type(req).FromString(req.SerializeToString()))
        return reply_type.FromString(rep.SerializeToString())

    def _framed(self, fn: Callable[[Any], Any], req: Framed, reply_type: Any) -> Framed:
        """``fn`` on the frame's bytes as a TrainFrame/InferFrame call carries them, and back."""
        sent = frame.parse(type(req.msg), frame.frame_bytes(req))
        rep = fn(sent if getattr(self.server, "accepts_frames", False) else sent.message())
        return frame.parse(reply_type, frame.frame_bytes(rep))

    def _call_train(self, req: Framed) -> Framed:
        assert self.server is not None, "InMemoryChannel needs a server"
        return self._framed(self.server.train, req, pb.TrainReply)

    def _call_infer(self, req: Framed) -> Framed:
        assert self.server is not None, "InMemoryChannel needs a server"
        return self._framed(self.server.infer, req, pb.InferReply)

    def _call_forward(self, req: pb.ForwardRequest) -> pb.ForwardReply:
        return self._roundtrip(self.server.forward, req, pb.ForwardReply)  # type: ignore[union-attr,no-any-return]

    def _call_backward(self, req: pb.BackwardRequest) -> pb.BackwardReply:
        return self._roundtrip(self.server.backward, req, pb.BackwardReply)  # type: ignore[union-attr,no-any-return]

    def _call_info(self) -> pb.InfoReply:
        assert self.server is not None, "InMemoryChannel needs a server"
        return self.server.info()
