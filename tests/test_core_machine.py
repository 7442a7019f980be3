"""core/machine.py: the CPU's instruction sets read from /proc/cpuinfo, and `claim`, which fails loudly."""

import json
import re
from pathlib import Path

import pytest

import helper


@pytest.fixture(autouse=True)
def _no_claims_log(monkeypatch):
    """These tests' claims are not the lessons': keep them out of a claims log set for a test pass."""
    monkeypatch.delenv(helper.CLAIMS_LOG, raising=False)


def test_cpu_instruction_sets_reads_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert helper.cpu_instruction_sets(info) == {
        "avx2": True,
        "avx512f": True,
        "avx512_vnni": False,
        "avx512_bf16": True,
        "amx_tile": False,
    }
    assert not any(helper.cpu_instruction_sets(tmp_path / "missing").values())


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="no /proc/cpuinfo on this system")
def test_cpu_instruction_sets_agree_with_a_word_search_of_this_machines_cpuinfo():
    text = Path("/proc/cpuinfo").read_text()
    found = helper.cpu_instruction_sets()
    assert list(found) == list(helper.INSTRUCTION_SETS)
    for flag in helper.INSTRUCTION_SETS:  # a flag is a whole word of a "flags" line
        assert found[flag] == bool(re.search(rf"^flags\s*:.*\b{flag}\b", text, re.M)), flag


def test_claim_prints_and_passes(capsys):
    helper.claim("two is between one and three", 2.0, 1.0, 3.0)
    helper.claim("a true statement", True)
    assert capsys.readouterr().out == "✓ two is between one and three\n✓ a true statement\n"


@pytest.mark.parametrize("value, low, high", [(3.5, 1.0, 3.0), (0.5, 1.0, None), (float("nan"), 0.0, 1.0)])
def test_claim_out_of_bounds_raises_with_the_value(value, low, high):
    with pytest.raises(AssertionError, match="measured value is"):
        helper.claim("a bounded statement", value, low, high)


def test_claim_false_raises_and_bad_input_is_refused():
    with pytest.raises(AssertionError, match="The lesson says: it is false"):
        helper.claim("it is false", 0)
    with pytest.raises(TypeError):
        helper.claim("", True)
    with pytest.raises(TypeError):
        helper.claim("a bounded claim needs a number", "3", 1, 5)


def test_claims_are_logged_when_asked(tmp_path, monkeypatch):
    import torch

    log = tmp_path / "claims.jsonl"
    monkeypatch.setenv(helper.CLAIMS_LOG, str(log))
    helper.claim("logged claim", 0.5, 0.0, 1.0)
    record = json.loads(log.read_text())
    assert record["claim"] == "logged claim" and record["value"] == 0.5 and record["holds"] is True
    assert record["cpu"] == helper.cpu_capability() == torch.backends.cpu.get_cpu_capability()
