"""The split server's state: its segment copies, admission of requests, the steps, the bookkeeping.

Every data-plane call goes through the same three stages, which the batchers use as they are:

* **admission** (``admit_train``, ``admit_infer``, ``admit_forward``, ``admit_backward``): the
  call is allowed (training server, split shape), the credential is valid, a retry of a step
  already taken is found in the retry cache, and the tensors are checked (server.validation).
  Nothing is touched before a request has passed every check, so bad input never changes the model;
* **the step** (``run_train``, ``run_infer``; U-shaped forward and backward): the compute on the
  segment copy the client is assigned, under that copy's lock (server.step, server.ushaped);
* **commit** (``commit``): the exchange is shown to the attack observer, the reply takes the form
  the request came in (frame or message) and the client's traffic is counted.

Per-client state lives for one round: the retry cache, U-shaped forwards awaiting their backward,
the per-client traffic table and the client -> segment-copy assignment hold the clients of the open
round only and are released by ``end_round`` (and ``merge_replicas``), so a run over thousands of
clients with a few per round keeps a few clients' worth of state. What outlives a round is
aggregate: the run's traffic totals and the optimizer step count.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from fsl.auth import RoundAuthority
from fsl.cutvalues import SINGLE, Activations, Signature, TensorSpec, batch_size, like
from fsl.grpc_channel import DEFAULT_MAX_MESSAGE_BYTES
from fsl.lora import carried_state, load_carried
from fsl.tasks import TASKS
from fsl.tasks import loss as task_loss
from fsl.training import label_log_prior
from fsl.wire import codec
from fsl.wire import dataplane_pb2 as pb
from fsl.wire.frame import Framed, as_framed, as_sent, wire_size
from server.jobs import BackwardJob, ForwardJob, InferJob, Job, TrainJob
from server.replicas import Replica, ReplicaSet
from server.step import LossFn, Staging, infer_step, train_step
from server.ushaped import Pending, backward_step, forward_step
from server.validation import ACTIVATION_DTYPES, InvalidRequest, check_labels, check_named, check_tensor

__all__ = ["ClientStats", "SplitServerState", "resolve_device"]

_J = TypeVar("_J", bound=Job)

NON_FINITE = "the batch gives a non-finite loss; the server segment was not updated"


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
    """The server segment(s), the optimizer(s) and the checks every request must pass."""

    accepts_frames: ClassVar[bool] = True  # train() and infer() read fsl.wire.frame.Framed requests in place

    segment: nn.Module  # the global server segment (in U-shaped splits: the middle segment)
    sample_shape: tuple[int, ...]  # per-sample activation shape at the cut, e.g. (16, 14, 14)
    num_classes: int
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    clip_norm: float = 0.0  # each step's gradient norm bound (0: none); ExperimentConfig.clip_norm
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
    # logit adjustment: train on logits + log(the label prior of the request's client), counted from
    # the labels that client sent this round (server.step); keeps the one shared segment from
    # following whichever label-skewed client trained last
    logit_adjust: bool = False
    # called with (header, activations, labels) of every accepted training request: what an
    # honest-but-curious server sees (the observation recorder of the attack suite hooks in here);
    # in U-shaped splits labels is None. A cut of several tensors passes its dict of named tensors.
    observer: Callable[[pb.Header, Activations, torch.Tensor | None], None] | None = None
    # called after each accepted training step with (header, activations, labels, dL/dh sent back):
    # the whole exchange, for the gradient-inversion attack (server/recorder.py sets one or the other);
    # a cut of several tensors passes dicts (the gradients of the tensors that take one)
    exchange_observer: Callable[[pb.Header, Activations, torch.Tensor, Activations], None] | None = None
    # what crosses the cut (None: one float tensor of ``sample_shape``, Signature.single); a cut of
    # several named tensors is validated against it and the segment is called with their dict
    signature: Signature | None = None
    # what the labels are: "classify" ((B,) class indices) or "causal-lm" ((B, T) token
    # targets in [0, num_classes) or -100); the loss is ``loss_fn`` (None: cross entropy)
    task: str = "classify"
    loss_fn: LossFn | None = None
    # the open round's traffic per client (released by end_round; the run's totals stay in traffic_total)
    stats: dict[str, ClientStats] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, not {self.task!r}")
        if self.loss_fn is None and self.task != "classify":
            self.loss_fn = functools.partial(task_loss, self.task)
        if self.signature is None:
            self.signature = Signature.single(self.sample_shape)
        elif self.signature.positional:
            self.sample_shape = tuple(int(d) for d in self.signature.tensors[0].dims)
        self.torch_device = resolve_device(self.device)
        self.segment.to(self.torch_device)
        self.global_replica = Replica(self.segment, self.lr, self.momentum, self.weight_decay, self.clip_norm)
        self.optimizer = self.global_replica.optimizer
        self._copies = ReplicaSet(self.global_replica, self.lr, self.momentum, self.weight_decay, self.clip_norm)
        self._lock = threading.Lock()  # guards the tables below, never held during compute
        self._last: dict[str, tuple[int, int, Any]] = {}  # client -> (round, step, reply): the retry cache
        self._pending: dict[str, Pending] = {}  # client -> U-shaped forward awaiting backward
        self._label_counts: dict[str, torch.Tensor] = {}  # client -> (num_classes,) labels sent this round
        self._totals = ClientStats()  # every client's traffic over the run, summed
        with torch.no_grad():
            was = self.segment.training
            probe = self.segment.eval()(self.signature.example(1, self.torch_device))
            self.segment.train(was)
        # per-sample shape of the segment's output (a U-shaped middle returning named tensors: by name)
        self.out_shape: Any = (
            tuple(probe.shape[1:])
            if isinstance(probe, torch.Tensor)
            else {n: tuple(t.shape[1:]) for n, t in probe.items()}
        )

    @property
    def steps(self) -> int:
        """Optimizer steps taken on the server side, over all copies."""
        return self._copies.steps

    # ------------------------------------------------------------- replicas
    def set_lr(self, lr: float) -> None:
        """The learning rate of every server-side step from now on (each round's, under train.lr_schedule)."""
        self.lr = lr
        self._copies.set_lr(lr)

    def open_replicas(self, assignment: dict[str, str]) -> None:
        """Give each replica id in ``assignment`` (client -> replica) its own copy of the global
        segment for this round. A single replica id means: everyone trains the global segment."""
        self._copies.open(assignment)

    def merge_replicas(self) -> dict[str, int]:
        """FedAvg the replicas into the global segment, weighted by the samples each trained on
        (optimizer momentum averaged the same way); returns the weights. No-op with one replica."""
        return self._copies.merge()

    def replicas(self) -> dict[str, Replica]:
        """This round's copies of the segment by replica id (empty: everyone trains the global one)."""
        return self._copies.copies()

    def replica_for(self, client_id: str) -> Replica:
        """The segment copy ``client_id`` runs on this round."""
        return self._copies.for_client(client_id)

    # ------------------------------------------------------------- admission
    def _admit(self, hdr: pb.Header, *, train: bool, ushaped: bool | None = None) -> None:
        """The checks every call makes first: the call is allowed here, then the credential."""
        if train and self.inference_only:
            raise InvalidRequest("this server serves inference only (fsl serve); training runs under the ServerApp")
        if ushaped is not None and ushaped != self.ushaped:
            raise InvalidRequest(
                "this split is U-shaped: labels must not be sent; use Forward/Backward"
                if self.ushaped
                else "this split is not U-shaped: use Train"
            )
        if self.authority is not None:
            self.authority.verify(hdr.run_id, hdr.round, hdr.client_id, hdr.token)

    def _recall(self, job: Job) -> bool:
        """Answer ``job`` from the retry cache if its step was taken already."""
        hdr = job.header
        with self._lock:
            last = self._last.get(hdr.client_id) if hdr.client_id else None
        if last is None or last[:2] != (hdr.round, hdr.step):
            return False
        job.reply, job.retry = last[2], True
        return True

    def _remember(self, job: Job) -> None:
        if job.header.client_id:
            with self._lock:
                self._last[job.header.client_id] = (job.header.round, job.header.step, job.reply)

    def _activations(self, t: pb.Tensor, data: Any = None) -> torch.Tensor:
        return check_tensor(t, "activations", self.sample_shape, max_batch=self.max_batch, cut=self.cut, data=data)

    @property
    def sig(self) -> Signature:
        assert self.signature is not None  # set by __post_init__
        return self.signature

    def _cut_values(self, req: Framed) -> tuple[Activations, dict[str, str] | None]:
        """The request's cut, checked: its one ``activations`` tensor, or its named ``tensors``
        (then also their wire formats, so that the gradients go back by name, each in its own)."""
        msg, sig = req.msg, self.sig
        if len(msg.tensors):
            if msg.HasField("activations"):
                raise InvalidRequest("send the cut as `activations` or as named `tensors`, not both")
            d = check_named(req, "tensors", sig, max_batch=self.max_batch, cut=self.cut)
            formats = {nt.name: codec.format_of(nt.tensor) for nt in msg.tensors}
            return (d[SINGLE] if sig.positional else d), formats
        if not sig.positional:
            raise InvalidRequest(
                f"the cut at {self.cut!r} carries {list(sig.names)}: send them as named tensors (`tensors`), "
                "not one `activations` tensor"
            )
        return self._activations(msg.activations, req.payloads.get("activations")), None

    def _label_elements(self) -> int:
        sig = self.sig
        longest = max((sig.bound(d)[1] for t in sig.tensors for d in t.dims if isinstance(d, str)), default=1)
        return self.max_batch * longest

    def admit_train(self, request: pb.TrainRequest | Framed) -> TrainJob:
        """Admit a ``Train`` request (a message or a frame, read in place) or raise why not.

        A retry of a step already taken comes back with ``retry`` set and its reply from the cache.
        """
        req = as_framed(request)
        msg, hdr = req.msg, req.msg.header
        self._admit(hdr, train=True, ushaped=False)
        h, formats = self._cut_values(req)
        y = check_labels(
            msg.labels,
            batch_size(h),
            num_classes=self.num_classes,
            max_batch=self.max_batch,
            data=req.payloads.get("labels"),
            task=self.task,
            max_elements=self._label_elements(),
        )
        job = TrainJob(
            hdr,
            request,
            self.replica_for(hdr.client_id),
            h=h,
            y=y,
            wire_format=codec.format_of(msg.activations) if formats is None else "float32",
            formats=formats,
            want_confidence=bool(msg.want_confidence),
        )
        if not self._recall(job) and self.logit_adjust and self.task == "classify":
            job.log_prior = self._log_prior(hdr.client_id, y, msg.label_counts)
        return job

    def _log_prior(self, client_id: str, y: torch.Tensor, declared: Sequence[int] = ()) -> torch.Tensor:
        """(num_classes,) log of ``client_id``'s label prior this round, add-one smoothed so that a class
        the client does not hold keeps a finite, strongly negative shift.

        The prior is the client's own label counts over its local data when the request declares them
        (exact from the first batch), else the labels it has sent this round, ``y`` counted in: an
        estimate that is poor over the first batches of a client with few samples, enough to swing
        early steps."""
        if declared:
            if len(declared) > self.num_classes or any(c < 0 for c in declared) or sum(declared) < len(y):
                raise InvalidRequest(
                    f"label_counts must hold at most {self.num_classes} non-negative counts summing to at least "
                    f"the batch ({len(y)}); got {len(declared)} counts summing to {sum(declared)}"
                )
            exact = torch.zeros(self.num_classes, dtype=torch.float64)
            exact[: len(declared)] = torch.tensor(list(declared), dtype=torch.float64)
            return label_log_prior(exact)
        batch = torch.bincount(y, minlength=self.num_classes).double()
        with self._lock:
            counts = self._label_counts.get(client_id)
            counts = batch if counts is None else counts + batch
            if client_id:
                self._label_counts[client_id] = counts
        return label_log_prior(counts)

    def admit_infer(self, request: pb.InferRequest | Framed) -> InferJob:
        """Admit an ``Infer`` request (a message or a frame, read in place) or raise why not."""
        req = as_framed(request)
        hdr = req.msg.header
        self._admit(hdr, train=False)
        h, formats = self._cut_values(req)
        return InferJob(
            hdr, request, self.replica_for(hdr.client_id), h=h, budget_ms=req.msg.budget_ms, named=formats is not None
        )

    def admit_forward(self, request: pb.ForwardRequest) -> ForwardJob:
        """Admit a U-shaped ``Forward`` request or raise why not (a retried forward: ``retry`` set)."""
        hdr = request.header
        self._admit(hdr, train=True, ushaped=True)
        h, formats = self._cut_values(as_framed(request))
        job = ForwardJob(hdr, request, self.replica_for(hdr.client_id), h=h, formats=formats)
        self._recall(job)
        return job

    def admit_backward(self, request: pb.BackwardRequest) -> BackwardJob:
        """Admit a U-shaped ``Backward`` request for the client's kept forward, or raise why not."""
        hdr = request.header
        self._admit(hdr, train=True, ushaped=True)
        job = BackwardJob(hdr, request, self.replica_for(hdr.client_id))
        if self._recall(job):
            return job
        with self._lock:
            p = self._pending.get(hdr.client_id)
        if p is None or (p.round, p.step) != (hdr.round, request.forward_step):
            raise InvalidRequest(f"no pending forward step {request.forward_step} for this client in round {hdr.round}")
        if len(request.grads) or isinstance(p.out, dict) or p.named:
            if request.HasField("grad"):
                raise InvalidRequest("send the gradient as `grad` or as named `grads`, not both")
            need = p.needs_grad()  # exactly the outputs that take a gradient, of the forward's shapes
            sig = Signature(tuple(TensorSpec(n, "float32", tuple(t.shape[1:]), grad=True) for n, t in need.items()))
            job.grad = like(
                p.out,
                check_named(as_framed(request), "grads", sig, max_batch=self.max_batch, cut=self.cut, what="grads"),
            )
            rows = batch_size(job.grad)
        else:
            job.grad = check_tensor(request.grad, "grad", self.out_shape, max_batch=self.max_batch, cut=self.cut)
            rows = int(job.grad.shape[0])
        if rows != p.rows:
            raise InvalidRequest(f"grad for a batch of {rows}, but the forward had {p.rows}")
        job.pending = p
        return job

    # ------------------------------------------------------------- steps
    def run_train(self, jobs: Sequence[TrainJob], staging: Staging | None = None, pad: bool = False) -> list[TrainJob]:
        """The training step for admitted ``jobs`` that share one segment copy: one forward and
        backward over all their samples and one optimizer step (server.step.train_step).

        ``pad``: jobs of different sequence lengths share the step, padded to the longest
        (:func:`server.step.train_step`).

        Every job ends with a reply or an error: a retry whose first attempt finished while it
        waited for the copy's lock is answered from the cache, a job the observer refuses fails
        alone, a job whose loss is not finite is dropped and the rest stepped without it (nothing
        moved before). Returns the jobs that were trained.
        """
        if not jobs:
            return []
        replica = jobs[0].replica
        if any(j.replica is not replica for j in jobs):
            raise ValueError("a training batch must share one segment copy")
        with replica.lock:
            live = []
            for job in jobs:
                if job.retry or self._recall(job):
                    continue
                try:
                    if self.observer is not None:
                        self.observer(job.header, job.h, job.y)
                    live.append(job)
                except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                    job.error = e
            while live:
                bad = train_step(
                    replica,
                    live,
                    device=self.torch_device,
                    exit_weight=self.exit_weight,
                    staging=staging,
                    grad_names=self.sig.grad_names,
                    loss_fn=self.loss_fn,
                    pad=self.sig if pad else None,
                )
                if not bad:
                    break
                for job in bad:
                    job.error = InvalidRequest(NON_FINITE)
                live = [j for j in live if j not in bad]
            server_step = self.steps
            for job in live:
                job.reply.msg.server_step = server_step
                self._remember(job)  # under the lock: a retry waiting for it must find the answer
        return live

    def run_infer(self, jobs: Sequence[InferJob], clock: Callable[[], float] = time.perf_counter) -> float:
        """The segment (eval mode) on admitted ``jobs`` that share one copy; sets each reply with
        its own rows and returns the compute time in ms on ``clock`` (lock wait included)."""
        replica = jobs[0].replica
        if any(j.replica is not replica for j in jobs):
            raise ValueError("an inference batch must share one segment copy")
        t0 = clock()
        with replica.lock:
            out = infer_step(replica, jobs, device=self.torch_device)  # (N, num_classes)
        ms = (clock() - t0) * 1000.0
        a = 0
        for job in jobs:
            b = a + job.rows
            job.reply = pb.InferReply(compute_ms=ms, batch=batch_size(out))
            if isinstance(out, torch.Tensor):
                codec.encode_into(job.reply.logits, out[a:b])  # (B, num_classes): small, inside the message
            else:  # a U-shaped middle's named outputs
                codec.encode_named(job.reply.outputs, {n: t[a:b] for n, t in out.items()})
            a = b
        return ms

    # ------------------------------------------------------------- commit
    def commit(self, job: Job) -> None:
        """Finish a job that ran: show the exchange to the attack observer, put the reply in the
        form the request came in, count the client's traffic. A failed job is left as it is (its
        error is raised by ``job.result()``); a retry is only framed, not counted again."""
        if job.error is not None:
            return
        job.sent = as_sent(job.reply, job.framed)
        if job.retry:
            return
        hdr = job.header
        if isinstance(job, TrainJob) and self.exchange_observer is not None:  # the dL/dh as the client receives it
            if job.formats is None:
                sent_back: Activations = job.reply.tensor("grad").float()
            else:
                sent_back = like(job.h, {n: g.float() for n, g in job.reply.named("grads").items()})
            self.exchange_observer(hdr, job.h, job.y, sent_back)
        up, down = wire_size(job.request), wire_size(job.sent)
        infer = isinstance(job, InferJob)
        with self._lock:
            for s in (self.stats.setdefault(hdr.client_id, ClientStats()), self._totals):
                s.bytes_up += up
                s.bytes_down += down
                s.samples += job.samples
                if infer:
                    s.infer_requests += 1
                else:
                    s.train_requests += 1

    def run_forward(self, job: ForwardJob) -> None:
        """U-shaped step 1: run the middle segment and keep its graph for the client's backward."""
        with job.replica.lock:
            if self.observer is not None:
                self.observer(job.header, job.h, None)
            p = forward_step(job, self.torch_device, self.sig.grad_names)
            self._remember(job)
        with self._lock:  # a client has at most one forward in flight; a new one replaces the old
            self._pending[job.header.client_id] = p

    def run_backward(self, job: BackwardJob) -> None:
        """U-shaped step 2: backprop the client's gradient through the middle and take a step."""
        with job.replica.lock:
            backward_step(job, self.torch_device)
            job.reply.server_step = self.steps
            self._remember(job)
        with self._lock:
            self._pending.pop(job.header.client_id, None)

    def _serve(self, job: _J, run: Callable[[_J], object]) -> Any:
        """Admitted ``job`` through its step (unless it is a retry, answered from the cache) and commit."""
        if not job.retry:
            run(job)
        self.commit(job)
        return job.result()

    # ------------------------------------------------------------- calls
    def train(self, request: pb.TrainRequest | Framed) -> pb.TrainReply | Framed:
        """One training step of the server segment on a client's batch (activations + labels):
        a batch of one through :meth:`run_train`.

        A framed request (:mod:`fsl.wire.frame`, what :class:`GrpcChannel` sends) is answered with a
        framed reply whose gradient is sent from the tensor's own memory; a protobuf request with a
        protobuf reply.
        """
        reply: pb.TrainReply | Framed = self._serve(self.admit_train(request), lambda j: self.run_train([j]))
        return reply

    def infer(self, request: pb.InferRequest | Framed) -> pb.InferReply | Framed:
        """Split inference: the rest of the model (the middle, if U-shaped) on a client's activations.

        A framed request (:mod:`fsl.wire.frame`) is read in place and answered with a frame.
        """
        reply: pb.InferReply | Framed = self._serve(self.admit_infer(request), lambda j: self.run_infer([j]))
        return reply

    def forward(self, request: pb.ForwardRequest) -> pb.ForwardReply:
        """U-shaped step 1 (:meth:`run_forward`): the middle segment's output for the bottom's activations."""
        reply: pb.ForwardReply = self._serve(self.admit_forward(request), self.run_forward)
        return reply

    def backward(self, request: pb.BackwardRequest) -> pb.BackwardReply:
        """U-shaped step 2 (:meth:`run_backward`): the gradient at the first cut."""
        reply: pb.BackwardReply = self._serve(self.admit_backward(request), self.run_backward)
        return reply

    def info(self) -> pb.InfoReply:
        """What the server segment expects: the cut's signature, limits, device, mode, task."""
        reply = pb.InfoReply(
            model=self.model_name,
            cut=self.cut,
            sample_shape=list(self.sample_shape),
            dtypes=list(ACTIVATION_DTYPES),
            max_batch=self.max_batch,
            max_message_bytes=self.max_message_bytes,
            device=str(self.torch_device),
            mode=self.mode,
            ushaped=self.ushaped,
            task=self.task,
        )
        codec.encode_signature(self.sig, reply)
        return reply

    def end_round(self) -> None:
        """Release the round's per-client state: pending U-shaped forwards, the retry cache, the label
        counts and the per-client traffic table (its sums stay in :meth:`traffic_total`). Called once the round's
        credentials are closed, so no request of the round can arrive to need them."""
        with self._lock:
            self._pending.clear()
            self._last.clear()
            self.stats.clear()
            self._label_counts.clear()

    def held_clients(self) -> dict[str, int]:
        """How many clients each per-client table holds now (after :meth:`end_round`: none)."""
        with self._lock:
            held = {
                "retry_cache": len(self._last),
                "pending": len(self._pending),
                "traffic": len(self.stats),
                "label_counts": len(self._label_counts),
            }
        return held | self._copies.held()

    # ------------------------------------------------------------- state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Global segment weights and optimizer buffers, as CPU tensors (for safetensors checkpoints and
        standalone split servers). A frozen base (LoRA) is left out: every node builds it itself."""
        with self.global_replica.lock:
            out = {f"segment.{k}": v.detach().cpu().clone() for k, v in carried_state(self.segment).items()}
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
            load_carried(self.segment, seg, "server segment")
            params = dict(self.segment.named_parameters())
            self.optimizer.state.clear()
            for k, v in tensors.items():
                if k.startswith("optim."):
                    pname, key = k[len("optim.") :].rsplit(".", 1)
                    self.optimizer.state[params[pname]][key] = v.to(self.torch_device)
            self.global_replica.steps = int(tensors.get("meta.steps", torch.tensor(0)))
        self._copies.retired_steps = 0
        with self._lock:
            self._last.clear()
            self._pending.clear()

    def segment_state_dict(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the global server segment's weights."""
        with self.global_replica.lock:
            return {k: v.detach().cpu().clone() for k, v in self.segment.state_dict().items()}

    def traffic(self) -> dict[str, ClientStats]:
        """The open round's traffic per client (empty after :meth:`end_round`)."""
        with self._lock:
            return {k: ClientStats(**vars(v)) for k, v in self.stats.items()}

    def add_traffic(self, client: str, traffic: ClientStats) -> None:
        """Count ``traffic`` that ``client`` exchanged with another split-server process (``server.endpoints``)
        as if it had been served here, in the round's table and in the run's totals."""
        with self._lock:
            for s in (self.stats.setdefault(client, ClientStats()), self._totals):
                s.bytes_up += traffic.bytes_up
                s.bytes_down += traffic.bytes_down
                s.train_requests += traffic.train_requests
                s.infer_requests += traffic.infer_requests
                s.samples += traffic.samples

    def traffic_total(self) -> ClientStats:
        """All clients' traffic over the run, summed (a round's is the difference across it)."""
        with self._lock:
            return ClientStats(**vars(self._totals))
