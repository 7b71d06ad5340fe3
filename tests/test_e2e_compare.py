"""`fsl run compare --quick`: every architecture through the real CLI and Flower's simulation engine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Flower simulation (Ray): one such test at a time, in one pytest worker (two Ray clusters side by side
# on 2 cores once hung a run whose simulation engine died)
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("ray")]

MODES = {"central", "fl", "sl", "sflv1", "sflv2", "fsl", "psl", "hybrid", "ushaped"}


def test_compare_quick_runs_every_mode_and_writes_the_table(tmp_path):
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    cmd = [
        sys.executable,
        "-m",
        "fsl_cli",
        "run",
        "compare",
        "--quick",
        "--quiet",
        "data.name=digits",
        "clients=3",
        "train.rounds=2",
        f"output_dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    root = Path(next(ln for ln in proc.stdout.splitlines() if ln.startswith("run directory:")).split(":", 1)[1].strip())
    rows = {r["mode"]: r for r in json.loads((root / "compare.json").read_text())}
    assert set(rows) == MODES
    for key in (
        "final_accuracy",
        "best_accuracy",
        "wall_s_per_round",
        "client_flops_per_sample",
        "full_model_flops_per_sample",
        "bytes_up_per_client_round",
        "bytes_down_per_client_round",
    ):
        assert all(r[key] is not None for r in rows.values()), key
    assert (root / "compare.md").read_text().count("\n") == len(MODES) + 2
    assert (root / "accuracy.png").stat().st_size > 10_000 and (root / "traffic.png").stat().st_size > 10_000
    # everyone learned something (chance is 0.1 on digits)
    assert all(r["best_accuracy"] > 0.2 for r in rows.values()), {m: r["best_accuracy"] for m, r in rows.items()}
    # sequential modes really ran one client at a time; parallel ones ran clients together
    for m in ("sl", "sflv2"):
        assert rows[m]["sequential"] and rows[m]["max_concurrent_clients"] == 1, m
    for m in ("fsl", "sflv1", "psl", "hybrid", "ushaped", "fl"):
        assert rows[m]["max_concurrent_clients"] >= 2, (m, rows[m]["max_concurrent_clients"])
    # the shallow cut keeps the client cheap; the baselines run the whole model on the client
    assert rows["fsl"]["client_flops_fraction"] <= 0.15
    assert rows["fl"]["client_flops_fraction"] == 1.0 and rows["central"]["bytes_up_per_client_round"] == 0
    # fl moves the model, split modes move activations: here (small data, tiny model) split moves more
    assert rows["fsl"]["bytes_up_per_client_round"] > rows["fl"]["bytes_up_per_client_round"]
    # U-shaped sends activations both ways at two cuts, so more bytes than the plain split
    assert rows["ushaped"]["bytes_up_per_client_round"] > rows["fsl"]["bytes_up_per_client_round"]
    # every mode wrote its own run directory with a summary
    for m in MODES:
        summary = json.loads((root / m / "summary.json").read_text())
        assert summary["mode"] == m and summary["rounds"] == 2
