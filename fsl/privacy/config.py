"""The ``[privacy]`` section of an experiment: typed, validated, with what each knob protects.

``[privacy.dp]``      DP-SGD on the client segment (Opacus): protects the segment *updates* that get aggregated.
``nopeek_weight``     NoPeek distance-correlation penalty between inputs and smashed activations (empirical, no epsilon).
``compression``       what the activations and gradients travel as on the data plane (not a privacy guarantee).
``secure_aggregation`` pairwise-masked client segments: the server only ever holds their (weighted) sum.
``label_dp_epsilon``  randomized response on each client's labels once per run (epsilon-label-DP, ``labels.py``).

Noise on the activations themselves is the ``[activation_noise]`` section (``fsl/privacy/activation.py``); it
protects the activations sent every batch and nothing else. The dataclasses raise ``ValueError``;
:func:`fsl.config.from_dict` turns that into a ``ConfigError`` that names the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ACCOUNTANTS", "COMPRESSIONS", "DPConfig", "PrivacyConfig", "check_privacy"]

ACCOUNTANTS = ("rdp", "prv")
COMPRESSIONS = ("none", "int8", "topk")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class DPConfig:
    enabled: bool = False  # DP-SGD on each client's segment (per-sample clipping + Gaussian noise, Opacus)
    noise_multiplier: float = 1.0  # noise std in units of max_grad_norm (ignored when target_epsilon > 0)
    max_grad_norm: float = 1.0  # per-sample L2 clipping bound of the client-segment gradient
    target_epsilon: float = 0.0  # > 0: choose the noise so that epsilon reaches this after train.rounds rounds
    delta: float = 1e-5  # the delta epsilon is reported for
    accountant: str = "rdp"  # "rdp" (Renyi DP) or "prv" (privacy random variables, tighter)
    poisson: bool = True  # Poisson sampling of batches (what the accountant assumes); false = shuffled batches

    def __post_init__(self) -> None:
        _check(
            self.accountant in ACCOUNTANTS, f"dp.accountant must be one of {list(ACCOUNTANTS)}, not {self.accountant!r}"
        )
        _check(self.noise_multiplier >= 0, f"dp.noise_multiplier must be >= 0, got {self.noise_multiplier}")
        _check(self.max_grad_norm > 0, f"dp.max_grad_norm must be > 0, got {self.max_grad_norm}")
        _check(self.target_epsilon >= 0, f"dp.target_epsilon must be >= 0 (0 = off), got {self.target_epsilon}")
        _check(0 < self.delta < 1, f"dp.delta must lie in (0, 1), got {self.delta}")
        _check(math.isfinite(self.target_epsilon), "dp.target_epsilon must be finite (use enabled = false for no DP)")


@dataclass(frozen=True)
class PrivacyConfig:
    dp: DPConfig = field(default_factory=DPConfig)
    nopeek_weight: float = 0.0  # weight of the NoPeek distance-correlation penalty dCor(x, h) (0 = off)
    compression: str = "none"  # data plane: "none" (train.wire_dtype), "int8" (linear, one scale), "topk" (sparse)
    topk_ratio: float = 0.1  # topk: share of the largest-magnitude entries kept per tensor
    secure_aggregation: bool = False  # pairwise-masked sum of client segments (server never sees one alone)
    # central DP (Flower's DifferentialPrivacyServerSideFixedClipping around the strategy): the server clips each
    # client's segment update to central_dp_clip and adds Gaussian noise of std central_dp_noise * clip / clients
    # to the average. Protects the aggregated client segment against whoever sees it after the round; the server
    # itself sees every individual update (so it cannot be combined with secure_aggregation).
    central_dp_noise: float = 0.0  # noise multiplier (0 with central_dp_clip = 0: off)
    central_dp_clip: float = 0.0  # L2 bound of each client's update (0 = off)
    # SplitGuard on every client (clients/splitguard.py): fake batches with shifted labels now and then;
    # when the split server's gradients stop following the labels (a hijacking server) the client
    # fails the round with the reason and refuses every later round of the run. Protects a client's
    # inputs against a server that steers its segment to invert them (feature-space hijacking).
    splitguard: bool = False
    splitguard_p_fake: float = 0.1  # share of batches sent fake (after 20 regular ones)
    splitguard_window: int = 5  # the verdict reads the mean of the last this many scores
    splitguard_threshold: float = 0.5  # ... and fires below this
    # label DP (fsl/privacy/labels.py): > 0 replaces each training label of a client once per run by
    # randomized response with this epsilon. Protects the labels a split sends with every batch (and,
    # U-shaped, the labels the returned gradients reveal); costs accuracy (noisy labels). 0: off
    label_dp_epsilon: float = 0.0

    def __post_init__(self) -> None:
        _check(self.nopeek_weight >= 0, f"privacy.nopeek_weight must be >= 0, got {self.nopeek_weight}")
        _check(
            self.compression in COMPRESSIONS,
            f"privacy.compression must be one of {list(COMPRESSIONS)}, not {self.compression!r}",
        )
        _check(0 < self.topk_ratio <= 1, f"privacy.topk_ratio must lie in (0, 1], got {self.topk_ratio}")
        _check(
            0 < self.splitguard_p_fake < 1,
            f"privacy.splitguard_p_fake must lie in (0, 1), got {self.splitguard_p_fake}",
        )
        _check(self.splitguard_window >= 1, f"privacy.splitguard_window must be >= 1, got {self.splitguard_window}")
        _check(
            self.label_dp_epsilon >= 0 and math.isfinite(self.label_dp_epsilon),
            f"privacy.label_dp_epsilon must be a finite number >= 0 (0: off), got {self.label_dp_epsilon}",
        )
        _check(self.central_dp_noise >= 0, f"privacy.central_dp_noise must be >= 0, got {self.central_dp_noise}")
        _check(self.central_dp_clip >= 0, f"privacy.central_dp_clip must be >= 0, got {self.central_dp_clip}")
        _check(
            self.central_dp_noise == 0 or self.central_dp_clip > 0,
            "privacy.central_dp_noise needs privacy.central_dp_clip > 0 (the noise is scaled to the clipping bound)",
        )

    @property
    def central_dp(self) -> bool:
        """Whether Flower's server-side central-DP wrapper aggregates the client segments."""
        return self.central_dp_clip > 0


