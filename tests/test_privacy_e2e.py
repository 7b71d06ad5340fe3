"""End to end through the real CLI and Flower's simulation: every defense in a parallel mode and U-shaped."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

# Flower simulation (Ray): one such test at a time, in one pytest worker (two Ray clusters side by side
# on 2 cores can hang a run whose simulation engine died)
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("ray")]

TINY = ["data.name=digits", "train.batch_size=16", "simulation.client_cpus=1", "--quiet"]


def _fsl(*args, timeout=400):
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "120"}
    p = subprocess.run(
        [sys.executable, "-m", "fsl_cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def _only_run(root: Path) -> Path:
    (run,) = [p for p in root.iterdir() if (p / "config.toml").exists()]
    return run


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_fsl_with_dp_sgd_secure_aggregation_and_int8(tmp_path):
    _fsl(
        "run",
        "quickstart",
        *TINY,
        "clients=3",
        "train.rounds=2",
        "privacy.dp.enabled=true",
        "privacy.dp.noise_multiplier=0.8",
        "privacy.secure_aggregation=true",
        "privacy.compression='int8'",
        f"output_dir={tmp_path}",
    )
    run = _only_run(tmp_path)
    s = json.loads((run / "summary.json").read_text())
    p = s["privacy"]
    assert {"accountant", "noise_multiplier", "max_grad_norm", "sample_rate", "steps", "delta", "epsilon"} <= set(p)
    assert p["secure_aggregation"]["void_rounds"] == [] and p["compression"]["activations_and_gradients"] == "int8"
    assert "NOT the activations" in p["protects"] or "activations" in p["does_not_protect"]
    # epsilon recomputed independently from the recorded noise multiplier, sample rate and steps
    for client, hist in p["history"].items():
        acc = RDPAccountant()
        for sigma, q, steps in hist:
            for _ in range(int(steps)):
                acc.step(noise_multiplier=sigma, sample_rate=q)
        assert acc.get_epsilon(delta=p["delta"]) == pytest.approx(p["epsilon_per_client"][client], rel=1e-9)
    assert p["epsilon"] == max(p["epsilon_per_client"].values()) and 0 < p["epsilon"] < math.inf
    rows = _rows(run)
    assert [len(r["privacy"]["clients"]) for r in rows] == [3, 3]
    assert rows[1]["privacy"]["epsilon"] > rows[0]["privacy"]["epsilon"]
    assert s["final_accuracy"] > 0.3  # the masked-sum aggregate trains: 10 classes, chance is 0.1
    # the checkpoint holds the accountant state; a resumed run continues the same budget
    extra = json.loads((run / "checkpoints" / "round-0002" / "state.json").read_text())
    assert extra["privacy"]["ledger"]["histories"] == {c: h for c, h in p["history"].items()}
    _fsl("run", "--resume", str(run), "train.rounds=3", "--quiet")
    s3 = json.loads((run / "summary.json").read_text())
    steps2, steps3 = p["steps"], s3["privacy"]["steps"]
    assert all(steps3[c] == steps2[c] * 3 // 2 for c in steps2)  # rounds 1-2 kept, round 3 added
    assert s3["privacy"]["epsilon"] > p["epsilon"]


def test_ushaped_with_dp_sgd_activation_noise_and_topk(tmp_path):
    _fsl(
        "run",
        "quickstart",
        *TINY,
        "mode=ushaped",
        "clients=2",
        "train.rounds=1",
        "privacy.dp.enabled=true",
        "privacy.dp.target_epsilon=5.0",
        "privacy.dp.accountant='prv'",
        "activation_noise.mechanism='gaussian'",
        "activation_noise.clip_norm=5.0",
        "activation_noise.noise_multiplier=0.05",
        "privacy.compression='topk'",
        "privacy.topk_ratio=0.25",
        f"output_dir={tmp_path}",
    )
    run = _only_run(tmp_path)
    p = json.loads((run / "summary.json").read_text())["privacy"]
    assert p["accountant"] == "prv" and p["epsilon"] == pytest.approx(5.0, abs=0.1)  # one round = all rounds
    assert p["activation_noise"]["epsilon_per_release"] > 0 and "updates" in p["activation_noise"]["does_not_protect"]
    assert _rows(run)[0]["dataplane_bytes_up"] > 0


def test_privacy_utility_quick_writes_its_table(tmp_path):
    _fsl("run", "privacy-utility", "--quick", "--quiet", f"output_dir={tmp_path}", timeout=600)
    (root,) = list(tmp_path.glob("privacy-utility-quick-*"))
    rows = json.loads((root / "privacy-utility.json").read_text())
    assert [r["mechanism"] for r in rows] == ["none", "dp-sgd", "compression"]
    for r in rows:
        assert {"mechanism", "param", "epsilon", "final_accuracy", "bytes_up_per_client_round"} <= set(r)
    none, dp, int8 = rows
    assert dp["epsilon"] == pytest.approx(3.0, abs=0.05) and none["epsilon"] == math.inf
    assert int8["dataplane_ratio"] == pytest.approx(0.25, abs=0.03)  # int8: a quarter of float32's bytes
    assert (root / "privacy-utility.png").is_file() and (root / "privacy-utility.md").is_file()
