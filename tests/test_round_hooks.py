"""The round's results and hooks without a network: the metrics row, the summary, the progress marker."""

import json

from fsl.config import load_experiment
from fsl.rundir import RunDir
from server.results import RoundNumbers, metrics_row, summarize_run
from server.round_hooks import CRASH_ENV, PHASES, CrashAfterRound, PhaseMarker, RoundHook, read_progress

# README, "What a run writes": the keys of a metrics.jsonl row, in the order they are written
ROW_KEYS = [
    "round", "mode", "accuracy", "loss", "client_accuracies", "client_accuracy_std", "fed_accuracy", "fed_loss",
    "fed_clients", "train_loss", "train_accuracy", "clients", "failures", "timeouts", "eval_failures", "examples",
    "sequential", "replicas", "max_concurrent_clients", "bytes_up", "bytes_down", "dataplane_bytes_up",
    "dataplane_bytes_down", "control_bytes_up", "control_bytes_down", "client_compute_s", "client_peak_rss_mb",
    "train_s", "seconds",
]  # fmt: skip


def _client(n: int, loss: float, acc: float, start: float, end: float) -> dict:
    return {
        "num-examples": n, "train_loss": loss, "train_accuracy": acc, "compute_s": 1.5,
        "started_at": start, "finished_at": end, "peak_rss_mb": 300.0 + n,
    }  # fmt: skip


def _numbers(**kw) -> RoundNumbers:
    base = dict(
        rnd=3, mode="fsl", accuracy=0.9, loss=0.3, per_client=[], eval_failures=0,
        fed_rows=[{"node_id": 7, "examples": 30, "accuracy": 0.8, "loss": 0.5},
                  {"node_id": 8, "examples": 10, "accuracy": 0.4, "loss": 1.5}],
        train_metrics=[_client(100, 0.5, 0.8, 0.0, 2.0), _client(300, 0.1, 0.9, 1.0, 3.0)],
        selected=3, answered=2, sequential=False, replicas=1, dataplane_up=1000, dataplane_down=900,
        control_up=50, control_down=60, train_s=2.5, seconds=4.0,
    )  # fmt: skip
    base.update(kw)
    return RoundNumbers(**base)


def test_the_metrics_row_has_the_documented_keys_and_weights_by_examples():
    row = metrics_row(_numbers())
    assert list(row) == ROW_KEYS
    assert row["train_loss"] == (100 * 0.5 + 300 * 0.1) / 400 and row["examples"] == 400
    assert row["fed_accuracy"] == (30 * 0.8 + 10 * 0.4) / 40
    assert (row["clients"], row["failures"], row["timeouts"]) == (2, 1, 1)  # one error reply, one silent
    assert row["max_concurrent_clients"] == 2  # [0, 2] and [1, 3] overlap
    assert (row["bytes_up"], row["bytes_down"]) == (1050, 960)
    assert row["client_peak_rss_mb"] == 600.0 and row["client_accuracy_std"] is None
    # a hook's keys come last; a round where nobody answered has no training figures
    empty = metrics_row(_numbers(train_metrics=[], fed_rows=[], answered=0, extra={"privacy": {"epsilon": 1.0}}))
    assert list(empty) == [*ROW_KEYS, "privacy"]
    assert empty["train_loss"] is None and empty["fed_accuracy"] is None and empty["max_concurrent_clients"] == 0


def test_the_summary_sums_the_rows(tmp_path):
    cfg = load_experiment("quickstart")
    rows = [metrics_row(_numbers(rnd=1, accuracy=0.5)), metrics_row(_numbers(rnd=2, accuracy=0.7))]
    s = summarize_run(cfg, rows, "cpu", 12.0, RunDir(tmp_path))
    assert (s["rounds"], s["final_accuracy"], s["best_accuracy"], s["bytes_up"]) == (2, 0.7, 0.7, 2100)
    assert s["bytes_up_per_client_round"] == 2100 / 4
    assert [h["round"] for h in s["history"]] == [1, 2] and set(s["history"][0]) >= {"accuracy", "seconds"}


def test_the_progress_marker_announces_every_phase_and_the_round_end(tmp_path):
    marker = PhaseMarker(tmp_path)
    assert read_progress(tmp_path) is None
    seen = []
    for phase in PHASES:
        marker.on_phase(4, phase)
        seen.append(read_progress(tmp_path))
    marker.on_round_end(4)
    assert seen == [(4, p) for p in PHASES] and read_progress(tmp_path) == (4, "done")
    assert json.loads((tmp_path / "progress.json").read_text()) == {"round": 4, "phase": "done"}
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]  # no temporary file left


def test_hooks_do_nothing_unless_they_override_and_the_crash_is_opt_in(monkeypatch):
    hook = RoundHook()
    base: dict = {}
    hook.on_start(base)
    hook.on_phase(1, "train")
    assert base == {} and hook.state_dict() == {} and not hook.replaces_aggregation
    monkeypatch.delenv(CRASH_ENV, raising=False)
    assert CrashAfterRound.from_env() is None
    monkeypatch.setenv(CRASH_ENV, "3")
    crash = CrashAfterRound.from_env()
    assert crash is not None and crash.after == 3
    crash.on_round_end(2)  # not its round: nothing happens (its own round is exercised end to end)
