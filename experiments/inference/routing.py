"""Route each inference request to the device, the edge or the cloud, and what each policy costs.

A multi-exit model (:mod:`fsl.exits`) is deployed across three tiers, cut at two of
its exits: the **device** runs the blocks up to ``device_exit`` (``conv1``), the **edge** the
blocks up to ``edge_exit`` (``conv2``), the **cloud** the rest, ending in the final
classifier. Any model whose exits :func:`fsl.exits.add_exits` or :func:`fsl.exits.add_exits_at`
put in works, token models included (exits after encoder layers, inputs token ids and an
attention mask). A request answered on the device stops at the device exit; one answered on the
edge at the edge exit; one answered in the cloud by the final classifier. Every request walks
the same pipeline: what differs is where it stops and which exit heads it evaluates on the way.

The :class:`CostModel` prices that walk per sample (parameters in :class:`CostParams`):

* compute: forward FLOPs (counted with torch's ``FlopCounterMode``, as :mod:`fsl.costs` does)
  of the blocks and exit heads each tier runs, times the tier's price per MFLOP;
* offloading: the float32 activation bytes that cross each tier boundary (plus what travels
  beside them, such as a text's attention mask), times the link's price per kB;
* latency: compute time at each tier's throughput plus, per link crossed, its round trip and
  transmission time; it enters the cost at ``price_per_ms``.

Policies decide, per test sample, the tier that answers (a :class:`Routing`):

====================  ============================================================================
``cloud-only``        everything to the final classifier (the reference: 0 % cost reduction)
``fixed-split``       everything answered at the edge exit
``random``            random tiers with the same fractions (and costs) as the cartography router
``confidence-exit``   DeeBERT-style: the first exit whose max probability is at least ``tau``
``adaptive-exit``     the same with one threshold per exit, tuned jointly
``bandit``            I-SplitEE-style UCB over the exit points, no labels: reward = confidence
                      at the exit taken minus ``lam`` times normalised cost
``cartography``       DIMEC-DC: a router on the device predicts the data-map region (easy,
                      moderate, hard) from the device exit; easy -> device, moderate -> edge,
                      hard -> cloud, with the two cut points of its difficulty score tuned
``cartography-argmax``  the same router, the region of highest predicted probability, untuned
====================  ============================================================================

Thresholds are chosen on a validation split (never the test set) by the reward
``accuracy - lam * cost / cost(cloud-only)``; with ``max_drop_points`` only settings whose
validation accuracy is within that many points of cloud-only's are eligible.
:func:`routing_study` runs the whole study (train and record the training dynamics, map, fit the
router, compare) for any multi-exit model and data; :func:`fashion_mnist_routing` on Fashion-MNIST,
``experiments/transformers_routing.py`` on text with a multi-exit MiniLM.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from experiments.inference.cartography import (
    REGIONS,
    classify,
    plot_data_map,
    record_epochs,
    region_counts,
    region_thresholds,
)
from fsl.costs import count_flops
from fsl.data import Inputs, num_samples, take, trim_padding
from fsl.exits import FINAL, ExitBlock, add_exits, all_exit_logits, exit_names, token_mean
from fsl.models import run_model

__all__ = [
    "TIERS",
    "CostModel",
    "CostParams",
    "DifficultyRouter",
    "PolicyResult",
    "Routing",
    "TierOutputs",
    "UCB",
    "bandit_routing",
    "channel_means",
    "cloud_only",
    "compare_policies",
    "confidence_exit",
    "device_features",
    "evaluate_routing",
    "fashion_mnist_routing",
    "fit_router",
    "fixed_split",
    "random_routing",
    "router_routing",
    "routing_study",
    "token_states",
    "tune",
]

TIERS = ("device", "edge", "cloud")
DEVICE, EDGE, CLOUD = 0, 1, 2


# --------------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CostParams:
    """Prices and speeds of a device-edge-cloud deployment (declared assumptions, not measurements).

    Cost is in arbitrary *cost units* per sample. The defaults describe a phone on a shared
    wireless uplink to a nearby edge server, and a metro/WAN backhaul to a cloud region.
    """

    device_price_per_mflop: float = 0.05  # device compute: free to the operator but costs energy
    edge_price_per_mflop: float = 0.5  # scarce, shared edge servers
    cloud_price_per_mflop: float = 1.0  # billed cloud accelerators, per-request overheads folded in
    uplink_price_per_kb: float = 0.02  # device -> edge, per 1000 bytes (radio energy, spectrum)
    backhaul_price_per_kb: float = 0.01  # edge -> cloud, per 1000 bytes (transit)
    device_gflops: float = 2.0  # effective throughput of each tier at batch 1 (GFLOP/s)
    edge_gflops: float = 20.0
    cloud_gflops: float = 200.0
    uplink_mbps: float = 20.0  # bandwidth (Mbit/s) and round trip (ms, the answer's way back included)
    uplink_rtt_ms: float = 10.0
    backhaul_mbps: float = 200.0
    backhaul_rtt_ms: float = 40.0
    price_per_ms: float = 0.01  # what a millisecond of end-to-end latency costs
    bytes_per_element: int = 4  # float32 activations on the wire

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v < 0:
                raise ValueError(f"CostParams.{f.name} must be >= 0, got {v}")
        for name in ("device_gflops", "edge_gflops", "cloud_gflops", "uplink_mbps", "backhaul_mbps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CostParams.{name} must be > 0: it divides work into time")

    @property
    def price_per_mflop(self) -> tuple[float, float, float]:
        return (self.device_price_per_mflop, self.edge_price_per_mflop, self.cloud_price_per_mflop)

    @property
    def gflops(self) -> tuple[float, float, float]:
        return (self.device_gflops, self.edge_gflops, self.cloud_gflops)


def _mflops(fn: Callable[[], Any]) -> float:
    """Forward MFLOPs torch counts while running ``fn()``."""
    return count_flops(fn) / 1e6


@dataclass(frozen=True)
class CostModel:
    """Per-sample cost and latency of a request, by the tier that answers it and the heads it ran.

    Attributes
    ----------
    exits : tuple of str
        The classifier that answers at each tier: device exit, edge exit, ``"final"``.
    block_mflops : tuple of float
        Forward MFLOPs per sample of the blocks each tier runs (exit heads excluded).
    head_mflops : tuple of float
        MFLOPs of the exit head at each tier (0 for the cloud: its final classifier is a block).
    offload_bytes : tuple of int
        Bytes per sample crossing device -> edge and edge -> cloud.
    router_mflops : float
        MFLOPs of the difficulty router, run on the device when a policy uses it.
    params : CostParams
        Prices and speeds.
    """

    exits: tuple[str, str, str]
    block_mflops: tuple[float, float, float]
    head_mflops: tuple[float, float, float]
    offload_bytes: tuple[int, int]
    router_mflops: float = 0.0
    params: CostParams = field(default_factory=CostParams)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        example: tuple[int, ...] | Inputs,
        *,
        device_exit: str = "conv1",
        edge_exit: str = "conv2",
        router: nn.Module | None = None,
        params: CostParams | None = None,
        carried_bytes: int = 0,
    ) -> CostModel:
        """Count the FLOPs and bytes of ``model`` deployed with cuts at ``device_exit`` and ``edge_exit``.

        Both must be exits of ``model`` (:func:`fsl.exits.add_exits`, :func:`fsl.exits.add_exits_at`),
        ``device_exit`` reached before ``edge_exit``. One forward pass of one sample is counted
        (torch's ``FlopCounterMode``), with marks where each exit's block ends and where its head
        starts and ends: a tier's blocks are the FLOPs between its marks, exit heads left out; the
        heads of the two deployed exits are counted apart and those of other exits not at all
        (they do not run in deployment).

        Parameters
        ----------
        example
            The per-sample input shape of an image model (a zero image is counted), or one
            sample's inputs (a ``(1, ...)`` tensor, or named tensors such as ``input_ids`` and
            ``attention_mask`` of shape ``(1, T)``: the cost is that of a text of ``T`` tokens).
        carried_bytes
            Bytes per sample that cross each tier boundary beside the exit's activations (a
            text model's attention mask).
        """
        p = params or CostParams()
        blocks_by_exit = _exit_blocks(model)
        for e in (device_exit, edge_exit):
            if e not in blocks_by_exit:
                raise ValueError(f"{e!r} is not an exit of this model; exits: {exit_names(model)}")
        x = torch.zeros(1, *example) if isinstance(example, tuple) else example
        if num_samples(x) != 1:
            raise ValueError(f"the example must hold one sample, not {num_samples(x)}")
        ends: dict[str, float] = {}  # FLOPs counted when each exit's block ended
        order: list[str] = []  # exits in the order the forward pass reached them
        heads: dict[str, float] = {}  # FLOPs of each exit's head
        head_start: dict[str, float] = {}
        cut_numel: dict[str, int] = {}
        handles = []
        counter = FlopCounterMode(display=False)

        def flops() -> float:
            return float(counter.get_total_flops())

        for name, block in blocks_by_exit.items():

            def body_end(_m: nn.Module, _a: Any, out: Any, name: str = name) -> None:
                ends[name] = flops() - sum(heads.values())  # heads run so far are not blocks
                order.append(name)
                cut_numel[name] = int((out[0] if isinstance(out, tuple) else out)[0].numel())

            def head_pre(_m: nn.Module, _a: Any, name: str = name) -> None:
                head_start[name] = flops()

            def head_end(_m: nn.Module, _a: Any, _out: Any, name: str = name) -> None:
                heads[name] = flops() - head_start[name]

            handles += [
                block.body.register_forward_hook(body_end),
                block.head.register_forward_pre_hook(head_pre),
                block.head.register_forward_hook(head_end),
            ]
        was = model.training
        model.eval()
        try:
            with torch.no_grad(), counter:
                run_model(model, x)
            total = flops() - sum(heads.values())
            router_mflops = 0.0
            if router is not None:
                if not isinstance(router, DifficultyRouter):
                    raise ValueError("router must be a DifficultyRouter")
                n_in = router.n_features
                router_mflops = _mflops(lambda: router(torch.zeros(1, n_in)))
        finally:
            for h in handles:
                h.remove()
            model.train(was)
        if order.index(device_exit) >= order.index(edge_exit):
            raise ValueError(f"the device exit {device_exit!r} must come before the edge exit {edge_exit!r}")
        dev, edge = ends[device_exit] / 1e6, ends[edge_exit] / 1e6
        return cls(
            exits=(device_exit, edge_exit, FINAL),
            block_mflops=(dev, edge - dev, total / 1e6 - edge),
            head_mflops=(heads[device_exit] / 1e6, heads[edge_exit] / 1e6, 0.0),
            offload_bytes=(
                cut_numel[device_exit] * p.bytes_per_element + carried_bytes,
                cut_numel[edge_exit] * p.bytes_per_element + carried_bytes,
            ),
            router_mflops=router_mflops,
            params=p,
        )

    # -- the pieces ------------------------------------------------------------------------
    def _link(self, k: int) -> tuple[float, float]:
        """(cost, latency ms) of sending one sample's activations over link ``k`` (0 uplink, 1 backhaul)."""
        p = self.params
        price, mbps, rtt = (
            (p.uplink_price_per_kb, p.uplink_mbps, p.uplink_rtt_ms)
            if k == 0
            else (p.backhaul_price_per_kb, p.backhaul_mbps, p.backhaul_rtt_ms)
        )
        b = self.offload_bytes[k]
        return b / 1000 * price, rtt + b * 8 / (mbps * 1e3)

    def _compute(self, tier: int, mflops: float) -> tuple[float, float]:
        """(cost, latency ms) of ``mflops`` at ``tier`` (MFLOP / (GFLOP/s) = ms)."""
        ms = mflops / self.params.gflops[tier]
        return mflops * self.params.price_per_mflop[tier], ms

    def _total(self, cost: float, ms: float) -> tuple[float, float]:
        return cost + self.params.price_per_ms * ms, ms

    def path(self) -> tuple[np.ndarray, np.ndarray]:
        """Cost and latency ``(3,)`` of reaching and answering at each tier, no exit heads run."""
        cost, ms = np.zeros(3), np.zeros(3)
        c_acc = m_acc = 0.0
        for t in range(3):
            if t > 0:
                c, m = self._link(t - 1)
                c_acc, m_acc = c_acc + c, m_acc + m
            c, m = self._compute(t, self.block_mflops[t])
            c_acc, m_acc = c_acc + c, m_acc + m
            cost[t], ms[t] = self._total(c_acc, m_acc)
        return cost, ms

    def heads(self) -> tuple[np.ndarray, np.ndarray]:
        """Cost and latency ``(3,)`` of running each tier's exit head (0 for the cloud)."""
        pairs = [self._total(*self._compute(t, self.head_mflops[t])) for t in range(3)]
        return np.array([c for c, _ in pairs]), np.array([m for _, m in pairs])

    def router_cost(self) -> tuple[float, float]:
        """Cost and latency of running the router on the device, per sample."""
        return self._total(*self._compute(DEVICE, self.router_mflops))

    def per_sample(self, routing: Routing) -> tuple[np.ndarray, np.ndarray]:
        """Cost and latency ``(N,)`` of each sample under ``routing``."""
        pc, pm = self.path()
        hc, hm = self.heads()
        heads = routing.heads.astype(np.float64)  # (N, 3)
        cost = pc[routing.tier] + heads @ hc  # (N,)
        ms = pm[routing.tier] + heads @ hm
        if routing.router:
            rc, rm = self.router_cost()
            cost, ms = cost + rc, ms + rm
        return cost, ms

    @property
    def cloud_only_cost(self) -> float:
        """Cost per sample of the reference policy: every sample to the final classifier, no heads."""
        return float(self.path()[0][CLOUD])

    def to_dict(self) -> dict[str, Any]:
        pc, pm = self.path()
        hc, _ = self.heads()
        return {
            "exits": dict(zip(TIERS, self.exits, strict=True)),
            "block_mflops": dict(zip(TIERS, self.block_mflops, strict=True)),
            "head_mflops": dict(zip(TIERS, self.head_mflops, strict=True)),
            "offload_bytes": {"device->edge": self.offload_bytes[0], "edge->cloud": self.offload_bytes[1]},
            "router_mflops": self.router_mflops,
            "path_cost": dict(zip(TIERS, pc.tolist(), strict=True)),
            "path_latency_ms": dict(zip(TIERS, pm.tolist(), strict=True)),
            "head_cost": dict(zip(TIERS, hc.tolist(), strict=True)),
            "params": asdict(self.params),
        }


