"""What the ClientApp wires around its trainer for the ``[privacy]`` section (issue 5).

One call, :func:`client_privacy`, returns the extra trainer arguments (DP-SGD's optimizer and
Poisson batches, NoPeek's penalty, activation noise for U-shaped splits) and the metrics the client
reports so the ServerApp can account for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from fsl.privacy.activation import activation_release
from fsl.privacy.dp import DPSession, make_dp_session
from fsl.privacy.nopeek import NoPeek

__all__ = ["ClientPrivacy", "client_privacy"]


@dataclass
class ClientPrivacy:
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for the trainer
    session: DPSession | None = None
    partition: int = 0
    delta: float = 1e-5

    def metrics(self) -> dict[str, float]:
        """Numbers for the round's MetricRecord; detaches Opacus from the segment."""
        out: dict[str, float] = {"partition-id": self.partition}
        if self.session is not None:
            out.update(self.session.metrics(self.delta))
            self.session.close()
        return out


def client_privacy(cfg: Any, module: nn.Module, n_train: int, kw: dict[str, Any], partition: int) -> ClientPrivacy:
    """The privacy wiring for one client's round (``cfg``: ``ExperimentConfig``; ``module``: what it trains)."""
    p = cfg.privacy
    out = ClientPrivacy(partition=partition, delta=p.dp.delta)
    if p.dp.enabled and cfg.mode != "fl":
        out.session = make_dp_session(
            module,
            n_train,
            dp=p.dp,
            batch_size=kw["batch_size"],
            lr=kw["lr"],
            momentum=kw["momentum"],
            weight_decay=kw["weight_decay"],
            seed=int(kw["seed"]),
            total_epochs=cfg.train.rounds * cfg.train.local_epochs,
        )
        out.kwargs.update(optimizer=out.session.optimizer, batches=out.session.batches, proximal_mu=0.0)
    if p.nopeek_weight > 0 and cfg.mode != "fl":
        out.kwargs["penalty"] = NoPeek(p.nopeek_weight)
    if cfg.model.ushaped:  # the non-U path gets its release from attacks.ground_truth.client_hooks
        out.kwargs["release"] = activation_release(cfg.activation_noise, seed=int(kw["seed"]))
    return out


def wire_dtype_for(cfg: Any) -> Any:
    """What the client's channel encodes activations with: ``train.wire_dtype``, or int8 / top-k (``privacy``)."""
    from fsl.wire.codec import DTYPES
    from fsl.wire.compress import WireFormat

    p = cfg.privacy
    if p.compression == "int8":
        return WireFormat("int8")
    if p.compression == "topk":
        return WireFormat(cfg.train.wire_dtype, p.topk_ratio)
    return DTYPES[cfg.train.wire_dtype]


# ----------------------------------------------------------------------------- secure aggregation (client side)
SECAGG_SETUP = "secagg-setup"


def secagg_setup_reply(msg: Any, context: Any) -> Any:
    """Answer the ServerApp's setup QUERY with a fresh public key (``None``: not a setup message)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from fsl.privacy.secagg import generate_keypair

    conf = msg.content["config"]
    if SECAGG_SETUP not in conf:
        return None
    private, public = generate_keypair()  # fresh per round; the private key never leaves this node
    context.state["secagg"] = ConfigRecord({"round": int(conf[SECAGG_SETUP]), "private": private})
    return Message(RecordDict({"secagg": ConfigRecord({"public": public})}), reply_to=msg)


def client_arrays(state_dict: dict[str, Any], conf: Any, context: Any, examples: int) -> Any:
    """What the client returns: its segment, or with secure aggregation on, ``examples * segment`` masked."""
    from flwr.app import Array, ArrayRecord

    from fsl.privacy.secagg import MASKED_KEY, flatten, mask

    if "secagg-peers" not in conf:
        return ArrayRecord(state_dict)
    rnd = int(conf["server-round"])
    st = context.state["secagg"] if "secagg" in context.state else None
    if st is None or int(st["round"]) != rnd:
        raise RuntimeError(f"secure aggregation: no key pair for round {rnd} on this node (setup missed)")
    flat, _ = flatten({k: v.detach().cpu().numpy() for k, v in state_dict.items()})
    peers = dict(zip([str(p) for p in conf["secagg-peers"]], [bytes(k) for k in conf["secagg-keys"]], strict=True))
    me = str(context.node_id)
    masked = mask(flat * float(examples), me, bytes(st["private"]), peers, f"{conf['run-id']}/{rnd}".encode())
    return ArrayRecord({MASKED_KEY: Array(masked)})
