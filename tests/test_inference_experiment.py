"""``fsl run inference --quick`` end to end: the result files and the keys other tools read."""

import argparse
import json
import math

import pytest

from experiments import inference

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
    assert inference.main(argparse.Namespace(quick=True)) == 0
    (run,) = (tmp_path / "runs").iterdir()
    for f in ("inference.json", "summary.json", "scheduler.json", "sensitivity.json", "validation.json",
              "routing.json", "provisioning.json", "latency_cdf.png", "decisions.png", "data_map.png"):  # fmt: skip
        assert (run / f).stat().st_size > 0, f
    doc = json.loads((run / "inference.json").read_text())
    assert KEYS <= set(doc)
    assert set(doc["sla_attainment"]) == {"scheduler", "all_cloud"}
    # what the quick run must already show: the scheduler saves server compute at no loss of
    # attainment. The RegNetX-400MF profile is measured in the run, so host load moves it: three
    # measurements on a 2-core host at load 4-6 gave 0.90-0.95 attainment (all-cloud 0.56, which
    # cannot send a 150 KB frame over 3G/4G within the target) and 89-94% less server compute.
    assert doc["server_compute_reduction_vs_cloud"] > 0.5
    assert doc["sla_attainment"]["scheduler"] >= doc["sla_attainment"]["all_cloud"]
    # the simulator-vs-loopback error is a figure of the host's load (reported, not asserted)
    assert math.isfinite(doc["latency_prediction_error"]) and doc["latency_prediction_error"] >= 0.0
    assert doc["sensitivity"] == {"moves_with_device_speed": True, "moves_with_network": True}
    assert {r["policy"] for r in doc["routing_baselines"]} >= {"cloud-only", "random", "confidence-exit", "cartography"}
