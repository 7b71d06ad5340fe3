"""Splitting any model by its graph: one step through the segments is one step of the unsplit model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fsl import tasks
from fsl.graphsplit import GraphSplit, SplitError, graph_split
from fsl.models import build_model, run_model

transformers = pytest.importorskip("transformers")

CE = nn.functional.cross_entropy


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return tasks.loss("causal-lm", logits, labels)


Pairs = list[list[tuple[torch.Tensor, torch.Tensor]]]


def _run_split(sp: GraphSplit, x: object) -> tuple[torch.Tensor, Pairs]:
    """Forward through every segment as the wire would: each crossing value arrives as a fresh leaf.

    Returns the prediction and, per segment, (sent tensor, received leaf) for each value it sent that
    needs a gradient.
    """
    pairs: Pairs = [[] for _ in sp.segments]
    carried: dict[str, torch.Tensor] = {}
    value: object = x
    for i, seg in enumerate(sp.segments):
        out = seg(value) if i == 0 else seg({c.name: carried[c.name] for c in sp.into(i)})
        if i == len(sp.segments) - 1:
            return out, pairs
        for c in sp.crossings:
            if c.source == i and c.name not in carried:
                t = out[c.name]
                leaf = t.detach().clone().requires_grad_(c.grad)
                if c.grad:
                    pairs[i].append((t, leaf))
                carried[c.name] = leaf
        value = None
    raise AssertionError("unreachable")


def _backward(loss: torch.Tensor, pairs: Pairs) -> None:
    """Backward through the last segment, then hand the gradients to each segment that sent values
    (latest first, as the wire does), all of one segment's in one backward pass."""
    loss.backward()
    for sent in reversed(pairs):
        got = [(t, leaf.grad) for t, leaf in sent if leaf.grad is not None]
        if got:
            torch.autograd.backward([t for t, _ in got], [g for _, g in got])


def _check_step(model: nn.Module, cuts: list[str], x: object, y: torch.Tensor, loss_fn, *, train: bool = True, **kw):
    """One SGD step of the unsplit model and of its split give the same gradients and weights."""
    whole, parted = copy.deepcopy(model), copy.deepcopy(model)
    sp = graph_split(parted, cuts, x, **kw)
    whole.train(train)
    for s in sp.segments:
        s.train(train)
    out = run_model(whole, x)
    loss = loss_fn(out, y)
    loss.backward()
    pred, pairs = _run_split(sp, x)
    torch.testing.assert_close(pred, out, rtol=1e-5, atol=1e-6)
    _backward(loss_fn(pred, y), pairs)
    ref = dict(whole.named_parameters(remove_duplicate=False))
    got: dict[str, torch.Tensor] = {}
    for s in sp.segments:
        got.update(dict(s.named_parameters(remove_duplicate=False)))
    assert set(got) == set(ref), "the segments must own every parameter under the model's names"
    for name, p in ref.items():
        if p.grad is None:
            assert got[name].grad is None or not got[name].grad.any(), name
            continue
        torch.testing.assert_close(got[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    for params in (whole.parameters(), {id(p): p for s in sp.segments for p in s.parameters()}.values()):
        torch.optim.SGD(list(params), lr=0.1).step()
    state = {k: v for s in sp.segments for k, v in s.state_dict().items()}
    ref_state = whole.state_dict()
    assert set(state) == set(ref_state)
    for k, v in ref_state.items():
        torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-6, msg=lambda m, n=k: f"{n}: {m}")
    return sp


def _bert(**kw: object) -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=200,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **kw,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg)


def _gpt2(tie: bool) -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=120,
        n_embd=32,
        n_layer=3,
        n_head=4,
        n_positions=64,
        use_cache=False,
        tie_word_embeddings=tie,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


TOKENS = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}


