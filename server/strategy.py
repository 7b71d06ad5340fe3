"""The Flower strategy that selects clients and aggregates client segments, as the experiment names it."""

from __future__ import annotations

from typing import Any

from flwr.serverapp import strategy as fl_strategy

from fsl.config import ExperimentConfig

__all__ = ["make_strategy"]


def make_strategy(cfg: ExperimentConfig) -> Any:
    """The Flower strategy named by ``cfg.train.strategy``, sampling as configured, wrapped in Flower's
    server-side fixed-clipping central-DP strategy when ``privacy.central_dp_clip`` is set."""
    base = _base_strategy(cfg)
    p = cfg.privacy
    if not p.central_dp:
        return base
    sampled = max(1, min(cfg.train.min_clients, cfg.clients), int(cfg.clients * cfg.train.fraction_train))
    return fl_strategy.DifferentialPrivacyServerSideFixedClipping(
        base, noise_multiplier=p.central_dp_noise, clipping_norm=p.central_dp_clip, num_sampled_clients=sampled
    )


def _base_strategy(cfg: ExperimentConfig) -> fl_strategy.FedAvg:
    n = cfg.clients
    common: dict[str, Any] = {
        "fraction_train": cfg.train.fraction_train,
        "fraction_evaluate": cfg.train.fraction_evaluate,
        "min_train_nodes": max(1, min(cfg.train.min_clients, n)),
        "min_evaluate_nodes": 1 if cfg.train.fraction_evaluate > 0 else 0,
        "min_available_nodes": max(1, min(cfg.train.min_clients, n)),
    }
    name = cfg.train.strategy
    if name == "fedavg":
        return fl_strategy.FedAvg(**common)
    if name == "fedavgm":
        return fl_strategy.FedAvgM(**common, server_momentum=0.9)
    if name == "fedprox":
        return fl_strategy.FedProx(**common, proximal_mu=cfg.train.proximal_mu)
    if name == "fedadam":
        return fl_strategy.FedAdam(**common)
    if name == "fedyogi":
        return fl_strategy.FedYogi(**common)
    if name == "fedadagrad":
        return fl_strategy.FedAdagrad(**common)
    if name == "fedmedian":
        return fl_strategy.FedMedian(**common)
    if name == "fedtrimmedavg":
        return fl_strategy.FedTrimmedAvg(**common)
    raise ValueError(f"unknown strategy {name!r}")  # the config validator makes this unreachable
