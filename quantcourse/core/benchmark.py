"""The capstone benchmark's committed table (benchmarks/results/): its columns and a reader.

Written by benchmarks/compare_methods.py; read by Lessons 3, 6, 8, 9, 12 and 14.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from quantcourse.core.config import REPO_DIR

__all__ = ["BENCHMARK_DIR", "BENCHMARK_COLUMNS", "read_benchmark", "read_benchmark_nll"]


BENCHMARK_DIR = REPO_DIR / "benchmarks" / "results"


BENCHMARK_COLUMNS = {
    "method": str,
    "library": str,
    "bytes": int,
    "reported_bytes": int,
    "ratio_to_fp32": float,
    "perplexity": float,
    "perplexity_se": float,
    "decode_tokens_per_s": float,
    "decode_speedup": float,
    "decode_speedup_low": float,
    "decode_speedup_high": float,
    "load_quantize_s": float,
    "peak_rss_mb": float,
}
"""The benchmark CSV's columns and their types: written by benchmarks/compare_methods.py, read here."""


def read_benchmark(path: Path | None = None) -> tuple[str, list[dict[str, Any]]]:
    """(the machine line, rows with typed values) of a benchmark CSV (default: the committed one)."""
    import csv

    path = Path(path) if path is not None else BENCHMARK_DIR / "smollm2_cpu.csv"
    lines = path.read_text().splitlines()
    if not lines or not lines[0].startswith("# "):
        raise ValueError(f"{path} does not start with the '# ...' line naming the machine")
    rows = list(csv.DictReader(lines[1:]))
    if not rows or list(rows[0]) != list(BENCHMARK_COLUMNS):
        raise ValueError(f"{path} does not have the columns {list(BENCHMARK_COLUMNS)}: regenerate it")
    return lines[0][2:], [{k: BENCHMARK_COLUMNS[k](v) for k, v in row.items()} for row in rows]


def read_benchmark_nll(path: Path | None = None) -> dict[str, torch.Tensor]:
    """Per-token NLLs of every benchmarked method (for paired comparisons), from the committed .npz."""
    import numpy as np

    path = Path(path) if path is not None else BENCHMARK_DIR / "smollm2_cpu_nll.npz"
    with np.load(path, allow_pickle=False) as data:
        return {name: torch.from_numpy(data[name].astype("float64")) for name in data.files}
