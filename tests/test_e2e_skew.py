"""`fsl run skew`: a slice of the skew table through the real CLI and Flower's simulation engine."""

import json
import os
import subprocess
import sys

import pytest

# Flower simulation (Ray): one such test at a time, in one pytest worker
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("ray")]

KEYS = {"mode", "partition", "alpha", "seed", "rounds", "final_accuracy", "best_accuracy"}


def test_skew_slice_writes_the_table_and_resumes(tmp_path):
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    out = tmp_path / "skew"
    cmd = [
        sys.executable,
        "-m",
        "fsl_cli",
        "run",
        "skew",
        "--quick",
        "--quiet",
        "data.name=digits",
        "clients=3",
        "train.rounds=1",
        "skew.modes=fsl,ushaped",
        "skew.partitions=shards",
        f"skew.out={out}",
        f"output_dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((out / "skew.json").read_text())
    assert [(r["mode"], r["partition"], r["alpha"], r["seed"], r["rounds"]) for r in rows] == [
        ("fsl", "shards", None, 0, 1),
        ("ushaped", "shards", None, 0, 1),
    ]
    assert all(KEYS <= set(r) for r in rows)
    assert all(0.0 <= r["final_accuracy"] <= r["best_accuracy"] <= 1.0 for r in rows)
    assert "| fsl |" in (out / "skew.md").read_text() and (out / "skew.png").stat().st_size > 10_000
    # resumable: the cells in skew.json are not run again
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "skew: " not in again.stdout and json.loads((out / "skew.json").read_text()) == rows
