"""Lesson 7 — bitsandbytes and the Model API workflow (notebooks/07_bitsandbytes.ipynb)."""

from __future__ import annotations

import torch
from torch import nn

from quantcourse.core.sizes import tensor_nbytes

__all__ = ["BNB_MODES", "bnb_quantize_linear", "detach_from_checkpoint"]


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
