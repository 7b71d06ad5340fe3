"""Token data: the fortunes topic set and its language-model twin (Debian `fortunes`), the MiniLM
tokenizer, and partitioning, limits and subsets on named inputs."""

import numpy as np
import pytest
import torch

from fsl.data import (
    Dataset,
    DatasetNotFound,
    client_partition,
    load_dataset,
    num_samples,
    subset,
    take,
)
from fsl.textdata import FORTUNE_TOPICS, FORTUNES_DIR, decode, next_token_labels, read_fortunes, tokenize

needs_fortunes = pytest.mark.skipif(
    not (FORTUNES_DIR / "people").exists(), reason="apt-get install -y fortunes (.ci/run installs it)"
)


def test_tokenize_round_trips_and_pads():
    texts = ["the quick brown fox jumps over the lazy dog", "hello world"]
    enc = tokenize(texts, max_length=16)
    assert set(enc) == {"input_ids", "attention_mask"}
    assert enc["input_ids"].shape == enc["attention_mask"].shape == (2, 16)
    assert enc["input_ids"].dtype == torch.int64
    assert enc["input_ids"][0, 0] == 101  # [CLS]
    assert enc["attention_mask"][1].tolist() == [1] * 4 + [0] * 12  # [CLS] hello world [SEP], padding
    assert (enc["input_ids"][1, 4:] == 0).all()
    for text, ids in zip(texts, enc["input_ids"], strict=True):
        assert decode(ids) == text
    long = tokenize(["word " * 100], max_length=8)
    assert long["attention_mask"].sum() == 8 and long["input_ids"][0, -1] == 102  # truncated, [SEP] kept


def test_next_token_labels_shift_and_ignore_padding():
    enc = {"input_ids": torch.tensor([[101, 7, 8, 102, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0]])}
    assert next_token_labels(enc).tolist() == [[7, 8, 102, -100, -100, -100]]


@needs_fortunes
def test_fortune_files_parse_into_entries():
    people = read_fortunes(FORTUNES_DIR, "people")
    assert 1200 <= len(people) <= 1300  # 1,250 entries in fortunes 1:1.99.1
    assert all(e and "\n" not in e and "\x08" not in e for e in people)
    assert people[0].startswith('A "practical joker" deserves applause')
    assert all("\x08" not in e for e in read_fortunes(FORTUNES_DIR, "computers"))  # overstrikes removed
    with pytest.raises(DatasetNotFound, match="no topic 'nosuch'"):
        read_fortunes(FORTUNES_DIR, "nosuch")


@needs_fortunes
def test_fortunes_is_balanced_seeded_and_tokenized():
    ds = load_dataset("fortunes")
    assert ds.task == "classify" and ds.input_kind == "tokens" and ds.input_shape == (64,)
    assert ds.classes == FORTUNE_TOPICS and ds.num_classes == 5
    train = np.bincount(ds.y_train.numpy(), minlength=5)
    test = np.bincount(ds.y_test.numpy(), minlength=5)
    assert len(set(train)) == 1 and len(set(test)) == 1  # every topic cut to the smallest's size
    assert train[0] + test[0] == len(read_fortunes(FORTUNES_DIR, "science"))
    assert abs(test[0] / (train[0] + test[0]) - 0.2) < 0.01
    for x in (ds.x_train, ds.x_test):
        assert x["input_ids"].dtype == torch.int64 and x["input_ids"].shape[1] == 64
        assert ((x["attention_mask"] == 0) == (x["input_ids"] == 0)).all()
    # no entry in both parts, and the same split for the same seed
    tr = {tuple(r) for r in ds.x_train["input_ids"].tolist()}
    te = {tuple(r) for r in ds.x_test["input_ids"].tolist()}
    assert len(tr & te) <= 2  # a handful of fortunes are filed twice
    again = load_dataset("fortunes", options={"seed": 0})  # other options key, not the cached object
    assert again is not ds and torch.equal(again.x_train["input_ids"], ds.x_train["input_ids"])
    other = load_dataset("fortunes", options={"seed": 1})
    assert not torch.equal(other.y_test, ds.y_test) or not torch.equal(
        other.x_test["input_ids"], ds.x_test["input_ids"]
    )


@needs_fortunes
def test_fortunes_options_choose_topics_size_and_length():
    ds = load_dataset("fortunes", options={"topics": ["computers", "politics"], "per_class": 100, "max_length": 32})
    assert ds.classes == ("computers", "politics") and ds.input_shape == (32,)
    assert np.bincount(ds.y_train.numpy()).tolist() == [80, 80]
    with pytest.raises(ValueError, match="exceeds"):
        load_dataset("fortunes", options={"topics": "computers,science", "per_class": 5000})
    with pytest.raises(ValueError, match="two or more"):
        load_dataset("fortunes", options={"topics": ["people"]})
    with pytest.raises(ValueError, match=r"unknown \[data.options\] \['max_len'\]"):
        load_dataset("fortunes", options={"max_len": 32})


