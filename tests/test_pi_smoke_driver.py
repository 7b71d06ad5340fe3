"""The aarch64 smoke test's two ends (fsl_cli/pi_smoke_host.py, clients/pi/smoke_driver.py) natively.

``smoke-aarch64.sh`` runs the client end under qemu inside an arm64 root filesystem, far too slow
for the suite; here the same host and ``client`` commands talk over real gRPC on 127.0.0.1 for one
batch, and ``report`` must find the server's step count equal to the client's batches.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from clients.pi.smoke_driver import BAD, GOOD, synthetic_digits, synthetic_tokens

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "clients" / "pi" / "smoke_driver.py"


def _run(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0"}
    return subprocess.run([sys.executable, str(DRIVER), *args], env=env, text=True, capture_output=True, **kw)


def test_synthetic_digits_are_mnist_shaped_and_seeded():
    x, y = synthetic_digits(50, seed=3)
    assert x.shape == (50, 1, 28, 28) and x.dtype.name == "float32" and 0 <= x.min() and x.max() <= 1
    assert y.shape == (50,) and set(y.tolist()) <= set(range(10))
    x2, y2 = synthetic_digits(50, seed=3)
    assert (x == x2).all() and (y == y2).all()


def test_synthetic_tokens_carry_their_class_word():
    ids, y = synthetic_tokens(40, 16, seed=1)
    assert ids.shape == (40, 16) and ids.dtype.name == "int64" and (ids[:, 0] == 101).all()
    for row, label in zip(ids, y, strict=True):
        assert (row == (GOOD if label else BAD)).sum() == 3 and (row == (BAD if label else GOOD)).sum() == 0


def test_host_and_client_train_one_batch_over_grpc(tmp_path):
    ready, data, stats = tmp_path / "ready.json", tmp_path / "data.npz", tmp_path / "stats.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0"}
    host = subprocess.Popen(
        [sys.executable, "-m", "fsl_cli.pi_smoke_host", "--ready", str(ready), "--data-out", str(data)]
        + ["--stats", str(stats)]
        + ["--clients", "pi4", "--train", "16", "--test", "16", "--timeout", "120"],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # the host prints its address once the ready file is written; EOF means it died
        line = host.stdout.readline()
        assert line.startswith("split server"), (line, host.communicate())
        assert ready.exists()
        out = tmp_path / "pi4.json"
        client = _run(
            "client", "--ready", str(ready), "--data", str(data), "--client-id", "pi4", "--batches", "1",
            "--batch-size", "16", "--out", str(out), timeout=120,
        )  # fmt: skip
        assert client.returncode == 0, client.stderr
        result = json.loads(client.stdout)
        assert result == json.loads(out.read_text())
        assert result["ok"] and result["loss_finite"] and len(result["losses"]) == 1
        assert result["server"]["model"] == "cnn" and result["server"]["cut"] == "conv1"
        assert result["versions"]["flwr"] == "1.42.0"  # the ClientApp's imports came in
        assert result["peak_rss_mb"] > 0 and result["bytes_up"] > 16 * 16 * 14 * 14 * 4  # (16, 16, 14, 14) fp32 up
    finally:
        host.send_signal(signal.SIGTERM)
        host.wait(timeout=30)
    assert host.returncode == 0, host.stderr
    assert json.loads(stats.read_text())["steps"] == 1

    report = _run(
        "report", "--out", str(tmp_path / "r.json"), "--host-stats", str(stats), "--meta", "wall_s=1", str(out)
    )
    assert report.returncode == 0, report.stdout + report.stderr
    joined = json.loads((tmp_path / "r.json").read_text())
    assert joined["ok"] and joined["server_steps"] == joined["expected_steps"] == 1 and joined["wall_s"] == 1


def test_report_fails_when_the_server_counted_other_steps(tmp_path):
    run = {"ok": True, "batches": 5, "qemu_cpu": "", "hwcaps": [], "arch": "x86_64", "python": "3.11"}
    run |= {"versions": {"torch": "x"}, "batch_size": 32, "losses": [2.3], "eval_loss_before": 2.3}
    run |= {"eval_loss_after": 2.2, "first_batch_s": 0.1, "median_batch_s": 0.1, "import_s": 1.0, "peak_rss_mb": 9}
    (tmp_path / "run.json").write_text(json.dumps(run))
    (tmp_path / "stats.json").write_text(json.dumps({"steps": 4, "traffic": {}}))
    r = _run(
        "report",
        "--out",
        str(tmp_path / "r.json"),
        "--host-stats",
        str(tmp_path / "stats.json"),
        str(tmp_path / "run.json"),
    )
    assert r.returncode == 1 and "FAIL" in r.stdout
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is False


@pytest.mark.slow
def test_a_minilm_client_segment_trains_against_the_host(tmp_path):
    pytest.importorskip("transformers")
    ready, data, stats = tmp_path / "ready.json", tmp_path / "data.npz", tmp_path / "stats.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0"}
    host = subprocess.Popen(
        [sys.executable, "-m", "fsl_cli.pi_smoke_host", "--ready", str(ready), "--data-out", str(data)]
        + ["--stats", str(stats), "--clients", "pi4", "--model", "minilm", "--cut", "bert.embeddings"]
        + ["--seq-len", "16", "--train", "8", "--test", "8", "--timeout", "180"],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        line = host.stdout.readline()
        assert line.startswith("split server (minilm"), (line, host.communicate())
        client = _run(
            "client", "--ready", str(ready), "--data", str(data), "--client-id", "pi4", "--batches", "2",
            "--batch-size", "4", "--no-clientapp", timeout=180,
        )  # fmt: skip
        assert client.returncode == 0, client.stderr
        result = json.loads(client.stdout)
        assert result["ok"] and result["model"] == "minilm" and result["dataset"] == "synthetic-tokens"
        assert result["server"]["cut"] == "bert.embeddings"
        # the embeddings' parameters (the 30522 x 384 word pieces among them) are the client's
        assert 11_000_000 < result["client_params"] < 12_500_000
        # what went up: hidden states (B, 16, 384) and the additive mask (B, 1, 16, 16), float32
        assert result["bytes_up"] > 2 * 4 * (16 * 384 + 16 * 16) * 4
    finally:
        host.send_signal(signal.SIGTERM)
        host.wait(timeout=30)
    assert host.returncode == 0, host.stderr
    assert json.loads(stats.read_text())["steps"] == 2
