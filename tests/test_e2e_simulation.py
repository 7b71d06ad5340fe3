"""End to end: the real `fsl` CLI runs Flower's simulation engine (Ray) on tiny data."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from server.round_hooks import CRASH_ENV, read_progress

# Flower simulation (Ray): one such test at a time, in one pytest worker (two Ray clusters side by side
# on 2 cores can hang a run whose simulation engine died)
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("ray")]

TINY = ["data.name=digits", "clients=2", "train.batch_size=16", "train.local_epochs=2", "simulation.client_cpus=1"]


def _fsl(*args, timeout=300, env=None, **kw):
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "120", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "fsl_cli", *args], capture_output=True, text=True, timeout=timeout, env=env, **kw
    )


def _run_dir(stdout):
    line = next(ln for ln in stdout.splitlines() if ln.startswith("run directory:"))
    return Path(line.split(":", 1)[1].strip())


def test_a_failing_simulation_engine_ends_the_run_with_a_clear_error(tmp_path):
    # 64 CPUs per client on this host: Flower's engine cannot place one actor and stops. The
    # ServerApp thread is then waiting for its clients to say what they hold (up to 5 minutes) and
    # would then wait for nodes forever; the run must end because the engine stopped, with its
    # reason. (The subprocess timeout, below those 5 minutes, only keeps a regression from hanging.)
    proc = _fsl(
        "run", "quickstart", *TINY, "train.rounds=1", "simulation.client_cpus=64", f"output_dir={tmp_path}",
        timeout=240,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "error: Flower's simulation engine failed" in proc.stderr and "ActorPool is empty" in proc.stderr
    assert f"fsl run --resume {_run_dir(proc.stdout)}" in proc.stderr


def test_cli_runs_a_simulation_writes_results_and_resumes(tmp_path):
    proc = _fsl("run", "quickstart", *TINY, "train.rounds=2", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = _run_dir(proc.stdout)
    assert "per-round results" in proc.stdout and "final test accuracy" in proc.stdout
    for name in ("config.toml", "metrics.jsonl", "summary.json", "curves.png"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["round-0001", "round-0002"]
    summary = json.loads((run / "summary.json").read_text())
    for key in (
        "experiment",
        "dataset",
        "mode",
        "clients",
        "rounds",
        "device",
        "final_accuracy",
        "best_accuracy",
        "wall_s",
        "bytes_up",
        "bytes_down",
        "history",
    ):
        assert key in summary, key
    assert (summary["dataset"], summary["mode"], summary["clients"], summary["rounds"]) == ("digits", "fsl", 2, 2)
    assert summary["device"] == "cpu"
    hist = summary["history"]
    assert [h["round"] for h in hist] == [1, 2]
    assert summary["final_accuracy"] > 0.6  # 10 classes: chance is 0.1
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["clients"] == 2 and r["failures"] == 0 for r in rows)
    assert all(len(r["fed_clients"]) == 2 and r["fed_accuracy"] > 0.3 for r in rows)
    # traffic: the data plane carries (16,4,4)... float32 activations up and as many gradient bytes down
    assert all(r["dataplane_bytes_up"] > 0 and r["control_bytes_down"] > 0 for r in rows)
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in rows)

    # resume: one more round continues from the round-2 checkpoint, rounds 1-2 are kept as they were
    proc = _fsl("run", "--resume", str(run), "train.rounds=3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary3 = json.loads((run / "summary.json").read_text())
    assert [h["round"] for h in summary3["history"]] == [1, 2, 3]
    assert summary3["history"][:2] == hist


def test_a_multi_exit_run_reports_every_exits_test_accuracy(tmp_path):
    """Exits trained split (the client's beside its segment, the server's beside the labels it gets)
    over the real data plane; each round's row says how far each exit has come."""
    proc = _fsl("run", "quickstart", *TINY, "train.rounds=1", "model.exits=true", f"output_dir={tmp_path}", "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = [json.loads(x) for x in (_run_dir(proc.stdout) / "metrics.jsonl").read_text().splitlines()]
    exits = row["exit_accuracies"]
    assert list(exits) == ["conv1", "conv2", "fc1"]  # an exit after every cut point of the cnn, shallow to deep
    assert all(0.3 < a <= 1.0 for a in exits.values()), exits  # each learned (10 classes: chance is 0.1)
    assert row["accuracy"] > 0.3


# what differs between two runs of one config however deterministic the training: clocks, the
# random node ids Flower gives simulated clients, and so the uplink byte counts: every data-plane
# request names its client by that id in decimal (one to 20 digits, most often 19 or 20), and the
# tensors framed after the message start on a 16-byte boundary
_NOT_REPEATABLE = {"seconds", "train_s", "client_compute_s", "client_peak_rss_mb", "bytes_up", "dataplane_bytes_up"}
_ID_BYTES_PER_REQUEST = 20 + 15  # at most: the id's digits, and the alignment padding they shift


def _repeatable(row: dict) -> dict:
    out = {k: v for k, v in row.items() if k not in _NOT_REPEATABLE}
    out["fed_clients"] = [{k: v for k, v in c.items() if k != "node_id"} for c in row["fed_clients"]]
    return out


def _uplink_differs_by_ids_only(got: dict, want: dict, batch_size: int, epochs: int) -> bool:
    """Whether two repeats of a round sent the same uplink but for the client ids in the headers:
    at most ``_ID_BYTES_PER_REQUEST`` a request (each batch one request: training, then evaluation)."""
    clients = len(want["fed_clients"])
    requests = want["examples"] // batch_size + clients * epochs  # training batches, a short one per epoch
    requests += sum(c["examples"] // batch_size + 1 for c in want["fed_clients"])  # evaluation batches
    bound = requests * _ID_BYTES_PER_REQUEST
    return all(abs(got[k] - want[k]) <= bound for k in ("bytes_up", "dataplane_bytes_up"))


def _only_run(root: Path) -> Path:
    (run,) = root.glob("quickstart-*")  # (rich may wrap the printed path)
    return run


def test_a_run_crashed_after_a_round_resumes_exactly_as_if_uninterrupted(tmp_path):
    """Clients train one after another in ``sflv2``, so a run is a function of its seed: a run
    SIGKILLed right after round 2's checkpoint and resumed ends with the same metrics and the same
    weights, bit for bit, as the same run without the crash. (One sequential mode is enough here:
    ``sl`` checkpoints the same parts, the client and server segments and the server's optimizer
    state; ``sflv2`` also passes its client segment through FedAvg.)"""
    mode = "sflv2"
    args = ["run", "quickstart", *TINY, f"mode={mode}", "train.rounds=3", "--quiet"]
    crashed = subprocess.Popen(
        [sys.executable, "-m", "fsl_cli", *args, f"output_dir={tmp_path / 'crashed'}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", CRASH_ENV: "2"},
        start_new_session=True,
    )
    try:
        out, _ = crashed.communicate(timeout=300)
    finally:
        try:  # what the crash left behind (the simulation engine's processes)
            os.killpg(crashed.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        crashed.wait()
    assert crashed.returncode == -signal.SIGKILL, out  # the ServerApp killed itself: no cleanup, no summary
    run = _only_run(tmp_path / "crashed")
    assert read_progress(run) == (2, "done")
    assert not (run / "summary.json").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["round-0001", "round-0002"]
    before = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in before] == [1, 2]

    res = _fsl("run", "--resume", str(run), "--quiet")
    assert res.returncode == 0, res.stdout + res.stderr
    ref = _fsl(*args, f"output_dir={tmp_path / 'uninterrupted'}")
    assert ref.returncode == 0, ref.stdout + ref.stderr
    ref_run = _only_run(tmp_path / "uninterrupted")

    after = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert after[:2] == before  # the checkpointed rounds are kept as they were
    expected = [json.loads(x) for x in (ref_run / "metrics.jsonl").read_text().splitlines()]
    assert [_repeatable(r) for r in after] == [_repeatable(r) for r in expected]
    assert all(_uplink_differs_by_ids_only(g, w, batch_size=16, epochs=2) for g, w in zip(after, expected, strict=True))
    assert after[-1]["clients"] == 2 and after[-1]["accuracy"] > 0.6  # (10 classes: chance is 0.1)
    for part in ("client", "server"):  # both segments and the server's optimizer state
        got = load_file(str(run / "checkpoints" / "round-0003" / f"{part}.safetensors"))
        want = load_file(str(ref_run / "checkpoints" / "round-0003" / f"{part}.safetensors"))
        assert got.keys() == want.keys()
        assert all(got[k].equal(want[k]) for k in got), part
    summary = json.loads((run / "summary.json").read_text())
    ref_summary = json.loads((ref_run / "summary.json").read_text())
    assert summary["final_accuracy"] == ref_summary["final_accuracy"]


def test_cli_reports_config_errors_clearly():
    proc = _fsl("run", "quickstart", "train.roundz=2", timeout=60)
    assert proc.returncode == 2 and "did you mean 'train.rounds'" in proc.stderr
    proc = _fsl("run", "quickstart", "data.name=fashion-mnist", "data.path=/nonexistent", timeout=60)
    assert proc.returncode == 2 and "apt-get install dataset-fashion-mnist" in proc.stderr
