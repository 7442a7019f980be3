"""Lesson 14 (the capstone): which methods no other beats on size and perplexity, and paired verdicts."""

import statistics

import pytest
import torch

import helper


def test_pareto_front_by_hand():
    # (size, perplexity): (3, 4) is beaten by (2, 3) on both; the two equal points do not beat each other
    points = [(1.0, 5.0), (2.0, 3.0), (3.0, 4.0), (2.0, 3.0), (4.0, 1.0), (4.0, 2.0)]
    assert helper.pareto_front(points) == [0, 1, 3, 4]  # (4, 2) loses to (4, 1): as large, and worse
    assert helper.pareto_front([(5.0, 5.0)]) == [0] and helper.pareto_front([]) == []


@pytest.mark.parametrize(
    "differences, verdict",
    [
        ([1.0, 1.5], "worse"),  # mean 1.25, standard error 0.25: more than 2 SE above 0
        ([-2.0, -1.5], "better"),
        ([-0.25, 0.75], "indistinguishable (within 2 SE)"),  # mean 0.25, standard error 0.5
    ],
)
def test_paired_verdict_names_a_winner_only_past_two_standard_errors(differences, verdict):
    nll_b = torch.tensor([3.0, 0.5])
    nll_a = nll_b + torch.tensor(differences)
    diff, se, said = helper.paired_verdict(nll_a, nll_b)
    assert diff == pytest.approx(statistics.mean(differences))
    assert se == pytest.approx(statistics.stdev(differences) / len(differences) ** 0.5)
    assert said == verdict


def _hand_made_methods():
    """Five methods scored on the same four tokens: (sizes, per-token losses), built so that the three
    dominance rules disagree (point estimates, paired verdicts, 'smaller and not distinguishably worse')."""
    base = torch.tensor([2.0, 1.0, 3.0, 0.5])
    offsets = [
        [0.0, 0.0, 0.0, 0.0],  # 0: the best, size 4
        [-0.25, 0.75, -0.25, 0.75],  # 1: size 1, mean +0.25 +- 0.29: indistinguishable from 0
        [1.0, 1.5, 1.0, 1.5],  # 2: size 2, mean +1.25 +- 0.14: worse than 0 and than 1 (by 1.0 +- 0.14)
        [1.0, 1.5, 1.0, 1.5],  # 3: size 4, as bad as 2 and as large as 0
        [0.3, -0.1, 0.3, -0.1],  # 4: size 5, mean +0.1 +- 0.12: a worse point estimate than 0, not distinguishable
    ]
    return [4.0, 1.0, 2.0, 4.0, 5.0], [base + torch.tensor(o) for o in offsets]


def test_significantly_better_needs_two_standard_errors():
    sizes, nlls = _hand_made_methods()
    assert helper.significantly_better(nlls[0], nlls[2]) and helper.significantly_better(nlls[1], nlls[2])
    assert not helper.significantly_better(nlls[2], nlls[0])  # worse, not better
    assert not helper.significantly_better(nlls[0], nlls[1]) and not helper.significantly_better(nlls[0], nlls[4])
    assert not helper.significantly_better(nlls[2], nlls[3])  # identical losses


def test_paired_pareto_front_keeps_what_no_smaller_method_beats_by_two_standard_errors():
    sizes, nlls = _hand_made_methods()
    assert helper.paired_pareto_front(sizes, nlls) == [0, 1, 4]
    # on point estimates, 4 loses to 0 (as small, lower mean NLL) although the data cannot tell them apart
    means = [n.mean().item() for n in nlls]
    assert helper.pareto_front(list(zip(sizes, means))) == [0, 1]
    # equal sizes: the significantly better one dominates; identical losses dominate nothing
    assert helper.paired_pareto_front([1.0, 1.0], [nlls[0], nlls[3]]) == [0]
    assert helper.paired_pareto_front([1.0, 1.0], [nlls[2], nlls[3]]) == [0, 1]
    assert helper.paired_pareto_front([], []) == []
    with pytest.raises(ValueError, match="sizes"):
        helper.paired_pareto_front([1.0], nlls)
