"""Plug-ins named by import string: resolution, and the ground-truth capture a recorded run switches on."""

import subprocess
import sys

import pytest

from attacks.ground_truth import load_ground_truth
from clients.trainer import TrainOptions, train_segment
from fsl.channel import ChannelIdentity, InMemoryChannel
from fsl.config import ConfigError, load_experiment
from fsl.plugins import PluginError, resolve
from helpers import make_state
from server.recorder import ObservationRecorder


def test_resolve_names_an_object_or_says_what_is_wrong():
    assert resolve("fsl.plugins:resolve") is resolve
    assert resolve("fsl.training:TrainOptions.from_config") is not None  # a dotted attribute
    for bad, why in (
        ("fsl.plugins", "import string"),
        ("fsl.no_such_module:x", "cannot import"),
        ("fsl.plugins:no_such_name", "no attribute"),
    ):
        with pytest.raises(PluginError, match=why):
            resolve(bad)
    with pytest.raises(ConfigError, match="record.ground_truth"):
        load_experiment("quickstart", ["record.ground_truth=attacks.ground_truth"])


def test_the_configured_ground_truth_capture_lines_up_with_the_recorded_steps(tmp_path, digits):
    cfg = load_experiment("quickstart", ["record.enabled=true", "record.rounds='2'", "record.max_batches=3"])
    factory = resolve(cfg.record.ground_truth)
    _ref, split, state = make_state("cnn", "conv1", input_shape=(1, 8, 8))
    meta = {"model": "cnn", "cut": "conv1", "input_shape": [1, 8, 8], "num_classes": 10, "dataset": "digits"}
    recorder = ObservationRecorder(tmp_path, meta=meta, rounds=(2,), max_batches=3)
    state.observer = recorder
    x, y = digits.x_train[:100], digits.y_train[:100]
    for rnd in (1, 2):
        conf = {"server-round": rnd, "record-dir": str(tmp_path)}
        hooks = factory(cfg, conf, "c7")
        assert (hooks is None) == (rnd == 1)  # only the rounds record.rounds names
        ch = InMemoryChannel(server=state, identity=ChannelIdentity(run_id="r", round=rnd, client_id="c7"))
        start = {k: v.clone() for k, v in split.client.state_dict().items()}
        train_segment(split.client, x, y, ch, TrainOptions(batch_size=16, seed=rnd), hooks)
        recorder.end_round(rnd, start, state.segment_state_dict(), updates=[("c7", split.client.state_dict())])
    truth = load_ground_truth(tmp_path)
    assert sorted({k.rsplit("/", 1)[0] for k in truth}) == ["2/c7/1", "2/c7/2", "2/c7/3"]
    assert len(truth) == 3 * 16
    # not a recorded run (no record-dir), a U-shaped split, or `fl`: nothing to capture
    assert factory(cfg, {"server-round": 2}, "c7") is None
    ushaped = load_experiment("quickstart", ["mode=ushaped", "record.enabled=true"])
    assert factory(ushaped, {"server-round": ushaped.train.rounds, "record-dir": str(tmp_path)}, "c7") is None


def test_the_client_app_imports_no_attack_code():
    code = "import sys, clients.client_app; print(sorted(m for m in sys.modules if m.split('.')[0] == 'attacks'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
