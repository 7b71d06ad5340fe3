"""SplitGuard on the client: an honest split server is not flagged, a hijacking one is (real segments, real codec)."""

import pytest
import torch

from attacks.splitguard import HijackingDetected, SplitGuard, sg_score, train_segment_guarded
from experiments.detector import run_one
from fsl.channel import ChannelIdentity, InMemoryChannel
from fsl.data import load_dataset
from fsl.models import build_model, cut_shape, split_model
from server.split_server import SplitServerState


@pytest.fixture(scope="module")
def mnist():
    ds = load_dataset("mnist5k")
    return ds.x_train, ds.y_train, ds.x_test[:1000]


def test_score_separates_label_driven_from_label_blind_gradients():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(50, generator=gen)
    # label-blind: fakes from the regular distribution; label-driven: fakes larger and elsewhere
    same = sg_score((base, 1.0), (base + 0.01, 1.01), (base - 0.01, 0.99))
    other = sg_score((-base, 5.0), (base + 0.01, 1.01), (base - 0.01, 0.99))
    assert other > 0.99 and same < 0.5


def test_honest_run_is_not_flagged_and_hijacked_run_is(mnist):
    x, y, pub = mnist
    torch.set_num_threads(1)  # the run's small convs: one thread is faster on shared cores
    honest = run_one("honest", x, y, pub, seed=0, steps=120)
    hijacked = run_one("fsha", x, y, pub, seed=0, steps=120)
    assert not honest["flagged"] and honest["fake_batches"] >= 10
    assert min(honest["scores"][-5:]) > 0.9
    assert hijacked["flagged"] and "hijacking" in hijacked["reason"]


def test_detection_stops_local_training(mnist):
    """The exception ends the loop at the fake batch that tipped the verdict: no step after it."""
    x, y = mnist[0][:640], mnist[1][:640]
    split = split_model(build_model("cnn", tuple(x.shape[1:]), 10, seed=0), "conv1")
    state = SplitServerState(split.server, cut_shape(split.client, tuple(x.shape[1:])), 10, device="cpu")
    channel = InMemoryChannel(server=state, identity=ChannelIdentity(run_id="g", round=1, client_id="c"))
    guard = SplitGuard(num_classes=10, warmup=2, p_fake=0.5, window=1, threshold=1.01, seed=0)  # fires at once
    with pytest.raises(HijackingDetected, match="SplitGuard"):
        train_segment_guarded(split.client, x, y, channel, guard)
    assert guard.flagged_at is not None and guard.flagged_at == guard.batches
    assert state.steps == guard.batches  # every batch sent, fakes included; none after the verdict
