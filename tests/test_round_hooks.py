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
    # a multi-exit model's row adds each exit's test accuracy, before the hooks' keys
    exits = metrics_row(_numbers(exit_accuracies={"conv1": 0.5, "fc1": 0.75}, extra={"privacy": {"epsilon": 1.0}}))
    assert list(exits) == [*ROW_KEYS, "exit_accuracies", "privacy"]
    assert exits["exit_accuracies"] == {"conv1": 0.5, "fc1": 0.75}


def test_a_language_models_row_weighs_clients_by_tokens_and_adds_perplexities():
    import math

    # client 7: 30 sequences, 600 target tokens; client 8: 10 sequences, 50 tokens
    fed = [
        {"node_id": 7, "examples": 30, "targets": 600, "accuracy": 0.2, "loss": 4.0},
        {"node_id": 8, "examples": 10, "targets": 50, "accuracy": 0.1, "loss": 6.0},
    ]
    row = metrics_row(_numbers(task="causal-lm", loss=5.0, fed_rows=fed))
    assert list(row) == [*ROW_KEYS, "perplexity", "fed_perplexity"]
    assert row["fed_loss"] == (600 * 4.0 + 50 * 6.0) / 650  # over tokens, not a mean of the clients' means
    assert row["fed_accuracy"] == (600 * 0.2 + 50 * 0.1) / 650
    assert row["perplexity"] == math.exp(5.0) and row["fed_perplexity"] == math.exp(row["fed_loss"])


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


def _events(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_log_holds_each_rounds_scalars_and_a_resume_appends(tmp_path):
    import math

    from server.round_hooks import TENSORBOARD_DIR, TensorBoardLog, scalars

    run = RunDir(tmp_path)

    def write(hook: TensorBoardLog, rnd: int, acc: float) -> dict:
        exits = {"conv1": acc / 2, "fc1": acc}  # a dict of numbers: one scalar each, under the row's key
        row = metrics_row(_numbers(rnd=rnd, accuracy=acc, exit_accuracies=exits, extra={"privacy": {"epsilon": 1.0}}))
        run.append_metrics(row)
        hook.on_round_end(rnd)
        return row

    first = TensorBoardLog(tmp_path)
    kept = [write(first, 1, 0.5), write(first, 2, 0.6)]
    write(first, 3, 0.1)  # logged, but the run dies before round 3 counts (resume goes on from round 2)
    run.rewrite_metrics(kept)
    again = TensorBoardLog(tmp_path)  # the resumed run: same folder, a new event file
    kept += [write(again, 3, 0.7), write(again, 4, 0.8)]
    again.on_summary({})
    assert len(list((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2
    rows = run.read_metrics()
    assert rows == kept
    got = _events(tmp_path / TENSORBOARD_DIR)
    want = {k for r in rows for k in scalars(r)}
    assert {"accuracy", "loss", "fed_accuracy", "train_loss", "bytes_up", "seconds"} <= want == set(got)
    assert {"exit_accuracies/conv1", "exit_accuracies/fc1", "privacy/epsilon"} <= want
    assert "round" not in got and "mode" not in got and "sequential" not in got  # not scalars
    for key in want:  # per round, the metrics.jsonl value (float32 in the event file); round 3 once, the resumed one
        expect = [(r["round"], scalars(r)[key]) for r in rows if key in scalars(r)]
        assert [s for s, _ in got[key]] == [s for s, _ in expect], key
        assert all(math.isclose(a, b, rel_tol=1e-6) for (_, a), (_, b) in zip(got[key], expect, strict=True)), key
