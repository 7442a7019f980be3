"""The quantization course's code: one module per lesson, named after its notebook, and `core/`.

Notebooks, benchmarks and scripts import `helper` (helper.py, the facade that re-exports every
module's `__all__`); tests may import a module itself. The contents, lesson by lesson, are in
helper.py's docstring; the import rules (core modules import earlier core modules only, a lesson
imports core and earlier lessons only, nothing here imports `helper`) are checked by
tests/test_course_layout.py.

Importing the package (any of its modules) first quiets a few loggers and, when the tests force the
CPU kernels down, keeps bitsandbytes off its AVX512-BF16 kernel: both must happen before those
libraries are imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys

# Two libraries print start-up noise that varies from run to run and teaches nothing: torchao
# warns that its CUDA-only extensions do not load on a CPU wheel, and torch's pytree warns about
# torchao's enums. Silence exactly those loggers (before torchao is first imported).
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
# bitsandbytes: on CPUs with AVX512-BF16 it logs that the optional `kernels` package (a faster
# 4-bit kernel fetched from the Hub) is missing, and LLM.int8() logs "MatMul8bitLt: inputs will
# be cast ... to float16" at every forward pass. Lesson 7 explains both; the lines teach nothing.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


class _ForcedKernelFinder(importlib.abc.MetaPathFinder):
    """Keeps bitsandbytes and torchao on the kernels of a real AVX2 CPU when the tests force them down.

    `make test` runs every lesson twice: natively and with ATEN_CPU_CAPABILITY=avx2 (plus the
    oneDNN, MKL and FBGEMM switches, see the Makefile), to prove the lessons' claims on a CPU
    without AVX-512. Two libraries ask the CPU itself, so no environment variable reaches them:
    - bitsandbytes (CPUID) whether it may use its fused AVX512-BF16 4-bit kernel;
    - torchao's dynamic int8 matmul whether the CPU has AVX512-VNNI (and no AMX): then it shifts the
      activations to uint8 for a u8s8 kernel, which oneDNN capped at AVX2 runs with 16-bit pair sums
      that saturate (a path no real CPU takes: a real AVX2 CPU has no VNNI and takes s8s8).
    This import hook answers "no" for both, as the modules load. On a real AVX2 CPU it changes nothing.
    """

    def find_spec(self, name, path, target=None):
        if name not in ("bitsandbytes.backends.cpu.ops", "torchao.kernel.intmm"):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            if name == "bitsandbytes.backends.cpu.ops":
                import bitsandbytes.functional

                bitsandbytes.functional.has_avx512bf16 = lambda: False
            run_module(module)
            if name == "torchao.kernel.intmm":
                module._cpu_is_vnni_supported = lambda: False
                module._cpu_is_amx_tile_supported = lambda: False

        spec.loader.exec_module = exec_module
        return spec


FORCED_DOWN = os.environ.get("ATEN_CPU_CAPABILITY", "").lower() not in {"", "avx512"}
"""True in the test pass that forces the CPU kernels below AVX-512 (see _ForcedKernelFinder)."""
if FORCED_DOWN:
    sys.meta_path.insert(0, _ForcedKernelFinder())

# huggingface_hub reads this once, when it is first imported (transformers imports it)
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
