"""Lesson 11 (the capstone): which methods no other beats on size and perplexity, and paired verdicts."""

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