def _exit_blocks(model: nn.Module) -> dict[str, ExitBlock]:
    """The model's exit blocks by exit name."""
    blocks = [m for m in model.modules() if isinstance(m, ExitBlock)]
    return dict(zip(exit_names(model), blocks, strict=True))


# --------------------------------------------------------------------------------------------
# What the tiers' classifiers say, and what a policy decided
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TierOutputs:
    """Softmax outputs of the three tiers' classifiers on a set of samples (and their labels).

    ``difficulty`` holds the router's predicted region probabilities when one was run.
    """

    probs: np.ndarray  # (N, 3, C) device exit, edge exit, final classifier
    y: np.ndarray | None = None  # (N,) labels, None where a policy must not see them
    difficulty: np.ndarray | None = None  # (N, 3) router's P(easy), P(moderate), P(hard)

    def __len__(self) -> int:
        return int(self.probs.shape[0])

    @classmethod
    def from_logits(
        cls,
        logits: dict[str, torch.Tensor],
        exits: Sequence[str],
        y: torch.Tensor | None = None,
        difficulty: np.ndarray | None = None,
    ) -> TierOutputs:
        """From :func:`fsl.exits.all_exit_logits` output, taking the three ``exits`` in tier order."""
        missing = [e for e in exits if e not in logits]
        if missing:
            raise ValueError(f"no logits for exits {missing}; have {sorted(logits)}")
        probs = torch.stack([torch.softmax(logits[e].float(), 1) for e in exits], 1)  # (N, 3, C)
        return cls(probs.numpy(), None if y is None else y.numpy(), difficulty)

    @property
    def confidence(self) -> np.ndarray:
        """(N, 3) max softmax probability at each tier."""
        return self.probs.max(2)

    @property
    def predictions(self) -> np.ndarray:
        """(N, 3) predicted class at each tier."""
        return self.probs.argmax(2)

    @property
    def correct(self) -> np.ndarray:
        """(N, 3) whether each tier's classifier is right (needs labels)."""
        if self.y is None:
            raise ValueError("these outputs carry no labels")
        return self.predictions == self.y[:, None]

    def take(self, idx: np.ndarray) -> TierOutputs:
        return TierOutputs(
            self.probs[idx],
            None if self.y is None else self.y[idx],
            None if self.difficulty is None else self.difficulty[idx],
        )


