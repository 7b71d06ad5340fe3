"""End to end: the real `fsl` CLI runs Flower's simulation engine (Ray) on tiny data."""

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Flower simulation (Ray): one such test at a time, in one pytest worker (two Ray clusters side by side
# on 2 cores once hung a run whose simulation engine died)
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("ray")]

TINY = ["data.name=digits", "clients=2", "train.batch_size=16", "train.local_epochs=2", "simulation.client_cpus=1"]


def _fsl(*args, timeout=300, **kw):
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "120"}
    return subprocess.run(
        [sys.executable, "-m", "fsl_cli", *args], capture_output=True, text=True, timeout=timeout, env=env, **kw
    )


def _run_dir(stdout):
    line = next(ln for ln in stdout.splitlines() if ln.startswith("run directory:"))
    return Path(line.split(":", 1)[1].strip())


def test_a_failing_simulation_engine_ends_the_run_with_a_clear_error(tmp_path):
    # 64 CPUs per client on this host: Flower's engine cannot place one actor and stops. The
    # ServerApp thread is then waiting for its clients to say what they hold (up to 5 minutes); the run
    # must end now, with the engine's reason, not when that wait expires.
    t0 = time.monotonic()
    proc = _fsl("run", "quickstart", *TINY, "train.rounds=1", "simulation.client_cpus=64", f"output_dir={tmp_path}")
    took = time.monotonic() - t0
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "error: Flower's simulation engine failed" in proc.stderr and "ActorPool is empty" in proc.stderr
    assert f"fsl run --resume {_run_dir(proc.stdout)}" in proc.stderr
    assert took < 120, f"the failed run took {took:.0f} s to exit"


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


def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fsl_cli",
            "run",
            "quickstart",
            *TINY,
            "train.rounds=4",
            f"output_dir={tmp_path}",
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        run = None
        while time.time() < deadline:
            dirs = list(tmp_path.glob("quickstart-*"))
            if dirs and (dirs[0] / "checkpoints" / "round-0001").is_dir():
                run = dirs[0]
                break
            time.sleep(0.2)
        assert run is not None, "no checkpoint appeared"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # crash: no cleanup, no summary
        proc.wait()
    assert not (run / "summary.json").exists()
    done = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("round-????"))
    assert done < 4
    rows = (run / "metrics.jsonl").read_text().splitlines()[:done]  # (a later row may be torn by the kill)
    before = [json.loads(x) for x in rows]
    res = _fsl("run", "--resume", str(run))
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert [h["round"] for h in summary["history"]] == [1, 2, 3, 4]
    after = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert after[:done] == before  # the checkpointed rounds are kept as they were
    assert summary["final_accuracy"] > 0.6
    # the resumed run is no worse than the same run without the crash, within noise. Parallel
    # clients interleave on the shared server segment, so runs with one seed differ, and one
    # round's accuracy on digits' 359 test images swings by 5-10 points (uninterrupted runs here:
    # 0.816 0.847 0.947 0.925 and 0.894 0.925 0.958 0.972; clean-clone CI runs ended 0.864 vs
    # 0.944 and 0.791 vs 0.922 on their last round). So the rounds trained after the crash are
    # compared as a mean, against the same rounds of the uninterrupted run; one-sided: better is
    # no defect. A resume that restarted from scratch is caught by the kept rows above.
    ref = _fsl("run", "quickstart", *TINY, "train.rounds=4", f"output_dir={tmp_path / 'uninterrupted'}", "--quiet")
    assert ref.returncode == 0, ref.stdout + ref.stderr
    (ref_dir,) = (tmp_path / "uninterrupted").glob("quickstart-*")  # (rich may wrap the printed path)
    ref_hist = json.loads((ref_dir / "summary.json").read_text())["history"]
    resumed = statistics.fmean(h["accuracy"] for h in summary["history"][done:])
    uninterrupted = statistics.fmean(h["accuracy"] for h in ref_hist[done:])
    assert resumed > uninterrupted - 0.1, (summary["history"], ref_hist)
    print(f"\nresumed {summary['final_accuracy']:.4f}, uninterrupted {uninterrupted:.4f}")


def test_cli_reports_config_errors_clearly():
    proc = _fsl("run", "quickstart", "train.roundz=2", timeout=60)
    assert proc.returncode == 2 and "did you mean 'train.rounds'" in proc.stderr
    proc = _fsl("run", "quickstart", "data.name=fashion-mnist", "data.path=/nonexistent", timeout=60)
    assert proc.returncode == 2 and "apt-get install dataset-fashion-mnist" in proc.stderr
