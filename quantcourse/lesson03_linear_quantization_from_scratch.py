"""Lesson 3 — linear quantization from scratch (notebooks/03_linear_quantization_from_scratch.ipynb).

Scale and zero point, symmetric and asymmetric, per tensor / channel / group, W8A16Linear, bit packing.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from quantcourse.core.surgery import replace_linears

__all__ = [
    "PACK_BITS",
    "int_range",
    "linear_q_params",
    "linear_quantize",
    "linear_dequantize",
    "quantize_per_channel",
    "dequantize_per_channel",
    "quantize_per_group",
    "dequantize_per_group",
    "quantization_error",
    "W8A16Linear",
    "replace_linear_with_w8a16",
    "pack_weights",
    "unpack_weights",
]


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
    return _linear_quantize(tensor, scale, zero_point, bits)


def _linear_quantize(
    tensor: torch.Tensor, scale: float | torch.Tensor, zero_point: int | torch.Tensor | None, bits: int
) -> torch.Tensor:
    """`linear_quantize` for a tensor its caller has checked; zero_point None: symmetric (adding 0 changes no code)."""
    qmin, qmax = int_range(bits)
    scale_t = torch.as_tensor(scale, dtype=torch.float32)
    if not (torch.isfinite(scale_t).all() and (scale_t > 0).all()):
        raise ValueError("linear_quantize needs finite, positive scale(s)")
    q = tensor.float() / scale_t
    if zero_point is not None:
        zero_t = torch.as_tensor(zero_point)
        if zero_t.is_floating_point() or zero_t.dtype == torch.bool:
            raise TypeError(f"zero_point must be an integer, got {zero_t.dtype}")
        q = q + zero_t
    return q.round_().clamp_(qmin, qmax).to(torch.int8)


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


def _channel_rows(w: torch.Tensor, axis: int) -> tuple[torch.Tensor, list[int]]:
    """(w as (slices along `axis`, everything else), the keepdim shape of one value per slice)."""
    if not -w.dim() <= axis < w.dim():
        raise ValueError(f"axis {axis} is out of range for a tensor with {w.dim()} dims")
    axis = axis % w.dim()
    rows = w.movedim(axis, 0)
    if rows.dim() != 2:
        rows = rows.reshape(w.shape[axis], -1)
    shape = [1] * w.dim()
    shape[axis] = w.shape[axis]
    return rows, shape


def _channel_min_max(w: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max over every dim except `axis`, shaped to broadcast against `w` (keepdim)."""
    rows, shape = _channel_rows(w, axis)
    return rows.min(dim=1).values.reshape(shape), rows.max(dim=1).values.reshape(shape)


def quantize_per_channel(
    w: torch.Tensor, bits: int = 8, axis: int = 0, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int8, scale float32, zero_point int32): one scale per slice along `axis` (keepdim shapes).

    The course's one per-row absmax quantizer (symmetric=True): Lesson 8's quantize_rows_absmax
    (a row per token or per output channel) and Lesson 12's quantize_int8_per_channel (the int8
    kernels' weights) call it. Asymmetric, it is the integer-zero-point min-max grid (the range
    widened to contain 0) that Lesson 9's rtn_quantize uses with fp16 scales
    (tests/test_course_one_implementation.py shows where the two differ).
    """
    _check_float(w, "quantize_per_channel")
    if w.dim() < 1:
        raise ValueError("quantize_per_channel needs a tensor with at least one dimension")
    return _quantize_per_channel(w, bits, axis, symmetric)


def _quantize_per_channel(
    w: torch.Tensor, bits: int, axis: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quantize_per_channel` for a tensor its caller has checked (Lessons 8 and 12 check their own)."""
    if symmetric:  # max(|min|, |max|) is max |x|: one reduction instead of two
        rows, shape = _channel_rows(w, axis)
        absmax = rows.abs().amax(dim=1).reshape(shape)
        scale, zero_point = _scale_zero_point(absmax, absmax, bits, symmetric)
        return _linear_quantize(w, scale, None, bits), scale, zero_point
    lo, hi = _channel_min_max(w, axis)
    scale, zero_point = _scale_zero_point(lo, hi, bits, symmetric)
    return _linear_quantize(w, scale, zero_point, bits), scale, zero_point


def dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_per_channel`: scale * (q - zero_point) with the keepdim shapes it returned."""
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if not torch.is_tensor(t) or t.dim() != q.dim():
            raise ValueError(f"{name} must be a tensor with as many dims as q (keepdim), got {t!r:.60}")
    return linear_dequantize(q, scale, zero_point)


def quantize_per_group(
    w: torch.Tensor, group_size: int, bits: int = 8, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8, scale float32 of shape (rows, cols // group_size)): symmetric, groups along the last dim.

    Symmetric (absmax) per group: quantize_per_channel on rows of `group_size` weights. The min-max
    group quantizers of the later lessons (Lesson 4's blockwise_minmax_rtn, Lesson 9's rtn_quantize,
    Lesson 12's quantize_int4_groups) each use another grid; tests/test_course_one_implementation.py
    ties them to one another.
    """
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


def replace_linear_with_w8a16(model: nn.Module, exclude: tuple[str, ...] | str = ("lm_head",)) -> nn.Module:
    """Swap every nn.Linear whose qualified name is not excluded for a W8A16Linear, in place.

    The loop is core.surgery's replace_linears (every lesson's swap, Lessons 3 to 9): it warns when
    a swapped weight is tied to another module's, as SmolLM2's lm_head is to the embedding.
    """
    return replace_linears(model, W8A16Linear.from_linear, exclude, replacement="the int8 copy")


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
