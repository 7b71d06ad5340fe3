"""A standalone split server that a ServerApp drives: ``fsl split-server``.

One process per GPU host. It serves the data plane (Train, Infer, Forward, Backward, as the
in-process split server does) and the control service the ServerApp uses (``SplitControl``:
``LoadSegment``, ``SegmentState``; :mod:`server.remote` is the other side). It holds no model until
the ServerApp's first ``LoadSegment``, which names the experiment, so one command serves any run:
the segment's architecture is built from that config, its weights and optimizer buffers loaded
from the request, and the round opened for exactly the clients the request lists, with their
tokens. Only those clients, with those tokens, may train or infer here until the next
``LoadSegment`` or a closing ``SegmentState``; clients routed to another split server are refused.

Control calls must carry an HMAC under the secret in ``--secret-file``, shared with the ServerApp
(``server.control_secret_file``); a client's round token is no such HMAC and is refused
(UNAUTHENTICATED). With ``--tls-certfile``/``--tls-keyfile`` both services are served over TLS.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import torch

from fsl.auth import AuthError, ExpiredCredential, RoundAuthority
from fsl.config import TrainConfig
from fsl.grpc_channel import grpc_options
from fsl.lora import BaseMismatch, check_base
from fsl.wire import codec
from fsl.wire import dataplane_pb2 as pb
from fsl.wire import dataplane_pb2_grpc as pb_grpc
from server.remote import ControlKey, pack_state, read_secret, unpack_state
from server.servicer import SplitServicer, add_servicer, bind
from server.state import SplitServerState
from server.validation import InvalidRequest

__all__ = ["GrantedTokens", "SplitHost", "SplitHostServer", "register"]

log = logging.getLogger("fsl.server")


class GrantedTokens(RoundAuthority):
    """Accepts exactly the (client, token) pairs the ServerApp granted for the open round.

    The tokens are the ServerApp's round tokens for these clients; this process cannot issue any
    (it never holds the ServerApp's secret) and accepts none it was not given.
    """

    def __init__(self) -> None:
        super().__init__("", secret=b"")
        self._grants: dict[str, str] = {}
        self._round: int | None = None

    def grant(self, run_id: str, round_: int, tokens: dict[str, str]) -> None:
        with self._lock:
            self.run_id, self._round, self._grants = run_id, round_, dict(tokens)

    def open_round(self, round_: int) -> None:
        raise NotImplementedError("a split server's rounds are opened by the ServerApp's LoadSegment")

    def close_all(self) -> None:
        with self._lock:
            self._round, self._grants = None, {}

    def issue(self, round_: int, client_id: str) -> str:
        raise NotImplementedError("a split server issues no tokens: the ServerApp does")

    def verify(self, run_id: str, round_: int, client_id: str, token: str) -> None:
        if not token:
            raise AuthError("no data-plane credential; the ServerApp hands one out with each round's config")
        with self._lock:
            open_round, want = self._round, self._grants.get(client_id)
            run = self.run_id
        if run_id != run or not client_id:
            raise AuthError(f"credential is not for the run this split server serves ({run or 'none'})")
        if open_round is not None and round_ != open_round:
            raise ExpiredCredential(f"credential for round {round_} is not valid now (open: {open_round})")
        if open_round is None:
            raise ExpiredCredential(f"credential for round {round_} is not valid now (open: none)")
        if want is None or not hmac.compare_digest(token, want):
            raise AuthError(f"client {client_id!r} is not served by this split server in round {round_}")


class SplitHost:
    """The split-server process's state across runs and rounds: the segment the ServerApp loaded."""

    def __init__(self, key: ControlKey, *, device: str = "auto") -> None:
        self.key, self.device = key, device
        self.tokens = GrantedTokens()
        self._lock = threading.Lock()  # one control call at a time
        self.state: SplitServerState | None = None
        self.batcher: Any | None = None
        self._built_for: tuple[str, tuple[int, ...], int] | None = None
        self._run_round: tuple[str, int] | None = None
        self._train_cfg: TrainConfig | None = None  # the experiment's [train], once a segment is built
        self._samples0 = self._steps0 = 0

    def current(self) -> SplitServerState:
        state = self.state
        if state is None:
            raise InvalidRequest("this split server holds no segment yet: the ServerApp loads one each round")
        return state

    def trainer(self) -> Any:
        """What serves Train: the batcher when the experiment batches, else the state."""
        return self.batcher if self.batcher is not None else self.current()

    def _build(self, experiment: str, input_shape: tuple[int, ...], num_classes: int) -> None:
        from fsl.experiment import build_model_for, config_from_json, server_side
        from fsl.lora import base_digest

        cfg = config_from_json(experiment)
        self._train_cfg = cfg.train
        _, side = server_side(cfg, build_model_for(cfg, input_shape, num_classes), input_shape)
        self._base_digest = base_digest(side.segment)  # what a LoRA segment's adapters are checked against
        self.state = SplitServerState(
            side.segment,
            sample_shape=side.sample_shape,
            signature=side.signature,
            task=side.task,
            num_classes=num_classes,
            lr=cfg.train.server_lr,
            momentum=cfg.train.momentum,
            clip_norm=cfg.clip_norm,
            weight_decay=cfg.train.weight_decay,
            device=self.device,
            max_batch=cfg.server.max_batch,
            authority=self.tokens,
            model_name=cfg.model.name,
            cut=cfg.model.cut,
            mode=cfg.mode,
            ushaped=cfg.model.ushaped,
            max_message_bytes=cfg.server.max_message_mb * 1024 * 1024,
            exit_weight=cfg.model.exit_weight,
        )
        self.batcher = None
        if cfg.server.batching:
            from server.batching import RequestBatcher

            self.batcher = RequestBatcher(
                self.state,
                max_requests=cfg.server.max_batch_requests,
                max_wait_ms=cfg.server.max_batch_wait_ms,
                pad_lengths=cfg.server.pad_lengths,
            )
        self._built_for = (experiment, input_shape, num_classes)
        log.info("split server built %s cut at %s on %s", cfg.model.name, cfg.model.cut, self.state.torch_device)

    def load_segment(self, req: pb.LoadSegmentRequest) -> pb.LoadSegmentReply:
        self.key.verify("LoadSegment", req.header)
        hdr = req.header
        shape = tuple(int(d) for d in req.input_shape)
        tensors = unpack_state(req.state)
        with self._lock:
            self.tokens.close_all()  # no client of the previous round steps into the new segment
            if self._built_for != (req.experiment, shape, int(req.num_classes)):
                self._build(req.experiment, shape, int(req.num_classes))
            state = self.current()
            try:  # adapters trained on another frozen base would mean something else here
                check_base(
                    {"server": req.base_digest} if req.base_digest else None,
                    {"server": self._base_digest},
                    "split server",
                )
            except BaseMismatch as e:
                raise InvalidRequest(str(e)) from e
            try:
                state.load_state_tensors(tensors)
            except (KeyError, RuntimeError) as e:
                raise InvalidRequest(f"the segment state does not fit the experiment's segment: {e}") from e
            state.stats.clear()
            if self._train_cfg is not None:  # the round's rate under train.lr_schedule
                t = self._train_cfg
                state.set_lr(t.server_lr * t.lr_factor(hdr.round))
            state.open_replicas({g.client_id: g.replica for g in req.clients})
            self.tokens.grant(hdr.run_id, hdr.round, {g.client_id: g.token for g in req.clients})
            self._run_round = (hdr.run_id, hdr.round)
            self._samples0, self._steps0 = state.global_replica.samples, state.steps
            copies = max(1, len(state.replicas()))
        return pb.LoadSegmentReply(device=str(state.torch_device), replicas=copies)

    def segment_state(self, req: pb.SegmentStateRequest) -> pb.SegmentStateReply:
        self.key.verify("SegmentState", req.header)
        with self._lock:
            if self._run_round != (req.header.run_id, req.header.round):
                raise InvalidRequest(
                    f"no segment loaded for run {req.header.run_id!r} round {req.header.round} (holds {self._run_round})"
                )
            state = self.current()
            if req.close:
                self.tokens.close_all()
            # the copies merge into the loaded segment (sample-weighted): what this process trained
            merged = state.merge_replicas()
            state.global_replica.samples += sum(merged.values())
            reply = pb.SegmentStateReply(
                samples=state.global_replica.samples - self._samples0, steps=state.steps - self._steps0
            )
            if req.tensors:
                pack_state(state.state_tensors(), reply.state)
            for client, s in sorted(state.traffic().items()):
                reply.traffic.add(
                    client_id=client,
                    bytes_up=s.bytes_up,
                    bytes_down=s.bytes_down,
                    train_requests=s.train_requests,
                    infer_requests=s.infer_requests,
                    samples=s.samples,
                )
            if req.close:
                state.end_round()
        return reply


class _DataPlane(SplitServicer):
    """The data plane of whatever segment the host holds now (it changes between runs)."""

    def __init__(self, host: SplitHost) -> None:  # no fixed state: each call looks up the current one
        self.host = host
        self.train_fn = lambda r: host.trainer().train(r)
        self.train_frame_fn = self.train_fn  # the state and the batcher both read frames in place
        self.infer_fn = lambda r: host.current().infer(r)
        self.infer_frame_fn = self.infer_fn

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoReply:  # noqa: N802
        return self._run(lambda _r: self.host.current().info(), request, context)

    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext) -> pb.ForwardReply:  # noqa: N802
        return self._run(lambda r: self.host.current().forward(r), request, context)

    def Backward(self, request: pb.BackwardRequest, context: grpc.ServicerContext) -> pb.BackwardReply:  # noqa: N802
        return self._run(lambda r: self.host.current().backward(r), request, context)


