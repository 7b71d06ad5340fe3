"""The observation recorder: what the split server saw, on disk, aligned with the owner's ground truth."""

import json

import torch

from attacks.ground_truth import GroundTruthTap, load_ground_truth
from attacks.models import segments
from attacks.observe import load_observation
from clients.trainer import TrainOptions, train_segment
from fsl.channel import ChannelIdentity, InMemoryChannel
from helpers import make_state
from server.recorder import ObservationRecorder


def test_recorder_keeps_what_the_server_saw_and_matches_ground_truth(tmp_path, digits):
    _ref, split, state = make_state("cnn", "conv1", input_shape=(1, 8, 8))
    recorder = ObservationRecorder(
        tmp_path,
        meta={"model": "cnn", "cut": "conv1", "input_shape": [1, 8, 8], "num_classes": 10, "dataset": "digits"},
        rounds=(2,),
        max_batches=3,
    )
    state.observer = recorder
    x, y = digits.x_train[:200], digits.y_train[:200]
    for rnd in (1, 2):
        start = {k: v.clone() for k, v in split.client.state_dict().items()}
        tap = GroundTruthTap(split.client, max_batches=3)
        ch = InMemoryChannel(server=state, identity=ChannelIdentity(run_id="r", round=rnd, client_id="c7"))
        train_segment(tap, x, y, ch, TrainOptions(batch_size=16, seed=rnd))
        recorder.end_round(rnd, start, state.segment_state_dict(), updates=[("c7", split.client.state_dict())])
        if recorder.wants(rnd):
            tap.save(tmp_path, rnd, "c7")

    obs_dir = tmp_path / "observations"
    assert not (obs_dir / "round-0001").exists()  # round 1 was not asked for
    files = sorted(p.name for p in (obs_dir / "round-0002").iterdir())
    assert files == [
        "client_segment.safetensors",
        "data.safetensors",
        "index.json",
        "server_segment.safetensors",
        "updates",
    ]
    assert not list(tmp_path.rglob("*.pkl")) and not list(tmp_path.rglob("*.pt"))
    index = json.loads((obs_dir / "round-0002" / "index.json").read_text())
    assert [r["step"] for r in index] == [1, 2, 3]  # only the first max_batches batches

    obs = load_observation(tmp_path)
    assert obs.activations.shape == (48, 16, 4, 4) and obs.labels is not None
    assert obs.keys[0] == "2/c7/1/0" and obs.keys[-1] == "2/c7/3/15"
    truth = load_ground_truth(tmp_path)
    assert set(truth) == set(obs.keys)
    # the recorded activations of step 1 are the round-start client segment applied to the owner's inputs
    client, _server = segments("cnn", "conv1", (1, 8, 8))
    client.load_state_dict(obs.client_segment)
    x1 = torch.stack([truth[k] for k in obs.keys[:16]])
    with torch.no_grad():
        assert torch.allclose(client(x1), obs.activations[:16], atol=1e-5)
    # the labels it recorded are the ones that travelled
    assert obs.labels.dtype == torch.int64 and int(obs.labels.max()) < 10


def test_config_drives_the_recorder(tmp_path):
    from fsl.config import load_experiment
    from fsl.rundir import RunDir
    from server.recorder import NullRecorder, attach_recorder, recorder_config

    _ref, _split, state = make_state("cnn", "conv1")
    off = load_experiment("quickstart")
    assert isinstance(attach_recorder(off, RunDir(tmp_path), state, (1, 28, 28)), NullRecorder)
    assert state.observer is None
    on = load_experiment("quickstart", ["record.enabled=true", "record.rounds=last", "record.max_batches=2"])
    rec = attach_recorder(on, RunDir(tmp_path), state, (1, 28, 28))
    # the ServerApp's recorder keeps the whole exchange: activations, labels and the dL/dh sent back
    assert state.observer is None and state.exchange_observer == rec.exchange
    assert rec.wants(on.train.rounds) and not rec.wants(1)
    assert recorder_config(rec, RunDir(tmp_path))["record-dir"].endswith(tmp_path.name)
    meta = json.loads((tmp_path / "observations" / "meta.json").read_text())
    assert meta["input_shape"] == [1, 28, 28] and meta["model"] == "cnn" and meta["max_batches"] == 2


def test_the_servers_recorder_keeps_the_gradient_it_sent_over_grpc(tmp_path):
    from fsl.grpc_channel import GrpcChannel
    from server.split_server import SplitServer

    _ref, split, state = make_state("cnn", "conv1", input_shape=(1, 8, 8))
    rec = ObservationRecorder(tmp_path, meta={"model": "cnn", "cut": "conv1", "input_shape": [1, 8, 8],
                              "num_classes": 10, "dataset": "digits"}, rounds=(1,), max_batches=2)  # fmt: skip
    state.exchange_observer = rec.exchange
    server = SplitServer(state, "127.0.0.1:0").start()
    received = []
    try:
        ident = ChannelIdentity(run_id="r", round=1, client_id="c1")
        with GrpcChannel(address=server.address, identity=ident) as ch:
            for _ in range(3):
                h, y = torch.rand(5, 16, 4, 4), torch.randint(0, 10, (5,))
                received.append((h, y, ch.train_step(h, y).grad))
    finally:
        server.stop(grace=None)
    rec.end_round(1, split.client.state_dict(), state.segment_state_dict())
    obs = load_observation(tmp_path)
    assert obs.activations.shape == (10, 16, 4, 4)  # max_batches=2 of the 3 steps
    assert torch.equal(obs.activations, torch.cat([r[0] for r in received[:2]]))
    assert torch.equal(obs.labels, torch.cat([r[1] for r in received[:2]]))
    assert torch.equal(obs.cut_gradients, torch.cat([r[2] for r in received[:2]]))  # exactly what travelled
