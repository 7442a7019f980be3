"""Perplexity with a standard error, paired comparisons, and the benchmark reader (Lesson 11)."""

import math
import re

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


def test_speedup_refuses_unpaired_rounds():
    with pytest.raises(ValueError, match="same"):
        helper.speedup({"a": [1.0, 2.0], "b": [1.0]}, "b", "a")


def test_read_benchmark_reads_the_committed_table_and_refuses_others(tmp_path):
    machine, rows = helper.read_benchmark()
    assert "cores" in machine and rows[0]["method"] == "fp32" and isinstance(rows[0]["bytes"], int)
    assert set(helper.read_benchmark_nll()) == {r["method"] for r in rows}
    bad = tmp_path / "old.csv"
    bad.write_text("# machine\nmethod,bytes\nfp32,1\n")
    with pytest.raises(ValueError, match="columns"):
        helper.read_benchmark(bad)
    (tmp_path / "none.csv").write_text("method,bytes\n")
    with pytest.raises(ValueError, match="machine"):
        helper.read_benchmark(tmp_path / "none.csv")


def _compare_methods():
    return helper.load_script("benchmarks/compare_methods.py")


@pytest.mark.parametrize(
    "outcome, message",
    [
        ("timeout", "did not finish"),
        ("oserror", "could not start"),
        ("exit", "failed (exit 3)"),
        ("no row", "printed no result row"),
        ("bad row", "unexpected row"),
    ],
)
def test_run_isolated_turns_every_failure_into_one_clear_error(monkeypatch, tmp_path, outcome, message):
    import subprocess
    from types import SimpleNamespace

    cm = _compare_methods()

    def fake_run(cmd, **kwargs):
        if outcome == "timeout":
            raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])
        if outcome == "oserror":
            raise OSError("no such interpreter")
        stdout = {"exit": "", "no row": "", "bad row": '{"method": "x"}'}[outcome]
        return SimpleNamespace(returncode=3 if outcome == "exit" else 0, stdout=stdout, stderr="boom")

    monkeypatch.setattr(cm.subprocess, "run", fake_run)
    args = cm.parse_args(["--methods", "fp32"])
    with pytest.raises(RuntimeError, match=re.escape(message)):
        cm.run_isolated("fp32", tmp_path, args)