@dataclass(frozen=True)
class Routing:
    """What a policy decided for each sample."""

    tier: np.ndarray  # (N,) int64: 0 device, 1 edge, 2 cloud answers
    heads: np.ndarray  # (N, 3) bool: the exit heads run on the way (column 2, the final classifier, unused)
    router: bool = False  # the difficulty router ran on the device for every sample

    def __post_init__(self) -> None:
        if self.heads.shape != (len(self.tier), 3):
            raise ValueError(f"heads must be (N, 3) = ({len(self.tier)}, 3), got {self.heads.shape}")
        if len(self.tier) and (self.tier.min() < 0 or self.tier.max() > 2):
            raise ValueError("tiers are 0 (device), 1 (edge) or 2 (cloud)")

    def fractions(self) -> dict[str, float]:
        n = max(1, len(self.tier))
        return {name: float((self.tier == t).sum() / n) for t, name in enumerate(TIERS)}


@dataclass(frozen=True)
class PolicyResult:
    """How a policy did on a set of samples."""

    name: str
    accuracy: float  # fraction of samples whose answering classifier is right
    cost: float  # mean cost per sample
    latency_ms: float  # mean end-to-end latency
    tier_fractions: dict[str, float]
    params: dict[str, Any] = field(default_factory=dict)  # thresholds chosen, bandit state, ...

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_routing(name: str, routing: Routing, outputs: TierOutputs, cost: CostModel, **params: Any) -> PolicyResult:
    """Accuracy, mean cost and latency, tier fractions of ``routing`` on ``outputs`` (labels needed)."""
    if len(routing.tier) != len(outputs):
        raise ValueError(f"routing for {len(routing.tier)} samples, outputs for {len(outputs)}")
    correct = outputs.correct[np.arange(len(outputs)), routing.tier]  # (N,)
    c, ms = cost.per_sample(routing)
    return PolicyResult(
        name, float(correct.mean()), float(c.mean()), float(ms.mean()), routing.fractions(), _plain(params)
    )


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    """JSON-friendly copy: numpy scalars to Python, infinities to strings."""

    def conv(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple, np.ndarray)):
            return [conv(x) for x in v]
        if isinstance(v, (np.floating, float)):
            f = float(v)
            return f if math.isfinite(f) else ("inf" if f > 0 else "-inf")
        if isinstance(v, np.integer):
            return int(v)
        return v

    return {k: conv(v) for k, v in d.items()}