def test_a_missing_fortunes_package_says_how_to_install_it(tmp_path):
    with pytest.raises(DatasetNotFound, match="apt-get install -y fortunes"):
        load_dataset("fortunes", str(tmp_path / "absent"))


@needs_fortunes
def test_fortunes_lm_labels_are_next_tokens():
    ds = load_dataset("fortunes-lm", options={"topics": ["science", "politics"], "max_length": 32})
    assert ds.task == "causal-lm" and ds.num_classes == 30522
    assert ds.y_train.shape == ds.x_train["input_ids"].shape and ds.y_train.dtype == torch.int64
    ids, mask, y = ds.x_train["input_ids"], ds.x_train["attention_mask"], ds.y_train
    keep = y != -100
    assert torch.equal(y[:, :-1][keep[:, :-1]], ids[:, 1:][keep[:, :-1]])
    assert (y[mask == 0] == -100).all()
    n = len(read_fortunes(FORTUNES_DIR, "science")) + len(read_fortunes(FORTUNES_DIR, "politics"))
    assert num_samples(ds.x_train) + num_samples(ds.x_test) == n
    # causal-lm data is limited at random and partitioned iid only
    small = subset(ds, 100, 20, 0)
    assert num_samples(small.x_train) == 100 and small.y_test.shape == (20, 32)
    part = client_partition(small, 0, 2)
    assert part.x_train["input_ids"].shape[0] == part.y_train.shape[0] == 45
    with pytest.raises(ValueError, match="'iid' only"):
        client_partition(small, 0, 2, scheme="dirichlet")


def _toy_text_dataset(n=40, t=6):
    g = torch.Generator().manual_seed(0)
    x = {"input_ids": torch.randint(1, 100, (n, t), generator=g), "attention_mask": torch.ones(n, t, dtype=torch.int64)}
    xt = {k: v[:10].clone() for k, v in x.items()}
    return Dataset("toy", x, torch.arange(n) % 4, xt, torch.arange(10) % 4, 4)


def test_take_and_partitions_keep_named_inputs_aligned():
    ds = _toy_text_dataset()
    idx = torch.tensor([3, 1, 7])
    got = take(ds.x_train, idx)
    assert torch.equal(got["input_ids"], ds.x_train["input_ids"][idx]) and num_samples(got) == 3
    seen = []
    for scheme in ("iid", "dirichlet", "shards"):
        for pid in range(2):
            p = client_partition(ds, pid, 2, scheme=scheme, alpha=100.0)
            rows = {tuple(r) for r in ds.x_train["input_ids"].tolist()}
            assert all(tuple(r) in rows for r in p.x_train["input_ids"].tolist())
            assert num_samples(p.x_train) == len(p.y_train) and num_samples(p.x_val) == len(p.y_val)
            if scheme == "iid":
                seen += p.x_train["input_ids"].tolist() + p.x_val["input_ids"].tolist()
            # each input row still carries its own label
            lookup = {tuple(r): int(y) for r, y in zip(ds.x_train["input_ids"].tolist(), ds.y_train, strict=True)}
            assert [lookup[tuple(r)] for r in p.x_train["input_ids"].tolist()] == p.y_train.tolist()
    assert len(seen) == 40
    s = subset(ds, 20, 8, 0)
    assert num_samples(s.x_train) == 20 and np.bincount(s.y_train.numpy()).tolist() == [5, 5, 5, 5]
    assert num_samples(s.x_test) == 8


def test_a_dataset_refuses_misaligned_inputs():
    ds = _toy_text_dataset()
    bad = {"input_ids": ds.x_train["input_ids"], "attention_mask": ds.x_train["attention_mask"][:5]}
    with pytest.raises(ValueError, match="differ in length"):
        Dataset("bad", bad, ds.y_train, ds.x_test, ds.y_test, 4)
    with pytest.raises(ValueError, match="holds 40 samples, y_train 39"):
        Dataset("bad", ds.x_train, ds.y_train[:39], ds.x_test, ds.y_test, 4)
    with pytest.raises(ValueError, match="same kind of inputs"):
        Dataset("bad", ds.x_train, ds.y_train, torch.zeros(10, 6), ds.y_test, 4)
    with pytest.raises(ValueError, match="2 class names for 4"):
        Dataset("bad", ds.x_train, ds.y_train, ds.x_test, ds.y_test, 4, classes=("a", "b"))
