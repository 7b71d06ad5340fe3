"""A multi-exit transformer split by its graph: each exit runs, and is trained, on the side that runs
its block, and nothing about the exits crosses the cut.

A tiny random-init BERT built from its config (nothing is downloaded), dropout off so that a
training-mode step is deterministic. The oracle: one split step (the server's loss is the final loss
plus its exits' losses; the client adds its exits' losses to the backward of the gradients it gets
back) gives the unsplit multi-exit model's loss, gradients and updated weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from clients.trainer import TrainOptions, train_segment, train_segment_u
from fsl.channel import InMemoryChannel
from fsl.config import ConfigError, ExperimentConfig, from_dict
from fsl.exits import (
    ExitBlock,
    add_exits_at,
    all_exit_logits,
    exit_logits,
    exit_loss,
    exit_names,
    exit_points,
)
from fsl.experiment import build_model_for, exit_paths, server_side, usplit_for
from fsl.graphsplit import GraphSplit, graph_split
from fsl.models import build_module, run_model
from helpers import padded_tokens
from server.state import SplitServerState

pytest.importorskip("transformers")

CLASSES, T, W = 3, 10, 0.5
TINY = {
    "hidden_size": 32,
    "num_layers": 4,
    "num_heads": 2,
    "max_length": 16,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
EXITS = ("bert.encoder.layer.0", "bert.encoder.layer.2")
DYN = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}
BOUNDS = {"seq": (2, 16)}


def _tokens(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return padded_tokens(n, T, seed)


def _plain() -> nn.Module:
    return build_module("bert", num_classes=CLASSES, seed=0, options=TINY).train()


def _multi() -> nn.Module:
    return add_exits_at(_plain(), EXITS, CLASSES, _tokens(2), seed=0).train()


def _split(model: nn.Module, cut: str, **kw: object) -> GraphSplit:
    sp = graph_split(model, cut, _tokens(2), dynamic=DYN, bounds=BOUNDS, **kw)  # type: ignore[arg-type]
    for s in sp.segments:
        s.train()
    return sp


def _close(got: dict, ref: dict, what: str) -> None:
    assert set(got) == set(ref), what
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=2e-4, atol=2e-6, msg=lambda m, k=k: f"{what} {k}: {m}")


def _reference_step(model: nn.Module, x: dict, y: torch.Tensor, lr: float = 0.1):
    """The unsplit multi-exit model's SGD step on the final loss plus ``W`` times every exit's."""
    whole = copy.deepcopy(model).train()
    loss = nn.functional.cross_entropy(run_model(whole, x), y) + exit_loss(whole, y, W)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in whole.named_parameters() if p.grad is not None}
    torch.optim.SGD(whole.parameters(), lr=lr).step()
    return float(loss.detach()), grads, whole.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("cut", ["bert.encoder.layer.0", "bert.encoder.layer.1"])
def test_a_split_step_with_exits_on_both_sides_is_the_unsplit_step(cut: str) -> None:
    model = _multi()
    x, y = _tokens(6, seed=1), torch.tensor([0, 1, 2, 0, 1, 2])
    ref_loss, ref_grads, ref_state = _reference_step(model, x, y)

    sp = _split(copy.deepcopy(model), cut)
    client, server = sp.segments
    # an exit at the cut runs on the client; the deeper one only on the server, with its head
    assert exit_names(client) == ["bert.encoder.layer.0"] and exit_names(server) == ["bert.encoder.layer.2"]
    assert "bert.encoder.layer.0.head.classifier.weight" in client.state_dict()
    assert not any(".head." in k for k in client.state_dict() if k.startswith("bert.encoder.layer.2"))
    assert "bert.encoder.layer.2.head.classifier.weight" in server.state_dict()

    h = client(x)  # the crossing values, and nothing else
    assert set(h) == {c.name for c in sp.crossings}
    sent = {c.name: h[c.name].detach().requires_grad_(c.grad) for c in sp.crossings}
    server_loss = nn.functional.cross_entropy(server(sent), y) + exit_loss(server, y, W)
    server_loss.backward()
    client_loss = exit_loss(client, y, W)
    assert client_loss is not None
    back = [c.name for c in sp.crossings if c.grad]
    torch.autograd.backward([*(h[k] for k in back), client_loss], [*(sent[k].grad for k in back), torch.ones(())])
    assert abs(float(server_loss.detach() + client_loss.detach()) - ref_loss) < 1e-4

    grads = {n: p.grad for s in sp.segments for n, p in s.named_parameters() if p.grad is not None}
    _close(grads, ref_grads, f"at {cut}: gradient of")
    for s in sp.segments:
        torch.optim.SGD(s.parameters(), lr=0.1).step()
    _close({k: v for s in sp.segments for k, v in s.state_dict().items()}, ref_state, f"at {cut}:")


@pytest.mark.slow
def test_exits_change_nothing_that_travels_and_stay_out_of_copies() -> None:
    cut = "bert.encoder.layer.1"
    plain = _split(_plain(), cut, cache_key="tiny-bert")
    # the same cache key: a model with exits must not reuse the trace of the model without them
    multi_model = _multi()
    sp = _split(multi_model, cut, cache_key="tiny-bert")
    assert [s.exits for s in sp.segments] == [("bert.encoder.layer.0",), ("bert.encoder.layer.2",)]
    assert [s.exits for s in plain.segments] == [(), ()]
    assert sp.signature(1) == plain.signature(1)  # the wire is as without exits
    assert sp.crossings == plain.crossings

    x = _tokens(5, seed=2)
    client, server = sp.segments
    client.eval(), server.eval()
    with torch.no_grad():
        h = client(x)
        pred = server(h)
    ref = all_exit_logits(multi_model, x)  # the unsplit model in evaluation mode
    got = {**exit_logits(client), **exit_logits(server), "final": pred}
    assert set(got) == set(ref)
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)

    assert exit_logits(client)
    twin = copy.deepcopy(client)  # a replica or a checkpoint never carries the last batch's logits
    assert exit_logits(twin) == {} and exit_names(twin) == ["bert.encoder.layer.0"]
    with torch.no_grad():
        twin(x)
    torch.testing.assert_close(exit_logits(twin), exit_logits(client))
    assert not any(isinstance(m, ExitBlock) for s in sp.segments for m in s.modules())


@pytest.mark.slow
def test_config_exits_train_on_both_sides_through_the_split_server() -> None:
    cfg = from_dict(
        ExperimentConfig,
        {"model": {"name": "bert", "cut": "bert.encoder.layer.1", "exits": True, "exit_weight": W, "options": TINY}},
    )
    assert exit_paths(cfg) == (
        "bert.embeddings",
        "bert.encoder.layer.0",
        "bert.encoder.layer.1",
        "bert.encoder.layer.2",
    )
    model = build_model_for(cfg, (T,), CLASSES).train()
    assert exit_names(model) == list(exit_paths(cfg))[1:]  # the embeddings get no attention mask: no exit
    x, y = _tokens(6, seed=3), torch.tensor([2, 1, 0, 2, 1, 0])
    _, _, ref_state = _reference_step(model, x, y)

    client, side = server_side(cfg, model, (T,))
    assert exit_names(client) == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    assert exit_names(side.segment) == ["bert.encoder.layer.2"]
    plain = from_dict(ExperimentConfig, {"model": {"name": "bert", "cut": "bert.encoder.layer.1", "options": TINY}})
    assert side.signature == server_side(plain, build_model_for(plain, (T,), CLASSES), (T,))[1].signature
    state = SplitServerState(
        side.segment,
        sample_shape=side.sample_shape,
        signature=side.signature,
        task=side.task,
        num_classes=CLASSES,
        lr=0.1,
        momentum=0.0,
        device="cpu",
        exit_weight=W,
    )
    heads = {k: v.clone() for k, v in {**client.state_dict(), **state.segment.state_dict()}.items() if ".head." in k}
    assert {k.split(".head.")[0] for k in heads} == set(exit_names(model))
    options = TrainOptions(epochs=1, batch_size=len(y), lr=0.1, momentum=0.0, exit_weight=W)
    train_segment(client, x, y, InMemoryChannel(server=state), options)

    after = {**client.state_dict(), **state.segment.state_dict()}
    for k, v in heads.items():  # every exit head learned, the client's from its own loss, the server's from its
        assert not torch.equal(after[k], v), k
    _close(after, ref_state, "config-built split step:")


@pytest.mark.slow
def test_a_u_shaped_split_trains_the_exits_beside_the_labels() -> None:
    """U-shaped, the labels stay on the client: the bottom's exit learns there (through the graph's
    named tensors), the middle's exits get no loss on a server without labels."""
    cfg = from_dict(
        ExperimentConfig,
        {
            "mode": "ushaped",
            "model": {
                "name": "bert",
                "cut": "bert.encoder.layer.0",
                "top_cut": "bert.encoder.layer.2",
                "ushaped": True,
                "exits": True,
                "exit_weight": W,
                "options": TINY,
            },
        },
    )
    model = build_model_for(cfg, (T,), CLASSES).train()
    x, y = _tokens(6, seed=4), torch.tensor([1, 2, 0, 1, 2, 0])
    whole = copy.deepcopy(model)
    final = run_model(whole, x)
    loss = nn.functional.cross_entropy(final, y) + W * nn.functional.cross_entropy(
        exit_logits(whole)["bert.encoder.layer.0"], y
    )
    loss.backward()
    torch.optim.SGD(whole.parameters(), lr=0.1).step()

    u = usplit_for(cfg, model, (T,))
    assert u.graph is not None
    assert [exit_names(m) for m in (u.bottom, u.middle, u.top)] == [
        ["bert.encoder.layer.0"],
        ["bert.encoder.layer.1", "bert.encoder.layer.2"],
        [],
    ]
    state = SplitServerState(
        u.middle, (), CLASSES, signature=u.graph.signature(1), lr=0.1, momentum=0.0, device="cpu", ushaped=True
    )
    middle_heads = {k: v.clone() for k, v in u.middle.state_dict().items() if ".head." in k}
    options = TrainOptions(epochs=1, batch_size=len(y), lr=0.1, momentum=0.0, exit_weight=W)
    train_segment_u(u.bottom, u.top, x, y, InMemoryChannel(server=state), options)
    for k, v in middle_heads.items():
        assert torch.equal(u.middle.state_dict()[k], v), k
    after = {**u.bottom.state_dict(), **u.middle.state_dict(), **u.top.state_dict()}
    _close(after, whole.state_dict(), "U-shaped step:")


