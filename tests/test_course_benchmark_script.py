"""benchmarks/compare_methods.py, the capstone benchmark: end to end on a tiny random Llama (no timings asserted),
and how it reports a method whose process fails."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import helper

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "compare_methods.py"


def end_to_end(test):
    """The tests that read one run of the script in fresh processes: slow. They check its plumbing (rows, sizes,
    files), which no CPU kernel decides, so the forced-AVX2 pass leaves them out."""
    return pytest.mark.slow(pytest.mark.cpu_independent(test))


def read_results(path: Path) -> tuple[str, list[dict]]:
    """(the machine line, typed rows) of a results CSV, read as the capstone notebook reads it."""
    return helper.read_benchmark(path)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Run the script once with --tiny on cheap methods (bf16 listed before fp32 on purpose): a calibrated
    one (SmoothQuant) and 4-bit codes (RTN; GPTQ and AWQ are tested in test_lesson09, in process)."""
    out = tmp_path_factory.mktemp("bench")
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--tiny",
        "--methods",
        "bf16",
        "w8a16-scratch",
        "w8a8-smoothquant",
        "rtn-int4-g128",
        "--ppl-tokens",
        "64",
        "--window",
        "32",
        "--new-tokens",
        "2",
        "--repeats",
        "2",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model gains nothing from threads
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@end_to_end
def test_csv_columns_and_methods(tiny_run):
    out, _ = tiny_run
    header, rows = read_results(out / "smollm2_cpu.csv")
    assert list(rows[0]) == list(helper.BENCHMARK_COLUMNS)
    # fp32 is added (it is the ratio's baseline) and comes first; no method is repeated
    assert [r["method"] for r in rows] == ["fp32", "bf16", "w8a16-scratch", "w8a8-smoothquant", "rtn-int4-g128"]
    assert "tiny random Llama" in header and "cores" in header and "torch " in header


@end_to_end
def test_sizes_and_ratios_are_consistent(tiny_run):
    out, _ = tiny_run
    rows = {r["method"]: r for r in read_results(out / "smollm2_cpu.csv")[1]}
    size = {m: r["bytes"] for m, r in rows.items()}
    assert size["w8a16-scratch"] < size["bf16"] < size["fp32"]
    assert float(rows["fp32"]["ratio_to_fp32"]) == 1.0
    assert size["bf16"] * 2 == pytest.approx(size["fp32"], rel=1e-4)  # every tensor halves (buffers too)
    for method, row in rows.items():
        assert float(row["ratio_to_fp32"]) == pytest.approx(size[method] / size["fp32"], abs=1e-4)
    # plain dtypes report what they hold; the from-scratch int8 buffers are reported honestly too
    assert int(rows["fp32"]["reported_bytes"]) == size["fp32"]


@end_to_end
def test_measurements_are_finite(tiny_run):
    out, _ = tiny_run
    nll = helper.read_benchmark_nll(out / "smollm2_cpu_nll.npz")
    for row in read_results(out / "smollm2_cpu.csv")[1]:
        ppl = row["perplexity"]
        assert math.isfinite(ppl) and ppl > 1, row
        assert 0 < row["perplexity_se"] < ppl, row
        assert nll[row["method"]].shape == (64,)  # --ppl-tokens scored tokens
        assert ppl == pytest.approx(math.exp(nll[row["method"]].mean().item()), rel=1e-4)
        assert row["decode_speedup_low"] <= row["decode_speedup"] <= row["decode_speedup_high"]
        for column in ("decode_tokens_per_s", "load_quantize_s", "peak_rss_mb"):
            assert row[column] > 0, (column, row)


@end_to_end
def test_markdown_table_matches_csv(tiny_run):
    out, _ = tiny_run
    text = (out / "smollm2_cpu.md").read_text()
    assert text.startswith("Measured: tiny random Llama")
    table = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [line.split("|")[1].strip() for line in table] == [
        "fp32",
        "bf16",
        "w8a16-scratch",
        "w8a8-smoothquant",
        "rtn-int4-g128",
    ]


@end_to_end
def test_unknown_method_is_rejected():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--methods", "int3-magic"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


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
