"""llama.cpp as an optional runtime (`llama-cpp-python`): loading the GGUF file, generating, scoring.

Taught in Lesson 4; timed in Lesson 12 and the capstone. Every function says so when it is not installed.
`window_nll`, the windows in which every per-token NLL of the course is scored, is here because this
is the first core module that scores windows (core.evaluation's token_nll calls it too).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from quantcourse.core.models import smollm2_gguf_path

__all__ = [
    "llama_cpp_installed",
    "LLAMA_CPP_MISSING",
    "load_llama_cpp",
    "llama_cpp_token_nll",
    "llama_cpp_generate",
    "llama_cpp_token_nll_kl",
    "check_windows",
    "window_nll",
    "window_log_probs",
    "window_nll_kl",
    "kl_rows",
]


def llama_cpp_installed() -> bool:
    """True when the optional llama.cpp runtime (`make setup-llama`) is importable."""
    return importlib.util.find_spec("llama_cpp") is not None


LLAMA_CPP_MISSING = (
    "llama.cpp is optional and not installed here: `make setup-llama` builds "
    "llama-cpp-python from source (about 6-9 minutes on 2 cores)"
)


def load_llama_cpp(path: Path | None = None, n_ctx: int = 513, threads: int | None = None):
    """The GGUF file in llama.cpp (llama-cpp-python), with logits for every position (for NLLs)."""
    if not llama_cpp_installed():
        raise ModuleNotFoundError(LLAMA_CPP_MISSING)
    from llama_cpp import Llama

    return Llama(
        model_path=str(path or smollm2_gguf_path()),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        logits_all=True,
        n_threads=threads or torch.get_num_threads(),
        verbose=False,
    )


def llama_cpp_token_nll(llm, ids: torch.Tensor | list[int], n_tokens: int = 4096, window: int = 512) -> torch.Tensor:
    """Per-token NLLs from llama.cpp, on the same token ids and windows as `token_nll` (no overlap).

    Both are `window_nll`; only where the logits of a window come from differs.
    """
    return window_nll(_llama_cpp_logits_of(llm), torch.as_tensor(ids).flatten(), n_tokens, window)


def _llama_cpp_logits_of(llm):
    def logits_of(inputs: torch.Tensor) -> torch.Tensor:
        llm.reset()
        llm.eval(inputs.tolist())
        return torch.tensor(llm.scores[: inputs.numel()], dtype=torch.float32)  # (window, vocab)

    return logits_of


def llama_cpp_token_nll_kl(
    llm, ids: torch.Tensor | list[int], ref_log_probs: torch.Tensor, window: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """(NLL, KL divergence to ref_log_probs) per token from llama.cpp: window_nll_kl on its logits."""
    return window_nll_kl(_llama_cpp_logits_of(llm), torch.as_tensor(ids).flatten(), ref_log_probs, window)


def check_windows(n_tokens: int, window: int) -> None:
    """Raise ValueError unless `n_tokens` is a positive multiple of `window`."""
    if window < 1 or n_tokens < window or n_tokens % window:
        raise ValueError(f"n_tokens ({n_tokens}) must be a positive multiple of window ({window})")


def _windows(logits_of, ids: torch.Tensor, n_tokens: int, window: int):
    """(log-probabilities (window, vocab), next tokens (window,)) of each window (see window_nll)."""
    check_windows(n_tokens, window)
    if ids.numel() < n_tokens + 1:
        raise ValueError(f"the text has {ids.numel()} tokens; {n_tokens + 1} are needed")
    for start in range(0, n_tokens, window):
        chunk = ids[start : start + window + 1]  # (window + 1,)
        yield torch.log_softmax(logits_of(chunk[:-1]).float(), -1), chunk[1:]


def window_nll(logits_of, ids: torch.Tensor, n_tokens: int, window: int) -> torch.Tensor:
    """NLL of each of the first `n_tokens` predictions of the 1-D token ids, in windows of `window`.

    Window i feeds ids[i*window : (i+1)*window] to logits_of (which returns float32 logits
    (window, vocab)) and scores the `window` tokens after its first, so the windows do not overlap
    and every token is predicted with at most `window` tokens of context. The course's one
    windowing: core.evaluation's token_nll (a torch model, Lessons 4 and 14) and
    llama_cpp_token_nll (llama.cpp) call it; it lives here, the earlier of the two core modules.
    """
    return torch.cat([-lp.gather(1, nxt[:, None])[:, 0] for lp, nxt in _windows(logits_of, ids, n_tokens, window)])


def window_log_probs(logits_of, ids: torch.Tensor, n_tokens: int, window: int) -> torch.Tensor:
    """(n_tokens, vocab) float32 log-probabilities of every prediction, in window_nll's windows:
    a reference model's token distributions, for window_nll_kl (Lesson 11)."""
    return torch.cat([lp for lp, _ in _windows(logits_of, ids, n_tokens, window)])


def window_nll_kl(
    logits_of, ids: torch.Tensor, ref_log_probs: torch.Tensor, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(NLL, KL divergence) of each prediction: the NLL as window_nll, and KL(P_ref || P) =
    sum_v p_ref(v) (log p_ref(v) - log p(v)) against `ref_log_probs` (window_log_probs of the
    reference on the same ids and windows), what llama.cpp's `--kl-divergence` reports per token.

    KL is zero only where the two distributions are equal; unlike the NLL, it sees every token of
    the vocabulary, so it separates two models whose perplexities are within noise (Lesson 11).
    """
    n_tokens = ref_log_probs.shape[0]
    nll, kl = [], []
    for i, (lp, nxt) in enumerate(_windows(logits_of, ids, n_tokens, window)):
        ref = ref_log_probs[i * window : (i + 1) * window]
        if ref.shape != lp.shape:
            raise ValueError(f"ref_log_probs has {tuple(ref.shape)} for a window of {tuple(lp.shape)}")
        nll.append(-lp.gather(1, nxt[:, None])[:, 0])
        kl.append(kl_rows(ref, lp))
    return torch.cat(nll), torch.cat(kl)


def kl_rows(ref_log_probs: torch.Tensor, log_probs: torch.Tensor, block: int = 128) -> torch.Tensor:
    """KL(P_ref || P) = sum_v p_ref(v) (log p_ref(v) - log p(v)) of each row of two (tokens, vocab)
    log-probability tensors, `block` rows at a time, without three more (tokens, vocab) temporaries at once
    (Lessons 11 and 13): the same sums as on the whole tensors where blocks hold many rows (checked
    on SmolLM2's vocabulary); a block of one row may be reduced in another order (the last bits)."""
    if ref_log_probs.shape != log_probs.shape or ref_log_probs.dim() != 2:
        raise ValueError(
            f"kl_rows needs two (tokens, vocab) tensors, got {tuple(ref_log_probs.shape)}, {tuple(log_probs.shape)}"
        )
    return torch.cat([(r.exp() * (r - q)).sum(1) for r, q in zip(ref_log_probs.split(block), log_probs.split(block))])


def llama_cpp_generate(llm, prompt_ids: list[int], new_tokens: int = 32) -> list[int]:
    """Greedy decoding of `new_tokens` tokens in llama.cpp (the decode-speed workload)."""
    out = []
    for token in llm.generate(list(prompt_ids), temp=0.0, top_k=1, reset=True):
        out.append(token)
        if len(out) == new_tokens:
            break
    return out
