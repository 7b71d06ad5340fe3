"""Token recovery from split MiniLM's hidden states, and what the cut's attention mask must survive.

The MiniLM test uses the framework's own split at ``bert.embeddings``: the client segment sends the
embeddings' hidden state and the additive attention mask (B, 1, T, T), float32 with -3.4e38 where a
position is padding. The fast tests trace a tiny model that sends the same kind of mask.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attacks.token_recovery import (
    EmbeddingInversion,
    LearnedInverter,
    hidden_name,
    observe,
    padded,
    segment_outputs,
    token_accuracy,
)
from clients.trainer import TrainHooks, TrainOptions, hidden_names, released, train_segment
from fsl.channel import InMemoryChannel
from fsl.config import load_experiment
from fsl.experiment import build_model_for, split_for
from fsl.graphsplit import graph_split
from fsl.privacy.activation import ActivationNoise
from fsl.privacy.nopeek import NoPeek, distance_correlation
from fsl.textdata import tokenize
from fsl.wire import codec
from fsl.wire.compress import WireFormat
from server.split_server import SplitServerState

LENGTH = 16
TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "split learning sends hidden states to a server",
    "a penny saved is a penny earned",
    "unix is simple, but it takes a genius to understand the simplicity",
    "short",
]
F32_MIN = torch.finfo(torch.float32).min


class Tiny(nn.Module):
    """Token embeddings, one attention with BERT's additive mask, a pooled head: split after ``embed``
    the client sends the embeddings and the mask (B, 1, T), float32 minimum at padding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.key = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)  # (B, T, 8)
        add = (1.0 - attention_mask[:, None, :].float()) * F32_MIN  # (B, 1, T)
        scores = h @ self.key(h).transpose(1, 2) + add  # (B, T, T)
        return self.head((scores.softmax(-1) @ h).mean(1))  # (B, 5)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    ids = torch.zeros(2, LENGTH, dtype=torch.long)
    seq = {1: "seq"}
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return graph_split(
        Tiny(), "embed", example, dynamic={"input_ids": seq, "attention_mask": seq}, bounds={"seq": (2, LENGTH)}
    )


@pytest.fixture(scope="module")
def tiny_texts():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (6, LENGTH), generator=g)
    mask = (torch.arange(LENGTH)[None, :] < torch.tensor([[16], [12], [9], [5], [3], [14]])).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


@pytest.fixture(scope="module")
def split():
    cfg = load_experiment("any-model-minilm", [f"data.options.max_length={LENGTH}", "model.cut='bert.embeddings'"])
    return split_for(cfg, build_model_for(cfg, (LENGTH,), 5), (LENGTH,))


@pytest.fixture(scope="module")
def texts():
    return tokenize(TEXTS, LENGTH)


def _noise(outputs, name, sigma):
    clip = float(torch.cat([o[name].flatten(1).norm(dim=1) for o in outputs]).median())
    return ActivationNoise("gaussian", clip_norm=clip, noise_multiplier=sigma, seed=0)


@pytest.mark.slow
def test_nearest_neighbour_reads_every_token_at_the_embeddings_cut_until_the_noise_is_large(split, texts):
    client = split.client
    name = hidden_name(client)
    assert name == "bert.embeddings" and len(split.graph.signature(1).names) == 2  # the mask is not hidden
    outputs = segment_outputs(client, texts)
    attack = EmbeddingInversion(client, name, LENGTH, 30522)
    ids, mask = texts["input_ids"], texts["attention_mask"]

    def accuracy(release=None, wire=torch.float32):
        got = observe(outputs, split.graph.signature(1), hidden=hidden_names(client), release=release, wire_dtype=wire)
        return token_accuracy(attack.predict(padded(got, name, LENGTH)), ids, mask)

    assert accuracy() == 1.0
    assert accuracy(wire=torch.float16) == 1.0  # the server accepts the float16 mask, and rounding hides nothing
    assert accuracy(wire=WireFormat("int8")) >= 0.95
    assert accuracy(_noise(outputs, name, 3.0)) < 0.2  # noise far above the signal: near chance over 30,522 tokens


def test_release_leaves_the_attention_mask_exact(tiny, tiny_texts):
    client = tiny.segments[0]
    h = segment_outputs(client, tiny_texts)[0]
    name = hidden_name(client)
    assert name == "embed"
    mask_name = next(n for n in h if n != name)
    assert float(h[mask_name].min()) == F32_MIN  # padding is masked with float32's minimum
    sent = released(h, _noise([h], name, 0.5), hidden_names(client))
    assert torch.equal(sent[mask_name], h[mask_name])  # clipping it would zero it: its norm overflows
    assert not torch.equal(sent[name], h[name])


