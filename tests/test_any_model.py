"""`fsl run any-model`: the row configs, and the quick slice through the real CLI and Flower's engine."""

import json
import os
import subprocess
import sys

import pytest

from experiments.any_model import ROWS, _digest, row_configs

KEYS = {
    "model",
    "cut",
    "dataset",
    "clients",
    "rounds",
    "split_accuracy",
    "central_accuracy",
    "bytes_up_per_client_round",
    "bytes_down_per_client_round",
    "command",
}


def test_every_row_loads_and_its_central_run_differs_only_in_mode():
    for name in ROWS:
        split, central = row_configs(name, ["train.rounds=1"])
        assert central.mode == "central" and split.mode != "central" and split.train.rounds == 1
        assert (central.model.name, central.data, central.train) == (split.model.name, split.data, split.train)
    # the two MiniLM cuts share one central run (the cut does not change central training)
    assert _digest(row_configs("minilm-embeddings", [])[1]) == _digest(row_configs("minilm-layer2", [])[1])
    assert _digest(row_configs("minilm-embeddings", [])[0]) != _digest(row_configs("minilm-layer2", [])[0])
    with pytest.raises(SystemExit, match="unknown row"):
        row_configs("nope", [])


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_quick_slice_writes_a_row_and_resumes(tmp_path):
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    out = tmp_path / "any-model"
    cmd = [sys.executable, "-m", "fsl_cli", "run", "any-model", "--quick", "--quiet"]
    cmd += [f"any_model.out={out}", f"output_dir={tmp_path}", "clients=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = json.loads((out / "results.json").read_text())
    assert KEYS <= set(row) and row["cut"] == "block1" and row["clients"] == 2 and row["rounds"] == 1
    assert 0.0 <= row["split_accuracy"] <= 1.0 and 0.0 <= row["central_accuracy"] <= 1.0
    # every byte is counted once: the data plane plus the segment weights Flower moves
    for way in ("up", "down"):
        parts = row[f"dataplane_bytes_{way}_per_client_round"] + row[f"segment_bytes_{way}_per_client_round"]
        assert row[f"dataplane_bytes_{way}_per_client_round"] > 0 and row[f"segment_bytes_{way}_per_client_round"] > 0
        assert parts == pytest.approx(row[f"bytes_{way}_per_client_round"])
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "any-model: " not in again.stdout and json.loads((out / "results.json").read_text()) == [row]