# --------------------------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------------------------
def cloud_only(n: int) -> Routing:
    """(i) Every sample to the final classifier; no exit head runs."""
    return Routing(np.full(n, CLOUD, dtype=np.int64), np.zeros((n, 3), dtype=bool))


def fixed_split(n: int, tier: int = EDGE) -> Routing:
    """(ii) Every sample answered at ``tier``'s exit (default the edge)."""
    heads = np.zeros((n, 3), dtype=bool)
    if tier < CLOUD:
        heads[:, tier] = True
    return Routing(np.full(n, tier, dtype=np.int64), heads)


def random_routing(like: Routing, seed: int = 0) -> Routing:
    """(iii) The tiers of ``like`` shuffled over the samples: the same fractions and the same costs.

    The per-sample pattern of heads (and the router) travels with the tier, so the random
    policy pays exactly what ``like`` pays; only *which* samples go where differs.
    """
    perm = np.random.default_rng(seed).permutation(len(like.tier))
    return Routing(like.tier[perm], like.heads[perm], like.router)


def confidence_exit(confidence: np.ndarray, thresholds: Sequence[float]) -> Routing:
    """(iv, v) Stop at the first of the device and edge exits whose max probability reaches its threshold.

    Parameters
    ----------
    confidence
        ``(N, 3)`` max softmax probability per tier (:attr:`TierOutputs.confidence`).
    thresholds
        ``(tau_device, tau_edge)``; ``inf`` never exits there. One value for both is
        DeeBERT's single threshold.
    """
    n = len(confidence)
    tier = np.full(n, CLOUD, dtype=np.int64)
    heads = np.zeros((n, 3), dtype=bool)
    pending = np.ones(n, dtype=bool)
    for t in (DEVICE, EDGE):
        heads[:, t] = pending  # every sample still on its way runs this exit's head
        stop = pending & (confidence[:, t] >= thresholds[t])
        tier[stop] = t
        pending &= ~stop
    return Routing(tier, heads)


def difficulty_score(difficulty: np.ndarray) -> np.ndarray:
    """(N,) expected region ``P(moderate) + 2 P(hard)``, in [0, 2]."""
    return difficulty[:, 1] + 2.0 * difficulty[:, 2]


def router_routing(difficulty: np.ndarray, cuts: Sequence[float] | None = None) -> Routing:
    """(vii) DIMEC-DC: predicted easy -> device exit, moderate -> edge exit, hard -> cloud.

    Parameters
    ----------
    difficulty
        ``(N, 3)`` router probabilities of the regions easy, moderate, hard.
    cuts
        ``(t1, t2)`` on :func:`difficulty_score`: below ``t1`` the device answers, from ``t2``
        the cloud, the edge in between. ``None``: the region of highest probability.
    """
    n = len(difficulty)
    if cuts is None:
        tier = difficulty.argmax(1).astype(np.int64)
    else:
        d = difficulty_score(difficulty)
        tier = np.where(d < cuts[0], DEVICE, np.where(d >= cuts[1], CLOUD, EDGE)).astype(np.int64)
    heads = np.zeros((n, 3), dtype=bool)
    heads[:, DEVICE] = True  # the router reads the device exit
    heads[:, EDGE] = tier == EDGE
    return Routing(tier, heads, router=True)


