"""The course's one timing protocol: interleaved rounds after a warm-up, and verdicts with their range.

Taught in Lesson 2; every lesson that times something and the benchmark use it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from quantcourse.core.llama_cpp import llama_cpp_generate

__all__ = [
    "TIMING_REPEATS",
    "DECODE_TOKENS",
    "time_variants",
    "speedup",
    "speed_verdict",
    "format_rate",
    "decode_timings",
    "print_decode_speeds",
    "one_thread",
]


TIMING_REPEATS = 3
"""Timed rounds per comparison in the lessons (the benchmark uses more)."""


DECODE_TOKENS = 8
"""New tokens per timed decode round in the lessons. The capstone benchmark generates 32 in 5
rounds; the lessons' 8 in 3 rounds keep the whole course within its time budget and give the
same speed-ups within the spread of their rounds (tests/test_course_speed_consistency.py)."""


def time_variants(variants: dict[str, Any], repeats: int = TIMING_REPEATS, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each zero-argument callable: `warmup` untimed rounds, then `repeats`
    timed rounds, interleaved (every round calls every variant once, in order).

    Interleaving spreads a slow moment of the machine over all variants instead of one, and
    each round gives one paired ratio between two variants (see `speedup`). The course's one
    timing protocol: every timing in the lessons and the benchmark goes through here.
    """
    if not variants or not all(callable(fn) for fn in variants.values()):
        raise TypeError("time_variants expects a non-empty dict of name -> zero-argument callable")
    for name, count in (("repeats", repeats), ("warmup", warmup)):
        if isinstance(count, bool) or not isinstance(count, int) or count < (1 if name == "repeats" else 0):
            raise ValueError(f"{name} must be an int >= {1 if name == 'repeats' else 0}, got {count!r}")
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(warmup + repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            if round_index >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return seconds


def speedup(times: dict[str, list[float]], variant: str, baseline: str) -> tuple[float, float, float]:
    """(median, lowest, highest) over the rounds of baseline time / variant time (> 1: variant faster)."""
    import statistics

    for name in (variant, baseline):
        if name not in times:
            raise KeyError(f"no timings for {name!r}; measured: {sorted(times)}")
    if not times[variant] or len(times[variant]) != len(times[baseline]):
        raise ValueError(f"{variant!r} and {baseline!r} need the same, non-zero number of timed rounds")
    ratios = [b / v for b, v in zip(times[baseline], times[variant])]
    return statistics.median(ratios), min(ratios), max(ratios)


def speed_verdict(times: dict[str, list[float]], variant: str, baseline: str) -> str:
    """'1.31x faster than fp32 (spread 1.25–1.40)', '2.10x slower than fp32 (spread 1.90–2.30)', or
    'about as fast as fp32 (spread 0.95–1.05)' when the rounds disagree on the direction.

    The spread is the range of the rounds in the verdict's own unit: speed-ups for "faster" and
    "about as fast", slow-downs (the reciprocals, smallest first) for "slower". A direction is named
    only when every round agrees on it; the format is what tests/nbval_sanitize.cfg blanks out.
    """
    mid, low, high = speedup(times, variant, baseline)
    if low <= 1.0 <= high:
        return f"about as fast as {baseline} (spread {low:.2f}–{high:.2f})"
    if mid > 1:
        return f"{mid:.2f}x faster than {baseline} (spread {low:.2f}–{high:.2f})"
    return f"{1 / mid:.2f}x slower than {baseline} (spread {1 / high:.2f}–{1 / low:.2f})"


def format_rate(work: float, seconds: list[float], unit: str) -> str:
    """'13.0 tokens/s (spread 12.5–13.3)': `work` units per median second, with the rounds' range."""
    import statistics

    rates = [work / s for s in seconds]
    return f"{work / statistics.median(seconds):.1f} {unit} (spread {min(rates):.1f}–{max(rates):.1f})"


def decode_timings(
    models: dict[str, nn.Module],
    tokenizer,
    prompt: str = "The history of",
    new_tokens: int = DECODE_TOKENS,
    repeats: int = TIMING_REPEATS,
    warmup_tokens: int = 2,
) -> dict[str, list[float]]:
    """Seconds to greedily generate exactly `new_tokens` tokens after `prompt`, per model (interleaved).

    Each model first generates `warmup_tokens` untimed (the default 2 run the prompt's forward pass
    and one decode step, so every kernel and buffer has been set up once; the benchmark warms up
    with a whole round), then `repeats` timed rounds follow, interleaved. A model is a transformers
    model or a llama.cpp model from `load_llama_cpp` (Lesson 4), which gets the same prompt tokens.
    """
    for name, count in (("new_tokens", new_tokens), ("warmup_tokens", warmup_tokens)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{name} must be an int >= 1, got {count!r}")
    batch = tokenizer(prompt, return_tensors="pt")

    def run(model, tokens: int):
        if isinstance(model, nn.Module):
            kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            return lambda: model.generate(**batch, **kwargs)
        if callable(getattr(model, "generate", None)) and hasattr(model, "n_ctx"):  # llama_cpp.Llama
            return lambda: llama_cpp_generate(model, batch.input_ids[0].tolist(), tokens)
        raise TypeError(f"decode_timings: {type(model).__name__} is neither a transformers nor a llama.cpp model")

    with torch.no_grad():
        timed = {name: run(model, new_tokens) for name, model in models.items()}  # checks every model first
        for model in models.values():
            run(model, min(warmup_tokens, new_tokens))()
        return time_variants(timed, repeats=repeats, warmup=0)


def print_decode_speeds(times: dict[str, list[float]], baseline: str, new_tokens: int = DECODE_TOKENS) -> None:
    """One line per model: tokens/s with its spread, and the speed verdict against `baseline`."""
    width = max(len(name) for name in times)
    for name, seconds in times.items():
        verdict = "" if name == baseline else f"  {speed_verdict(times, name, baseline)}"
        print(f"decode {name:<{width}} {format_rate(new_tokens, seconds, 'tokens/s')}{verdict}")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block: for loops of many tiny tensor operations (GPTQ's
    column loop), where waking a second thread per operation costs more than it saves; when
    another program keeps a core busy it made GPTQ 20x slower here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