@pytest.mark.parametrize("wire", [torch.float16, torch.bfloat16, WireFormat("int8"), WireFormat("float16", 0.5)])
def test_wire_formats_keep_an_attention_mask_finite(wire):
    mask = torch.zeros(2, 1, 3, 3)
    mask[0, ..., 2] = F32_MIN  # the last position of the first text is padding
    got = codec.decode(codec.encode(mask, wire)).float()
    assert codec.all_finite(got)  # an infinity would make the split server refuse the request
    assert torch.equal(got == 0, mask == 0)
    assert float(got[0, 0, 0, 2]) <= -3e38
    # a real infinity still arrives as one
    if not isinstance(wire, WireFormat):
        assert not codec.all_finite(codec.decode(codec.encode(torch.tensor([float("inf"), 1.0]), wire)))


def test_split_training_with_noise_and_nopeek_on_a_traced_token_segment(tiny, tiny_texts):
    """One step of the real trainer: NoPeek reads the token ids and the hidden state (not the mask),
    the noise goes on the hidden state only, and the server receives the mask as the client made it."""
    client, server = tiny.segments
    texts = tiny_texts
    state = SplitServerState(
        server, sample_shape=(), num_classes=5, lr=0.1, momentum=0.0, device="cpu", signature=tiny.signature(1)
    )
    seen = []
    state.observer = lambda header, h, y: seen.append(h)
    name = hidden_name(client)
    hooks = TrainHooks(penalty=NoPeek(3.0), release=_noise(segment_outputs(client, texts), name, 0.1))
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    before = client.embed.weight.detach().clone()
    stats = train_segment(client, texts, y, InMemoryChannel(server=state), TrainOptions(batch_size=8, lr=0.1), hooks)
    assert torch.isfinite(torch.tensor(stats.loss))
    assert torch.isfinite(client.embed.weight).all() and not torch.equal(client.embed.weight, before)
    (got,) = seen
    mask_name = next(n for n in got if n != name)
    clean = segment_outputs(client, texts, batch_size=8)[0]
    received = got[mask_name]
    assert received.shape == clean[mask_name].shape
    assert bool(((received == 0) | (received == F32_MIN)).all())  # no noise, no clipping to zero
    # the batch was shuffled: each text's count of masked positions, in any order
    counts = lambda m: sorted((m == F32_MIN).flatten(1).sum(1).tolist())  # noqa: E731
    assert counts(received) == counts(clean[mask_name]) and counts(received)[-1] > 0


def test_distance_correlation_of_token_ids_is_that_of_their_one_hot_encoding():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 3, (64, 6), generator=g)  # few symbols: the texts' distances vary
    one_hot = torch.nn.functional.one_hot(ids, 3).float()  # (64, 6, 3)
    for h in (one_hot, torch.randn(64, 8, generator=g)):
        assert abs(float(distance_correlation(ids, h)) - float(distance_correlation(one_hot, h))) < 1e-4
    assert float(distance_correlation({"input_ids": ids}, one_hot)) > 0.999
    dependent = float(distance_correlation(ids, one_hot[:, :3].flatten(1) + 0.3 * torch.randn(64, 9, generator=g)))
    independent = float(distance_correlation(ids, torch.randn(64, 9, generator=g)))
    assert dependent > independent + 0.2


def test_learned_inverter_reads_tokens_it_never_trained_on_through_a_nonlinear_mixing():
    """States ``tanh(E[token] @ R)`` of a vocabulary of 500: trained on tokens 0-399 only, the
    inverter decodes over the whole codebook and still reads tokens 400-499."""
    g = torch.Generator().manual_seed(0)
    book = torch.randn(500, 32, generator=g)
    mix = torch.linalg.qr(torch.randn(32, 32, generator=g))[0] * 2.0

    def states(ids):
        return torch.tanh(book[ids] @ mix)[:, None, :] + 0.01 * torch.randn(len(ids), 1, 32, generator=g)

    train = torch.randint(0, 400, (4000,), generator=g)
    inverter = LearnedInverter(book, hidden_units=128, epochs=3, batch_size=256, negatives=256, seed=0)
    inverter.fit(states(train), train[:, None], torch.ones(4000, 1, dtype=torch.bool))
    unseen = torch.arange(400, 500)
    seen = torch.arange(0, 100)
    ones = torch.ones(100, 1, dtype=torch.long)
    assert token_accuracy(inverter.predict(states(seen)), seen[:, None], ones, special=()) > 0.9
    assert token_accuracy(inverter.predict(states(unseen)), unseen[:, None], ones, special=()) > 0.8
