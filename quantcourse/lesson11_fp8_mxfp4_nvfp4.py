"""Lesson 11 — the formats of today's accelerators: FP8, MXFP4 and NVFP4 from the bits up
(notebooks/11_fp8_mxfp4_nvfp4.ipynb).

Small *floats* with shared scales, written from scratch and checked bit for bit against the
references: torch's own FP8 casts, gguf-py's and ggml's MXFP4 quantizer, torchao's MXTensor and
NVFP4Tensor (tests/test_lesson11_fp8_mxfp4_nvfp4.py, and the lesson's cells).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from quantcourse.lesson03_linear_quantization_from_scratch import _check_float, pack_weights, unpack_weights

__all__ = [
    "FloatFormat",
    "FP8_FORMATS",
    "fp8_decode",
    "fp8_encode",
    "fp8_quantize_weight",
    "E2M1_VALUES",
    "e2m1_encode",
    "e2m1_decode",
    "mxfp4_quantize",
    "mxfp4_dequantize",
    "mxfp4_ggml_blocks",
    "nvfp4_quantize",
    "nvfp4_dequantize",
    "FP8Linear",
    "FP4Linear",
]


class FloatFormat(NamedTuple):
    """A small IEEE-like float: 1 sign bit, `ebits` exponent bits (bias `bias`), `mbits` mantissa bits.

    `max` is the largest finite value; `inf` whether the all-ones exponent holds infinities (E5M2,
    as IEEE) or, with a mantissa of all ones, the only NaN (E4M3 "fn": finite, no infinities).
    """

    name: str
    ebits: int
    mbits: int
    bias: int
    max: float
    inf: bool
    torch_dtype: torch.dtype


FP8_FORMATS = {
    "e4m3fn": FloatFormat("e4m3fn", 4, 3, 7, 448.0, False, torch.float8_e4m3fn),
    "e5m2": FloatFormat("e5m2", 5, 2, 15, 57344.0, True, torch.float8_e5m2),
}


def _format(fmt: str | FloatFormat) -> FloatFormat:
    if isinstance(fmt, FloatFormat):
        return fmt
    if fmt not in FP8_FORMATS:
        raise ValueError(f"fmt must be one of {sorted(FP8_FORMATS)}, got {fmt!r}")
    return FP8_FORMATS[fmt]


def fp8_decode(codes: torch.Tensor, fmt: str | FloatFormat) -> torch.Tensor:
    """float32 values of FP8 bytes (uint8): sign, then (1 + m / 2**mbits) * 2**(e - bias), or a subnormal
    m / 2**mbits * 2**(1 - bias) when the exponent field e is 0; the specials as `FloatFormat` says."""
    f = _format(fmt)
    if codes.dtype != torch.uint8:
        raise TypeError(f"fp8_decode expects uint8 codes, got {codes.dtype}")
    c = codes.to(torch.int32)
    e = (c >> f.mbits) & ((1 << f.ebits) - 1)
    m = (c & ((1 << f.mbits) - 1)).float()
    frac = m / (1 << f.mbits)
    v = torch.where(e == 0, torch.ldexp(frac, torch.tensor(1 - f.bias)), torch.ldexp(1 + frac, e - f.bias))
    top = e == (1 << f.ebits) - 1
    if f.inf:  # E5M2: all-ones exponent is inf (m == 0) or NaN
        v = torch.where(top & (m == 0), torch.tensor(math.inf), v)
        v = torch.where(top & (m != 0), torch.tensor(math.nan), v)
    else:  # E4M3fn: only S.1111.111 is NaN
        v = torch.where(top & (m == (1 << f.mbits) - 1), torch.tensor(math.nan), v)
    return torch.where((c >> 7) == 1, -v, v)


def fp8_encode(x: torch.Tensor, fmt: str | FloatFormat) -> torch.Tensor:
    """FP8 bytes (uint8) of float32 values, rounded to nearest, ties to even, written from the definition.

    Finite values beyond the largest finite one: E4M3fn saturates them (and infinities) to +-448,
    which is what torch 2.13's cast does; E5M2 rounds them to +-inf as IEEE does. NaN stays NaN
    (S.1111.111, the sign kept).
    Bit for bit equal to `x.to(torch.float8_e4m3fn / float8_e5m2).view(torch.uint8)` on every
    bf16 pattern and a sample of fp32 ones (tests/test_lesson11_fp8_mxfp4_nvfp4.py).
    """
    f = _format(fmt)
    if x.dtype != torch.float32:
        raise TypeError(f"fp8_encode expects float32 values, got {x.dtype}")
    sign = torch.signbit(x).to(torch.int32) << 7
    a = x.abs()
    emin = 1 - f.bias
    _, e2 = torch.frexp(torch.where(torch.isfinite(a), a, torch.zeros_like(a)))  # a = m * 2**e2, m in [0.5, 1)
    e = (e2 - 1).clamp(min=emin)  # floor(log2 a), at least the smallest normal exponent
    quantum = torch.ldexp(torch.ones_like(a), e - f.mbits)  # the spacing of the fp8 numbers near a
    q = torch.round(a / quantum) * quantum  # round half to even; exact: powers of two
    overflow = ~(q <= f.max)  # also inf and NaN
    _, eq2 = torch.frexp(q)
    eq = (eq2 - 1).clamp(min=emin)
    sub = q < 2.0**emin
    field = torch.where(sub, torch.zeros_like(eq), eq + f.bias)
    mant = torch.where(sub, q / 2.0 ** (emin - f.mbits), torch.ldexp(q, f.mbits - eq) - (1 << f.mbits))
    code = (field << f.mbits) | mant.to(torch.int32)
    if f.inf:
        over_code = ((1 << f.ebits) - 1) << f.mbits  # inf
    else:
        over_code = (((1 << f.ebits) - 1) << f.mbits) | ((1 << f.mbits) - 2)  # the largest finite: 448
    code = torch.where(overflow, torch.tensor(over_code, dtype=torch.int32), code)
    code = torch.where(torch.isnan(x), torch.tensor(0x7F, dtype=torch.int32), code)  # NaN keeps its sign
    return (code | sign).to(torch.uint8)


def fp8_quantize_weight(
    w: torch.Tensor, fmt: str = "e4m3fn", per_channel: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 bytes, float32 scale) of a 2-D weight: w / scale cast to the format, scale = max|w| / max
    of the format, one per output row (per_channel) or one for the tensor. Dequantize with
    fp8_decode(codes) * scale. The cast is torch's, which gives fp8_encode's bytes (tested on every
    bf16 pattern) 50 times faster."""
    _check_float(w, "fp8_quantize_weight")
    if w.dim() != 2:
        raise ValueError(f"fp8_quantize_weight expects a 2-D weight (out, in), got shape {tuple(w.shape)}")
    f = _format(fmt)
    w = w.detach().float()
    absmax = w.abs().amax(1, keepdim=True) if per_channel else w.abs().amax().reshape(1, 1)  # (out or 1, 1)
    scale = torch.where(absmax > 0, absmax / f.max, torch.ones_like(absmax))
    return (w / scale).to(f.torch_dtype).view(torch.uint8), scale  # torch's cast: fp8_encode's bytes, faster


