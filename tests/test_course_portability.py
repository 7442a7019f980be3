"""The second test pass (`make test-avx2`) really runs other kernels than this CPU's own."""

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
import json, torch, helper, bitsandbytes.functional as F, torchao.kernel.intmm as intmm
g = torch.Generator().manual_seed(0)
a, b = torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g)
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(),
                  "bnb_bf16_kernel": bool(F.has_avx512bf16()),
                  "torchao_u8s8": intmm._cpu_is_vnni_supported() and not intmm._cpu_is_amx_tile_supported(),
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


@pytest.fixture(scope="module")
def probes():
    return _probe({}), _probe(AVX2)


@pytest.mark.slow
def test_forcing_avx2_changes_the_kernels(probes):
    native, forced = probes
    assert forced["capability"] == "AVX2"
    assert forced["bnb_bf16_kernel"] is False  # quantcourse's import hook, as on a real AVX2 CPU
    assert forced["torchao_u8s8"] is False  # torchao's dynamic int8 takes s8s8, as on a real AVX2 CPU
    if native["capability"] in ("AVX2", "DEFAULT"):  # torch's kernel levels: DEFAULT < AVX2 < AVX512
        pytest.skip(f"this CPU's own kernels are {native['capability']}: there is no higher level to force down from")
    # torch dispatches its CPU kernels to another instruction set in the forced pass, on every CPU above AVX2
    assert native["capability"] != forced["capability"]
    if native["capability"] == "AVX512" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        # a CPU with native bf16 matmuls: the forced pass must really compute differently
        assert native["bf16_sum"] != forced["bf16_sum"]
