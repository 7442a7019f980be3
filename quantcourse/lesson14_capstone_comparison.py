"""Lesson 14 — the capstone: every method on one model (notebooks/14_capstone_comparison.ipynb).

The table itself is measured by benchmarks/compare_methods.py and read with core/benchmark.py; the
per-token losses and paired differences are core/evaluation.py's (taught in Lesson 4). Here: how the
lesson turns them into verdicts, and the Pareto front built on those verdicts rather than on point
estimates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from quantcourse.core.evaluation import paired_verdict

__all__ = ["pareto_front", "significantly_better", "paired_pareto_front"]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (size, perplexity) points no other point dominates (both minimised).

    This trusts every digit of the perplexities; paired_pareto_front is the version for measured
    perplexities, which differ by less than their standard errors.
    """
    front = []
    for i, (size_i, ppl_i) in enumerate(points):
        dominated = any(
            size_j <= size_i and ppl_j <= ppl_i and (size_j, ppl_j) != (size_i, ppl_i) for size_j, ppl_j in points
        )
        if not dominated:
            front.append(i)
    return front


def significantly_better(nll_a: torch.Tensor, nll_b: torch.Tensor) -> bool:
    """Whether a predicts the same tokens better than b by more than two paired standard errors."""
    return paired_verdict(nll_a, nll_b)[2] == "better"


def paired_pareto_front(sizes: Sequence[float], nlls: Sequence[torch.Tensor]) -> list[int]:
    """Indices of the methods no other method dominates, with quality judged by paired verdicts.

    sizes[i] is method i's bytes (exact); nlls[i] its per-token losses on the same tokens as every
    other method. Method j dominates method i when j is no larger (sizes[j] <= sizes[i]) and
    significantly better (its mean NLL lower than i's by more than two paired standard errors).
    A smaller method that is only *not distinguishably worse* does not dominate: the data cannot
    say it is as good. So the front holds every method that no smaller-or-equal method beats by
    the course's 2-SE rule; two front members may be indistinguishable in quality, and then the
    data leave the choice between them to size (or speed).
    """
    if len(sizes) != len(nlls):
        raise ValueError(f"got {len(sizes)} sizes for {len(nlls)} loss tensors")
    front = []
    for i, (size_i, nll_i) in enumerate(zip(sizes, nlls)):
        dominated = any(
            j != i and size_j <= size_i and significantly_better(nll_j, nll_i)
            for j, (size_j, nll_j) in enumerate(zip(sizes, nlls))
        )
        if not dominated:
            front.append(i)
    return front
