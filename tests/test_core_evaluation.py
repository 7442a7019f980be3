"""core/evaluation.py: perplexity, per-token losses, their standard errors and paired differences, the calibration
text (disjoint from the evaluation text)."""

import math
from types import SimpleNamespace

import pytest
import torch

import helper


def test_perplexity_with_error_on_known_losses():
    nll = torch.tensor([1.0, 3.0])  # mean 2, std sqrt(2), n 2 -> se of the mean 1
    ppl, se = helper.perplexity_with_error(nll)
    assert ppl == pytest.approx(math.exp(2.0))
    assert se == pytest.approx(math.exp(2.0) * 1.0)


def test_paired_difference_cancels_what_is_common():
    hard_and_easy = torch.tensor([5.0, 0.1, 3.0, 0.2])
    diff, se = helper.paired_nll_difference(hard_and_easy + 0.5, hard_and_easy)
    assert diff == pytest.approx(0.5) and se == pytest.approx(0.0, abs=1e-6)  # float32 inputs
    assert helper.paired_nll_difference(hard_and_easy, hard_and_easy) == (0.0, 0.0)


@pytest.mark.parametrize("bad", [torch.tensor([1.0]), torch.ones(2, 2), [1.0, 2.0]])
def test_statistics_refuse_bad_input(bad):
    with pytest.raises(ValueError):
        helper.perplexity_with_error(bad)
    with pytest.raises(ValueError):
        helper.paired_nll_difference(bad, bad if torch.is_tensor(bad) else torch.ones(3))


def test_token_nll_refuses_windows_that_do_not_tile():
    with pytest.raises(ValueError, match="multiple"):
        helper.token_nll(None, None, n_tokens=100, window=64)


class _Words:
    """A tokenizer of single characters: 'abc' -> ids [0, 1, 2] (enough for the evaluation functions)."""

    def __call__(self, text, return_tensors="pt"):
        return SimpleNamespace(input_ids=torch.tensor([[ord(c) - ord("a") for c in text]]))


class _KnowsNothing(torch.nn.Module):
    """A causal LM whose logits are all equal: every next token has probability 1 / vocab."""

    def __init__(self, vocab: int = 26):
        super().__init__()
        self.vocab, self.seen = vocab, []

    def forward(self, input_ids):
        self.seen.append(input_ids[0].tolist())
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_perplexity_of_a_model_that_knows_nothing_is_its_vocabulary_size():
    assert helper.perplexity(_KnowsNothing(26), _Words(), text="thequickbrownfox") == pytest.approx(26, rel=1e-6)
    with pytest.raises(ValueError, match="two tokens"):
        helper.perplexity(_KnowsNothing(26), _Words(), text="a", max_tokens=1)


def test_token_nll_reads_windows_that_do_not_overlap():
    model = _KnowsNothing(26)
    text = "abcdefghijklmnopqrstuvwxyz"
    nll = helper.token_nll(model, _Words(), n_tokens=8, window=4, text=text)
    assert model.seen == [[0, 1, 2, 3], [4, 5, 6, 7]]  # tokens 1..8 scored, each window on its own tokens
    torch.testing.assert_close(nll, torch.full((8,), math.log(26)))
    with pytest.raises(ValueError, match="9 are needed"):
        helper.token_nll(model, _Words(), n_tokens=8, window=4, text=text[:8])


def test_calibration_text_is_disjoint_from_eval_text():
    cal, ev = helper.calibration_text(), helper.eval_text()
    assert len(cal) > 40_000
    # no 80-character window of the evaluation text appears in the calibration text
    assert not any(ev[i : i + 80] in cal for i in range(0, len(ev) - 80, 20))


def test_calibration_ids_shape_and_errors():
    _, tok = helper.load_smollm2()
    ids = helper.calibration_ids(tok, 1024, 256)
    assert ids.shape == (4, 256) and ids.dtype == torch.long
    for bad in [(1000, 256), (100, 256), (256, 0)]:
        with pytest.raises(ValueError):
            helper.calibration_ids(tok, *bad)
    with pytest.raises(ValueError, match="calibration text has"):
        helper.calibration_ids(tok, 512 * 1000, 512)
