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

__all__ = [
    "CLAIMS_LOG",
    "cpu_capability",
    "claim",
    "CPU_FLAGS",
    "INSTRUCTION_SETS",
    "KERNEL_FLAGS",
    "cpu_flags",
    "cpu_model_name",
    "cpu_instruction_sets",
    "last_level_cache_bytes",
]


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


CPU_FLAGS = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX-512 VNNI (int8 dot products)",
    "avx_vnni": "AVX-VNNI (int8 dot products on 256-bit vectors)",
    "avx512_bf16": "AVX-512 BF16 (bf16 dot products)",
    "amx_tile": "AMX (matrix tiles)",
    "amx_int8": "AMX-INT8 (int8 tile products)",
    "amx_bf16": "AMX-BF16 (bf16 tile products)",
}
"""The course's one list of CPU flags (as /proc/cpuinfo names them) that decide which int8 and bf16
kernels are fast, and what they mean. Lesson 12 explains INSTRUCTION_SETS; the benchmark's machine
line and Lesson 14 list KERNEL_FLAGS."""

INSTRUCTION_SETS = {flag: CPU_FLAGS[flag] for flag in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")}
"""The instruction sets Lesson 12 explains (`cpu_instruction_sets`): AMX as one set, its tiles."""

KERNEL_FLAGS = tuple(flag for flag in CPU_FLAGS if flag != "amx_tile")
"""The flags the benchmark's machine line and Lesson 14 report: AMX as the products it computes
(amx_int8, amx_bf16; a CPU with either has amx_tile), and the 256-bit avx_vnni."""


def _cpuinfo_lines(cpuinfo: str | Path) -> list[str] | None:
    """The lines of /proc/cpuinfo (or of the file given), None where it cannot be read."""
    try:
        return Path(cpuinfo).read_text().splitlines()
    except OSError:
        return None


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo", wanted=CPU_FLAGS) -> dict[str, bool] | None:
    """{flag: whether this CPU has it} for each of `wanted` (default CPU_FLAGS), from the first
    "flags" line of /proc/cpuinfo; None where the file cannot be read (not Linux).

    The course's one reader of the CPU's flags: `cpu_instruction_sets` (Lesson 12), the
    benchmark's machine line and Lesson 14 call it.
    """
    lines = _cpuinfo_lines(cpuinfo)
    if lines is None:
        return None
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return {flag: flag in flags for flag in wanted}


def cpu_model_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """The CPU's model name, from the first "model name" line of /proc/cpuinfo; None where there is none."""
    lines = _cpuinfo_lines(cpuinfo)
    return next((line.split(":", 1)[1].strip() for line in lines or [] if line.startswith("model name")), None)


def cpu_instruction_sets(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, bool]:
    """Which of INSTRUCTION_SETS this CPU has (read from /proc/cpuinfo; all False where it cannot be read).

    torch may use fewer than the CPU has: `helper.cpu_capability()` says which kernels it
    dispatches to (ATEN_CPU_CAPABILITY=avx2 forces AVX2 on an AVX-512 CPU).
    """
    found = cpu_flags(cpuinfo, INSTRUCTION_SETS)
    return found if found is not None else dict.fromkeys(INSTRUCTION_SETS, False)


def last_level_cache_bytes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """Size in bytes of the largest (highest-level) data or unified cache of CPU 0, from Linux's
    sysfs (`index*/level`, `type`, `size` such as "32768K"); None where sysfs does not say.

    A bandwidth measurement or a set of weights smaller than this may be served by the cache
    rather than by memory. Taught in Lesson 12 (its memory-bandwidth measurement).
    """
    best = None
    for index in sorted(Path(root).glob("index*")):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or not size:
            continue
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1].upper(), 1)
        try:
            nbytes = int(size.rstrip("KkMmGg")) * unit
        except ValueError:
            continue
        if best is None or level > best[0] or (level == best[0] and nbytes > best[1]):
            best = (level, nbytes)
    return None if best is None else best[1]
