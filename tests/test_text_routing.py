"""Routing a multi-exit transformer: exits after encoder layers, token inputs through the cost model,
the tiers' outputs, the router's features and the training dynamics. A tiny random-init BERT built
from its config (nothing is downloaded)."""

import json

import numpy as np
import pytest
import torch

from experiments.inference.cartography import record_epochs
from experiments.inference.routing import (
    CLOUD,
    DEVICE,
    CostModel,
    TierOutputs,
    confidence_exit,
    device_features,
    evaluate_routing,
    token_states,
)
from fsl.costs import count_flops
from fsl.data import DatasetNotFound
from fsl.exits import ExitBlock, TokenMeanHead, add_exits_at, all_exit_logits, exit_names, token_mean
from fsl.models import build_module, run_model
from helpers import padded_tokens

HIDDEN, CLASSES, T = 32, 3, 10
TINY = {"hidden_size": HIDDEN, "num_layers": 4, "num_heads": 2, "max_length": 16}
EXITS = ("bert.encoder.layer.0", "bert.encoder.layer.2")


def _tokens(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return padded_tokens(n, T, seed)


def _bert() -> torch.nn.Module:
    return build_module("bert", num_classes=CLASSES, seed=0, options=TINY).eval()


@pytest.fixture(scope="module")
def multi():
    return add_exits_at(_bert(), EXITS, CLASSES, _tokens(2), seed=0).eval()


def _example() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.full((1, T), 1000), "attention_mask": torch.ones(1, T, dtype=torch.int64)}


def test_exits_at_module_paths_leave_the_model_output_alone(multi):
    x = _tokens(6)
    with torch.no_grad():
        assert torch.equal(run_model(_bert(), x), run_model(multi, x))
    assert exit_names(multi) == list(EXITS)
    assert isinstance(multi.bert.encoder.layer[0], ExitBlock) and isinstance(
        multi.bert.encoder.layer[0].head, TokenMeanHead
    )
    names = {n for n, _ in multi.named_parameters()}
    assert (
        "bert.encoder.layer.0.head.classifier.weight" in names and "bert.encoder.layer.1.output.dense.weight" in names
    )
    logits = all_exit_logits(multi, x, batch_size=4)
    assert sorted(logits) == sorted([*EXITS, "final"]) and all(v.shape == (6, CLASSES) for v in logits.values())
    with pytest.raises(ValueError, match="each must be the path"):
        add_exits_at(_bert(), ("bert.encoder.layer.9",), CLASSES, _tokens(2))


def test_an_exit_reads_only_the_real_tokens(multi):
    x = _tokens(4)
    padded = {k: torch.cat([v, torch.zeros(4, 5, dtype=v.dtype)], 1) for k, v in x.items()}  # 5 more [PAD]s
    padded["input_ids"][:, T:] = 7  # whatever sits under the padding must not matter
    with torch.no_grad():
        a, b = run_model(multi, x), multi.bert.encoder.layer[0].logits
        c, d = run_model(multi, padded), multi.bert.encoder.layer[0].logits
        one = run_model(multi, {k: v[3:4, : int(x["attention_mask"][3].sum())] for k, v in x.items()})
        e = multi.bert.encoder.layer[0].logits  # batch 1, no padding: the layer gets no mask at all
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(b, d)
    torch.testing.assert_close(e, b[3:4])
    assert one.shape == (1, CLASSES)
    h = torch.randn(2, 4, 3)
    mask4 = torch.zeros(2, 1, 4, 4)
    mask4[1, :, :, 2:] = torch.finfo(torch.float32).min  # the second text has 2 real tokens
    torch.testing.assert_close(token_mean(h, mask4), torch.stack([h[0].mean(0), h[1, :2].mean(0)]))
    torch.testing.assert_close(token_mean(h, mask4 == 0), token_mean(h, torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])))


def test_the_cost_model_counts_a_token_model(multi):
    cm = CostModel.from_model(multi, _example(), device_exit=EXITS[0], edge_exit=EXITS[1], carried_bytes=T)
    dev, edge, cloud = cm.block_mflops
    # the blocks add up to the plain model's forward pass: no head counted, nothing twice
    plain = count_flops(lambda: run_model(_bert(), _example())) / 1e6
    assert dev + edge + cloud == pytest.approx(plain)
    assert edge == pytest.approx(2 * dev)  # two identical layers against one (embeddings count no FLOPs)
    assert cloud > dev  # the last layer, the pooler and the classifier
    # each head: the mean state (D) -> classes, 2 FLOPs a multiply-add (torch counts no sums)
    assert cm.head_mflops == pytest.approx((2 * HIDDEN * CLASSES / 1e6,) * 2 + (0.0,))
    assert cm.offload_bytes == (T * HIDDEN * 4 + T,) * 2  # float32 hidden states and a byte-per-token mask
    cost, ms = cm.path()
    assert cost[0] < cost[1] < cost[2] and ms[0] < ms[1] < ms[2]  # later exits cost more
    with pytest.raises(ValueError, match="before the edge exit"):
        CostModel.from_model(multi, _example(), device_exit=EXITS[1], edge_exit=EXITS[0])


