"""llama.cpp as an optional runtime (`llama-cpp-python`): loading the GGUF file, generating, scoring.

Taught in Lesson 4; timed in Lesson 10 and the capstone. Every function says so when it is not installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from quantcourse.core.models import smollm2_gguf_path

__all__ = ["llama_cpp_installed", "LLAMA_CPP_MISSING", "load_llama_cpp", "llama_cpp_token_nll", "llama_cpp_generate"]


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
    """Per-token NLLs from llama.cpp, on the same token ids and windows as `token_nll` (no overlap)."""
    ids = torch.as_tensor(ids).flatten().tolist()
    if n_tokens < window or n_tokens % window or len(ids) < n_tokens + 1:
        raise ValueError(f"need a positive multiple of {window} tokens and {n_tokens + 1} ids, got {len(ids)}")
    losses = []
    for start in range(0, n_tokens, window):
        chunk = ids[start : start + window + 1]
        llm.reset()
        llm.eval(chunk[:-1])
        logits = torch.tensor(llm.scores[:window], dtype=torch.float32)  # (window, vocab)
        losses.append(torch.nn.functional.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="none"))
    return torch.cat(losses)


def llama_cpp_generate(llm, prompt_ids: list[int], new_tokens: int = 32) -> list[int]:
    """Greedy decoding of `new_tokens` tokens in llama.cpp (the decode-speed workload)."""
    out = []
    for token in llm.generate(list(prompt_ids), temp=0.0, top_k=1, reset=True):
        out.append(token)
        if len(out) == new_tokens:
            break
    return out