# E2M1, the 4-bit float of MXFP4 and NVFP4: 1 sign, 2 exponent (bias 1), 1 mantissa bit, no specials.
# Its code's low three bits are the index of its magnitude here (0b000 = 0 ... 0b111 = 6).
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_E2M1_MIDPOINTS = (E2M1_VALUES[1:] + E2M1_VALUES[:-1]) / 2  # (7,): 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5


def e2m1_encode(x: torch.Tensor, rounding: str = "even") -> torch.Tensor:
    """4-bit E2M1 codes (uint8, 0..15; bit 3 the sign) of float32 values, saturating at +-6.

    rounding="even": to nearest, ties to the even code (the OCP MX spec's rounding; torchao's
    `f32_to_f4_unpacked`); the sign bit follows the input's, so -0.0 and tiny negatives get code 8.
    rounding="ggml": to nearest, ties to the smaller magnitude, and a value that rounds to zero
    gets code 0 whatever its sign (ggml's and gguf-py's `best_index_mxfp4`, which keep the first of
    equally near levels in the order 0, 0.5, ..., 6, -0, -0.5, ...).
    """
    if x.dtype != torch.float32:
        raise TypeError(f"e2m1_encode expects float32 values, got {x.dtype}")
    if rounding not in ("even", "ggml"):
        raise ValueError(f"rounding must be 'even' or 'ggml', got {rounding!r}")
    a = x.abs()
    idx = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for k, mid in enumerate(_E2M1_MIDPOINTS.tolist()):  # the code is the number of midpoints a is past
        # a tie on midpoint k (between codes k and k + 1): "even" passes it when k + 1 is even
        idx += (a >= mid) if rounding == "even" and k % 2 == 1 else (a > mid)
    sign = torch.signbit(x) if rounding == "even" else torch.signbit(x) & (idx > 0)
    return idx | (sign.to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of E2M1 codes (uint8, 0..15)."""
    v = E2M1_VALUES.to(codes.device)[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -v, v)


def _blocks(w: torch.Tensor, block: int, what: str) -> torch.Tensor:
    _check_float(w, what)
    if w.dim() < 1 or w.shape[-1] % block:
        raise ValueError(f"{what}: the last dimension ({tuple(w.shape)}) must be a multiple of {block}")
    return w.detach().float().reshape(-1, block)


def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2 a) of positive finite float32 values, exactly, from their bits (0 maps to -127)."""
    bits = a.contiguous().view(torch.int32)
    return ((bits >> 23) & 0xFF) - 127  # fp32 subnormals (and 0) read as -127


def _floor_log2f(a: torch.Tensor) -> torch.Tensor:
    """floorf(log2f(a)) as ggml computes the MXFP4 exponent: log2 rounded to float32 first, so a
    maximum a few units in the last place below a power of two counts as that power."""
    return torch.floor(torch.log2(a.double()).float()).to(torch.int32)


def mxfp4_quantize(w: torch.Tensor, rounding: str = "even") -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 (OCP MX v1.0): per block of 32 consecutive weights one E8M0 scale and 32 E2M1 codes.

    The shared exponent is floor(log2(max|block|)) - 2 (2: the exponent of E2M1's largest value, 6),
    stored biased by 127 (clamped to 0..254); the block is divided by 2**exponent and each value
    rounded to E2M1, values past 6 saturating (max|block| / 2**exponent lies in [4, 8): the top of a
    block above 6 is clipped). Returns (uint8 E8M0 exponents (n_blocks,), uint8 codes (n_blocks, 32)).
    rounding="even" is the spec's and torchao's (`to_mx`, FLOOR); rounding="ggml" is gguf-py's and
    ggml's: the same scale except where float log2 rounds up to a power of two, ties to the smaller
    magnitude (e2m1_encode).
    """
    x = _blocks(w, 32, "mxfp4_quantize")  # (n_blocks, 32)
    amax = x.abs().amax(1)  # _blocks has refused inf and NaN
    if rounding == "ggml":
        e = torch.where(amax > 0, _floor_log2f(torch.where(amax > 0, amax, 1.0)) - 2, -127)
    else:
        e = _floor_log2(amax) - 2
    biased = (e + 127).clamp(0, 254)
    scale = torch.ldexp(torch.ones_like(amax), biased - 127).clamp(min=torch.finfo(torch.float32).tiny)
    codes = e2m1_encode(x / scale[:, None], rounding="even" if rounding == "even" else "ggml")
    return biased.to(torch.uint8), codes


def mxfp4_dequantize(exponents: torch.Tensor, codes: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """float32 weights of MXFP4 blocks: E2M1 value * 2**(exponent - 127)."""
    scale = torch.ldexp(torch.ones(exponents.shape), exponents.to(torch.int32) - 127)
    return (e2m1_decode(codes) * scale[:, None]).reshape(shape)


def mxfp4_ggml_blocks(exponents: torch.Tensor, codes: torch.Tensor, rows: int) -> torch.Tensor:
    """ggml's block_mxfp4 bytes (rows, 17 * blocks per row): the E8M0 byte, then 16 bytes whose low
    nibbles are weights 0..15 of the block and high nibbles weights 16..31."""
    qs = codes[:, :16] | (codes[:, 16:] << 4)  # (n_blocks, 16)
    return torch.cat([exponents[:, None], qs], 1).reshape(rows, -1)


_E4M3_TINY = 2.0**-6  # torch.finfo(torch.float8_e4m3fn).tiny: torchao's smallest block scale


def nvfp4_quantize(
    w: torch.Tensor, tensor_scale: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """NVFP4: per block of 16 weights one E4M3 scale and 16 E2M1 codes, and one fp32 scale per tensor.

    As torchao's nvfp4_quantize computes it: the block's ideal scale max|block| / 6 is divided by
    the tensor scale (torchao's default for weights: max|w| / (448 * 6), so the largest block scale
    becomes 448), clamped to [2**-6, 448] and rounded to E4M3 (fp8_encode); the weights are then
    multiplied by (1 / tensor_scale) / block_scale, clamped to +-6 and rounded to E2M1 (ties to even).
    The E4M3 rounding is torch's cast (fp8_encode's bytes).
    tensor_scale=None: no second level (the block scales alone, as torchao without per_tensor_scale).
    Returns (E4M3 block-scale bytes (rows, blocks per row), codes (rows, in), tensor_scale).
    """
    x = _blocks(w, 16, "nvfp4_quantize")  # (n_blocks, 16)
    rows = w.reshape(-1, w.shape[-1]).shape[0]
    block_scale = x.abs().amax(1) / 6.0
    ts = None if tensor_scale is None else torch.as_tensor(tensor_scale, dtype=torch.float32)
    s8 = (block_scale if ts is None else block_scale / ts).clamp(_E4M3_TINY, 448.0).to(torch.float8_e4m3fn)
    recip = 1.0 / s8.float() if ts is None else (1.0 / ts) / s8.float()  # torchao multiplies by the reciprocal
    codes = e2m1_encode((x * recip[:, None]).clamp(-6.0, 6.0).reshape(rows, -1))
    return s8.view(torch.uint8).reshape(rows, -1), codes, ts


def nvfp4_dequantize(scales: torch.Tensor, codes: torch.Tensor, tensor_scale: torch.Tensor | None) -> torch.Tensor:
    """float32 weights of NVFP4: E2M1 value * E4M3 block scale (* tensor scale)."""
    s = scales.view(torch.float8_e4m3fn).float()  # fp8_decode's values
    if tensor_scale is not None:
        s = s * tensor_scale
    v = e2m1_decode(codes).reshape(*scales.shape, 16)
    return (v * s[..., None]).reshape(codes.shape)


class FP8Linear(nn.Module):
    """A linear layer with E4M3 weights and one fp32 scale per output channel.

    activations=None keeps the inputs in float32 (W8A16-FP8: the weight is decoded and multiplied
    in fp32); "per_tensor" casts each call's input to E4M3 with one scale (max|x| / 448, dynamic),
    "per_token" with one scale per token, and multiplies the two FP8 matrices with torch._scaled_mm
    (W8A8-FP8), whose CPU path gives exactly the fp32 product of the decoded values (Lesson 11,
    section 2).
    """

    def __init__(self, linear: nn.Linear, activations: str | None = None):
        super().__init__()
        if activations not in (None, "per_tensor", "per_token"):
            raise ValueError(f"activations must be None, 'per_tensor' or 'per_token', got {activations!r}")
        codes, scale = fp8_quantize_weight(linear.weight)
        self.register_buffer("weight_fp8", codes.view(torch.float8_e4m3fn))  # (out, in)
        self.register_buffer("scale", scale.reshape(1, -1).contiguous())  # (1, out)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.activations, self.in_features, self.out_features = activations, linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()  # (tokens, in)
        if self.activations is None:
            w = self.weight_fp8.float() * self.scale.T  # (out, in)
            y = x2 @ w.T
        else:
            absmax = x2.abs().amax(1, keepdim=True)  # (tokens, 1)
            if self.activations == "per_tensor":
                absmax = absmax.max().expand_as(absmax).contiguous()  # one scale, given per row to _scaled_mm
            sx = torch.where(absmax > 0, absmax / 448.0, torch.ones_like(absmax))
            x8 = (x2 / sx).to(torch.float8_e4m3fn)
            y = torch._scaled_mm(x8, self.weight_fp8.T, scale_a=sx, scale_b=self.scale, out_dtype=torch.float32)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class FP4Linear(nn.Module):
    """A linear layer that holds MXFP4 or NVFP4 weights as they are stored: E2M1 codes packed two per
    byte, plus the format's scales (MXFP4: one E8M0 byte per 32 weights, 4.25 bits per weight;
    NVFP4: one E4M3 byte per 16 and an fp32 scale for the tensor, 4.5 bits). It decodes the fp32
    weight at every forward pass (like Lesson 9's GroupQuantLinear: small, not fast; a CPU has no
    FP4 arithmetic, so the format's speed is not measured here). The capstone's mxfp4 and nvfp4 rows.
    MXFP4's `rounding` is mxfp4_quantize's: "ggml" by default, the blocks of the lesson's table and of
    the GGUF file it writes; NVFP4's tensor scale is torchao's default, max|w| / (448 * 6).
    """

    def __init__(self, linear: nn.Linear, fmt: str = "mxfp4", rounding: str = "ggml"):
        super().__init__()
        if fmt not in ("mxfp4", "nvfp4"):
            raise ValueError(f"fmt must be 'mxfp4' or 'nvfp4', got {fmt!r}")
        w = linear.weight.detach().float()  # (out, in)
        self.fmt, self.out_features, self.in_features = fmt, linear.out_features, linear.in_features
        if fmt == "mxfp4":
            scales, codes = mxfp4_quantize(w, rounding)  # (out * in / 32,), (out * in / 32, 32)
            tensor_scale = None
        else:
            scales, codes, tensor_scale = nvfp4_quantize(w, w.abs().amax() / (448.0 * 6.0))  # torchao's default
        self.register_buffer("packed", pack_weights(codes.reshape(-1), 4))  # (out * in / 2,) uint8
        self.register_buffer("scales", scales.reshape(-1).contiguous())  # uint8 E8M0 or E4M3 bytes
        self.register_buffer("tensor_scale", tensor_scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight (out, in) the codes and scales stand for."""
        codes = unpack_weights(self.packed, 4, self.out_features * self.in_features)
        if self.fmt == "mxfp4":
            return mxfp4_dequantize(self.scales, codes.reshape(-1, 32), (self.out_features, self.in_features))
        scales = self.scales.reshape(self.out_features, -1)  # (out, in / 16)
        return nvfp4_dequantize(scales, codes.reshape(self.out_features, -1), self.tensor_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized().to(x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