class UCB:
    """UCB1 over ``n_arms`` arms: pull each once, then ``argmax mean + exploration * sqrt(ln t / n)``."""

    def __init__(self, n_arms: int, exploration: float = 1.0) -> None:
        if n_arms < 1:
            raise ValueError("a bandit needs at least one arm")
        self.exploration = float(exploration)
        self.counts = np.zeros(n_arms, dtype=np.int64)
        self.sums = np.zeros(n_arms)

    @property
    def means(self) -> np.ndarray:
        return self.sums / np.maximum(1, self.counts)

    def select(self) -> int:
        untried = np.flatnonzero(self.counts == 0)
        if len(untried):
            return int(untried[0])
        t = self.counts.sum()
        return int(np.argmax(self.means + self.exploration * np.sqrt(np.log(t) / self.counts)))

    def update(self, arm: int, reward: float) -> None:
        self.counts[arm] += 1
        self.sums[arm] += reward


def bandit_arms(outputs: TierOutputs, alpha: float) -> tuple[Routing, ...]:
    """The routing and label-free reward of every sample under each bandit arm (I-SplitEE).

    Arm ``k`` (0 device, 1 edge) runs the pipeline to tier ``k`` and its exit head; a sample whose
    max probability there reaches ``alpha`` stops, the others go on to the final classifier
    without another head. Arm 2 is cloud-only.
    """
    n = len(outputs)
    conf = outputs.confidence  # (N, 3)
    arms = []
    for k in (DEVICE, EDGE):
        heads = np.zeros((n, 3), dtype=bool)
        heads[:, k] = True
        arms.append(Routing(np.where(conf[:, k] >= alpha, k, CLOUD).astype(np.int64), heads))
    arms.append(cloud_only(n))
    return tuple(arms)


def bandit_rewards(outputs: TierOutputs, cost: CostModel, arms: Sequence[Routing], lam: float) -> np.ndarray:
    """(N, arms) label-free reward: confidence of the classifier that answers minus ``lam`` x normalised cost."""
    conf = outputs.confidence
    ref = cost.cloud_only_cost
    cols = [conf[np.arange(len(outputs)), a.tier] - lam * cost.per_sample(a)[0] / ref for a in arms]
    return np.stack(cols, 1)


def bandit_routing(
    outputs: TierOutputs,
    cost: CostModel,
    *,
    alpha: float = 0.9,
    lam: float = 0.05,
    exploration: float = 0.1,
    seed: int = 0,
) -> tuple[Routing, dict[str, Any]]:
    """(vi) I-SplitEE-style online choice of the exit point over a stream of samples, without labels.

    The samples arrive in a seeded random order; for each, UCB picks an arm of
    :func:`bandit_arms`, the sample is served that way and the arm's reward
    (:func:`bandit_rewards`) updates the bandit.

    Returns
    -------
    routing, info
        The routing (in the original sample order) and ``arm_counts``, ``arm_means``,
        ``best_arm`` (most pulled), the arms pulled in stream order (``pulls``) and the mean
        reward the stream collected (``mean_reward``: against the best single arm's mean reward,
        the bandit's regret per sample).
    """
    n = len(outputs)
    arms = bandit_arms(outputs, alpha)
    rewards = bandit_rewards(outputs, cost, arms, lam)  # (N, 3)
    order = np.random.default_rng(seed).permutation(n)
    ucb = UCB(len(arms), exploration)
    chosen = np.zeros(n, dtype=np.int64)
    pulls = np.zeros(n, dtype=np.int64)
    for step, i in enumerate(order):
        a = ucb.select()
        ucb.update(a, float(rewards[i, a]))  # the bandit sees only the reward of the arm it pulled
        chosen[i] = a
        pulls[step] = a
    tier = np.stack([a.tier for a in arms], 1)[np.arange(n), chosen]
    heads = np.stack([a.heads for a in arms], 1)[np.arange(n), chosen]  # (N, 3)
    info = {
        "alpha": alpha,
        "lam": lam,
        "exploration": exploration,
        "arm_counts": ucb.counts.tolist(),
        "arm_means": ucb.means.tolist(),
        "best_arm": int(np.argmax(ucb.counts)),
        "pulls": pulls,
        "mean_reward": float(rewards[np.arange(n), chosen].mean()) if n else 0.0,
    }
    return Routing(tier, heads), info


# --------------------------------------------------------------------------------------------
# Choosing thresholds on validation data
# --------------------------------------------------------------------------------------------
def tune(
    make: Callable[[Any], Routing],
    candidates: Iterable[Any],
    val: TierOutputs,
    cost: CostModel,
    *,
    lam: float = 0.05,
    max_drop_points: float | None = 0.5,
) -> tuple[Any, PolicyResult, float]:
    """The candidate whose routing of ``val`` has the highest ``accuracy - lam * cost / cost(cloud-only)``.

    With ``max_drop_points``, only candidates whose validation accuracy is at most that many
    points below cloud-only's compete (cloud-only-like settings always qualify, so some
    candidate should; if none does the best reward wins regardless). Ties go to the cheaper one.

    Returns
    -------
    best, result, reward
        The chosen candidate, its validation result and reward.
    """
    ref = cost.cloud_only_cost
    cloud_acc = float(val.correct[:, CLOUD].mean())
    best: tuple[float, float, Any, PolicyResult] | None = None
    fallback: tuple[float, float, Any, PolicyResult] | None = None
    for cand in candidates:
        r = evaluate_routing("tune", make(cand), val, cost)
        key = (r.accuracy - lam * r.cost / ref, -r.cost)
        if fallback is None or key > fallback[:2]:
            fallback = (*key, cand, r)
        if max_drop_points is not None and (cloud_acc - r.accuracy) * 100 > max_drop_points + 1e-9:
            continue
        if best is None or key > best[:2]:
            best = (*key, cand, r)
    chosen = best or fallback
    if chosen is None:
        raise ValueError("no candidates to tune over")
    return chosen[2], chosen[3], chosen[0]


def _grid(values: np.ndarray, points: int) -> list[float]:
    """Quantiles of ``values`` (``points`` of them, deduplicated) plus ``inf`` (never)."""
    q = np.unique(np.quantile(values, np.linspace(0.0, 1.0, points)))
    return [*q.tolist(), math.inf]


