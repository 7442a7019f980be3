"""benchmarks/compare_methods.py, the capstone benchmark: end to end on a tiny random Llama (no timings asserted),
and how it reports a method whose process fails."""

from __future__ import annotations

import csv
import datetime as dt
import math
import os
import re
import shutil
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


TINY_SETTINGS = ["--ppl-tokens", "64", "--window", "32", "--new-tokens", "2", "--repeats", "2"]


@end_to_end
def test_update_replaces_the_named_rows_and_keeps_every_other(tiny_run, tmp_path):
    """--update on a copy of the tiny run: the re-measured row (spoiled first, so that its replacement shows)
    comes back as the script measures it, a new method is appended, every other row stays byte for byte."""
    import numpy as np

    out, _ = tiny_run
    target = tmp_path / "results"
    shutil.copytree(out, target)
    csv_path, md_path, nll_path = target / "smollm2_cpu.csv", target / "smollm2_cpu.md", target / "smollm2_cpu_nll.npz"
    first, *table = csv_path.read_text().splitlines()
    rows = list(csv.DictReader(table))
    spoiled = next(r for r in rows if r["method"] == "rtn-int4-g128")
    measured = dict(spoiled)
    spoiled.update(perplexity="999.0", library="spoiled")
    with open(csv_path, "w", newline="") as handle:
        handle.write(first + "\n")
        writer = csv.DictWriter(handle, fieldnames=list(helper.BENCHMARK_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    md = md_path.read_text().splitlines()
    md = [line if not line.startswith("| rtn-int4-g128 |") else "| rtn-int4-g128 | spoiled |" for line in md]
    md_path.write_text("\n".join(md) + "\n")
    with np.load(nll_path) as data:
        nll = {k: data[k] for k in data.files}
    original_nll = nll["rtn-int4-g128"].copy()
    np.savez_compressed(nll_path, **{**nll, "rtn-int4-g128": np.zeros_like(original_nll)})
    before_csv, before_md = csv_path.read_text().splitlines(), md_path.read_text().splitlines()

    cmd = [sys.executable, str(SCRIPT), "--tiny", "--update", "--methods", "rtn-int4-g128", "nf4-g128"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        cmd + TINY_SETTINGS + ["--out", str(target)], capture_output=True, text=True, cwd=REPO, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    after_csv = csv_path.read_text().splitlines()
    today = dt.datetime.now(dt.timezone.utc).date().isoformat()
    note = f"; rows rtn-int4-g128, nf4-g128 re-measured on {today} with --update: "
    assert after_csv[0].startswith(before_csv[0] + note) and after_csv[0].endswith("at start")
    assert "cores, torch " in after_csv[0][len(before_csv[0]) :]
    at = next(i for i, line in enumerate(before_csv) if line.startswith("rtn-int4-g128,"))
    assert after_csv[1:at] == before_csv[1:at] and after_csv[at + 1 : -1] == before_csv[at + 1 :]  # kept as written
    _, new_rows = read_results(csv_path)
    by_method = {r["method"]: r for r in new_rows}
    assert [r["method"] for r in new_rows] == ["fp32", "bf16", "w8a16-scratch", "w8a8-smoothquant"] + [
        "rtn-int4-g128",
        "nf4-g128",
    ]
    rtn = by_method["rtn-int4-g128"]
    assert rtn["library"] == measured["library"] and rtn["bytes"] == int(measured["bytes"])
    assert rtn["perplexity"] == pytest.approx(float(measured["perplexity"]), rel=1e-4)  # re-measured, not 999
    for method in ("rtn-int4-g128", "nf4-g128"):
        assert by_method[method]["ratio_to_fp32"] == pytest.approx(
            by_method[method]["bytes"] / by_method["fp32"]["bytes"], abs=1e-4
        )
    after_nll = helper.read_benchmark_nll(nll_path)
    assert list(after_nll) == list(nll) + ["nf4-g128"]
    assert np.allclose(after_nll["rtn-int4-g128"].numpy(), original_nll, atol=2e-5)
    assert all(np.array_equal(after_nll[m].numpy(), nll[m].astype("float64")) for m in nll if m != "rtn-int4-g128")
    assert rtn["perplexity"] == pytest.approx(math.exp(after_nll["rtn-int4-g128"].mean().item()), rel=1e-4)

    after_md = md_path.read_text().splitlines()
    assert after_md[0] == "Measured: " + after_csv[0][2:]
    md_at = before_md.index("| rtn-int4-g128 | spoiled |")
    assert after_md[1:md_at] == before_md[1:md_at] and after_md[md_at].startswith("| rtn-int4-g128 | course helper")
    assert (
        after_md[md_at + 1].startswith("| nf4-g128 | course helper") and after_md[md_at + 2 :] == before_md[md_at + 1 :]
    )


def test_update_refuses_what_it_cannot_merge(tmp_path, capsys):
    cm = _compare_methods()
    with pytest.raises(SystemExit) as exit_info:  # no method named: --update would re-measure everything
        cm.parse_args(["--update"])
    assert exit_info.value.code == 2 and "name them" in capsys.readouterr().err
    assert cm.main(["--update", "--methods", "rtn-int4-g128", "--out", str(tmp_path)]) == 2
    assert "needs the results of an earlier run" in capsys.readouterr().err
    (tmp_path / cm.CSV_NAME).write_text("# tiny random Llama (tests) on some CPU\nmethod\n")
    (tmp_path / cm.MD_NAME).write_text("Measured: tiny random Llama (tests) on some CPU\n")
    cm.write_nll([{"method": "fp32", "nll": [1.0] * 64}], tmp_path / cm.NLL_NAME)
    assert cm.main(["--update", "--methods", "fp32", "--out", str(tmp_path)]) == 2  # SmolLM2 into tiny results
    assert "would not compare" in capsys.readouterr().err
    args = ["--tiny", "--update", "--methods", "fp32", "--ppl-tokens", "128", "--window", "32", "--out", str(tmp_path)]
    assert cm.main(args) == 2  # 128 scored tokens where the file has 64
    assert "would not compare" in capsys.readouterr().err


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