def check_privacy(cfg: Any, error: type[Exception] = ValueError) -> None:
    """Cross-section checks (``cfg`` is an ``ExperimentConfig``); each message says why and how to fix it."""
    p: PrivacyConfig = cfg.privacy
    if p.dp.enabled:
        if cfg.mode in ("fl", "central"):
            raise error(
                f"privacy.dp trains the client segment of a split; mode {cfg.mode!r} does not split the model "
                "(use a split mode such as 'fsl', 'sflv1' or 'ushaped')"
            )
        if cfg.model.norm == "batch":
            raise error(
                "privacy.dp: BatchNorm mixes the samples of a batch, so a per-sample gradient does not exist and "
                "DP-SGD's clipping bounds nothing; set model.norm = 'group' (GroupNorm normalises each sample alone)"
            )
        if p.nopeek_weight > 0:
            raise error(
                "privacy.dp with privacy.nopeek_weight > 0: the NoPeek penalty couples the samples of a batch "
                "(distance correlation), so per-sample clipping would not bound one sample's influence; use one of them"
            )
        if cfg.train.strategy == "fedprox":
            raise error(
                "privacy.dp with train.strategy = 'fedprox': the proximal term is added to the summed gradient after "
                "Opacus clipped and noised the per-sample ones, which Opacus ignores; use another strategy"
            )
    if p.splitguard and (cfg.mode in ("fl", "central") or cfg.model.ushaped or p.dp.enabled):
        raise error(
            "privacy.splitguard reads the gradients a split server returns for labels the client sent: it needs a "
            f"split mode whose server computes the loss (not {cfg.mode!r}, not U-shaped) and plain SGD (not privacy.dp)"
        )
    if p.label_dp_epsilon > 0 and cfg.mode in ("fl", "central"):
        raise error(
            f"privacy.label_dp_epsilon protects the labels a split sends (or a U-shaped client's returned "
            f"gradients reveal); in mode {cfg.mode!r} no label or gradient leaves the client (use a split mode)"
        )
    if (p.nopeek_weight > 0 or p.compression != "none") and cfg.mode in ("fl", "central"):
        raise error(f"privacy.nopeek_weight and privacy.compression act at the cut; mode {cfg.mode!r} has none")
    if p.central_dp and p.secure_aggregation:
        raise error(
            "privacy.central_dp_* clips each client's update on the server, which needs the individual updates; "
            "privacy.secure_aggregation hides them: use one of the two"
        )
    if p.central_dp and cfg.mode in ("sl", "psl", "central"):
        raise error(
            f"privacy.central_dp_* acts on the aggregation of client segments; mode {cfg.mode!r} aggregates none"
        )
    if p.secure_aggregation and cfg.train.strategy not in ("fedavg", "fedprox"):
        raise error(
            f"privacy.secure_aggregation yields only the weighted sum of the client segments, which fits FedAvg "
            f"(and FedProx's aggregation); train.strategy = {cfg.train.strategy!r} needs the individual updates"
        )
    if p.secure_aggregation and cfg.mode not in ("fsl", "sflv1", "sflv2", "hybrid", "ushaped", "fl"):
        raise error(
            f"privacy.secure_aggregation needs a mode that averages the client segments; {cfg.mode!r} does not "
            "(sl and psl hand the segment on or keep one per client)"
        )
