"""Scale-out: the ServerApp's side of standalone split servers (``fsl split-server``, one per GPU host).

With ``server.endpoints`` set, the server-segment copies of a round (a ``hybrid`` group's, a
``sflv1`` client's; the one shared segment in the other modes) live on those processes instead of
the in-process split server. Copy ``i`` of the round goes to endpoint ``i mod n``, and each client
is told its copy's endpoint in its round config (``dataplane-address``). At the round's start the
ServerApp pushes the global segment (weights, optimizer buffers) to every endpoint that hosts a
copy, together with the tokens of the clients it serves (``LoadSegment``); when training is over it
pulls each endpoint's trained segment with the samples behind it (``SegmentState``) and FedAvgs
them into the global segment, weighted by samples, momentum alike, as
:meth:`server.replicas.ReplicaSet.merge` does inside one process. An endpoint that hosts several
copies merges them itself first; a sample-weighted mean of sample-weighted means is the flat one.

Control calls are authenticated with a secret the ServerApp and the split servers share
(:class:`ControlKey`): each request carries an HMAC of the method, run and round under it, so the
secret itself never crosses the wire. Clients hold round tokens, HMACs under the run's own secret
over another message, which no control call accepts. Tensors travel as raw buffers with dtype and
shape (:mod:`fsl.wire.codec`); nothing is pickled.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from fsl.auth import AuthError, RoundAuthority
from fsl.grpc_channel import grpc_options
from fsl.wire import codec
from fsl.wire import dataplane_pb2 as pb
from fsl.wire import dataplane_pb2_grpc as pb_grpc
from server.state import ClientStats, SplitServerState

__all__ = [
    "ControlKey",
    "EndpointResult",
    "RemoteSegments",
    "add_traffic",
    "fedavg_states",
    "pack_state",
    "read_secret",
    "unpack_state",
]

log = logging.getLogger("fsl.server")

_DOMAIN = b"fsl-split-control"  # keeps a control HMAC apart from any other MAC under the same key


def read_secret(path: str | Path, create: bool = False) -> bytes:
    """The control secret in ``path`` (hex); with ``create`` a new one is written (mode 0600) if absent."""
    p = Path(path)
    if create and not p.exists():
        # written aside and linked into place: a split server started beside this one on the same
        # host reads either no file or the whole secret, never a half-written one
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        try:
            os.link(tmp, p)
        except FileExistsError:  # another split server made it first: use that one
            pass
        finally:
            tmp.unlink()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no control secret; `fsl split-server --secret-file {p}` creates one")
    secret = bytes.fromhex(p.read_text().strip())
    if len(secret) < 16:
        raise ValueError(f"{p}: a control secret needs at least 16 bytes (32 hex digits)")
    return secret


class ControlKey:
    """Signs and checks control calls: HMAC-SHA256 of (method, run, round) under the shared secret."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def token(self, method: str, run_id: str, round_: int) -> str:
        msg = b"\x00".join((_DOMAIN, method.encode(), run_id.encode(), str(round_).encode()))
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()

    def header(self, method: str, run_id: str, round_: int) -> pb.ControlHeader:
        return pb.ControlHeader(run_id=run_id, round=round_, token=self.token(method, run_id, round_))

    def verify(self, method: str, header: pb.ControlHeader) -> None:
        """Raise :class:`fsl.auth.AuthError` (UNAUTHENTICATED) unless ``header`` was signed for ``method``."""
        if not header.token:
            raise AuthError("control call without a credential")
        if not hmac.compare_digest(header.token, self.token(method, header.run_id, header.round)):
            raise AuthError(f"invalid control credential for {method}")


# ----------------------------------------------------------------------------- tensors on the wire
def pack_state(tensors: Mapping[str, torch.Tensor], out: Any) -> None:
    """Append ``tensors`` to the repeated ``NamedTensor`` field ``out`` (raw buffers, dtype, shape)."""
    for name, t in tensors.items():
        item = out.add()
        item.name = name
        codec.encode_into(item.tensor, t.detach().cpu().contiguous())


def unpack_state(items: Iterable[pb.NamedTensor]) -> dict[str, torch.Tensor]:
    """The tensors of repeated ``NamedTensor``s, each its own CPU copy."""
    out: dict[str, torch.Tensor] = {}
    for item in items:
        if item.name in out:
            raise codec.WireError(f"tensor {item.name!r} sent twice")
        out[item.name] = codec.decode(item.tensor, name=item.name).clone()
    return out


