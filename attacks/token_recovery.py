"""Token recovery from the hidden states a split transformer sends: which tokens the server reads back.

Two attacks on the hidden states ``(N, T, D)`` at a cut of a token model (all-MiniLM-L6-v2 or any
BERT-like model split by :mod:`fsl.graphsplit`), both scored by :func:`token_accuracy`:

* :class:`EmbeddingInversion` — at a cut before any token mixing (the embeddings: word plus
  position embedding, then LayerNorm), the state at position ``t`` is a function of the token at
  ``t`` and of ``t`` alone. The attacker knows the client segment (the pretrained weights are public;
  in federated split learning the server also aggregates the segment), runs it once on every token
  of the vocabulary at every position and answers each received state with the nearest candidate
  (cosine, so a clipped and rescaled state still finds its token).
* :class:`LearnedInverter` — deeper, every state mixes the whole sequence. The attacker runs the
  client segment, with the defense it knows the client applies, on public texts of its own and
  trains a map from one state to the model's word-embedding space; decoding takes the nearest word
  embedding over the whole vocabulary, so tokens that the public texts never hold can still be read.

What the server receives is produced by the framework's own code (:func:`observe`): the client
segment's outputs go through :func:`clients.trainer.released` (the activation-noise release, applied
to the hidden states only) and a real :class:`fsl.channel.InMemoryChannel` in the wire format of the
run (float16, bfloat16, int8) to a :class:`server.split_server.SplitServerState`, whose segment is a
:class:`ServerTap` that keeps what the validated, decoded request held.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from clients.trainer import hidden_names, released
from fsl.channel import ChannelIdentity, InMemoryChannel
from fsl.cutvalues import Activations, Signature, as_dict
from fsl.data import take, trim_padding
from server.split_server import SplitServerState

__all__ = [
    "SPECIAL_TOKENS",
    "EmbeddingInversion",
    "LearnedInverter",
    "ServerTap",
    "observe",
    "padded",
    "segment_outputs",
    "token_accuracy",
]

SPECIAL_TOKENS = (101, 102)  # [CLS] and [SEP] of the MiniLM (BERT uncased) vocabulary; [PAD] is 0
Release = Callable[[torch.Tensor], torch.Tensor]


class ServerTap(nn.Module):
    """A server segment that keeps every input it is called with and answers constant logits.

    Behind a :class:`~server.split_server.SplitServerState` it sees exactly what the split server's
    segment would: the request decoded, checked against the cut's signature and found finite.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        # the server's optimizer needs a parameter to hold; inference never changes it
        self.logits = nn.Parameter(torch.zeros(num_classes))
        self.seen: list[dict[str, torch.Tensor]] = []

    def forward(self, x: Activations) -> torch.Tensor:
        d = as_dict(x)
        self.seen.append({n: t.detach().clone() for n, t in d.items()})
        batch = next(iter(d.values())).shape[0]
        return self.logits.expand(batch, -1)


@torch.no_grad()
def segment_outputs(client: nn.Module, x: dict[str, torch.Tensor], batch_size: int = 64) -> list[Activations]:
    """The client segment (eval mode) on ``x`` in batches as split inference sends them: each batch
    cut to its longest text (:func:`fsl.data.trim_padding`)."""
    was = client.training
    client.eval()
    try:
        n = len(next(iter(x.values())))
        out = []
        for i in range(0, n, batch_size):
            xb, _ = trim_padding(take(x, torch.arange(i, min(n, i + batch_size))), torch.zeros(0))
            out.append(client(xb))
        return out
    finally:
        client.train(was)