# --------------------------------------------------------------------------------------------
# The router: predicts the data-map region from what the device has
# --------------------------------------------------------------------------------------------
class _DeviceDone(Exception):
    """Raised by a hook to end a forward pass where the device's segment ends."""


def channel_means(h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, C)`` per-channel means of cut activations ``(B, C, ...)`` (flat ``(B, D)`` as they are)."""
    return h.float().flatten(2).mean(2) if h.dim() > 2 else h.float()


def token_states(h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, D)`` mean hidden state of the real tokens of a transformer layer's output ``(B, T, D)``."""
    return token_mean(h.float(), attention_mask)


@torch.no_grad()
def device_features(
    model: nn.Module,
    x: Inputs,
    device_exit: str = "conv1",
    pooled: bool = True,
    batch_size: int = 1024,
    pool: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] = channel_means,
) -> torch.Tensor:
    """What the device knows about each sample after its segment: ``(N, F)`` router features.

    Runs the model up to ``device_exit`` only (the forward pass stops there). Features: the
    exit's softmax probabilities ``(C,)``, its max probability, top-1 minus top-2 margin and
    entropy, and with ``pooled`` a summary of the cut activations, ``pool(h, attention_mask)``
    (the mask the exit's layer was given, ``None`` for other models): the channel means of a
    feature map by default, :func:`token_states` for a transformer. ``x`` is a tensor or named
    tensors (token ids and attention mask).
    """
    blocks = _exit_blocks(model)
    if device_exit not in blocks:
        raise ValueError(f"{device_exit!r} is not an exit of this model; exits: {exit_names(model)}")
    block = blocks[device_exit]
    cut: list[Any] = []

    def stop(_m: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")  # a transformer layer's mask
        cut[:] = [out[0] if isinstance(out, tuple) else out, mask]  # (B, ...) the cut activations
        raise _DeviceDone

    handle = block.register_forward_hook(stop, with_kwargs=True)
    was = model.training
    model.eval()
    parts = []
    n = num_samples(x)
    try:
        for i in range(0, n, batch_size):
            xb, _ = trim_padding(take(x, torch.arange(i, min(i + batch_size, n))), torch.empty(0))
            cut.clear()
            try:
                run_model(model, xb)
            except _DeviceDone:
                pass
            if not cut or block.logits is None:
                raise RuntimeError(f"the forward pass never reached the exit {device_exit!r}")
            p = torch.softmax(block.logits.float(), 1)  # (B, C)
            top2 = p.topk(2, dim=1).values  # (B, 2)
            entropy = -(p * p.clamp_min(1e-12).log()).sum(1, keepdim=True)  # (B, 1)
            cols = [p, top2[:, :1], top2[:, :1] - top2[:, 1:], entropy]
            if pooled:
                cols.append(pool(cut[0], cut[1]))  # (B, F_cut)
            parts.append(torch.cat(cols, 1))
    finally:
        handle.remove()
        model.train(was)
    return torch.cat(parts)


class DifficultyRouter(nn.Module):
    """A small MLP from standardised device features ``(B, F)`` to region logits ``(B, 3)``."""

    def __init__(self, n_features: int, hidden: int = 32, n_regions: int = len(REGIONS)) -> None:
        super().__init__()
        self.n_features = n_features
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, n_regions))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.std)  # (B, 3)

    @torch.no_grad()
    def predict_proba(self, features: torch.Tensor) -> np.ndarray:
        """(N, 3) probabilities of easy, moderate, hard."""
        was = self.training
        self.eval()
        try:
            return torch.softmax(self(features.float()), 1).numpy()
        finally:
            self.train(was)


