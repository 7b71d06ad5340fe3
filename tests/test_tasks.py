"""The task helpers a language model's results stand on: perplexity and the unigram baseline."""

import math

import pytest
import torch

from fsl import tasks
from fsl.training import evaluate_logits

IGN = tasks.IGNORE


def test_unigram_perplexity_counts_train_tokens_with_add_one_smoothing_and_skips_ignored_positions():
    # vocabulary of 4; train targets: token 1 three times, token 2 once (the -100s are not tokens)
    train = torch.tensor([[1, 1, IGN], [1, 2, IGN]])
    test = torch.tensor([[1, 3, IGN, IGN]])
    # add-one: p(1) = (3 + 1) / (4 + 4), p(3) = (0 + 1) / 8 (never seen, still finite)
    expected = math.exp(-(math.log(4 / 8) + math.log(1 / 8)) / 2)
    assert tasks.unigram_perplexity(train, test, vocab_size=4) == pytest.approx(expected)
    # Lidstone with a smaller alpha gives the seen token more mass and the unseen one less
    p1, p3 = (3 + 0.5) / (4 + 2), 0.5 / (4 + 2)
    assert tasks.unigram_perplexity(train, test, 4, alpha=0.5) == pytest.approx(math.exp(-(math.log(p1 * p3)) / 2))


def test_unigram_perplexity_is_the_exp_of_a_unigram_models_token_mean_loss():
    # the baseline means what the model's test loss means: the same tokens, the same ignore rule,
    # a token-weighted mean over batches of different numbers of targets
    g = torch.Generator().manual_seed(0)
    vocab = 7
    train = torch.randint(0, vocab, (20, 6), generator=g)
    test = torch.randint(0, vocab, (9, 6), generator=g)
    test[::2, 3:] = IGN  # padding: uneven numbers of targets per batch
    counts = torch.bincount(train.flatten(), minlength=vocab).float()
    log_p = torch.log((counts + 1) / (counts.sum() + vocab))

    def logits_of(xb: torch.Tensor) -> torch.Tensor:
        return log_p.expand(xb.shape[0], xb.shape[1], vocab)

    ev = evaluate_logits(logits_of, torch.zeros(9, 6, dtype=torch.long), test, batch_size=4, task="causal-lm")
    assert ev.targets == int((test != IGN).sum())
    assert tasks.perplexity(ev.loss) == pytest.approx(tasks.unigram_perplexity(train, test, vocab), rel=1e-5)


def test_a_uniform_model_has_the_vocabulary_as_perplexity_and_bad_input_is_refused():
    assert tasks.perplexity(math.log(30522)) == pytest.approx(30522)
    assert tasks.perplexity(1e6) == math.inf
    y = torch.tensor([[0, 1, IGN]])
    # a huge alpha drowns the counts: every token near 1 / vocab
    assert tasks.unigram_perplexity(y, y, vocab_size=5, alpha=1e9) == pytest.approx(5, rel=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        tasks.unigram_perplexity(y, y, 5, alpha=0)
    with pytest.raises(ValueError, match="no target"):
        tasks.unigram_perplexity(y, torch.full((1, 3), IGN), 5)
    with pytest.raises(ValueError, match="vocabulary"):
        tasks.unigram_perplexity(torch.tensor([7]), y, 5)
