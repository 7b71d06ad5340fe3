"""Flower's server-side central-DP strategy around the aggregation of client segments."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fsl.config import ConfigError, load_experiment
from server.strategy import make_strategy


def test_central_dp_wraps_the_strategy_and_is_validated():
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

    cfg = load_experiment("quickstart", ["privacy.central_dp_clip=0.5", "privacy.central_dp_noise=1.0"])
    strat = make_strategy(cfg)
    assert isinstance(strat, DifferentialPrivacyServerSideFixedClipping)
    assert strat.clipping_norm == 0.5 and strat.noise_multiplier == 1.0 and strat.num_sampled_clients == cfg.clients
    assert isinstance(make_strategy(load_experiment("quickstart")), FedAvg)
    with pytest.raises(ConfigError, match="use one of the two"):
        load_experiment("quickstart", ["privacy.central_dp_clip=0.5", "privacy.secure_aggregation=true"])
    with pytest.raises(ConfigError, match="aggregates none"):
        load_experiment("quickstart", ["privacy.central_dp_clip=0.5", "mode=psl"])
    with pytest.raises(ConfigError, match="needs privacy.central_dp_clip"):
        load_experiment("quickstart", ["privacy.central_dp_noise=1.0"])


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.xdist_group("ray")  # Flower simulation: with the other Ray tests, one at a time
def test_clipping_bounds_what_the_aggregate_can_move(tmp_path):
    """With a tiny clipping bound the aggregated client segment stays where it started, while the
    server segment (not covered by central DP) trains as usual."""
    from safetensors.torch import load_file

    from fsl.experiment import build_model_for, experiment_dataset

    over = ["data.name=digits", "clients=2", "train.rounds=2", "privacy.central_dp_clip=1e-6", f"output_dir={tmp_path}"]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "fsl_cli", "run", "quickstart", "--quiet", *over],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run = next(Path(tmp_path).glob("quickstart-*"))
    cfg = load_experiment("quickstart", over)
    ds = experiment_dataset(cfg)
    init = build_model_for(cfg, ds.input_shape, ds.num_classes).state_dict()
    client = load_file(str(run / "checkpoints" / "round-0002" / "client.safetensors"))
    server = load_file(str(run / "checkpoints" / "round-0002" / "server.safetensors"))
    assert set(client) == {"conv1.0.weight", "conv1.0.bias"}
    moved = sum(float((client[k] - init[k]).norm()) for k in client)
    assert moved <= 2 * 2e-6  # two rounds, each update clipped to 1e-6
    server_moved = sum(float((server[f"segment.{k}"] - init[k]).norm()) for k in ("fc2.weight", "conv2.0.weight"))
    assert server_moved > 1e-2
    assert torch.isfinite(torch.tensor(moved))
