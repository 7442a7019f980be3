"""Lesson 11 — the capstone: every method on one model (notebooks/11_capstone_comparison.ipynb).

The table itself is measured by benchmarks/compare_methods.py and read with core/benchmark.py; the
per-token losses and paired differences are core/evaluation.py's (taught in Lesson 4). Here: how the
lesson turns them into verdicts.
"""

from __future__ import annotations

import torch

from quantcourse.core.evaluation import paired_nll_difference

__all__ = ["pareto_front", "paired_verdict"]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (size, perplexity) points no other point dominates (both minimised)."""
    front = []
    for i, (size_i, ppl_i) in enumerate(points):
        dominated = any(
            size_j <= size_i and ppl_j <= ppl_i and (size_j, ppl_j) != (size_i, ppl_i) for size_j, ppl_j in points
        )
        if not dominated:
            front.append(i)
    return front


def paired_verdict(nll_a: torch.Tensor, nll_b: torch.Tensor) -> tuple[float, float, str]:
    """(mean NLL of a minus b, its standard error, verdict): "worse"/"better" past 2 SE, else "indistinguishable"."""
    diff, se = paired_nll_difference(nll_a, nll_b)
    if abs(diff) <= 2 * se:
        verdict = "indistinguishable (within 2 SE)"
    else:
        verdict = "worse" if diff > 0 else "better"
    return diff, se, verdict
