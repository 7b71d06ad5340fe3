"""``fsl run inference --quick`` end to end: the result files and the keys other tools read."""

import argparse
import json
import math
from pathlib import Path

import pytest

from experiments import inference

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEYS = {
    "server_compute_reduction_vs_cloud",
    "sla_attainment",
    "dc_cost_reduction_vs_cloud",
    "dc_accuracy_drop_points",
    "provisioning_cost_reduction",
    "latency_prediction_error",
    "scheduler_baselines",
    "routing_baselines",
    "provisioning_policies",
}


def test_quick_inference_study_writes_its_tables_and_the_scheduler_responds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the RegNet profile is read from the committed measurement, not timed here: what the
    # scheduler decides follows from the profile, and a profile timed on a loaded (or an idle)
    # host would make these assertions a figure of the host's load; measuring is tested in
    # tests/test_real_profiles.py
    profile = ROOT / "experiments/results/transformers/profiles-regnet.json"
    assert inference.main(argparse.Namespace(quick=True, overrides=[f"profile={profile}"])) == 0
    (run,) = (tmp_path / "runs").iterdir()
    for f in ("inference.json", "summary.json", "scheduler.json", "sensitivity.json", "validation.json",
              "routing.json", "provisioning.json", "latency_cdf.png", "decisions.png", "data_map.png"):  # fmt: skip
        assert (run / f).stat().st_size > 0, f
    doc = json.loads((run / "inference.json").read_text())
    assert KEYS <= set(doc)
    assert set(doc["sla_attainment"]) == {"scheduler", "all_cloud"}
    # what the quick run must already show: the scheduler saves server compute at no loss of
    # attainment (all-cloud cannot send a 150 KB frame over 3G/4G within the target)
    assert doc["server_compute_reduction_vs_cloud"] > 0.5
    assert doc["sla_attainment"]["scheduler"] >= doc["sla_attainment"]["all_cloud"]
    # the simulator-vs-loopback error is a figure of the host's load (reported, not asserted)
    assert math.isfinite(doc["latency_prediction_error"]) and doc["latency_prediction_error"] >= 0.0
    assert doc["sensitivity"] == {"moves_with_device_speed": True, "moves_with_network": True}
    assert {r["policy"] for r in doc["routing_baselines"]} >= {"cloud-only", "random", "confidence-exit", "cartography"}


def test_the_scheduler_decision_moves_with_device_speed_and_network_on_the_committed_profile(tmp_path):
    from experiments.inference.profiles import ModelProfile
    from experiments.inference.study import _sensitivity

    committed = json.loads((ROOT / "experiments/results/inference/profiles.json").read_text())["regnet"]
    doc = _sensitivity(tmp_path, ModelProfile.from_dict(committed))
    assert doc["moves_with_device_speed"] and doc["moves_with_network"]
    # the cut moves towards the device as it gets faster: first and last rows of one case differ
    rows = doc["device_speed"]["pi4-wifi"]
    assert rows[-1]["cut_index"] > rows[0]["cut_index"]
