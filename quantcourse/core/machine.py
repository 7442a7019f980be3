"""The machine a number was measured on, and `claim`: prose checked on the CPU that runs it.

One reader of /proc/cpuinfo (`cpu_flags`, `cpu_model_name`, `cpu_instruction_sets`) for the lessons, the
benchmark and the course runner. `claim` is introduced in Lesson 1 and used by every lesson.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["CLAIMS_LOG", "cpu_capability", "claim", "INSTRUCTION_SETS", "cpu_instruction_sets"]


CLAIMS_LOG = "QUANT_COURSE_CLAIMS_LOG"
"""If set to a file path, every `claim` appends a JSON line (text, value, bounds, CPU) to it."""


def cpu_capability() -> str:
    """The instruction set torch's CPU kernels use here: 'AVX512', 'AVX2', 'DEFAULT', ..."""
    return torch.backends.cpu.get_cpu_capability()


def claim(text: str, value: Any, low: float | None = None, high: float | None = None) -> None:
    """Check one statement of the lesson on this machine and print it; raise if it does not hold.

    Numbers that depend on the CPU's kernels (anything computed in bf16/fp16, with int8 or
    4-bit kernels, perplexities, generated text) are not compared as text by the tests; the
    lesson asserts what its prose says about them instead. Without bounds `value` must be
    true; with them, low <= value <= high (tolerances measured on two instruction sets,
    see CONTRIBUTING.md). The printed line is the same on every machine.
    """
    if not isinstance(text, str) or not text:
        raise TypeError("claim needs the statement as a non-empty str")
    bounded = low is not None or high is not None
    if bounded:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"claim {text!r}: a bounded claim needs a number, got {value!r}")
        holds = math.isfinite(value) and (low is None or value >= low) and (high is None or value <= high)
    else:
        holds = bool(value)
    log_path = os.environ.get(CLAIMS_LOG)
    if log_path:
        record = {
            "claim": text,
            "value": value if bounded else bool(value),
            "low": low,
            "high": high,
            "holds": holds,
            "cpu": cpu_capability(),
        }
        with open(log_path, "a") as log:
            log.write(json.dumps(record) + "\n")
    if not holds:
        bounds = f", expected between {low} and {high}" if bounded else ""
        raise AssertionError(
            f"The lesson says: {text}. On this machine ({cpu_capability()} kernels) the "
            f"measured value is {value!r}{bounds}. Please report it with your CPU model."
        )
    print(f"✓ {text}")


INSTRUCTION_SETS = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX-512 VNNI (int8 dot products)",
    "avx512_bf16": "AVX-512 BF16 (bf16 dot products)",
    "amx_tile": "AMX (matrix tiles)",
}
"""CPU flags (as /proc/cpuinfo names them) that decide which kernels are fast, and what they mean."""


def cpu_instruction_sets(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, bool]:
    """Which of INSTRUCTION_SETS this CPU has (read from /proc/cpuinfo; all False where it cannot be read).

    torch may use fewer than the CPU has: `helper.cpu_capability()` says which kernels it
    dispatches to (ATEN_CPU_CAPABILITY=avx2 forces AVX2 on an AVX-512 CPU).
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        text = ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {flag: flag in flags for flag in INSTRUCTION_SETS}
