"""Sizes: the bytes a model really holds, a quantized tensor counted as its integer data and its scales.

Taught in Lesson 2 (`model_size`, `compute_module_sizes`); quantized tensors from Lesson 5 on.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterator

import torch
from torch import nn

__all__ = [
    "dtype_byte_size",
    "DATA",
    "SCALES",
    "PLAIN",
    "tensor_parts",
    "tensor_nbytes",
    "named_module_tensors",
    "unique_module_tensors",
    "compute_module_sizes",
    "model_size",
    "format_bytes",
]


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