def _tokens(b: int, t: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t, dtype=torch.long)
    if b > 1:
        mask[1, t // 2 :] = 0  # a padded sequence: the mask must reach the server's layers
    return {"input_ids": torch.randint(0, vocab, (b, t), generator=g), "attention_mask": mask}


@pytest.mark.parametrize("cut", ["conv1", "conv2", "fc1", "conv1.0", "conv2.1"])
def test_cnn_every_cut_is_the_unsplit_step(cut: str) -> None:
    torch.manual_seed(0)
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    _check_step(build_model("cnn", seed=0), [cut], x, y, CE)


@pytest.mark.parametrize("cut", ["stem", "layer1", "layer2.conv1", "layer2.n2", "layer3"])
def test_resnet_with_batchnorm_and_a_skip_across_the_cut(cut: str) -> None:
    torch.manual_seed(0)
    x, y = torch.rand(4, 3, 16, 16), torch.randint(0, 10, (4,))
    sp = _check_step(build_model("resnet", input_shape=(3, 16, 16), seed=0), [cut], x, y, CE)
    if cut == "layer2.conv1":
        # inside a residual block: the block's input (its shortcut) travels beside conv1's output
        assert [c.name for c in sp.crossings] == ["layer1", "layer2.conv1"]
        assert all(c.grad for c in sp.crossings)


def test_bert_sends_its_attention_mask_and_matches_at_every_layer() -> None:
    model = _bert()
    x, y = _tokens(3, 10, 200), torch.tensor([0, 1, 2])
    for cut in ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.2"]:
        sp = _check_step(model, [cut], x, y, CE, dynamic=TOKENS, bounds={"seq": (2, 64)})
        kinds = {c.dtype: c for c in sp.crossings}
        hidden = kinds[torch.float32]
        assert hidden.name == cut and hidden.dims == ("seq", 32) and hidden.grad
        if cut != "bert.encoder.layer.2":  # after the last layer nothing needs the mask
            mask = kinds[torch.bool]
            assert mask.dims[-2:] == ("seq", "seq") and not mask.grad
        assert "input_ids" not in {c.name for c in sp.crossings}


def test_one_trace_serves_other_batch_sizes_and_lengths() -> None:
    model = _bert().eval()
    sp = graph_split(
        copy.deepcopy(model), "bert.encoder.layer.1", _tokens(3, 10, 200), dynamic=TOKENS, bounds={"seq": (2, 64)}
    )
    for s in sp.segments:
        s.eval()
    for b, t in [(1, 20), (5, 7), (2, 64)]:
        x = _tokens(b, t, 200, seed=b)
        pred, _ = _run_split(sp, x)
        torch.testing.assert_close(pred, model(**x).logits, rtol=1e-5, atol=1e-5)


def test_dropout_follows_the_segments_mode() -> None:
    model = _bert(classifier_dropout=0.5)
    sp = graph_split(model, "bert.encoder.layer.0", _tokens(4, 8, 200), dynamic=TOKENS, bounds={"seq": (2, 64)})
    x = _tokens(4, 8, 200)
    for s in sp.segments:
        s.train()
    a, _ = _run_split(sp, x)
    b, _ = _run_split(sp, x)
    assert not torch.equal(a, b), "training mode must drop out"
    for s in sp.segments:
        s.eval()
    a, _ = _run_split(sp, x)
    b, _ = _run_split(sp, x)
    assert torch.equal(a, b), "evaluation mode must not"


def test_regnet_from_transformers() -> None:
    cfg = transformers.RegNetConfig(
        num_channels=1,
        embedding_size=8,
        hidden_sizes=[8, 16, 24, 32],
        depths=[1, 1, 2, 1],
        groups_width=8,
        num_labels=10,
    )
    torch.manual_seed(0)
    model = transformers.RegNetForImageClassification(cfg)
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    for cut in ["regnet.embedder", "regnet.encoder.stages.1", "regnet.encoder.stages.2.layers.0.layer.1"]:
        _check_step(model, [cut], x, y, CE)


def test_gpt2_u_shaped_keeps_tied_embeddings_on_the_client() -> None:
    model = _gpt2(tie=True)
    x = _tokens(2, 12, 120)
    labels = torch.cat([x["input_ids"][:, 1:], torch.full((2, 1), tasks.IGNORE)], 1)
    sp = _check_step(
        model, ["transformer.h.0", "transformer.h.1"], x, labels, _lm_loss, dynamic=TOKENS, bounds={"seq": (2, 64)}
    )
    bottom, middle, top = (set(s.state_dict()) for s in sp.segments)
    assert {"transformer.wte.weight", "lm_head.weight"} <= bottom & top
    assert not any("wte" in n or "lm_head" in n for n in middle)


def test_gpt2_two_way_split_needs_untied_embeddings() -> None:
    x = _tokens(2, 12, 120)
    with pytest.raises(SplitError, match="tie_word_embeddings"):
        graph_split(_gpt2(tie=True), "transformer.h.1", x, dynamic=TOKENS, bounds={"seq": (2, 64)})
    labels = torch.cat([x["input_ids"][:, 1:], torch.full((2, 1), tasks.IGNORE)], 1)
    _check_step(_gpt2(tie=False), ["transformer.h.1"], x, labels, _lm_loss, dynamic=TOKENS, bounds={"seq": (2, 64)})


class _RawInputLate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) + self.c(x)


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > 0:  # data-dependent control flow: no single graph
            h = h * 2
        return self.b(h)


def test_errors_say_why_and_what_to_do() -> None:
    x = torch.rand(3, 4)
    with pytest.raises(SplitError, match="raw input 'x' would cross"):
        graph_split(_RawInputLate(), "a", x)
    with pytest.raises(SplitError, match="not a module.*near it: a"):
        graph_split(_RawInputLate(), "a.weight", x)
    with pytest.raises(SplitError, match="cannot be traced"):
        graph_split(_Branchy(), "a", x)
    with pytest.raises(SplitError, match="no computation"):
        graph_split(build_model("cnn"), "fc2", torch.rand(2, 1, 28, 28))
    with pytest.raises(SplitError, match="must come after"):
        graph_split(build_model("cnn"), ["conv2", "conv1"], torch.rand(2, 1, 28, 28))
    with pytest.raises(SplitError, match="no bounds"):
        graph_split(_bert(), "bert.encoder.layer.0", _tokens(2, 8, 200), dynamic=TOKENS)


def test_dp_sgd_refuses_a_traced_segment_with_the_reason() -> None:
    pytest.importorskip("opacus")
    from fsl.models import split_model
    from fsl.privacy.dp import validate_dp_module

    traced = split_model(build_model("cnn", norm="group"), "conv1.0", torch.rand(2, 1, 28, 28))
    (problem,) = validate_dp_module(traced.client)
    assert "per-sample gradients" in problem.why and "Sequential" in problem.fix
    assert validate_dp_module(split_model(build_model("cnn"), "conv1").client) == []


def test_a_cached_trace_splits_another_instance_of_the_same_model() -> None:
    x = torch.rand(3, 1, 28, 28)
    first = graph_split(build_model("cnn", seed=0), "conv1.0", x, cache_key="cnn-test")
    other = build_model("cnn", seed=1)
    again = graph_split(other, "conv1.0", x, cache_key="cnn-test")
    assert dict(again.segments[0].named_parameters())["conv1.0.weight"] is other.conv1[0].weight  # its own
    for s in (*first.segments, *again.segments):
        s.eval()
    pred, _ = _run_split(again, x)
    torch.testing.assert_close(pred, other.eval()(x))
    assert not torch.allclose(pred, _run_split(first, x)[0])
