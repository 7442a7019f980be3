"""The speed ratios stored in the lessons agree with the capstone's committed table.

Both come from the course's one timing protocol (helper.decode_timings: new tokens after "The
history of", a warm-up, interleaved rounds; the lessons generate helper.DECODE_TOKENS = 8 in 3
rounds, the benchmark 32 in 5). A lesson prints each model's speed-up over fp32
with the range of its per-round speed-ups; the capstone's table gives the same for each method,
timed against an fp32 copy in the method's own process. The two agree when the ranges overlap. Stored
outputs are regenerated on an idle machine (CONTRIBUTING.md), so this holds for what a learner
reads in the repository; it says nothing about a learner's own machine.
"""

import re
from pathlib import Path

import nbformat
import pytest

import helper

NOTEBOOKS = Path(helper.REPO_DIR) / "notebooks"
# lesson notebook -> {name printed by helper.print_decode_speeds: method in the capstone table}
LESSON_METHODS = {
    "02_loading_models_in_dtypes": {"bf16": "bf16", "fp16": "fp16"},
    # not Lesson 3's W8A16: it builds a float copy of every weight at every call, and its speed moved
    # between processes (0.47x to 1.5x fp32 in lesson runs, 0.98x to 1.23x in the benchmark) for a
    # cause not yet established. The lesson prints the benchmark's row next to its own; CONTRIBUTING.md.
    # llama.cpp runs its own kernels on the file's blocks; the stored outputs come from a machine with
    # it installed (CONTRIBUTING: `make setup-llama` before a refresh), so its lines are required
    "04_gguf": {"llama.cpp Q4_1": "llama.cpp-q4_1-file"},
    "05_quantization_with_quanto": {"int8": "quanto-int8"},
    "06_dynamic_quantization": {
        "torch.ao dynamic": "torch.ao-dynamic-int8",
        "torchao dynamic": "torchao-int8-dynamic",
        # not torchao weight-only: like W8A16 it builds a float copy of every weight at every call, and
        # its speed moved between refreshes (0.5x and 1.35x fp32); Lesson 6 prints the benchmark's rows
    },
    "07_bitsandbytes": {"bnb 8-bit": "bnb-int8", "NF4": "bnb-nf4"},
    # Lesson 12's baseline is transformers' fp32 model, the benchmark's fp32 row
    "12_decode_speed": {
        "lean fp32": "fast-fp32",
        "lean int8 + bf16": "fast-int8-bf16",
        "lean int4 g32 + bf16": "fast-int4-g32-bf16",
        "llama.cpp, the Q4_1 file": "llama.cpp-q4_1-file",
    },
}
# Two processes timing the same pair differ by a few percent beyond their rounds' spread (allocator
# state, thread placement): 3% for torchao dynamic int8 between Lesson 6 and the benchmark on
# 2026-11-24. The ranges must overlap once widened by this factor; a gross disagreement (W8A16's 2x,
# when its weight copies come from fresh mmap pages; see CONTRIBUTING) still fails.
MARGIN = 1.10
LINE = re.compile(
    r"^decode (?P<name>.+?)\s+[\d.]+ tokens/s \(spread [\d.]+–[\d.]+\)\s+"
    r"(?:[\d.]+x (?P<word>faster|slower) than|about as fast as) (?:transformers )?fp32 "
    r"\(spread (?P<low>[\d.]+)–(?P<high>[\d.]+)\)$",
    re.M,
)


def speedup_range(match: re.Match) -> tuple[float, float]:
    """(lowest, highest) per-round speed-up of a parsed line: a "slower" verdict prints slow-downs."""
    low, high = float(match["low"]), float(match["high"])
    return (1 / high, 1 / low) if match["word"] == "slower" else (low, high)


def stored_text(stem: str) -> str:
    """Everything a lesson's stored outputs printed."""
    cells = nbformat.read(NOTEBOOKS / f"{stem}.ipynb", as_version=4).cells
    return "".join(output.get("text", "") for cell in cells for output in cell.get("outputs", []))


def stored_speedups(stem: str) -> dict[str, tuple[float, float]]:
    """{model name: (lowest, highest) per-round speed-up over fp32} from a lesson's stored outputs."""
    return {m["name"]: speedup_range(m) for m in LINE.finditer(stored_text(stem))}


def table_range(method: str, rows: dict) -> tuple[float, float]:
    """(lowest, highest) per-round speed-up of a method over fp32 in the capstone's table."""
    return rows[method]["decode_speedup_low"], rows[method]["decode_speedup_high"]


@pytest.mark.parametrize("stem", sorted(LESSON_METHODS))
def test_lesson_speedups_agree_with_the_capstone(stem):
    rows = {r["method"]: r for r in helper.read_benchmark()[1]}
    stored = stored_speedups(stem)
    for name, method in LESSON_METHODS[stem].items():
        assert name in stored, f"{stem} stores no decode speed for {name!r} (found {sorted(stored)})"
        low, high = stored[name]
        t_low, t_high = table_range(method, rows)
        low, high = low / MARGIN, high * MARGIN
        assert low <= t_high and t_low <= high, (
            f"{stem}: {name} speed-up over fp32 {low:.2f}–{high:.2f}, capstone {method} {t_low:.2f}–{t_high:.2f}"
        )


# Left out above because their speed moves between processes (cause open); instead each lesson prints
# the capstone's measurement (a fresh process) beside its own: {lesson: {printed name: method}}
PRINTED_BESIDE = {
    "03_linear_quantization_from_scratch": {"W8A16": "w8a16-scratch"},
    "06_dynamic_quantization": {"torchao weight-only": "torchao-int8-weight-only"},
}


@pytest.mark.parametrize("stem", sorted(PRINTED_BESIDE))
def test_the_left_out_speeds_are_printed_beside_the_benchmarks(stem):
    rows = {r["method"]: r for r in helper.read_benchmark()[1]}
    text, stored = stored_text(stem), stored_speedups(stem)
    for name, method in PRINTED_BESIDE[stem].items():
        assert name in stored and name not in LESSON_METHODS.get(stem, {})
        assert f"capstone benchmark, {name} in a fresh process: {rows[method]['decode_speedup']:.2f}x fp32" in text


def test_the_parser_reads_what_print_decode_speeds_prints(capsys):
    helper.print_decode_speeds({"fp32": [2.0, 2.0, 2.0], "bf16": [1.0, 1.1, 0.9]}, "fp32")
    parsed = {m["name"]: speedup_range(m) for m in LINE.finditer(capsys.readouterr().out)}
    assert parsed == {"bf16": (1.82, 2.22)}
    helper.print_decode_speeds({"transformers fp32": [2.0, 2.0], "lean fp32": [1.0, 1.0]}, "transformers fp32")
    parsed = {m["name"]: speedup_range(m) for m in LINE.finditer(capsys.readouterr().out)}
    assert parsed == {"lean fp32": (2.0, 2.0)}
    helper.print_decode_speeds({"fp32": [1.0, 1.0, 1.0], "slow": [2.0, 2.5, 2.2]}, "fp32")  # a slow-down's spread
    parsed = {m["name"]: speedup_range(m) for m in LINE.finditer(capsys.readouterr().out)}
    assert parsed == {"slow": (0.4, 0.5)}
