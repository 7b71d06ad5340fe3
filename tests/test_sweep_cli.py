"""Studies with their own command line run under `fsl run NAME` too: `--quick` and NAME.key=value."""

import argparse

import pytest

from experiments import argv_from_run


def test_run_options_become_the_studys_own_flags():
    args = argparse.Namespace(quick=True, overrides=["label_leakage.positive=3", "label_leakage.out=/tmp/x"])
    assert argv_from_run(args, "label_leakage") == ["--quick", "--positive", "3", "--out", "/tmp/x"]
    assert argv_from_run(argparse.Namespace(quick=False, overrides=[]), "detector") == []


def test_a_foreign_override_is_refused_not_ignored():
    with pytest.raises(SystemExit, match="only --quick and detector.KEY=VALUE"):
        argv_from_run(argparse.Namespace(quick=False, overrides=["train.rounds=3"]), "detector")