def observe(
    outputs: Sequence[Activations],
    signature: Signature,
    *,
    hidden: tuple[str, ...] | None,
    release: Release | None = None,
    wire_dtype: Any = torch.float32,
    num_classes: int = 2,
) -> list[dict[str, torch.Tensor]]:
    """What the split server receives for each batch of client-segment ``outputs``.

    Each batch goes through :func:`clients.trainer.released` with ``release`` (applied to the tensors
    named in ``hidden``: :func:`clients.trainer.hidden_names` of the segment) and an in-memory data
    plane in ``wire_dtype`` (a float dtype or a :class:`fsl.wire.compress.WireFormat`, as
    :func:`fsl.privacy.client.wire_dtype_for` gives it) to a split server that checks it against
    ``signature``. Returns the tensors the server segment was called with, in float32.
    """
    tap = ServerTap(num_classes)
    state = SplitServerState(tap, sample_shape=(), num_classes=num_classes, device="cpu", signature=signature)
    tap.seen.clear()  # the server may probe its segment with an example when it starts
    channel = InMemoryChannel(
        server=state, identity=ChannelIdentity(run_id="token-recovery", round=1, client_id="0"), wire_dtype=wire_dtype
    )
    for h in outputs:
        channel.infer(released(h, release, hidden))
    return [{n: t.float() for n, t in d.items()} for d in tap.seen]


def padded(batches: Sequence[dict[str, torch.Tensor]], name: str, length: int) -> torch.Tensor:
    """Tensor ``name`` of every batch, ``(B_i, T_i, D)``, stacked to ``(N, length, D)``: zeros past a
    batch's own length."""
    parts = []
    for b in batches:
        t = b[name]
        parts.append(functional.pad(t, (0, 0, 0, length - t.shape[1])))
    return torch.cat(parts)


def token_accuracy(
    predicted: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor, special: Sequence[int] = SPECIAL_TOKENS
) -> float:
    """Share of the texts' tokens recovered exactly: padding and the ``special`` tokens ([CLS], [SEP],
    which sit at known places in every text) are not counted."""
    count = attention_mask.bool() & ~torch.isin(ids, torch.tensor(list(special), dtype=ids.dtype))
    total = int(count.sum())
    if total == 0:
        raise ValueError("no text tokens to score")
    return float((predicted[count] == ids[count]).float().sum()) / total


