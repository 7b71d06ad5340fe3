"""SplitGuard on the client: an honest split server is not flagged, a hijacking one is (real segments, real codec)."""

import pytest
import torch

from clients.splitguard import HijackingDetected, SplitGuard, sg_score, train_segment_guarded
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


def _guarded_rounds(server_state, cfg, rounds, auth=None):
    """The real ClientApp's train, round after round, over real gRPC to ``server_state``, one node
    whose context (where the detector keeps what it learnt) lives on between rounds. Returns each
    round's outcome (the reply, or the exception it failed with), the node's context and the
    server's step count after each round."""
    from flwr.app import ArrayRecord, Context, RecordDict

    import clients.client_app as client_app
    from fsl.experiment import client_part, config_to_json
    from helpers import flower_message
    from server.split_server import SplitServer

    module, _ = client_part(cfg, (1, 28, 28), 10)
    arrays = ArrayRecord(module.state_dict())
    ctx = Context(
        run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 4}, state=RecordDict(), run_config={}
    )
    server = SplitServer(server_state, "127.0.0.1:0").start()
    outcomes, steps = [], []
    try:
        for rnd in range(1, rounds + 1):
            token = ""
            if auth is not None:
                auth.open_round(rnd)
                token = auth.issue(rnd, "5")
            conf = {
                "experiment": config_to_json(cfg),
                "run-id": "run-guard",
                "dataplane-address": server.address,
                "server-round": rnd,
                "dataplane-token": token,
            }
            try:
                reply = client_app.train(flower_message(conf, arrays), ctx)
                arrays = reply.content["arrays"]
                outcomes.append(reply)
            except HijackingDetected as e:
                outcomes.append(e)
            steps.append(server_state.steps)
    finally:
        server.stop(grace=None)
    return outcomes, ctx, steps


GUARDED = ["privacy.splitguard=true", "privacy.splitguard_p_fake=0.2", "privacy.splitguard_window=3"]


@pytest.mark.slow
def test_the_client_app_trains_on_with_an_honest_server(mnist, flower_task):
    from fsl.auth import RoundAuthority
    from fsl.config import load_experiment

    cfg = load_experiment("quickstart", GUARDED)
    torch.set_num_threads(1)
    split = split_model(build_model("cnn", (1, 28, 28), 10, seed=0), "conv1")
    auth = RoundAuthority("run-guard")
    state = SplitServerState(split.server, cut_shape(split.client, (1, 28, 28)), 10, device="cpu", authority=auth)
    outcomes, ctx, _ = _guarded_rounds(state, cfg, 4, auth)
    assert all(not isinstance(o, Exception) for o in outcomes)
    numbers = ctx.state["splitguard-numbers"]
    assert numbers["batches"] > 100 and numbers["fake.n"] >= 5  # the detector saw every round's batches
    scores = ctx.state["splitguard-tensors"].to_torch_state_dict()["scores"]
    assert len(scores) >= 3 and float(scores[-3:].mean()) > 0.9


@pytest.mark.slow
def test_the_client_app_stops_for_good_once_a_hijacking_server_is_noticed(mnist, flower_task):
    from attacks.fsha import HijackingServer
    from fsl.config import load_experiment

    cfg = load_experiment("quickstart", GUARDED)
    torch.set_num_threads(1)
    hijacker = HijackingServer(model="cnn", cut="conv1", input_shape=(1, 28, 28), public=mnist[2], seed=0)
    outcomes, ctx, steps = _guarded_rounds(hijacker, cfg, 6)
    failed = [i for i, o in enumerate(outcomes) if isinstance(o, Exception)]
    assert failed, "SplitGuard never noticed the hijacking server"
    first = failed[0]
    assert "hijacking" in str(outcomes[first]) and ctx.state["splitguard-verdict"]["round"] == first + 1
    # every later round is refused before the client sends the server anything
    assert failed == list(range(first, 6)) and first < 5
    assert all("refusing to train" in str(o) for o in outcomes[first + 1 :])
    assert len(set(steps[first:])) == 1


def test_splitguard_needs_a_server_that_computes_the_loss():
    from fsl.config import ConfigError, load_experiment

    assert load_experiment("quickstart", ["privacy.splitguard=true"]).privacy.splitguard
    for bad in (["mode=fl"], ["mode=ushaped"], ["privacy.dp.enabled=true"]):
        with pytest.raises(ConfigError, match="splitguard"):
            load_experiment("quickstart", ["privacy.splitguard=true", *bad])