def test_confidence_exit_at_tau_zero_answers_everything_at_the_first_exit(multi):
    x, y = _tokens(12), torch.arange(12) % CLASSES
    cm = CostModel.from_model(multi, _example(), device_exit=EXITS[0], edge_exit=EXITS[1])
    out = TierOutputs.from_logits(all_exit_logits(multi, x), cm.exits, y)
    r = confidence_exit(out.confidence, (0.0, 0.0))
    assert (r.tier == DEVICE).all() and r.heads[:, 0].all() and not r.heads[:, 1:].any()
    res = evaluate_routing("tau=0", r, out, cm)
    assert res.accuracy == pytest.approx(out.correct[:, DEVICE].mean())
    assert res.cost == pytest.approx(cm.path()[0][DEVICE] + cm.heads()[0][DEVICE])
    never = confidence_exit(out.confidence, (np.inf, np.inf))
    assert (never.tier == CLOUD).all()


def test_device_features_stop_at_the_device_exit(multi):
    x = _tokens(5)
    later = []
    handle = multi.bert.encoder.layer[1].register_forward_pre_hook(lambda *_: later.append(1))
    try:
        feats = device_features(multi, x, EXITS[0], pool=token_states)
    finally:
        handle.remove()
    assert not later  # the forward pass ended at the device's cut
    assert feats.shape == (5, CLASSES + 3 + HIDDEN)
    with torch.no_grad():
        logits = all_exit_logits(multi, x)[EXITS[0]]
    torch.testing.assert_close(feats[:, :CLASSES], torch.softmax(logits, 1))


def test_record_epochs_trains_a_token_model_and_its_exits():
    torch.manual_seed(0)
    model = add_exits_at(_bert(), EXITS, CLASSES, _tokens(2), seed=0).train()
    model.bert.embeddings.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = _tokens(24, seed=1), torch.arange(24) % CLASSES
    stats = record_epochs(model, x, y, 2, lr=0.05, batch_size=8, eval_batch_size=16).stats()
    assert stats.indices.tolist() == list(range(24)) and (stats.epochs == 2).all()
    assert not np.isnan(stats.correctness).any()
    after = dict(model.named_parameters())
    for name in ("bert.encoder.layer.0.head.classifier.weight", "bert.encoder.layer.2.head.classifier.weight"):
        assert not torch.equal(before[name], after[name]), name  # the exits learn
    assert torch.equal(
        before["bert.embeddings.word_embeddings.weight"], after["bert.embeddings.word_embeddings.weight"]
    )


@pytest.mark.slow
def test_the_text_routing_driver_writes_its_result(tmp_path):
    from experiments.transformers_routing import text_routing

    try:
        report = text_routing(
            tmp_path,
            model="bert",
            model_options=TINY | {"max_length": 32},
            device_layers=1,
            edge_layers=3,
            train_limit=60,
            val_size=40,
            test_limit=40,
            epochs=2,
            lr=0.05,
        )
    except DatasetNotFound as e:
        pytest.skip(str(e))
    saved = json.loads((tmp_path / "routing.json").read_text())
    assert (tmp_path / "routing-data-map.png").stat().st_size > 0
    for key in ("dc_cost_reduction_vs_cloud", "dc_accuracy_drop_points", "dataset", "model", "cost_model", "regions"):
        assert key in saved
    table = saved["comparison"]["policies"]
    assert {"cloud-only", "fixed-split", "random", "confidence-exit", "adaptive-exit", "bandit", "cartography"} <= set(
        table
    )
    assert saved["dc_cost_reduction_vs_cloud"] == pytest.approx(table["cartography"]["cost_reduction_pct"] / 100)
    assert sum(saved["regions"].values()) == saved["config"]["train"] == 60
    assert report["exits"] == {"device": "bert.encoder.layer.0", "edge": "bert.encoder.layer.2", "cloud": "final"}
