"""train.length_buckets: batches of texts of about one length, so bytes and compute follow the real
lengths; every text still trains once an epoch, and evaluation does not depend on the order."""

from __future__ import annotations

import torch

from fsl.config import ConfigError, load_experiment
from fsl.training import TrainOptions, _bucketed, _shuffled, evaluate_logits, lengths


def _texts(n: int = 400, t: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    real = torch.randint(3, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None, :] < real[:, None]).long()
    return {"input_ids": torch.randint(5, 100, (n, t), generator=g) * mask, "attention_mask": mask}


def _sent_tokens(batches, n: torch.Tensor) -> int:
    """What the batches carry once each is trimmed to its longest text."""
    return sum(int(n[b].max()) * len(b) for b in batches)


def test_bucketed_batches_cover_every_text_once_and_carry_far_less_padding():
    x = _texts()
    n = lengths(x)
    assert n is not None
    gen = torch.Generator().manual_seed(1)
    plain = list(_shuffled(len(n), 16, gen))
    buckets = _bucketed(n, 16, 8, torch.Generator().manual_seed(1))
    assert sorted(torch.cat(buckets).tolist()) == list(range(len(n)))  # each sample exactly once
    assert all(len(b) <= 16 for b in buckets)
    real = int(n.sum())
    # uniform batches of 16 almost always hold a text of 30+ tokens: about 32/17.5 of the real tokens
    assert _sent_tokens(plain, n) > 1.6 * real
    assert _sent_tokens(buckets, n) < 1.15 * real
    # the batches' order and makeup change with the epoch's draw
    other = _bucketed(n, 16, 8, torch.Generator().manual_seed(2))
    assert [b.tolist() for b in other] != [b.tolist() for b in buckets]


def test_images_have_no_lengths_and_the_option_is_checked():
    assert lengths(torch.zeros(4, 1, 8, 8)) is None
    cfg = load_experiment("quickstart", ["train.length_buckets=8"])
    assert TrainOptions.from_config(cfg, seed=0).length_buckets == 8
    try:
        load_experiment("quickstart", ["train.length_buckets=-1"])
    except ConfigError as e:
        assert "length_buckets" in str(e)
    else:
        raise AssertionError("a negative pool size was accepted")


def test_evaluation_in_length_order_gives_the_full_batch_result():
    x = _texts(n=50, t=12, seed=3)
    y = torch.randint(0, 4, (50,))
    emb = torch.nn.EmbeddingBag(100, 4, mode="sum", padding_idx=0)  # pads (id 0) add nothing

    def logits_of(xb):  # depends on the real tokens only, so trimming must not change it
        return emb(xb["input_ids"]) * 0.1

    got = evaluate_logits(logits_of, x, y, batch_size=7)
    with torch.no_grad():
        full = logits_of(x)
    want_loss = float(torch.nn.functional.cross_entropy(full, y))
    assert abs(got.loss - want_loss) < 1e-5
    assert got.accuracy == int((full.argmax(1) == y).sum()) / 50