def test_an_exit_must_see_which_tokens_are_real() -> None:
    # a transformer's embeddings are not given the attention mask: an exit there would average padding
    assert exit_points(_plain(), ("bert.embeddings", "bert.encoder.layer.0"), _tokens(2)) == ("bert.encoder.layer.0",)
    with pytest.raises(ValueError, match="not given the attention mask"):
        add_exits_at(_plain(), ("bert.embeddings",), CLASSES, _tokens(2))
    with pytest.raises(ConfigError, match="classification model"):
        from_dict(ExperimentConfig, {"model": {"name": "gpt2", "exits": True}})


def test_an_image_model_with_batch_norm_keeps_its_exits_on_their_sides() -> None:
    """RegNet (a Hugging Face image model, batch norm in training mode): the exits' conv heads run
    beside their stages, and a step's gradients and running statistics are the unsplit model's."""
    cfg = from_dict(ExperimentConfig, {"model": {"name": "regnet", "cut": "regnet.encoder.stages.0", "exits": True}})
    model = build_model_for(cfg, (1, 28, 28), 10).train()
    x, y = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(5)), torch.tensor([0, 1, 2, 3])
    whole = copy.deepcopy(model)
    loss = nn.functional.cross_entropy(run_model(whole, x), y) + exit_loss(whole, y, W)
    loss.backward()

    client, side = server_side(cfg, model, (1, 28, 28))
    assert exit_names(client) == ["regnet.embedder", "regnet.encoder.stages.0"]
    assert exit_names(side.segment) == ["regnet.encoder.stages.1"]
    assert side.signature is not None and [t.name for t in side.signature.tensors] == ["regnet.encoder.stages.0"]
    client.train(), side.segment.train()
    h = client(x)
    sent = {k: v.detach().requires_grad_(True) for k, v in h.items()}
    server_loss = nn.functional.cross_entropy(side.segment(sent), y) + exit_loss(side.segment, y, W)
    server_loss.backward()
    client_loss = exit_loss(client, y, W)
    assert client_loss is not None
    torch.autograd.backward([*h.values(), client_loss], [*(sent[k].grad for k in h), torch.ones(())])
    assert abs(float(server_loss.detach() + client_loss.detach()) - float(loss.detach())) < 1e-4
    grads = {n: p.grad for s in (client, side.segment) for n, p in s.named_parameters() if p.grad is not None}
    _close(grads, {n: p.grad for n, p in whole.named_parameters() if p.grad is not None}, "regnet: gradient of")
    _close({**client.state_dict(), **side.segment.state_dict()}, whole.state_dict(), "regnet after the forward:")


