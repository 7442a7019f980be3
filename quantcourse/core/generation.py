"""Generation: greedy answers from a chat model, used by every lesson that shows what a model says."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["get_generation", "chat", "with_generation_config"]


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


def with_generation_config(model: nn.Module, **settings: Any) -> nn.Module:
    """A second handle on a transformers `model`, sharing its modules and weights (no copy), whose
    generate() uses other settings, e.g. cache_implementation="static"."""
    if not hasattr(model, "generation_config"):
        raise TypeError(f"{type(model).__name__} has no generation_config: expected a transformers model")
    other = copy.copy(model)  # shallow: parameters, buffers and submodules are shared
    other.generation_config = copy.deepcopy(model.generation_config)
    for key, value in settings.items():
        if not hasattr(other.generation_config, key):
            raise ValueError(f"transformers' GenerationConfig has no setting {key!r}")
        setattr(other.generation_config, key, value)
    return other
