"""Lesson 6 — post-training dynamic quantization (notebooks/06_dynamic_quantization.ipynb)."""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from quantcourse.core.evaluation import eval_text
from quantcourse.core.surgery import run_rows_until_seen

__all__ = ["count_modules", "logits_diff", "activation_absmax"]


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
