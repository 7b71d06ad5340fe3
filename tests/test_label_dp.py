"""Label DP (``privacy.label_dp_epsilon``): randomized response at its stated rate, and the split
server receiving only the randomized labels, the same ones every round, through the real ClientApp."""

import math
from collections import Counter

import pytest
import torch

from fsl.config import ConfigError, load_experiment
from fsl.privacy.labels import keep_probability, randomized_response


def test_randomized_response_keeps_at_its_rate_and_spreads_the_rest_evenly():
    y = torch.arange(60_000) % 10
    out = randomized_response(y, 1.0, 10, seed=0)
    keep = math.e / (math.e + 9)
    assert keep_probability(1.0, 10) == pytest.approx(keep)
    n = len(y)
    kept = float((out == y).float().mean())
    assert abs(kept - keep) < 4 * math.sqrt(keep * (1 - keep) / n)  # within 4 sigma of the stated rate
    # the replaced labels: each of the 9 other classes equally likely (shift 1..9 from the true one)
    shifts = Counter(((out - y) % 10)[out != y].tolist())
    assert set(shifts) == set(range(1, 10))
    expected = (n - int((out == y).sum())) / 9
    assert all(abs(c - expected) < 5 * math.sqrt(expected) for c in shifts.values())
    assert torch.equal(out, randomized_response(y, 1.0, 10, seed=0))  # seeded
    assert float((randomized_response(y, 12.0, 10, seed=0) == y).float().mean()) > 0.99


def test_randomized_response_refuses_what_it_cannot_protect():
    with pytest.raises(ValueError, match="class labels"):
        randomized_response(torch.zeros(4, 8, dtype=torch.long), 1.0, 10)  # token targets of a language model
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        randomized_response(torch.tensor([3, 10]), 1.0, 10)
    with pytest.raises(ValueError, match="epsilon > 0"):
        keep_probability(0.0, 10)


def test_label_dp_is_checked_with_the_config():
    with pytest.raises(ConfigError, match="label_dp_epsilon"):
        load_experiment("quickstart", ["privacy.label_dp_epsilon=-1"])
    with pytest.raises(ConfigError, match="no label or gradient leaves"):
        load_experiment("quickstart", ["mode='fl'", "privacy.label_dp_epsilon=1"])


@pytest.mark.slow
def test_the_split_server_receives_only_the_randomized_labels_every_round(flower_task):
    """Two rounds of the real ClientApp over gRPC: what reaches the server is the partition's labels
    after randomized response, the same draw in both rounds (a fresh draw per round would let the
    server average a label's releases)."""
    from flwr.app import ArrayRecord, Context, RecordDict

    import clients.client_app as client_app
    from fsl.experiment import client_part, config_to_json, local_partition
    from fsl.models import build_model, cut_shape, split_model
    from fsl.privacy.client import private_labels
    from helpers import flower_message
    from server.split_server import SplitServer, SplitServerState

    torch.set_num_threads(1)
    cfg = load_experiment("quickstart", ["privacy.label_dp_epsilon=1.0", "train.local_epochs=1"])
    split = split_model(build_model("cnn", (1, 28, 28), 10, seed=0), "conv1")
    state = SplitServerState(split.server, cut_shape(split.client, (1, 28, 28)), 10, device="cpu")
    received: dict[int, Counter] = {}
    state.observer = lambda header, h, y: received.setdefault(header.round, Counter()).update(y.tolist())
    ds, part = local_partition(cfg, 0, 8)
    module, _ = client_part(cfg, ds.input_shape, ds.num_classes)
    arrays = ArrayRecord(module.state_dict())
    ctx = Context(
        run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 8}, state=RecordDict(), run_config={}
    )
    server = SplitServer(state, "127.0.0.1:0").start()
    try:
        for rnd in (1, 2):
            conf = {
                "experiment": config_to_json(cfg),
                "run-id": "run-label-dp",
                "dataplane-address": server.address,
                "server-round": rnd,
                "dataplane-token": "",
            }
            arrays = client_app.train(flower_message(conf, arrays), ctx).content["arrays"]
    finally:
        server.stop(grace=None)
    truth = Counter(part.y_train.tolist())
    randomized = Counter(private_labels(cfg, part.y_train, 10, 0).tolist())
    assert received[1] == received[2] == randomized != truth


def test_the_run_summary_says_what_label_dp_protects():
    from fsl.privacy.server import ServerPrivacy

    block = ServerPrivacy(load_experiment("quickstart", ["privacy.label_dp_epsilon=2"])).summary()["privacy"]
    assert block["label_dp"]["epsilon"] == 2.0 and "label" in block["label_dp"]["protects"]
    assert "label_dp" not in ServerPrivacy(load_experiment("quickstart")).summary().get("privacy", {})
