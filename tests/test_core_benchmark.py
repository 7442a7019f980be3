"""core/benchmark.py: the capstone benchmark's committed table and per-token losses, and their reader."""

import math
from pathlib import Path

import pytest

import helper

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


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


def test_the_reader_reads_where_the_benchmark_writes_and_the_two_files_agree():
    assert helper.BENCHMARK_DIR == RESULTS
    assert helper.load_script("benchmarks/compare_methods.py").parse_args([]).out == helper.BENCHMARK_DIR
    assert helper.read_benchmark() == helper.read_benchmark(RESULTS / "smollm2_cpu.csv")
    rows = helper.read_benchmark()[1]
    nll = helper.read_benchmark_nll(RESULTS / "smollm2_cpu_nll.npz")
    for row in rows:  # each perplexity is exp of the mean of its committed per-token losses (4,096 tokens)
        assert nll[row["method"]].shape == (4096,)
        assert row["perplexity"] == pytest.approx(math.exp(nll[row["method"]].mean().item()), rel=1e-3)
