"""What the ClientApp wires around its trainer for the ``[privacy]`` and ``[activation_noise]`` sections.

One call, :func:`client_privacy`, returns the training hooks (DP-SGD's optimizer and Poisson
batches, NoPeek's penalty, activation noise on every release of activations) and the metrics the
client reports so the ServerApp can account for it; :func:`private_labels`, the labels it trains on
under label DP.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fsl.privacy.activation import activation_release
from fsl.privacy.dp import DPSession, make_dp_session
from fsl.privacy.labels import randomized_response
from fsl.privacy.nopeek import NoPeek
from fsl.training import TrainHooks, TrainOptions

__all__ = ["ClientPrivacy", "client_privacy", "private_labels"]


@dataclass
class ClientPrivacy:
    options: TrainOptions  # the round's options, as privacy leaves them (DP-SGD turns FedProx off)
    hooks: TrainHooks = field(default_factory=TrainHooks)
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


def client_privacy(cfg: Any, module: nn.Module, n_train: int, options: TrainOptions, partition: int) -> ClientPrivacy:
    """The privacy wiring for one client's round (``cfg``: ``ExperimentConfig``; ``module``: what it trains).

    Only split modes get hooks: in ``fl`` no activations leave the client and its updates are not DP-SGD's.
    """
    p = cfg.privacy
    out = ClientPrivacy(options=options, partition=partition, delta=p.dp.delta)
    if cfg.mode == "fl":
        return out
    hooks = TrainHooks()
    if p.dp.enabled:
        out.session = make_dp_session(
            module,
            n_train,
            dp=p.dp,
            batch_size=options.batch_size,
            lr=options.lr,
            momentum=options.momentum,
            weight_decay=options.weight_decay,
            seed=options.seed,
            total_epochs=cfg.train.rounds * cfg.train.local_epochs,
        )
        hooks = out.session.train_hooks()
        # FedProx's term would be added after Opacus clipped each sample, outside the DP guarantee
        out.options = dataclasses.replace(options, proximal_mu=0.0)
    penalty = NoPeek(p.nopeek_weight) if p.nopeek_weight > 0 else None
    # activations leave the client in every split mode, whichever step sends them: the noise is put on here
    release = activation_release(cfg.activation_noise, seed=options.seed)
    out.hooks = hooks.merged(TrainHooks(penalty=penalty, release=release))
    return out


def private_labels(cfg: Any, y: torch.Tensor, num_classes: int, partition: int) -> torch.Tensor:
    """The labels a client trains on: ``y``, or under ``privacy.label_dp_epsilon`` their randomized
    response, the same every round (seeded by the run and the partition, not the round)."""
    eps = cfg.privacy.label_dp_epsilon
    if eps <= 0 or cfg.mode in ("fl", "central"):
        return y
    return randomized_response(y, eps, num_classes, seed=cfg.seed * 100_003 + partition)


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
