"""Tolerance table: every claim the lessons assert, its bounds, and the value measured per pass.

Record the claims of two test passes, then build the table:
    QUANT_COURSE_CLAIMS_LOG=/tmp/claims_native.jsonl make nbval
    QUANT_COURSE_CLAIMS_LOG=/tmp/claims_avx2.jsonl make nbval-avx2
    python scripts/claims_table.py /tmp/claims_native.jsonl /tmp/claims_avx2.jsonl
(one log holding both passes works too: records are grouped by the CPU capability they name).
Prints a markdown table (claim, bounds, one value column per CPU capability)
and, per lesson, how many cells with output are compared exactly, backed by an assertion, or
ignored without one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def read_logs(paths: list[Path]) -> list[tuple[str, dict[str, dict]]]:
    """[(CPU capability, {claim text: its last record})], one entry per capability found in the logs."""
    by_cpu: dict[str, dict[str, dict]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                by_cpu.setdefault(record["cpu"], {})[record["claim"]] = record
    return list(by_cpu.items())


def fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    return f"{value:.4g}"


def main(paths: list[str]) -> int:
    logs = read_logs([Path(p) for p in paths])
    claims = list(dict.fromkeys(c for _, log in logs for c in log))
    print("| claim | bounds | " + " | ".join(cpu for cpu, _ in logs) + " |")
    print("|---|---|" + "---:|" * len(logs))
    for text in claims:
        first = next(log[text] for _, log in logs if text in log)
        low = "-inf" if first["low"] is None else fmt(first["low"])
        high = "inf" if first["high"] is None else fmt(first["high"])
        bounds = "true" if first["low"] is None and first["high"] is None else f"[{low}, {high}]"
        values = [fmt(log[text]["value"]) if text in log else "not run" for _, log in logs]
        print(f"| {text} | {bounds} | " + " | ".join(values) + " |")
    from helper import NOTEBOOKS, output_checks

    print("\n| lesson | cells with output | compared exactly | backed by an assertion | ignored, unbacked |")
    print("|---|---:|---:|---:|---:|")
    for path in NOTEBOOKS:
        total, exact, backed = output_checks(path)
        print(f"| {path.stem} | {total} | {exact} | {backed} | {total - exact - backed} |")
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1:]))
