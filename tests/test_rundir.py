import json

import torch

from fsl.rundir import Checkpoint, RunDir


def test_checkpoints_round_trip_without_pickle(tmp_path):
    run = RunDir.create(tmp_path, "x")
    c = {"conv1.0.weight": torch.randn(4, 1, 3, 3)}
    s = {"segment.fc.weight": torch.randn(2, 3), "meta.steps": torch.tensor(7)}
    run.save_checkpoint(Checkpoint(1, c, s, {"wall_s": 1.5}))
    run.save_checkpoint(Checkpoint(2, {k: v + 1 for k, v in c.items()}, s, {"wall_s": 3.0}))
    ck = run.latest_checkpoint()
    assert ck.round == 2 and ck.extra["wall_s"] == 3.0
    torch.testing.assert_close(ck.client["conv1.0.weight"], c["conv1.0.weight"] + 1)
    files = {p.name for p in (run.path / "checkpoints" / "round-0002").iterdir()}
    assert files == {"client.safetensors", "server.safetensors", "state.json"}


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path):
    run = RunDir.create(tmp_path, "x")
    for r in (1, 2):
        run.save_checkpoint(Checkpoint(r, {"w": torch.full((2,), float(r))}, {"v": torch.zeros(1)}, {}))
    (run.path / "checkpoints" / "round-0002" / "client.safetensors").write_bytes(b"garbage")
    (run.path / "checkpoints" / "round-0003.tmp").mkdir()  # a crash in the middle of writing round 3
    ck = run.latest_checkpoint()
    assert ck.round == 1 and ck.client["w"].tolist() == [1.0, 1.0]


def test_metrics_survive_a_torn_last_line(tmp_path):
    run = RunDir.create(tmp_path, "x")
    run.append_metrics({"round": 1, "accuracy": 0.5})
    run.append_metrics({"round": 2, "accuracy": 0.6})
    with run.metrics_path.open("a") as f:
        f.write('{"round": 3, "accu')
    assert [r["round"] for r in run.read_metrics()] == [1, 2]
    assert [r["round"] for r in run.read_metrics(up_to_round=1)] == [1]
    run.write_summary({"a": 1})
    assert json.loads(run.summary_path.read_text()) == {"a": 1}
