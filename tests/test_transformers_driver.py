"""`fsl run transformers`: the sections' keys merge into one results file other tools read."""

from __future__ import annotations

import argparse
import json

import pytest

from experiments.transformers import falling_rounds, main, merge_results


def test_falling_rounds_counts_the_leading_strictly_falling_run():
    assert falling_rounds([]) == 0
    assert falling_rounds([7.0]) == 1
    assert falling_rounds([9.0, 8.0, 7.0, 7.0, 6.0]) == 3  # a plateau ends the run
    assert falling_rounds([9.0, 8.0, 8.5, 6.0]) == 2
    assert falling_rounds([5.0, 4.0, 3.0, 2.0, 1.0]) == 5


def test_a_section_merges_into_the_file_and_keeps_the_others(tmp_path):
    path = tmp_path / "results.json"
    merge_results(path, {"lora_split_accuracy": 0.8, "lm_unigram_perplexity": 900.0})
    doc = merge_results(path, {"lm_unigram_perplexity": 850.0, "lm_perplexity_by_round": [1000.0, 700.0]})
    assert doc == json.loads(path.read_text())
    assert doc == {
        "lora_split_accuracy": 0.8,
        "lm_unigram_perplexity": 850.0,
        "lm_perplexity_by_round": [1000.0, 700.0],
    }
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(["transformers.sections=lm,nope"], "unknown section"), (["transformers.colour=red"], "unknown option")],
)
def test_unknown_sections_and_options_are_refused_before_anything_runs(tmp_path, capsys, overrides, message):
    args = argparse.Namespace(overrides=[*overrides, f"output_dir={tmp_path}"], quick=True, quiet=True)
    assert main(args) == 2
    assert message in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


def test_the_committed_results_hold_every_key_other_tools_read():
    from pathlib import Path

    doc = json.loads((Path(__file__).parents[1] / "experiments/results/transformers/results.json").read_text())
    for key in (
        "lora_split_accuracy",
        "lora_central_accuracy",
        "adapter_bytes_per_round",
        "full_segment_bytes",
        "lm_perplexity_by_round",
        "lm_unigram_perplexity",
        "dc_cost_reduction_vs_cloud",
        "dc_accuracy_drop_points",
        "scheduler_server_compute_reduction_vs_cloud",
        "scheduler_sla_attainment",
        "dataset",
        "model",
        "lm_dataset",
        "lm_model",
        "dc_dataset",
        "dc_model",
    ):
        assert key in doc, key
    assert isinstance(doc["lm_perplexity_by_round"], list) and len(doc["lm_perplexity_by_round"]) >= 5
    assert doc["adapter_bytes_per_round"] < doc["full_segment_bytes"]
