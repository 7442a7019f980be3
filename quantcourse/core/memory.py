"""Process memory: resident set size, peaks measured in fresh processes, giving freed memory back.

Taught in Lesson 2 (peaks of fresh processes); used by every lesson that loads several models.
"""

from __future__ import annotations

import os

from quantcourse.core.config import REPO_DIR

__all__ = ["PEAK_SNIPPET", "fresh_process_peak_mb", "fresh_process_peaks_mb", "peak_rss_mb", "rss_mb", "malloc_trim"]


# Printed by the child of fresh_process_peak_mb (peak_rss_mb reads the child's own VmHWM).
PEAK_SNIPPET = "from quantcourse.core.memory import peak_rss_mb; print('__PEAK_MB__', peak_rss_mb())"


def _child_env() -> dict[str, str]:
    """The environment of a measuring child process: this one's, with progress bars and warnings quiet."""
    return dict(os.environ, HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")


def fresh_process_peak_mb(code: str, timeout: float = 600.0) -> float:
    """Run Python `code` in a fresh interpreter and return that process's peak resident memory in MB."""
    import subprocess
    import sys

    if not isinstance(code, str):
        raise TypeError(f"fresh_process_peak_mb expects Python source as a str, got {type(code).__name__}")
    result = subprocess.run(
        [sys.executable, "-c", code + "\n" + PEAK_SNIPPET],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_DIR,
        env=_child_env(),
    )
    if result.returncode != 0:
        raise RuntimeError(f"the child process failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    lines = [line for line in result.stdout.splitlines() if line.startswith("__PEAK_MB__ ")]
    if not lines:
        raise RuntimeError("the child process did not report its peak memory")
    return float(lines[-1].split()[1])


_FORK_SERVER = r"""
import json, os, sys, traceback
import torch, transformers, helper  # imported once here; every child is forked with them loaded
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # and transformers' lazy modules

job = json.loads(sys.stdin.read())
pending, running, results = list(job["codes"].items()), {}, {}
while pending or running:
    while pending and len(running) < job["workers"]:
        name, code = pending.pop(0)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: run the code, report its own high-water mark, exit
            os.close(read_end)
            try:
                exec(compile(code, name, "exec"), {"__name__": "__main__"})
                message = {"peak_mb": helper.peak_rss_mb()}
            except BaseException:
                message = {"error": traceback.format_exc()[-2000:]}  # small: fits the pipe's buffer
            os.write(write_end, json.dumps(message).encode())
            os._exit(0)
        os.close(write_end)
        running[pid] = (name, read_end)
    pid, _ = os.wait()
    name, read_end = running.pop(pid)
    with os.fdopen(read_end) as pipe:
        results[name] = json.loads(pipe.read() or '{"error": "the child died without a report"}')
print("__PEAKS__", json.dumps(results))
"""


def fresh_process_peaks_mb(codes: dict[str, str], workers: int = 2, timeout: float = 600.0) -> dict[str, float]:
    """Peak resident memory (MB) of each named piece of code, each run in a process of its own.

    Faster than `fresh_process_peak_mb` per piece: one fresh interpreter imports torch,
    transformers and helper once, then forks a child per piece, `workers` at a time (Lesson 2's
    five: 6-7 s instead of 12 s with a fresh interpreter each, two at a time). A forked child's
    high-water mark (VmHWM) is its own, not the server's: it starts at the memory the child
    shares with the server (the imported libraries) and grows with what the child touches.
    """
    import json
    import signal
    import subprocess
    import sys

    if not isinstance(codes, dict) or not codes or not all(isinstance(c, str) for c in codes.values()):
        raise TypeError("fresh_process_peaks_mb expects a non-empty dict of name -> Python source (str)")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    with subprocess.Popen(
        [sys.executable, "-c", _FORK_SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_DIR,
        env=_child_env(),
        start_new_session=True,  # its own process group: a timeout stops the children too
    ) as server:
        try:
            out, err = server.communicate(json.dumps({"codes": codes, "workers": workers}), timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.communicate()
            raise TimeoutError(f"fresh_process_peaks_mb: the children did not finish within {timeout} s") from None
    lines = [line for line in out.splitlines() if line.startswith("__PEAKS__ ")]
    if server.returncode != 0 or not lines:
        raise RuntimeError(f"the process that forks the children failed (exit {server.returncode}):\n{err[-2000:]}")
    results = json.loads(lines[-1].split(" ", 1)[1])
    failed = {name: r["error"] for name, r in results.items() if "error" in r}
    if failed:
        name, error = next(iter(failed.items()))
        raise RuntimeError(f"the child running {name!r} failed:\n{error}")
    return {name: results[name]["peak_mb"] for name in codes}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (its own high-water mark, VmHWM)."""
    # Not ru_maxrss: Linux carries it over from the parent through fork and exec, so a child
    # started by a process holding a model would report the parent's peak.
    try:
        with open("/proc/self/status") as status:
            kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        return kib * 1024 / 1e6
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def rss_mb() -> float:
    """Current resident memory of this process, in MB."""
    import psutil

    return psutil.Process().memory_info().rss / 1e6


def malloc_trim() -> bool:
    """Ask glibc to hand freed heap memory back to the OS; True if it released some (Linux only)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to trim this way
        return False
    return bool(libc.malloc_trim(0))
