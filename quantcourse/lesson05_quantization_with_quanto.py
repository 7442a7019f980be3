"""Lesson 5 — linear quantization with optimum-quanto (notebooks/05_quantization_with_quanto.ipynb)."""

from __future__ import annotations

from torch import nn

from quantcourse.core.sizes import DATA, PLAIN, SCALES, tensor_parts, unique_module_tensors

__all__ = ["quanto_size_breakdown"]


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