class _Layer(nn.Module):
    """A token layer that is handed the attention mask and ignores it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.relu(self.lin(h))


class _Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.layers = nn.ModuleList([_Layer(), _Layer()])
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        for layer in self.layers:
            h = layer(h, attention_mask)
        return self.fc(h[:, 0])


def test_an_exit_that_would_make_a_raw_input_cross_is_refused() -> None:
    """Only the exit after the second layer reads the mask there: the server would need the raw mask,
    which never crosses. The exit after the first layer reads it on the client, beside the inputs."""
    x = {"input_ids": torch.randint(0, 50, (3, 6)), "attention_mask": torch.ones(3, 6, dtype=torch.int64)}
    x["attention_mask"][0, 4:] = 0
    kw = {"dynamic": {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}, "bounds": {"seq": (2, 8)}}
    torch.manual_seed(0)
    plain = graph_split(_Tokens(), "layers.0", x, **kw)
    assert [c.name for c in plain.crossings] == ["layers.0"]  # without exits, the mask stays home
    client_exit = graph_split(add_exits_at(_Tokens(), ("layers.0",), CLASSES, x), "layers.0", x, **kw)
    assert client_exit.crossings == plain.crossings and client_exit.segments[0].exits == ("layers.0",)
    deep = add_exits_at(_Tokens(), ("layers.1",), CLASSES, x)
    with pytest.raises(ValueError, match=r"exit 'layers\.1' \(segment 1\) would need 'attention_mask'"):
        graph_split(deep, "layers.0", x, **kw)


@pytest.mark.slow
def test_a_text_client_answers_at_its_exit_when_sure_and_sends_only_the_rest() -> None:
    """Device-side early exit with a graph-split client: rows whose deepest client exit is sure enough
    are answered on the device (its exit's logits), the others by the server (the model's final
    logits), and only those others travel."""
    from clients.predictor import SplitPredictor

    cfg = from_dict(
        ExperimentConfig,
        {"model": {"name": "bert", "cut": "bert.encoder.layer.1", "exits": True, "options": TINY}},
    )
    model = build_model_for(cfg, (T,), CLASSES).eval()
    x = _tokens(8, seed=4)
    ref = all_exit_logits(model, x)  # the unsplit model: every exit's logits and the final ones
    client, side = server_side(cfg, model, (T,))
    state = SplitServerState(
        side.segment, sample_shape=side.sample_shape, signature=side.signature, task=side.task, num_classes=CLASSES
    )

    def predict(threshold: float) -> tuple[torch.Tensor, torch.Tensor, InMemoryChannel]:
        channel = InMemoryChannel(server=state)
        p = SplitPredictor(client, channel, exit_threshold=threshold).predict(x)
        return p.logits, p.exited, channel

    device = ref["bert.encoder.layer.1"]  # the exit at the cut: the client's deepest
    sure = torch.softmax(device, 1).amax(1)
    logits, exited, channel = predict(0.0)  # every row sure enough: nothing travels
    assert exited.all() and channel.requests == 0
    torch.testing.assert_close(logits, device, rtol=1e-4, atol=1e-5)
    logits, exited, channel = predict(1.01)  # no row: all go to the server
    assert not exited.any() and channel.requests == 1
    torch.testing.assert_close(logits, ref["final"], rtol=1e-4, atol=1e-5)
    all_bytes = channel.bytes_up
    cut = float(sure.median())
    logits, exited, channel = predict(cut)
    assert torch.equal(exited, sure >= cut) and 0 < int(exited.sum()) < len(sure)
    torch.testing.assert_close(logits[exited], device[exited], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[~exited], ref["final"][~exited], rtol=1e-4, atol=1e-5)
    assert channel.requests == 1 and channel.bytes_up < all_bytes  # only the unsure rows' values went up