def fit_router(
    features: torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    hidden: int = 32,
    epochs: int = 20,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
) -> DifficultyRouter:
    """Train a :class:`DifficultyRouter` on ``(N, F)`` features and ``(N,)`` region labels (Adam, cross entropy).

    Deterministic for a given ``seed`` (initial weights and batch order); the global RNG is left alone.
    """
    x = features.float()
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} feature rows but {len(y)} labels")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        router = DifficultyRouter(x.shape[1], hidden)
    router.mean.copy_(x.mean(0))
    router.std.copy_(x.std(0).clamp_min(1e-6))
    opt = torch.optim.Adam(router.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    router.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch_size):
            idx = perm[i : i + batch_size]
            loss = nn.functional.cross_entropy(router(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return router.eval()


# --------------------------------------------------------------------------------------------
# All policies side by side
# --------------------------------------------------------------------------------------------
def compare_policies(
    test: TierOutputs,
    val: TierOutputs,
    cost: CostModel,
    *,
    lam: float = 0.05,
    max_drop_points: float | None = 0.5,
    grid_points: int = 41,
    bandit_exploration: float = 0.1,
    seed: int = 0,
) -> dict[str, Any]:
    """Every policy on ``test``, thresholds tuned on ``val``; a JSON-friendly table.

    The cartography policies need ``difficulty`` (router probabilities) in both outputs; they
    and ``random`` are left out otherwise. The bandit's exit threshold ``alpha`` is the one
    tuned for ``confidence-exit``.

    Returns
    -------
    dict
        ``policies``: name -> accuracy, accuracy drop vs cloud-only (points), cost, cost
        reduction vs cloud-only (%), latency, tier fractions, chosen parameters and the
        validation result behind them; plus ``reference``, ``lam``, ``max_drop_points``,
        ``cloud_only_cost``.
    """
    n = len(test)
    results: list[tuple[PolicyResult, PolicyResult | None]] = []

    def add(r: PolicyResult, v: PolicyResult | None = None) -> None:
        results.append((r, v))

    add(evaluate_routing("cloud-only", cloud_only(n), test, cost))
    add(evaluate_routing("fixed-split", fixed_split(n, EDGE), test, cost))
    opts = {"lam": lam, "max_drop_points": max_drop_points}

    vconf = val.confidence
    tau, vr, _ = tune(
        lambda t: confidence_exit(vconf, (t, t)), _grid(vconf[:, :2].ravel(), grid_points), val, cost, **opts
    )
    add(evaluate_routing("confidence-exit", confidence_exit(test.confidence, (tau, tau)), test, cost, tau=tau), vr)

    pairs = [(a, b) for a in _grid(vconf[:, 0], grid_points) for b in _grid(vconf[:, 1], grid_points)]
    taus, vr, _ = tune(lambda ab: confidence_exit(vconf, ab), pairs, val, cost, **opts)
    adaptive = confidence_exit(test.confidence, taus)
    add(evaluate_routing("adaptive-exit", adaptive, test, cost, tau_device=taus[0], tau_edge=taus[1]), vr)

    alpha = tau if math.isfinite(tau) else 1.0
    routing, info = bandit_routing(test, cost, alpha=alpha, lam=lam, exploration=bandit_exploration, seed=seed)
    info.pop("pulls")
    add(evaluate_routing("bandit", routing, test, cost, **info))

    if test.difficulty is not None and val.difficulty is not None:
        vd = val.difficulty
        scores = _grid(difficulty_score(vd), grid_points)
        cuts = [(-math.inf, b) for b in scores] + [(a, b) for a in scores for b in scores if a <= b]
        best, vr, _ = tune(lambda c: router_routing(vd, c), cuts, val, cost, **opts)
        cart = router_routing(test.difficulty, best)
        add(evaluate_routing("cartography", cart, test, cost, cuts=best), vr)
        add(evaluate_routing("random", random_routing(cart, seed), test, cost, like="cartography"))
        add(evaluate_routing("cartography-argmax", router_routing(test.difficulty), test, cost))

    ref = results[0][0]
    table: dict[str, Any] = {}
    for r, v in results:
        row = {
            "accuracy": r.accuracy,
            "accuracy_drop_points": 100 * (ref.accuracy - r.accuracy),
            "cost": r.cost,
            "cost_reduction_pct": 100 * (1 - r.cost / ref.cost),
            "latency_ms": r.latency_ms,
            "tier_fractions": r.tier_fractions,
            "params": r.params,
        }
        if v is not None:
            row["validation"] = {"accuracy": v.accuracy, "cost": v.cost, "tier_fractions": v.tier_fractions}
        table[r.name] = row
    return {
        "reference": "cloud-only",
        "lam": lam,
        "max_drop_points": max_drop_points,
        "cloud_only_cost": ref.cost,
        "policies": table,
    }


# --------------------------------------------------------------------------------------------
# The study: train a multi-exit model, map its training data, route, compare
# --------------------------------------------------------------------------------------------
def routing_study(
    out_dir: str | Path,
    model: nn.Module,
    train: tuple[Inputs, torch.Tensor],
    val: tuple[Inputs, torch.Tensor],
    test: tuple[Inputs, torch.Tensor],
    *,
    example: tuple[int, ...] | Inputs,
    device_exit: str,
    edge_exit: str,
    epochs: int,
    lr: float,
    batch_size: int,
    momentum: float = 0.9,
    exit_weight: float = 0.5,
    clip_norm: float = 0.0,
    lam: float = 0.05,
    max_drop_points: float | None = 0.5,
    seed: int = 0,
    router_holdout: float = 0.1,
    rng: np.random.Generator | None = None,
    region_kwargs: dict[str, float] | None = None,
    params: CostParams | None = None,
    carried_bytes: int = 0,
    pool: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] = channel_means,
    eval_batch_size: int = 1024,
    config: dict[str, Any] | None = None,
    title: str = "data map",
    json_name: str = "routing.json",
    map_name: str = "data_map.png",
    records_name: str | None = "cartography.npz",
) -> dict[str, Any]:
    """Data-cartography routing of a multi-exit ``model``: train, map, route, compare; writes JSON, PNG, NPZ.

    1. ``model`` (exits at ``device_exit`` and ``edge_exit`` at least) trains ``epochs`` epochs on
       ``train`` with :func:`experiments.inference.cartography.record_epochs` (SGD, in this
       process), recording each sample's p(true label) under the final classifier after every epoch.
    2. The data map splits the training samples into easy / moderate / hard
       (:func:`experiments.inference.cartography.classify`, ``region_kwargs``).
    3. A router learns the region from the device features (:func:`device_features` with ``pool``)
       of the training samples; a ``router_holdout`` share of them (drawn with ``rng``, default
       seeded by ``seed``) measures its accuracy against the majority class.
    4. :func:`compare_policies` on ``test``, thresholds tuned on ``val``; the cost model is counted
       on ``example`` (:meth:`CostModel.from_model`, ``carried_bytes``).

    Writes ``json_name`` (``config`` and the training settings, cost model, region counts, router
    accuracy, per-tier accuracies, the table), ``map_name`` and, unless ``records_name`` is None,
    the training dynamics as ``records_name`` to ``out_dir``, and returns the JSON's content.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed) if rng is None else rng
    (x_tr, y_tr), (x_val, y_val), (x_te, y_te) = train, val, test
    rec = record_epochs(
        model,
        x_tr,
        y_tr,
        epochs,
        lr=lr,
        batch_size=batch_size,
        momentum=momentum,
        exit_weight=exit_weight,
        clip_norm=clip_norm,
        seed=seed,
        eval_batch_size=eval_batch_size,
    )
    t_train = time.perf_counter() - t0
    if records_name is not None:
        rec.save(out / records_name)
    stats = rec.stats()
    kw = region_kwargs or {}
    labels = classify(stats, **kw)
    plot_data_map(stats, labels, out / map_name, title=title)

    def features(x: Inputs) -> torch.Tensor:
        return device_features(model, x, device_exit, batch_size=eval_batch_size, pool=pool)

    feats = features(x_tr)  # (N, F)
    hold = torch.from_numpy(rng.random(len(labels)) < router_holdout)
    router = fit_router(feats[~hold], labels[~hold.numpy()], seed=seed)
    pred = router.predict_proba(feats[hold]).argmax(1)
    held = labels[hold.numpy()]
    majority = np.bincount(labels[~hold.numpy()], minlength=3).argmax()
    cost = CostModel.from_model(
        model,
        example,
        device_exit=device_exit,
        edge_exit=edge_exit,
        router=router,
        params=params,
        carried_bytes=carried_bytes,
    )

    def outputs(x: Inputs, y: torch.Tensor) -> TierOutputs:
        logits = all_exit_logits(model, x, eval_batch_size)
        return TierOutputs.from_logits(logits, cost.exits, y, router.predict_proba(features(x)))

    test_out, val_out = outputs(x_te, y_te), outputs(x_val, y_val)
    assert test_out.difficulty is not None
    pred_test = test_out.difficulty.argmax(1)
    table = compare_policies(test_out, val_out, cost, lam=lam, max_drop_points=max_drop_points, seed=seed)
    report = {
        "config": {
            **(config or {}),
            "train": len(y_tr),
            "validation": len(y_val),
            "test": len(y_te),
            "epochs": epochs,
            "lr": lr,
            "momentum": momentum,
            "batch_size": batch_size,
            "exit_weight": exit_weight,
            "clip_norm": clip_norm,
            "lam": lam,
            "max_drop_points": max_drop_points,
            "seed": seed,
            "region_thresholds": region_thresholds(stats, **kw),
        },
        "cost_model": cost.to_dict(),
        "regions": region_counts(labels),
        "region_mean_correctness": {  # fraction of epochs the final classifier got the sample right
            name: float(stats.correctness[labels == k].mean()) if (labels == k).any() else None
            for k, name in enumerate(REGIONS)
        },
        "test_final_accuracy_by_predicted_region": {
            name: float(test_out.correct[pred_test == k, CLOUD].mean()) if (pred_test == k).any() else None
            for k, name in enumerate(REGIONS)
        },
        "router": {
            "holdout": int(hold.sum()),
            "accuracy": float((pred == held).mean()),
            "majority_baseline": float((held == majority).mean()),
        },
        "tier_test_accuracy": dict(zip(TIERS, test_out.correct.mean(0).tolist(), strict=True)),
        "comparison": table,
        "seconds": {"train": t_train, "total": time.perf_counter() - t0},
    }
    (out / json_name).write_text(json.dumps(report, indent=2))
    return report


def fashion_mnist_routing(
    out_dir: str | Path,
    *,
    train_limit: int = 0,
    test_limit: int = 0,
    val_size: int = 5000,
    router_holdout: float = 0.1,
    epochs: int = 5,
    lr: float = 0.02,  # with momentum 0.9: lr 0.05 oscillated (final classifier 85.9 %, below its own exits)
    batch_size: int = 64,
    exit_weight: float = 0.5,
    lam: float = 0.05,
    max_drop_points: float | None = 0.5,
    seed: int = 0,
    dataset: str = "fashion-mnist",
    region_kwargs: dict[str, float] | None = None,
    params: CostParams | None = None,
) -> dict[str, Any]:
    """Data-cartography routing on Fashion-MNIST (:func:`routing_study`); writes JSON, PNG, NPZ.

    ``val_size`` training samples are held out (seeded) for tuning thresholds; the multi-exit
    cnn (exits after conv1, conv2, fc1) trains on the rest; the device answers at conv1's exit,
    the edge at conv2's. Writes ``routing.json``, ``data_map.png`` and ``cartography.npz`` to
    ``out_dir``.
    """
    from fsl.data import load_dataset, subset
    from fsl.models import build_model

    ds = subset(load_dataset(dataset), train_limit, test_limit, seed)
    rng = np.random.default_rng(seed)
    perm = torch.from_numpy(rng.permutation(len(ds.y_train)))
    val_idx, tr_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    x_tr, y_tr = ds.x_train[tr_idx], ds.y_train[tr_idx]
    x_val, y_val = ds.x_train[val_idx], ds.y_train[val_idx]
    cuts = ("conv1", "conv2", "fc1")
    base = build_model("cnn", ds.input_shape, ds.num_classes, seed=seed)
    model = add_exits(base, ds.input_shape, ds.num_classes, cuts, seed=seed)
    return routing_study(
        out_dir,
        model,
        (x_tr, y_tr),
        (x_val, y_val),
        (ds.x_test, ds.y_test),
        example=ds.input_shape,
        device_exit="conv1",
        edge_exit="conv2",
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        exit_weight=exit_weight,
        lam=lam,
        max_drop_points=max_drop_points,
        seed=seed,
        router_holdout=router_holdout,
        rng=rng,
        region_kwargs=region_kwargs,
        params=params,
        config={"dataset": dataset},
        title=f"{dataset}: final classifier, {epochs} epochs",
    )


if __name__ == "__main__":  # python -m experiments.inference.routing OUT_DIR [train_limit]
    import sys

    torch.set_num_threads(1)
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/routing"
    res = fashion_mnist_routing(out_dir, train_limit=int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    for name, row in res["comparison"]["policies"].items():
        acc, drop, red = 100 * row["accuracy"], row["accuracy_drop_points"], row["cost_reduction_pct"]
        print(f"{name:20s} acc {acc:.2f}  drop {drop:+.2f} pts  cost -{red:.1f} %  {row['tier_fractions']}")