def fedavg_states(
    parts: Sequence[tuple[Mapping[str, torch.Tensor], int]], base: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The sample-weighted average of ``parts`` ((state, samples) each) over the keys of ``base``.

    The rule of :meth:`server.replicas.ReplicaSet.merge`: floating tensors (weights, momentum) are
    averaged with weights ``samples / total``; integer ones (BatchNorm's batch counter) take the
    largest; a key that not every part has keeps ``base``'s value (a copy that never stepped has no
    momentum yet). Parts with no samples count for nothing; with none at all ``base`` is returned.
    """
    live = [(s, n) for s, n in parts if n > 0]
    total = sum(n for _, n in live)
    out = {k: v.clone() for k, v in base.items()}
    if total == 0:
        return out
    keys = set(base) | {k for s, _ in live for k in s}
    for k in sorted(keys):
        if k.startswith("meta.") or not all(k in s for s, _ in live):
            continue
        first = live[0][0][k]
        if first.is_floating_point():
            out[k] = sum((s[k] * (n / total) for s, n in live), torch.zeros_like(first))
        else:
            out[k] = torch.stack([s[k] for s, _ in live]).amax(dim=0)
    return out


# ----------------------------------------------------------------------------- the ServerApp's side
@dataclass
class EndpointResult:
    """What one split server trained in a round."""

    address: str
    samples: int
    steps: int
    state: dict[str, torch.Tensor]
    traffic: list[pb.ClientTraffic]


class RemoteSegments:
    """The ServerApp's handle on the split servers of ``server.endpoints``."""

    def __init__(
        self,
        endpoints: Sequence[str],
        key: ControlKey,
        *,
        run_id: str,
        experiment: str,
        input_shape: Sequence[int],
        num_classes: int,
        root_certificates: bytes | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        timeout_s: float = 600.0,
        base_digest: str = "",
    ) -> None:
        if not endpoints:
            raise ValueError("RemoteSegments needs at least one endpoint")
        self.endpoints = tuple(endpoints)
        self.key, self.run_id, self.experiment = key, run_id, experiment
        self.input_shape, self.num_classes = tuple(int(d) for d in input_shape), int(num_classes)
        self.timeout_s = timeout_s
        self.root_certificates = root_certificates
        self.base_digest = base_digest  # the server segment's frozen base (LoRA), which each split server checks
        opts = grpc_options(max_message_bytes)
        creds = grpc.ssl_channel_credentials(root_certificates) if root_certificates else None
        self._channels = [
            grpc.secure_channel(a, creds, options=opts) if creds else grpc.insecure_channel(a, options=opts)
            for a in self.endpoints
        ]
        self._stubs = [pb_grpc.SplitControlStub(ch) for ch in self._channels]
        self._route: dict[str, int] = {}  # client id -> endpoint index, for the open round
        self._loaded: list[int] = []  # endpoints holding copies of the open round
        self._round = 0

    @classmethod
    def from_config(
        cls,
        server_cfg: Any,
        *,
        run_id: str,
        experiment: str,
        input_shape: Sequence[int],
        num_classes: int,
        base_digest: str = "",
    ) -> RemoteSegments:
        """From the ``[server]`` section: ``endpoints``, ``control_secret_file``, and the CA in
        ``tls_ca_certfile`` (or the certificate in ``tls_certfile``) when the split servers serve TLS."""
        roots_file = server_cfg.tls_ca_certfile or server_cfg.tls_certfile
        return cls(
            server_cfg.endpoints,
            ControlKey(read_secret(server_cfg.control_secret_file)),
            run_id=run_id,
            experiment=experiment,
            input_shape=input_shape,
            num_classes=num_classes,
            root_certificates=Path(roots_file).read_bytes() if roots_file else None,
            max_message_bytes=server_cfg.max_message_mb * 1024 * 1024,
            timeout_s=server_cfg.request_timeout_s,
            base_digest=base_digest,
        )

    def client_conf(self) -> dict[str, str]:
        """Round-config entries every client needs for these endpoints: the PEM that verifies them."""
        return {"dataplane-root-certificates": self.root_certificates.decode()} if self.root_certificates else {}

    def address_for(self, client_id: str) -> str:
        """The endpoint ``client_id`` dials this round (copies not yet assigned: the first)."""
        return self.endpoints[self._route.get(client_id, 0)]

    def spread(self, assignment: Mapping[str, str]) -> dict[int, dict[str, str]]:
        """Endpoint index -> {client: copy} for client -> copy ``assignment``: copy ``i`` (in order of
        first appearance) on endpoint ``i mod n``."""
        copies: dict[str, int] = {}
        for rid in assignment.values():
            copies.setdefault(rid, len(copies) % len(self.endpoints))
        out: dict[int, dict[str, str]] = {}
        for client, rid in assignment.items():
            out.setdefault(copies[rid], {})[client] = rid
        return out

    def _each(self, calls: Mapping[int, Any]) -> dict[int, Any]:
        """Run the endpoint calls of ``calls`` (index -> thunk) at once; their results by index."""
        if not calls:
            return {}
        with ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="split-control") as pool:
            futs = {i: pool.submit(fn) for i, fn in calls.items()}
            return {i: f.result() for i, f in futs.items()}

    def open_round(
        self,
        rnd: int,
        assignment: Mapping[str, str],
        state: Mapping[str, torch.Tensor],
        authority: RoundAuthority,
    ) -> None:
        """Push the global segment ``state`` to the endpoints that host a copy of client -> copy
        ``assignment``, with the tokens ``authority`` issues those clients for round ``rnd``."""
        self._load(rnd, self.spread(assignment), state, authority)

    def open_evaluation(
        self, rnd: int, clients: Sequence[str], state: Mapping[str, torch.Tensor], authority: RoundAuthority
    ) -> None:
        """Push the merged segment for split inference by ``clients``: each on the endpoint it trained
        on this round, the others spread in turn over all endpoints."""
        n = len(self.endpoints)
        placed: dict[int, dict[str, str]] = {}
        for j, c in enumerate(clients):
            placed.setdefault(self._route.get(c, j % n), {})[c] = ""  # one shared segment per endpoint
        self._load(rnd, placed, state, authority)

    def _load(
        self,
        rnd: int,
        placed: Mapping[int, Mapping[str, str]],
        state: Mapping[str, torch.Tensor],
        authority: RoundAuthority,
    ) -> None:
        self._round = rnd
        self._route = {c: i for i, clients in placed.items() for c in clients}
        self._loaded = sorted(placed)

        def load(i: int) -> Any:
            req = pb.LoadSegmentRequest(
                header=self.key.header("LoadSegment", self.run_id, rnd),
                experiment=self.experiment,
                input_shape=list(self.input_shape),
                num_classes=self.num_classes,
                base_digest=self.base_digest,
            )
            pack_state(state, req.state)
            for client, rid in placed[i].items():
                req.clients.add(client_id=client, token=authority.issue(rnd, client), replica=rid)
            try:
                return self._stubs[i].LoadSegment(req, timeout=self.timeout_s)
            except grpc.RpcError as e:
                raise RuntimeError(f"split server {self.endpoints[i]} refused the round's segment: {_why(e)}") from e

        for i, rep in self._each({i: (lambda i=i: load(i)) for i in self._loaded}).items():
            log.info(
                "round %d: split server %s serves %d client(s) on %d segment copy(ies), device %s",
                rnd,
                self.endpoints[i],
                len(placed[i]),
                rep.replicas,
                rep.device,
            )

    def collect(self, *, tensors: bool = True, close: bool = True) -> list[EndpointResult]:
        """Each loaded endpoint's trained segment (``tensors``), samples, steps and client traffic;
        ``close``: no client token is accepted there afterwards. An endpoint that cannot answer is
        left out (logged): its copy is lost, the others are merged."""

        def pull(i: int) -> EndpointResult | None:
            req = pb.SegmentStateRequest(
                header=self.key.header("SegmentState", self.run_id, self._round), tensors=tensors, close=close
            )
            try:
                rep = self._stubs[i].SegmentState(req, timeout=self.timeout_s)
            except grpc.RpcError as e:
                log.warning("split server %s: its segment is lost for this round: %s", self.endpoints[i], _why(e))
                return None
            return EndpointResult(
                self.endpoints[i], int(rep.samples), int(rep.steps), unpack_state(rep.state), list(rep.traffic)
            )

        got = self._each({i: (lambda i=i: pull(i)) for i in self._loaded})
        if close:
            self._loaded = []
        return [r for _, r in sorted(got.items()) if r is not None]

    def merge(
        self, results: Sequence[EndpointResult], global_state: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """``global_state`` with the endpoints' segments FedAvg'd in (optimizer steps added up)."""
        merged = fedavg_states([(r.state, r.samples) for r in results], global_state)
        steps0 = int(global_state.get("meta.steps", torch.tensor(0)))
        merged["meta.steps"] = torch.tensor(steps0 + sum(r.steps for r in results), dtype=torch.int64)
        return merged

    def collect_into(self, state: SplitServerState) -> list[dict[str, Any]]:
        """Training is over: pull every endpoint's segment, FedAvg them into ``state``'s global segment
        (which the ServerApp evaluates and checkpoints), count their traffic in ``state``; returns a
        row per endpoint (address, samples, steps) for the metrics."""
        results = self.collect()
        state.load_state_tensors(self.merge(results, state.state_tensors()))
        add_traffic(state, results)
        return [{"address": r.address, "samples": r.samples, "steps": r.steps} for r in results]

    def finish_round(self, state: SplitServerState) -> None:
        """The round is over: no token of it is accepted anywhere; the evaluation's traffic counted."""
        add_traffic(state, self.collect(tensors=False))

    def close(self) -> None:
        for ch in self._channels:
            ch.close()


def add_traffic(state: SplitServerState, results: Sequence[EndpointResult]) -> None:
    """Count the endpoints' per-client traffic in ``state`` (the ServerApp's own split-server state,
    whose run totals the metrics rows and the progress bar read)."""
    for r in results:
        for t in r.traffic:
            state.add_traffic(
                t.client_id,
                ClientStats(
                    bytes_up=t.bytes_up,
                    bytes_down=t.bytes_down,
                    train_requests=t.train_requests,
                    infer_requests=t.infer_requests,
                    samples=t.samples,
                ),
            )


def _why(e: grpc.RpcError) -> str:
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    return f"{getattr(code, 'name', code)}: {details}"
