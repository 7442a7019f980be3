"""The second test pass really runs other kernels, and the claims API fails loudly."""

import json
import os
import subprocess
import sys

import pytest
import torch

import helper

AVX2 = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
}
PROBE = """
import json, torch, helper, bitsandbytes.functional as F
g = torch.Generator().manual_seed(0)
a, b = torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g)
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(),
                  "bnb_bf16_kernel": bool(F.has_avx512bf16()),
                  "bf16_sum": (a.bfloat16() @ b.bfloat16()).float().sum().item()}))
"""


def _probe(env: dict) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in AVX2}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=helper.REPO_DIR,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(autouse=True)
def _no_claims_log(monkeypatch):
    """These tests' claims are not the lessons': keep them out of a claims log set for a test pass."""
    monkeypatch.delenv(helper.CLAIMS_LOG, raising=False)


@pytest.fixture(scope="module")
def probes():
    return _probe({}), _probe(AVX2)


@pytest.mark.slow
def test_forcing_avx2_changes_the_kernels(probes):
    native, forced = probes
    assert forced["capability"] == "AVX2"
    assert forced["bnb_bf16_kernel"] is False  # helper's import hook, as on a real AVX2 CPU
    if native["capability"] == "AVX512" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        # a CPU with native bf16 matmuls: the forced pass must really compute differently
        assert native["bf16_sum"] != forced["bf16_sum"]


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
    log = tmp_path / "claims.jsonl"
    monkeypatch.setenv(helper.CLAIMS_LOG, str(log))
    helper.claim("logged claim", 0.5, 0.0, 1.0)
    record = json.loads(log.read_text())
    assert record["claim"] == "logged claim" and record["value"] == 0.5 and record["holds"] is True
    assert record["cpu"] == helper.cpu_capability()


def test_check_versions_flags_a_library_outside_its_range(tmp_path):
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("torch==0.0.1  # impossible pin\n")
    with pytest.raises(AssertionError, match="torch"):
        helper.check_versions(reqs)
    helper.check_versions()  # the repo's own ranges hold in the test environment
