"""What the ServerApp does for the ``[privacy]`` section: validation, accounting, results.

:class:`ServerPrivacy` is the one object the round loop talks to (through :mod:`server.round_hooks`):
it validates the client segment before the first round, records each client's DP-SGD steps in a
:class:`PrivacyLedger` (epsilon recomputed with Opacus from the recorded noise multiplier, sample rate
and steps), adds the per-round figures to ``metrics.jsonl``, saves and restores its state with every
checkpoint, and writes the ``privacy`` object of ``summary.json``, which says plainly what each
mechanism does and does not protect.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from fsl.privacy.activation import activation_release
from fsl.privacy.dp import DPValidationError, PrivacyLedger, validate_dp_module

__all__ = ["ServerPrivacy"]

log = logging.getLogger("fsl.server")

DP_PROTECTS = "the client-segment updates each client returns (and their aggregate), per client, over all rounds"
DP_DOES_NOT = "the smashed activations (and labels) sent every batch: the server sees them before any noise"
NOISE_PROTECTS = "each release of one sample's smashed activation (per-release guarantee; releases compose)"
NOISE_DOES_NOT = "the client-segment updates that get aggregated (use DP-SGD), and the labels"


class ServerPrivacy:
    """Validation, accounting and reporting of the privacy defenses, on the server."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        p = cfg.privacy
        self.dp = p.dp if p.dp.enabled else None
        self.ledger = PrivacyLedger(p.dp.accountant, p.dp.delta) if self.dp is not None else None
        self.secagg = bool(p.secure_aggregation)
        self._participants: set[str] = set()
        self.void_rounds: list[int] = []

    def validate(self, client_part: nn.Module) -> None:
        """Refuse, before any round, a client segment DP-SGD cannot train (the text says why and how to fix it)."""
        if self.dp is not None:
            problems = validate_dp_module(client_part)
            if problems:
                raise DPValidationError(problems)

    # ------------------------------------------------------------------ rounds
    def round_row(self, replies: list[Any]) -> dict[str, Any]:
        """Record this round's DP-SGD steps (replies: the successful train Messages); the row's ``privacy`` field."""
        if self.ledger is None:
            return {}
        clients: dict[str, dict[str, float]] = {}
        for m in replies:
            met = m.content["metrics"]
            if "dp_steps" not in met:
                continue
            pid = str(int(met["partition-id"]))
            self.ledger.record(
                pid, float(met["dp_noise_multiplier"]), float(met["dp_sample_rate"]), int(met["dp_steps"])
            )
            clients[pid] = {
                "noise_multiplier": float(met["dp_noise_multiplier"]),
                "sample_rate": float(met["dp_sample_rate"]),
                "steps_this_round": int(met["dp_steps"]),
                "steps": self.ledger.steps(pid),
                "epsilon": self.ledger.epsilon(pid),
            }
        eps = [c["epsilon"] for c in clients.values()]
        return {
            "privacy": {
                "accountant": self.ledger.accountant,
                "delta": self.ledger.delta,
                "epsilon": max(self.ledger.epsilons().values(), default=0.0),
                "epsilon_this_round_max": max(eps, default=0.0),
                "clients": clients,
            }
        }

    # ------------------------------------------------------- secure aggregation
    def secagg_setup(
        self, grid: Any, rnd: int, nodes: list[int], base: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        """Collect a fresh public key from every node of the round; the config keys the TRAIN messages carry."""
        if not self.secagg:
            return {}
        from flwr.app import ConfigRecord, Message, MessageType, RecordDict

        from fsl.privacy.client import SECAGG_SETUP

        msgs = [
            Message(
                RecordDict({"config": ConfigRecord({**base, SECAGG_SETUP: rnd})}),
                dst_node_id=n,
                message_type=MessageType.QUERY,
            )
            for n in nodes
        ]
        keys = {
            str(m.metadata.src_node_id): bytes(m.content["secagg"]["public"])
            for m in grid.send_and_receive(msgs, timeout=timeout)
            if not m.has_error()
        }
        self._participants = set(keys)
        return {"secagg-peers": list(keys), "secagg-keys": list(keys.values())}

    def secagg_aggregate(self, rnd: int, replies: list[Any], current: Any) -> Any:
        """FedAvg from the masked uploads: ``sum_i n_i w_i / sum_i n_i``; ``None`` when the round is void."""
        from flwr.app import Array, ArrayRecord

        from fsl.privacy.secagg import MASKED_KEY, SecAggError, flatten, unflatten, unmask_sum

        senders = {str(m.metadata.src_node_id) for m in replies}
        if senders != self._participants:
            log.warning(
                "secure aggregation: round %d lost %s; the sum cannot be unmasked, segment kept",
                rnd,
                sorted(self._participants - senders),
            )
            self.void_rounds.append(rnd)
            return None
        try:
            total = unmask_sum([m.content["arrays"][MASKED_KEY].numpy() for m in replies])
        except SecAggError as e:
            log.warning("secure aggregation: round %d: %s; segment kept", rnd, e)
            self.void_rounds.append(rnd)
            return None
        n = sum(int(m.content["metrics"]["num-examples"]) for m in replies)
        _, layout = flatten({k: a.numpy() for k, a in current.items()})
        return ArrayRecord({k: Array(v) for k, v in unflatten(total / max(1, n), layout).items()})

    # ------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        return {"ledger": self.ledger.state()} if self.ledger is not None else {}

    def load(self, state: dict[str, Any] | None) -> None:
        if self.ledger is not None and state:
            self.ledger.load(state.get("ledger"))

    # ----------------------------------------------------------------- results
    def summary(self) -> dict[str, Any]:
        """``{"privacy": {...}}`` for summary.json, or ``{}`` when no defense is on."""
        cfg, p = self.cfg, self.cfg.privacy
        out: dict[str, Any] = {}
        if self.ledger is not None:
            out.update(self.ledger.summary(p.dp.max_grad_norm))
            out["protects"], out["does_not_protect"] = DP_PROTECTS, DP_DOES_NOT
            if p.dp.target_epsilon > 0:
                out["target_epsilon"] = p.dp.target_epsilon
        noise = activation_release(cfg.activation_noise)
        if noise is not None:
            g = noise.guarantee(p.dp.delta)
            out["activation_noise"] = {
                "mechanism": noise.mechanism,
                "clip_norm": noise.clip_norm,
                "noise_multiplier": noise.noise_multiplier,
                "epsilon_per_release": g.epsilon,
                "delta_per_release": g.delta,
                "scope": g.scope,
                "protects": NOISE_PROTECTS,
                "does_not_protect": NOISE_DOES_NOT,
            }
        if p.nopeek_weight > 0:
            out["nopeek"] = {
                "weight": p.nopeek_weight,
                "protects": "empirical only: lowers dCor(inputs, activations); no epsilon, no worst-case bound",
            }
        if p.compression != "none" or cfg.train.wire_dtype != "float32":
            out["compression"] = {
                "activations_and_gradients": p.compression if p.compression != "none" else cfg.train.wire_dtype,
                "topk_ratio": p.topk_ratio if p.compression == "topk" else None,
                "protects": "nothing: fewer bytes on the data plane, not a privacy mechanism",
            }
        if p.label_dp_epsilon > 0:
            out["label_dp"] = {
                "epsilon": p.label_dp_epsilon,
                "mechanism": "randomized response, drawn once per run and client (fsl/privacy/labels.py)",
                "protects": "each training label: what the server receives from it is epsilon-label-DP",
                "does_not_protect": "the inputs and activations; accuracy pays for the noisy labels",
            }
        if p.secure_aggregation:
            out["secure_aggregation"] = {
                "scheme": "pairwise additive masks (X25519 + HKDF + ChaCha20), fixed point mod 2^64",
                "protects": "each client's segment from the server: it stores and sees only the weighted sum",
                "does_not_protect": "the aggregate itself, the activations, dropouts (a round with a dropout is void)",
                "void_rounds": self.void_rounds,
            }
        return {"privacy": out} if out else {}