class _Control(pb_grpc.SplitControlServicer):
    def __init__(self, host: SplitHost) -> None:
        self.host = host

    def LoadSegment(self, request: pb.LoadSegmentRequest, context: grpc.ServicerContext) -> pb.LoadSegmentReply:  # noqa: N802
        return SplitServicer._run(self.host.load_segment, request, context)

    def SegmentState(self, request: pb.SegmentStateRequest, context: grpc.ServicerContext) -> pb.SegmentStateReply:  # noqa: N802
        return SplitServicer._run(self.host.segment_state, request, context)


class SplitHostServer:
    """A :class:`SplitHost` behind gRPC on ``address`` (port 0: the OS picks), TLS when given a
    certificate chain and key (PEM bytes or paths)."""

    def __init__(
        self,
        host: SplitHost,
        address: str = "127.0.0.1:0",
        *,
        max_workers: int = 32,
        max_message_bytes: int = 64 * 1024 * 1024,
        certificate_chain: bytes | str | Path | None = None,
        private_key: bytes | str | Path | None = None,
    ) -> None:
        self.host = host
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="split-host"),
            options=grpc_options(max_message_bytes),
        )
        codec.tune_allocator()
        add_servicer(_DataPlane(host), self._server)
        pb_grpc.add_SplitControlServicer_to_server(_Control(host), self._server)
        self.address, _, self.tls = bind(self._server, address, certificate_chain, private_key)

    def start(self) -> SplitHostServer:
        self._server.start()
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        self._server.stop(grace).wait()

    def __enter__(self) -> SplitHostServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _cmd_split_server(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if bool(args.tls_certfile) != bool(args.tls_keyfile):
        print("error: TLS needs both --tls-certfile and --tls-keyfile", file=sys.stderr)
        return 2
    tls: dict[str, Any] = {}
    if args.tls_certfile:
        tls = {"certificate_chain": Path(args.tls_certfile), "private_key": Path(args.tls_keyfile)}
    key = ControlKey(read_secret(args.secret_file, create=True))
    host = SplitHost(key, device=args.device)
    server = SplitHostServer(host, args.address, max_message_bytes=args.max_message_mb * 1024 * 1024, **tls).start()
    info = {"address": server.address, "tls": server.tls, "device": args.device, "secret_file": args.secret_file}
    print(json.dumps(info), flush=True)  # one line that scripts (and tests) read
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=1.0)
    return 0


def register(sub: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    p = sub.add_parser(
        "split-server",
        help="a standalone split server (one per GPU host) that a ServerApp with server.endpoints drives",
    )
    p.add_argument("--address", default="0.0.0.0:7800", help="host:port to listen on (port 0: any)")
    p.add_argument(
        "--secret-file",
        required=True,
        help="the control secret shared with the ServerApp (server.control_secret_file); created if absent",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--max-message-mb", type=int, default=64, help="largest message either side accepts")
    p.add_argument("--tls-certfile", default="", help="PEM certificate chain (with --tls-keyfile: TLS)")
    p.add_argument("--tls-keyfile", default="")
    return {"split-server": _cmd_split_server}
