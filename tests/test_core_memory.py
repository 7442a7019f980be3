"""core/memory.py: resident memory now and at its peak, in this process and in fresh ones; giving memory back."""

import contextlib
import io
import os
import platform
import sys
import time

import pytest

import helper


def _statm_rss_mb() -> float:
    """This process's resident memory read from /proc/self/statm (pages), not through psutil."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _vmhwm_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) * 1024 / 1e6


LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux only)")


@LINUX
def test_rss_mb_is_the_resident_size_the_kernel_reports():
    before = _statm_rss_mb()
    rss = helper.rss_mb()
    after = _statm_rss_mb()
    assert min(before, after) - 1 <= rss <= max(before, after) + 1


@LINUX
def test_the_peak_snippet_prints_this_processs_high_water_mark():
    low = _vmhwm_mb()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(helper.PEAK_SNIPPET, {})
    tag, value = out.getvalue().split()
    assert tag == "__PEAK_MB__" and low <= float(value) <= _vmhwm_mb()
    assert low <= helper.peak_rss_mb() <= _vmhwm_mb()


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's"
)
def test_malloc_trim_gives_freed_heap_pages_back():
    pieces = [b"x" * 60_000 for _ in range(1000)]  # 60 MB in heap chunks (below glibc's mmap threshold), touched
    del pieces[::2]  # free every other one: the heap cannot shrink from its top, only trimming returns them
    before = _statm_rss_mb()
    assert helper.malloc_trim() is True
    assert before - _statm_rss_mb() > 15  # about 30 MB were freed
    del pieces


@pytest.mark.slow
@pytest.mark.cpu_independent  # process memory, no kernel: the forced-AVX2 pass leaves it out
def test_fresh_process_peak_sees_the_child_allocation():
    idle = helper.fresh_process_peak_mb("pass")
    busy = helper.fresh_process_peak_mb("data = b'x' * 200_000_000")  # touches 200 MB
    assert 0 < idle < busy
    assert 180 < busy - idle < 260


@pytest.mark.slow
@pytest.mark.cpu_independent  # process memory, no kernel: the forced-AVX2 pass leaves it out
def test_fresh_process_peak_does_not_inherit_the_parent_size():
    ballast = b"y" * 800_000_000  # the parent holds 800 MB: ru_maxrss would leak it to the child
    assert helper.peak_rss_mb() > 800
    assert helper.fresh_process_peak_mb("pass") < 600  # the child imports torch (~250 MB), no more
    del ballast


@pytest.mark.cpu_independent  # process memory, no kernel: the forced-AVX2 pass leaves it out
def test_fresh_process_peak_reports_child_errors():
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        helper.fresh_process_peak_mb("1 / 0")


def test_fresh_process_peak_rejects_non_str_code():
    with pytest.raises(TypeError, match="str"):
        helper.fresh_process_peak_mb(b"pass")


@pytest.mark.slow
@pytest.mark.cpu_independent  # process memory, no kernel: the forced-AVX2 pass leaves it out
def test_fresh_process_peaks_each_child_has_its_own_peak_and_keeps_its_name():
    ballast = b"y" * 800_000_000  # this process holds 800 MB; ru_maxrss would carry it into a child
    assert helper.peak_rss_mb() > 800
    codes = {"idle": "pass", "busy": "data = b'x' * 300_000_000\ndel data", "idle2": "pass"}
    peaks = helper.fresh_process_peaks_mb(codes, workers=1)  # one after the other: idle2 is forked after busy
    del ballast
    assert list(peaks) == ["idle", "busy", "idle2"]
    assert peaks["idle"] < 600  # not the caller's 800 MB
    assert peaks["busy"] - peaks["idle"] > 250  # the child's own 300 MB
    assert abs(peaks["idle2"] - peaks["idle"]) < 50  # not the earlier child's peak: the server never held it
    with pytest.raises(TypeError, match="non-empty dict"):
        helper.fresh_process_peaks_mb({})
    with pytest.raises(ValueError, match="workers"):
        helper.fresh_process_peaks_mb({"idle": "pass"}, workers=0)
    with pytest.raises(TypeError, match="str"):
        helper.fresh_process_peaks_mb({"idle": b"pass"})


@pytest.mark.slow
@pytest.mark.cpu_independent  # process memory, no kernel: the forced-AVX2 pass leaves it out
def test_fresh_process_peaks_reports_which_child_failed():
    with pytest.raises(RuntimeError, match=r"'bad'(.|\n)*ZeroDivisionError"):
        helper.fresh_process_peaks_mb({"fine": "pass", "bad": "1 / 0"})


@pytest.mark.slow
@pytest.mark.cpu_independent  # process memory, no kernel: the forced-AVX2 pass leaves it out
def test_fresh_process_peaks_stops_a_child_that_hangs():
    import psutil

    code = "import time\ntime.sleep(600)  # fresh_process_peaks_mb test"
    with pytest.raises(TimeoutError, match="did not finish"):
        helper.fresh_process_peaks_mb({"hangs": code}, timeout=6)
    time.sleep(0.5)
    left = [p for p in psutil.process_iter(["cmdline"]) if "__PEAKS__" in " ".join(p.info["cmdline"] or [])]
    assert not left  # the server and its children were stopped
