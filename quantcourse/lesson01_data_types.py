"""Lesson 1 — numeric data types (notebooks/01_data_types.ipynb): the bits of a float, exact integers."""

from __future__ import annotations

import math

import torch

__all__ = ["float_bits", "largest_exact_integer"]


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def float_bits(value: float, dtype: torch.dtype) -> tuple[str, str, str]:
    """Sign, exponent and mantissa bit strings of `value` rounded to the float `dtype`.

    The split is computed, not read off a bit pattern: the mantissa gets log2(1/eps) bits
    (`torch.finfo(dtype).eps` = 2**-mantissa_bits), the exponent the bits left after the sign.
    """
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
