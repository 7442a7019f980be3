"""Lesson 4 — GGUF, the file our model came in (notebooks/04_gguf.ipynb).

The block formats Q8_0, Q4_0, Q4_1 and Q4_K from scratch (bit-exact against gguf-py), the GGUF
tensor table, GGUFLinear. llama.cpp itself is in core/llama_cpp.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from quantcourse.core.models import smollm2_gguf_path
from quantcourse.core.surgery import replace_linears
from quantcourse.lesson03_linear_quantization_from_scratch import _check_float

__all__ = [
    "GGUFFormat",
    "GGUF_FORMATS",
    "round_half_away_from_zero",
    "gguf_quantize",
    "gguf_dequantize",
    "blockwise_minmax_rtn",
    "blockwise_nf4_rtn",
    "absmax_level_codes",
    "nearest_level_codes",
    "distinct_values_per_block",
    "gguf_name_to_hf",
    "unpermute_rope_rows",
    "read_gguf_tensors",
    "gguf_tensor_infos",
    "GGUFLinear",
    "replace_linear_with_gguf",
]


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
    Lesson 12's quantize_int4_groups keeps a float minimum too, but rounds its step and zero to the
    parameter dtype before it chooses the codes (here the codes are chosen with the exact step, as
    Q4_1 does) and rounds a weight half-way between two levels to even (here: up). Lesson 9's
    rtn_quantize widens the range to contain 0 instead (tests/test_course_one_implementation.py).
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

    Equal to bitsandbytes' quantize_4bit + dequantize_4bit where those are right. bitsandbytes
    0.50.2's CPU dequantize_4bit is wrong on AVX-512F CPUs when the block size does not divide the
    row length (its vectorized C path looks up the scales row by row, 576 / 128 truncated to 4
    blocks, while quantize_4bit blocked the flattened tensor); its scalar path (no AVX-512F) is
    right, and so is every block size that divides the rows (64 for SmolLM2; Lesson 4, section 4.1).
    The rounding is `absmax_level_codes`, which Lesson 9's nf4_quantize shares; the two differ in
    their groups only: runs of the flattened weight here (a run may span two rows), runs of
    a row there (the last one shorter), so they agree where group_size divides the row.
    """
    import bitsandbytes.functional as bnbf

    _check_float(w, "blockwise_nf4_rtn")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or w.numel() % group_size:
        raise ValueError(f"group_size must be a positive int dividing the {w.numel()} weights, got {group_size!r}")
    levels = bnbf.get_4bit_type("nf4", device="cpu").float()  # (16,) from -1 to 1
    codes, absmax = absmax_level_codes(w.detach().float().reshape(-1, group_size), levels)
    return (levels.take(codes.long()) * absmax).reshape(w.shape)


def absmax_level_codes(x: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes, absmax (..., 1)) of each run along x's last dim: x / absmax rounded to the
    nearest of the sorted `levels` (an all-zero run divides by 1).

    The course's one codebook rounding (NF4): Lesson 4's blockwise_nf4_rtn with bitsandbytes'
    table, Lesson 9's nf4_quantize with the table it rebuilds (nf4_levels, the same bits).
    """
    absmax = x.abs().amax(-1, keepdim=True)
    scaled = x / torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    return nearest_level_codes(scaled, (levels[1:] + levels[:-1]) / 2), absmax


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
    """Swap every nn.Linear (except `exclude`) for a GGUFLinear, in place (core.surgery's replace_linears).

    fmt: quantize the layer's own weight with gguf_quantize. tensors (from read_gguf_tensors): take
    the file's blocks as they are ("as shipped"); layers the file keeps in F32 stay nn.Linear.
    """
    if (fmt is None) == (tensors is None):
        raise ValueError("give exactly one of fmt (re-quantize) or tensors (the file's own blocks)")
    if tensors is None:
        return replace_linears(model, lambda linear: GGUFLinear.from_linear(linear, fmt), exclude, "the GGUF copy")
    names = {module: name for name, module in model.named_modules()}

    def from_file(linear: nn.Linear) -> GGUFLinear | None:
        name = names[linear]
        if f"{name}.weight" not in tensors:
            raise ValueError(f"the GGUF file has no tensor for layer {name!r}")
        kind, data = tensors[f"{name}.weight"]
        return GGUFLinear(data, kind, linear.in_features, linear.bias) if kind in GGUF_FORMATS else None

    return replace_linears(model, from_file, exclude, "the GGUF copy")
