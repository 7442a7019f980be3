"""Evaluation text and perplexity: the fixed evaluation text, per-token losses, standard errors, paired
differences, and the calibration text (disjoint from the evaluation text).

`perplexity` is taught in Lesson 2; the per-token losses and paired differences in Lesson 4;
the calibration text in Lesson 8.
"""

from __future__ import annotations

import math

import torch

from quantcourse.core.config import ASSETS_DIR
from quantcourse.core.llama_cpp import check_windows, window_log_probs, window_nll, window_nll_kl

__all__ = [
    "eval_text",
    "perplexity",
    "calibration_text",
    "calibration_ids",
    "token_nll",
    "perplexity_with_error",
    "paired_nll_difference",
    "paired_verdict",
    "token_log_probs",
    "token_nll_kl",
    "mean_with_error",
]


def eval_text() -> str:
    """A fixed real English text (an excerpt of the Python docs) used for every perplexity."""
    return (ASSETS_DIR / "eval_text.txt").read_text()


def perplexity(model, tokenizer, text: str | None = None, max_tokens: int = 512) -> float:
    """Perplexity of a causal LM on the first `max_tokens` tokens of `text` (default eval_text).

    One pass over the max_tokens tokens, exp of the mean NLL of the max_tokens - 1 predictions
    (Lesson 2). Its per-token NLLs are the first max_tokens - 1 of token_nll(n_tokens=max_tokens,
    window=max_tokens), the same pass: only the order the mean adds them in may differ.
    """
    ids = tokenizer(text if text is not None else eval_text(), return_tensors="pt").input_ids[:, :max_tokens]
    if ids.shape[1] < 2:
        raise ValueError("perplexity needs a text of at least two tokens")
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()  # (1, tokens, vocab)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return math.exp(loss.item())


def calibration_text() -> str:
    """Text for calibration, disjoint from eval_text: the Python 3.11 docs' "Compound statements".

    Shipped in assets/ (like eval_text, so every Python version reads the same characters).
    Every calibrated method (SmoothQuant, GPTQ, AWQ) computes its statistics on it, never on the
    text its perplexity is measured on.
    """
    return (ASSETS_DIR / "calibration_text.txt").read_text()


def calibration_ids(tokenizer, n_tokens: int = 2048, seq_len: int = 512) -> torch.Tensor:
    """(n_tokens // seq_len, seq_len) token ids: consecutive windows of calibration_text()."""
    if seq_len < 1 or n_tokens < seq_len or n_tokens % seq_len:
        raise ValueError(f"n_tokens ({n_tokens}) must be a positive multiple of seq_len ({seq_len})")
    ids = tokenizer(calibration_text(), return_tensors="pt").input_ids[0]
    if ids.numel() < n_tokens:
        raise ValueError(f"the calibration text has {ids.numel()} tokens; {n_tokens} were asked for")
    return ids[:n_tokens].reshape(-1, seq_len)


def token_nll(model, tokenizer, n_tokens: int = 4096, window: int = 512, text: str | None = None) -> torch.Tensor:
    """Negative log-likelihood of each of `n_tokens` tokens of `text`, predicted in windows of `window`.

    Window i feeds tokens [i*window, (i+1)*window] and scores the `window` tokens after its first,
    so the windows do not overlap and every token is predicted with at most `window` tokens of
    context (core.llama_cpp's window_nll, which llama_cpp_token_nll shares). Taught in Lesson 14
    (the capstone benchmark's perplexity and its standard error).
    """
    check_windows(n_tokens, window)
    with torch.no_grad():
        return window_nll(_logits_of(model), _eval_ids(tokenizer, text), n_tokens, window)


def _eval_ids(tokenizer, text: str | None) -> torch.Tensor:
    return tokenizer(text if text is not None else eval_text(), return_tensors="pt").input_ids[0]


def _logits_of(model):
    return lambda inputs: model(input_ids=inputs[None]).logits.float()[0]


def token_log_probs(model, tokenizer, n_tokens: int = 1024, window: int = 512, text: str | None = None) -> torch.Tensor:
    """(n_tokens, vocab) log-probabilities of the predictions token_nll scores: the reference
    distributions for token_nll_kl (Lesson 11). 1,024 tokens of SmolLM2's 49,152-word vocabulary
    hold 201 MB."""
    with torch.no_grad():
        return window_log_probs(_logits_of(model), _eval_ids(tokenizer, text), n_tokens, window)


def token_nll_kl(
    model, tokenizer, ref_log_probs: torch.Tensor, window: int = 512, text: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(NLL, KL divergence to the reference) of each token token_log_probs scored (Lesson 11)."""
    with torch.no_grad():
        return window_nll_kl(_logits_of(model), _eval_ids(tokenizer, text), ref_log_probs, window)


def mean_with_error(values: torch.Tensor) -> tuple[float, float]:
    """(mean, its standard error std / sqrt(n)) of per-token values, such as KL divergences."""
    if not torch.is_tensor(values) or values.dim() != 1 or values.numel() < 2:
        raise ValueError("mean_with_error needs a 1-D tensor of at least two values")
    v = values.double()
    return v.mean().item(), v.std().item() / math.sqrt(v.numel())


def perplexity_with_error(nll: torch.Tensor) -> tuple[float, float]:
    """(perplexity, its standard error) from per-token NLLs: exp(mean), exp(mean) * std / sqrt(n)."""
    if not torch.is_tensor(nll) or nll.dim() != 1 or nll.numel() < 2:
        raise ValueError("perplexity_with_error needs a 1-D tensor of at least two per-token NLLs")
    mean = nll.double().mean().item()
    se = nll.double().std().item() / math.sqrt(nll.numel())
    return math.exp(mean), math.exp(mean) * se  # delta method: d exp(m) = exp(m) dm


def paired_nll_difference(nll_a: torch.Tensor, nll_b: torch.Tensor) -> tuple[float, float]:
    """(mean of nll_a - nll_b, its standard error) over the same tokens: > 0 means b predicts better.

    Both models are scored on the same tokens, so the per-token differences cancel what makes
    some tokens hard for every model; their standard error is far smaller than either
    perplexity's. Two methods are ranked only when the difference exceeds two standard errors.
    """
    if (
        not torch.is_tensor(nll_a)
        or not torch.is_tensor(nll_b)
        or nll_a.shape != nll_b.shape
        or nll_a.dim() != 1
        or nll_a.numel() < 2
    ):
        raise ValueError("paired_nll_difference needs two 1-D tensors of NLLs of the same (at least two) tokens")
    diff = nll_a.double() - nll_b.double()
    return diff.mean().item(), diff.std().item() / math.sqrt(diff.numel())


def paired_verdict(nll_a: torch.Tensor, nll_b: torch.Tensor) -> tuple[float, float, str]:
    """(mean NLL of a minus b, its standard error, verdict): "worse"/"better" past 2 SE, else
    "indistinguishable". The capstone's rule (Lesson 14); Lesson 11 ranks its formats with it."""
    diff, se = paired_nll_difference(nll_a, nll_b)
    if abs(diff) <= 2 * se:
        verdict = "indistinguishable (within 2 SE)"
    else:
        verdict = "worse" if diff > 0 else "better"
    return diff, se, verdict