def _nearest(queries: torch.Tensor, codebook: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Index of the codebook row (V, D) nearest in cosine to each query (M, D)."""
    book = functional.normalize(codebook, dim=1)
    out = [(functional.normalize(q, dim=1) @ book.T).argmax(1) for q in queries.split(chunk)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


@dataclass
class EmbeddingInversion:
    """Nearest-neighbour inversion of the states at an embeddings cut through the client segment.

    ``client`` is the segment (its own weights: the attacker holds them), ``name`` the hidden state
    among its outputs, ``length`` the longest sequence to invert, ``vocab_size`` the token ids to try.
    """

    client: nn.Module
    name: str
    length: int
    vocab_size: int
    chunk: int = 1024
    _candidates: list[torch.Tensor] = field(default_factory=list, init=False, repr=False)

    @torch.no_grad()
    def candidates(self) -> torch.Tensor:
        """(T, V, D) unit-norm state of every token at every position: a row of ``length`` copies
        of token ``v`` gives ``v`` at every position at once (no position sees another token first)."""
        if not self._candidates:
            was = self.client.training
            self.client.eval()
            try:
                parts = []
                for start in range(0, self.vocab_size, self.chunk):
                    v = torch.arange(start, min(self.vocab_size, start + self.chunk))
                    ids = v[:, None].expand(-1, self.length).contiguous()  # (chunk, T)
                    h = as_dict(self.client({"input_ids": ids, "attention_mask": torch.ones_like(ids)}))[self.name]
                    parts.append(functional.normalize(h.float(), dim=-1).transpose(0, 1))  # (T, chunk, D)
            finally:
                self.client.train(was)
            self._candidates.append(torch.cat(parts, 1))
        return self._candidates[0]

    @torch.no_grad()
    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, T) token ids for the received states ``hidden`` (N, T, D), ``T <= length``."""
        n, t, _ = hidden.shape
        if t > self.length:
            raise ValueError(f"states of length {t}, but the candidates cover {self.length} positions")
        cand = self.candidates()[:t]  # (T, V, D)
        q = functional.normalize(hidden.float(), dim=-1).transpose(0, 1)  # (T, N, D)
        best = torch.full((t, n), -2.0)
        arg = torch.zeros((t, n), dtype=torch.long)
        for start in range(0, cand.shape[1], self.chunk):
            sims = torch.bmm(q, cand[:, start : start + self.chunk].transpose(1, 2))  # (T, N, chunk)
            val, idx = sims.max(-1)
            better = val > best
            best = torch.where(better, val, best)
            arg = torch.where(better, idx + start, arg)
        return arg.T.contiguous()


@dataclass
class LearnedInverter:
    """A map from one hidden state to the word-embedding space, trained on public texts.

    ``codebook`` (V, D') is the model's word-embedding table (public with the pretrained weights):
    the map's targets, and at decoding the whole vocabulary to choose from. The map is a linear
    part, started at the ridge-regression solution onto the unit-norm targets, plus an MLP with
    ``hidden_units``; it is trained with a softmax over cosine similarities to the batch's tokens
    and ``negatives`` random other tokens, for ``epochs`` passes over the public tokens.
    """

    codebook: torch.Tensor
    hidden_units: int = 512
    epochs: int = 1
    batch_size: int = 512
    negatives: int = 1024
    lr: float = 1e-3
    ridge: float = 1.0
    seed: int = 0
    _net: nn.Module | None = field(default=None, init=False, repr=False)
    _stats: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False)

    def _features(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self._stats is not None
        mu, sd = self._stats
        return (hidden.reshape(-1, hidden.shape[-1]).float() - mu) / sd

    def fit(self, hidden: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor) -> LearnedInverter:
        """Train on the states ``hidden`` (N, T, D) of public texts ``ids`` (N, T) at positions ``keep``."""
        gen = torch.Generator().manual_seed(self.seed)
        x = hidden[keep.bool()].float()  # (M, D)
        y = ids[keep.bool()]
        self._stats = (x.mean(0), x.std(0).clamp_min(1e-6))
        x = (x - self._stats[0]) / self._stats[1]
        book = functional.normalize(self.codebook.float(), dim=1)  # (V, D')
        d, d_out = x.shape[1], book.shape[1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            linear = nn.Linear(d, d_out)
            last = nn.Linear(self.hidden_units, d_out)
            mlp = nn.Sequential(nn.Linear(d, self.hidden_units), nn.GELU(), last)
        a = torch.cat([x, torch.ones(len(x), 1)], 1)  # ridge regression of the targets, the bias included
        w = torch.linalg.solve(a.T @ a + self.ridge * torch.eye(d + 1), a.T @ book[y])  # (D + 1, D')
        with torch.no_grad():
            linear.weight.copy_(w[:-1].T)
            linear.bias.copy_(w[-1])
            nn.init.zeros_(last.weight)  # the MLP starts as no change to the ridge map
            nn.init.zeros_(last.bias)
        scale = nn.Parameter(torch.tensor(20.0))
        params = [*linear.parameters(), *mlp.parameters(), scale]
        opt = torch.optim.Adam(params, lr=self.lr)
        for _ in range(self.epochs):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), self.batch_size):
                b = order[i : i + self.batch_size]
                noise = torch.randint(0, len(book), (self.negatives,), generator=gen)
                cand = torch.unique(torch.cat([y[b], noise]))  # sorted: targets found by search
                z = functional.normalize(linear(x[b]) + mlp(x[b]), dim=1)
                loss = functional.cross_entropy(scale * z @ book[cand].T, torch.searchsorted(cand, y[b]))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        self._net = _Sum(linear, mlp).eval()
        return self

    @torch.no_grad()
    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, T) token ids for the states ``hidden`` (N, T, D), each the nearest word embedding."""
        if self._net is None:
            raise RuntimeError("LearnedInverter.predict before fit")
        z = self._net(self._features(hidden))
        return _nearest(z, self.codebook.float()).reshape(hidden.shape[:2])


class _Sum(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.a(x) + self.b(x)
        return out


def hidden_name(client: nn.Module) -> str:
    """The one hidden state a traced client segment sends (its ``hidden``)."""
    names = hidden_names(client)
    if not names or len(names) != 1:
        raise ValueError(f"token recovery reads one hidden state at the cut; this segment sends {names}")
    return names[0]
