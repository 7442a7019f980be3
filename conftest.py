"""pytest configuration shared by the unit tests and nbval: say which CPU kernels this pass uses."""

import os

import torch

FORCING = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "FBGEMM_ENABLE_INSTRUCTIONS")


def pytest_report_header(config):
    forced = ", ".join(f"{name}={os.environ[name]}" for name in FORCING if name in os.environ)
    how = f"forced: {forced}" if forced else "this CPU's own kernels"
    return f"CPU kernels: torch capability {torch.backends.cpu.get_cpu_capability()} ({how})"
