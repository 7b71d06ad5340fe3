"""Per-block profiles of graph-split models, and the scheduler study on a measured profile.

Tiny zoo models (a RegNet of 28x28 images, a 4-layer BERT of 16 tokens) stand in for the real ones:
the profile must count what the graph splitter sends at each cut and the FLOPs of every block, and the
scheduler study must run on the profile as measured (no declared total, no scaling).
"""

import json
import math

import pytest
import torch

from experiments.inference import real_profiles
from experiments.inference.profiles import ModelProfile, profile_graph_model
from experiments.transformers_sched import scheduler_section
from fsl.costs import count_flops
from fsl.graphsplit import cut_table, trace
from fsl.models import build_module, run_model

pytest.importorskip("transformers")

REGNET_CUTS = ["regnet.embedder", "regnet.encoder.stages.0", "regnet.encoder.stages.1", "regnet.encoder.stages.2"]
BERT_CUTS = ["bert.embeddings", *(f"bert.encoder.layer.{i}" for i in range(4))]
SEQ = 16


def _images(b):
    return torch.rand(b, 1, 28, 28, generator=torch.Generator().manual_seed(b))


def _tokens(b):
    ids = torch.randint(1000, 2000, (b, SEQ), generator=torch.Generator().manual_seed(b))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


TOKEN_DIMS = {"dynamic": {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}, "bounds": {"seq": (2, SEQ)}}


@pytest.fixture(scope="module")
def regnet_profile():
    model = build_module("regnet", (1, 28, 28), 10, seed=0)
    return profile_graph_model(model, _images, REGNET_CUTS, batch_sizes=(1, 4), repeats=2, warmup=1)


@pytest.fixture(scope="module")
def bert_profile():
    model = build_module("bert", (SEQ,), 2, seed=0)
    return profile_graph_model(model, _tokens, BERT_CUTS, batch_sizes=(1, 4), repeats=2, warmup=1, **TOKEN_DIMS)


def test_graph_profile_counts_what_crosses_each_cut_and_every_blocks_flops(regnet_profile):
    p = regnet_profile
    assert p.blocks == [*REGNET_CUTS, "head"] and p.cuts == ["input", *REGNET_CUTS, "head"]
    model = build_module("regnet", (1, 28, 28), 10, seed=0).eval()
    rows, _ = cut_table(trace(model, _images(2)), _images(2))
    by_cut = {r.cut: r.bytes_per_sample for r in rows}
    assert {c: p.cut_bytes(c) for c in REGNET_CUTS} == {c: by_cut[c] for c in REGNET_CUTS}
    assert p.cut_bytes("regnet.embedder") == 16 * 14 * 14 * 4  # the stem's stride-2 output, float32
    assert p.cut_bytes("input") == 28 * 28 * 4 and p.cut_bytes("head") == 10 * 4  # the image; the logits
    with torch.no_grad():
        whole = count_flops(lambda: run_model(model, _images(1)))
    assert sum(p.block_flops.values()) == pytest.approx(whole, rel=1e-6)
    assert all(f > 0 for f in p.block_flops.values())
    own = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert sum(p.param_bytes.values()) == own  # every parameter and buffer in exactly one block
    assert all(len(ts) == 2 and all(t > 0 for t in ts) for ts in p.block_ms.values())
    assert all(a > 0 for a in p.act_bytes.values())
    assert ModelProfile.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_graph_profile_of_a_token_model_sends_the_mask_and_ids(bert_profile):
    p = bert_profile
    hidden, mask = SEQ * 64 * 4, SEQ * SEQ * 4  # (T, 64) float32 hidden states, (1, T, T) additive mask
    assert p.input_bytes == 2 * SEQ * 8  # input_ids and attention_mask, int64
    assert p.cut_bytes("bert.embeddings") == hidden + mask
    assert p.cut_bytes("bert.encoder.layer.1") == hidden + mask
    assert p.cut_bytes("bert.encoder.layer.3") == hidden  # the head reads no mask
    assert p.block_flops["bert.embeddings"] == 0  # look-ups and a layer norm: no matrix products
    layers = [p.block_flops[c] for c in BERT_CUTS[1:]]
    assert max(layers) == pytest.approx(min(layers))  # four identical layers
    assert p.param_bytes["bert.embeddings"] > 30522 * 64 * 4  # the vocabulary's embedding stays with the first block


def test_graph_profile_refuses_unknown_and_out_of_order_cuts():
    model = build_module("regnet", (1, 28, 28), 10, seed=0)
    with pytest.raises(ValueError, match="not module paths"):
        profile_graph_model(model, _images, ["regnet.nowhere"], batch_sizes=(1,), repeats=1)
    with pytest.raises(ValueError, match="forward order"):
        profile_graph_model(model, _images, ["regnet.encoder.stages.1", "regnet.embedder"], batch_sizes=(1,), repeats=1)
    with pytest.raises(ValueError, match="statistic"):
        profile_graph_model(model, _images, REGNET_CUTS, batch_sizes=(1,), repeats=1, statistic="mean")


def test_scheduler_section_runs_on_a_measured_profile_as_it_is(regnet_profile, tmp_path):
    measured = real_profiles.save(regnet_profile, tmp_path / "measured.json")
    assert "declared" not in measured.read_text() and "scaled" not in json.loads(measured.read_text())
    heavy_file = real_profiles.save(regnet_profile.scaled(1000.0), tmp_path / "heavy.json")  # a what-if, 1000x
    out = tmp_path / "out"
    sec = scheduler_section(out, quick=True, models=("regnet",), profiles={"regnet": measured})
    for key in ("scheduler_server_compute_reduction_vs_cloud", "scheduler_sla_attainment"):
        assert math.isfinite(sec[key]) and 0.0 <= sec[key] <= 1.0
    assert sec["scheduler_model"] == "regnet" and "read from" in sec["scheduler_profile_source"]["regnet"]
    doc = json.loads((out / "scheduler-regnet.json").read_text())
    # the study used the profile's own total: the block latencies as measured, not a declared figure
    assert doc["profile"]["scaled"] is False
    assert doc["profile"]["model_ms_batch1"] == pytest.approx(sum(ts[0] for ts in regnet_profile.block_ms.values()))
    assert real_profiles.load(out / "profiles-regnet.json") == regnet_profile
    # a model of about a millisecond stays on every device: nothing left for the server
    tiny = sec["scheduler_models"]["regnet"]
    assert tiny["local_fraction"] > 0.9 and sec["scheduler_server_compute_reduction_vs_cloud"] > 0.9
    # the same shape a thousand times heavier cannot run whole on a Pi within the target: work moves
    heavy = scheduler_section(tmp_path / "heavy", quick=True, models=("regnet",), profiles={"regnet": heavy_file})
    assert heavy["scheduler_models"]["regnet"]["local_fraction"] < tiny["local_fraction"]
    assert heavy["scheduler_models"]["regnet"]["model_ms_batch1"] == pytest.approx(1000 * tiny["model_ms_batch1"])


def test_real_models_are_declared_at_their_published_size():
    regnet = real_profiles.REAL_MODELS["regnet"]
    model = regnet.build()
    assert 5.0e6 < sum(p.numel() for p in model.parameters()) < 5.4e6  # RegNetX-400MF: 5.2 M parameters
    assert regnet.cuts[-1] == "regnet.encoder.stages.3.layers.11" and len(regnet.cuts) == 23
    assert regnet.input_bytes == 3 * 224 * 224  # 8-bit pixels
    x = regnet.batch_maker()(2)
    assert x.shape == (2, 3, 224, 224)
