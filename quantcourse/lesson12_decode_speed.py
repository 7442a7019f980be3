"""Lesson 12 — why quantized decoding is (or is not) fast on a CPU (notebooks/12_decode_speed.ipynb).

Contents, in the order of the lesson
  1  The roofline: memory_bandwidth_gbs (the CPU's flags: core/machine.py), roofline_tokens_per_s,
     bytes_per_token
  2  One linear layer on each CPU kernel: quantize_int8_per_channel, quantize_int4_groups,
     pack_scales_and_zeros, PackedLinear (PackedLinear.from_group_quant: a Lesson 9 checkpoint's own
     int4 codes), reference_weight, kernel_error, time_kernels, matmul_seconds
     (last_level_cache_bytes: core/machine.py)
  3  Everything else a token costs: with_generation_config (core/generation.py: transformers' static cache),
     rms_norm, apply_rope, FastDecoder (a lean Llama decoder with a static KV cache that
     helper.token_nll and helper.decode_timings accept like a transformers model),
     FastDecoder.compile_layers (torch.compile)

Shapes: decode runs one sequence (batch 1), so activations are (T, features), T the number of
tokens fed at once (the prompt at prefill, 1 at every decode step).
"""

from __future__ import annotations

import statistics
import time
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantcourse.core.timing import time_variants
from quantcourse.lesson03_linear_quantization_from_scratch import _quantize_per_channel, quantize_per_channel
from quantcourse.lesson09_gptq_awq_nf4 import GroupQuant, GroupQuantLinear

__all__ = [
    "memory_bandwidth_gbs",
    "roofline_tokens_per_s",
    "bytes_per_token",
    "quantize_int8_per_channel",
    "quantize_int4_groups",
    "pack_scales_and_zeros",
    "LINEAR_KINDS",
    "INT4_GROUP_SIZES",
    "PackedLinear",
    "reference_weight",
    "kernel_error",
    "time_kernels",
    "matmul_seconds",
    "rms_norm",
    "apply_rope",
    "FastDecoder",
    "attention_in",
    "mlp_out",
]


aten = torch.ops.aten


def memory_bandwidth_gbs(mb: int = 256, repeats: int = 5, rounds: int = 5) -> float:
    """Read bandwidth of this machine in GB/s: torch.sum over an `mb`-MiB fp32 tensor, all torch threads.

    The tensor must be far larger than the last-level cache (last_level_cache_bytes: tens of MB on
    most CPUs, hundreds on some servers), or the number is partly the cache's bandwidth. Each round
    times `repeats` sums; the median round is reported.
    """
    if isinstance(mb, bool) or not isinstance(mb, int) or mb < 1:
        raise ValueError(f"mb must be a positive int, got {mb!r}")
    x = torch.ones(mb * 2**20 // 4)  # fp32; ones: the pages are really allocated
    x.sum()  # warm-up: touches the pages, starts the threads
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            x.sum()
        seconds.append((time.perf_counter() - start) / repeats)
    return x.nbytes / statistics.median(seconds) / 1e9


def roofline_tokens_per_s(nbytes: float, gbs: float) -> float:
    """The memory roofline of decode: tokens/s if a step took only the time to read `nbytes` at `gbs` GB/s."""
    if not nbytes > 0 or not gbs > 0:
        raise ValueError(f"bytes per token and bandwidth must be positive, got {nbytes!r} and {gbs!r}")
    return gbs * 1e9 / nbytes


def bytes_per_token(decoder: FastDecoder, position: int = 0) -> dict[str, int]:
    """Bytes a decode step of `decoder` reads, by kind: every linear weight once (lm_head included,
    as stored), their scales (and zeros), the KV cache up to `position`, and one embedding row.

    For a transformers model whose embedding is tied to its output layer (SmolLM2), the bytes it
    holds are, to within one embedding row and the KV cache, the bytes it reads per token.
    """
    kv = decoder.kv_bytes_per_position() * position
    return {
        "weights": sum(lin.weight.nbytes for lin in decoder.linears()),
        "scales": sum(lin.scales.nbytes for lin in decoder.linears() if lin.scales is not None),
        "kv cache": kv,
        "embedding row": decoder.embedding_row_bytes(),
    }


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (out, in), scale fp32 (out,)): symmetric, one scale per output row, q in -127..127.

    Lesson 3's helper.quantize_per_channel(w, bits=8, axis=0, symmetric=True), with the scales
    flattened to the (out,) vector the int8 kernels take.
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"expected a 2-D float weight (out, in), got {tuple(w.shape)} {w.dtype}")
    q, scale, _ = _quantize_per_channel(w, 8, 0, True)
    return q, scale.flatten()


def quantize_int4_groups(
    w: torch.Tensor, group_size: int, param_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int32 (out, in) in 0..15, scale (out, groups), zero (out, groups)): asymmetric min-max
    round-to-nearest per group of `group_size` inputs, in the CPU int4 kernel's convention

        w ~ (q - 8) * scale + zero        (zero: the value of the middle code 8, a float)

    Scale and zero are rounded to `param_dtype` (the kernel wants the activation dtype) before q is
    chosen, so q is the best code for the parameters the kernel will really use.

    The course's SmolLM2 weights come from a Q4_1 GGUF file (min-max 4-bit blocks of 32): with
    group_size=32 this finds the file's own grid again, nearly losslessly (Lesson 12 measures it).
    Lesson 4's blockwise_minmax_rtn (Q4_1's arithmetic) keeps the same float minimum but chooses
    its codes before rounding its parameters, and rounds half-way weights up: with fp32 parameters
    the two agree to float rounding (tests/test_course_one_implementation.py).
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"expected a 2-D float weight (out, in), got {tuple(w.shape)} {w.dtype}")
    out_features, in_features = w.shape
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2, got {group_size!r}")
    if in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
    groups = w.float().reshape(out_features, in_features // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)  # (out, groups)
    scale = ((hi - lo) / 15).clamp(min=1e-6).to(param_dtype)
    zero = (lo + 8 * scale.float()).to(param_dtype)
    low = zero.float() - 8 * scale.float()  # the value of code 0
    q = torch.round((groups - low[..., None]) / scale.float()[..., None]).clamp(0, 15)
    return q.reshape(out_features, in_features).to(torch.int32), scale, zero


def pack_scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The (groups, out, 2) tensor the int4 kernel reads: [..., 0] scales, [..., 1] zeros (each (out, groups))."""
    if scale.shape != zero.shape or scale.dim() != 2:
        raise ValueError(f"scale and zero must both be (out, groups), got {tuple(scale.shape)}, {tuple(zero.shape)}")
    return torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()


LINEAR_KINDS = ("float", "int8-dequant", "int8-scale-after", "int8pack", "int4-dequant", "int4pack")
"""How PackedLinear stores a weight and which kernel multiplies by it (see PackedLinear)."""


INT4_GROUP_SIZES = (32, 64, 128, 256)
"""Group sizes torch's CPU int4 kernel (_weight_int4pack_mm_for_cpu) accepts."""


class PackedLinear:
    """A bias-free linear layer y = x @ W.T whose weight is stored for one CPU kernel.

    kind              stored                                computes (x: (T, in) in `dtype`)
    float             W in dtype                            F.linear(x, W)
    int8-dequant      q int8, scale (out,)                  F.linear(x, q.to(dtype) * scale[:, None])  (quanto's way)
    int8-scale-after  q int8, scale (out,)                  F.linear(x, q.to(dtype)) * scale  (Lesson 3's W8A16Linear)
    int8pack          q int8, scale (out,)                  aten._weight_int8pack_mm(x, q, scale)
    int4-dequant      q uint8 0..15 (out, in), scale and    F.linear(x, (q - 8) * scale + zero)  (a reference)
                      zero (out, groups)
    int4pack          (out, in/2) uint8 packed by           aten._weight_int4pack_mm_for_cpu(x, packed,
                      aten._convert_weight_to_int4pack_      group_size, scales_and_zeros)
                      for_cpu; (groups, out, 2) scales/zeros

    The fused kernels want their scales in the activation dtype, and are fast only for bf16
    activations (with fp32 they take a far slower path; Lesson 12 times both). The int4 packing
    needs out_features % 16 == 0 and a group size in INT4_GROUP_SIZES dividing in_features, and its
    byte layout depends on the kernels torch dispatches to (AVX512, AVX2, ...): bytes packed under
    one give wrong results under another, so pack in the process that multiplies, never save them.
    A plain class, not an nn.Module: a decode step calls 121 of them, and Module.__call__ costs.
    """

    def __init__(self, weight: torch.Tensor, kind: str = "float", dtype: torch.dtype = torch.float32, group_size=32):
        if kind not in LINEAR_KINDS:
            raise ValueError(f"kind must be one of {LINEAR_KINDS}, got {kind!r}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"expected a 2-D float weight (out, in), got {tuple(weight.shape)} {weight.dtype}")
        self.kind, self.dtype, self.group_size = kind, dtype, group_size
        self.out_features, self.in_features = weight.shape
        if kind == "int4pack" and (group_size not in INT4_GROUP_SIZES or self.out_features % 16):
            raise ValueError(
                f"the int4 kernel needs a group size in {INT4_GROUP_SIZES} dividing in_features and "
                f"out_features % 16 == 0; got group_size {group_size!r} for a {tuple(weight.shape)} weight"
            )
        w = weight.detach().float()
        self.scales: torch.Tensor | None = None
        if kind == "float":
            self.weight = w.to(dtype).contiguous()  # (out, in)
        elif kind == "int4pack":
            q, scale, zero = quantize_int4_groups(w, group_size, dtype)
            self.weight = aten._convert_weight_to_int4pack_for_cpu(q, 1)  # (out, in/2) uint8; inner_k_tiles unused
            self.scales = pack_scales_and_zeros(scale, zero)  # (groups, out, 2) in dtype
        elif kind == "int4-dequant":
            q, scale, zero = quantize_int4_groups(w, group_size, dtype)
            self.weight = q.to(torch.uint8)  # (out, in), one code per byte: a reference, not a storage format
            self.scales = torch.stack([scale, zero])  # (2, out, groups)
        else:  # the int8 kinds
            self.weight, scale = quantize_int8_per_channel(w)  # (out, in) int8, (out,) fp32
            self.scales = scale.to(dtype)
        self._forward = getattr(self, "_" + kind.replace("-", "_"))

    @classmethod
    def from_group_quant(cls, gq: GroupQuant, dtype: torch.dtype = torch.bfloat16) -> PackedLinear:
        """An int4pack layer holding a Lesson 9 GroupQuant's codes (RTN, GPTQ, AWQ: (code - zero) * scale) as
        they are: the kernel's zero (code 8's value) is (8 - zero) * scale, rounded with the scale to `dtype`,
        the one change to the weight. Kernel groups must divide the row: a group of 128 on a row of 576 (its
        last group 64) becomes two of 64 that repeat its scale and zero (more bytes, the same weight)."""
        out_features, in_features = gq.codes.shape
        g = max((g for g in INT4_GROUP_SIZES if gq.group_size % g == 0 == in_features % g), default=None)
        if gq.levels is not None or gq.zero is None or g is None or out_features % 16:
            raise ValueError("the int4 kernel holds a uniform grid (not NF4's codebook), in groups of 32-256 "
                             "that divide the checkpoint's groups and the row, and out_features % 16 == 0")  # fmt: skip
        group = torch.arange(in_features // g) * g // gq.group_size  # (in / g,) the checkpoint group of each
        self, scale = cls.__new__(cls), gq.scale.float()[:, group]  # (out, in / g)
        self.kind, self.dtype, self.group_size = "int4pack", dtype, g
        self.out_features, self.in_features = out_features, in_features
        self.weight = aten._convert_weight_to_int4pack_for_cpu(gq.codes.to(torch.int32), 1)  # (out, in/2) uint8
        self.scales = pack_scales_and_zeros(scale.to(dtype), ((8 - gq.zero.float()[:, group]) * scale).to(dtype))
        self._forward = self._int4pack
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(T, in) -> (T, out), in x's dtype."""
        return self._forward(x)

    def _float(self, x):
        return F.linear(x, self.weight)

    def _int8_dequant(self, x):
        return F.linear(x, self.weight.to(x.dtype) * self.scales[:, None])

    def _int8_scale_after(self, x):
        return F.linear(x, self.weight.to(x.dtype)) * self.scales

    def _int8pack(self, x):
        return aten._weight_int8pack_mm(x, self.weight, self.scales)

    def _int4_dequant(self, x):
        return F.linear(x, self.dequantized().to(x.dtype))

    def _int4pack(self, x):
        return aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size, self.scales)

    @property
    def nbytes(self) -> int:
        """Bytes read per call: the stored weight and its scales (and zeros)."""
        return self.weight.nbytes + (self.scales.nbytes if self.scales is not None else 0)

    def dequantized(self) -> torch.Tensor:
        """The fp32 (out, in) weight this layer multiplies by (what its kernel should compute with)."""
        if self.kind == "float":
            return self.weight.float()
        if self.kind == "int4pack":
            raise NotImplementedError("the packed int4 layout depends on the CPU: use reference_weight instead")
        if self.kind == "int4-dequant":
            scale, zero = self.scales.float()  # (out, groups) each
            groups = self.weight.float().reshape(self.out_features, -1, self.group_size)  # (out, groups, group)
            return ((groups - 8) * scale[..., None] + zero[..., None]).reshape(self.out_features, self.in_features)
        return self.weight.float() * self.scales.float()[:, None]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight in self.dtype: a tied lm_head serves as the embedding table."""
        if self.kind == "float":
            return self.weight[ids]
        if self.kind.startswith("int4"):
            raise NotImplementedError("rows of an int4 weight: keep a separate embedding table")
        return self.weight[ids].to(self.dtype) * self.scales[ids, None]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors this layer holds, by name (what a size count must include)."""
        return {"weight": self.weight} | ({"scales": self.scales} if self.scales is not None else {})

    def __repr__(self) -> str:
        group = f", group_size={self.group_size}" if self.kind.startswith("int4") else ""
        return f"PackedLinear({self.in_features}->{self.out_features}, {self.kind}, {self.dtype}{group})"


def reference_weight(weight: torch.Tensor, kind: str, dtype: torch.dtype, group_size: int = 32) -> torch.Tensor:
    """The fp32 (out, in) weight a PackedLinear(weight, kind, dtype, group_size) should multiply by,
    dequantized by hand, without PackedLinear or its kernel: the weight rounded to `dtype` (float);
    Lesson 3's symmetric per-channel int8 codes times their scales rounded to `dtype` (the int8
    kinds); the codes and grid of quantize_int4_groups dequantized as its convention says,
    (q - 8) * scale + zero (the int4 kinds)."""
    if kind not in LINEAR_KINDS:
        raise ValueError(f"kind must be one of {LINEAR_KINDS}, got {kind!r}")
    w = weight.detach().float()
    if kind == "float":
        return w.to(dtype).float()
    if kind.startswith("int8"):
        q, scale, _ = quantize_per_channel(w, bits=8, axis=0, symmetric=True)  # (out, in), (out, 1)
        return q.float() * scale.to(dtype).float()
    q, scale, zero = quantize_int4_groups(w, group_size, dtype)  # (out, in), (out, groups) x 2
    return (q - 8) * scale.float().repeat_interleave(group_size, 1) + zero.float().repeat_interleave(group_size, 1)


def kernel_error(linear: PackedLinear, x: torch.Tensor, reference: torch.Tensor) -> float:
    """max |linear(x) - x @ reference.T| / max |x @ reference.T|: x (T, in), reference (out, in).

    The reference product is computed in float64, so even an fp32 kernel that multiplies by
    exactly `reference` shows its own rounding (about 1e-7), not a comparison with itself.
    """
    expected = x.double() @ reference.double().T
    return ((linear(x.to(linear.dtype)).double() - expected).abs().max() / expected.abs().max()).item()


def time_kernels(calls: dict[str, Any], inner: int = 50, repeats: int = 5) -> dict[str, list[float]]:
    """Seconds per call of each zero-argument callable, per round, by the course's timing protocol
    (helper.time_variants: interleaved rounds), each round running the callable `inner` times."""

    if isinstance(inner, bool) or not isinstance(inner, int) or inner < 1:
        raise ValueError(f"inner must be a positive int, got {inner!r}")
    loops = {name: (lambda fn=fn: [fn() for _ in range(inner)]) for name, fn in calls.items()}
    with torch.inference_mode():
        seconds = time_variants(loops, repeats=repeats)
    return {name: [s / inner for s in rounds] for name, rounds in seconds.items()}


def matmul_seconds(linears: list[PackedLinear], repeats: int = 5) -> float:
    """Median seconds of one pass over `linears` at decode shape (x: (1, in)): the matmul share of a token."""
    if not linears:
        raise ValueError("matmul_seconds needs at least one PackedLinear")
    inputs = [torch.randn(1, lin.in_features).to(lin.dtype) for lin in linears]
    one_pass = lambda: [lin(x) for lin, x in zip(linears, inputs)]
    return statistics.median(time_kernels({"pass": one_pass}, inner=1, repeats=repeats)["pass"])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm x / sqrt(mean(x^2) + eps) * weight, in one call.

    In fp32 it equals transformers' LlamaRMSNorm bit for bit; in bf16 it rounds once where
    transformers rounds twice, so a few outputs differ by one bf16 step.
    """
    return F.rms_norm(x, x.shape[-1:], weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding in transformers' "rotate half" convention, in 4 ops.

    x: (T, heads, head_dim); cos, signed_sin: (T, 1, head_dim), rows of the tokens' positions.
    transformers computes x * cos + cat(-x2, x1) * sin for the halves x1, x2 of x; rolling x by
    half a head gives cat(x2, x1), so the minus sign moves into signed_sin = cat(-sin1, sin2).
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def _check_llama(model: nn.Module) -> None:
    """Raise a clear error unless `model` is a transformers Llama-architecture causal LM."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    needed = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
    if (
        layers is None
        or not hasattr(model, "lm_head")
        or not all(hasattr(inner, a) for a in ("embed_tokens", "norm", "rotary_emb"))
        or not all(hasattr(layer, a) for layer in layers for a in needed)
        or not all(hasattr(layer.self_attn, p) for layer in layers for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    ):
        raise ValueError(
            f"FastDecoder rebuilds Llama-architecture models (model.model.layers with self_attn.q_proj, "
            f"mlp.gate_proj, ...); got {type(model).__name__}"
        )
    if any(getattr(model.config, flag, False) for flag in ("attention_bias", "mlp_bias")):
        raise ValueError("FastDecoder's linear layers have no bias; this model's attention or MLP has one")


class _Layer:
    """The weights of one decoder layer; q, k, v and gate, up are fused into one matmul each."""

    def __init__(self, hf_layer, kind: str, dtype: torch.dtype, group_size: int):
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.norm1 = hf_layer.input_layernorm.weight.detach().to(dtype)  # (hidden,)
        self.norm2 = hf_layer.post_attention_layernorm.weight.detach().to(dtype)
        pack = lambda *linears: _packed(linears, kind, dtype, group_size)  # qkv: (q + 2 kv, hidden)
        self.qkv, self.o = pack(attn.q_proj, attn.k_proj, attn.v_proj), pack(attn.o_proj)
        self.gate_up, self.down = pack(mlp.gate_proj, mlp.up_proj), pack(mlp.down_proj)


def _packed(linears, kind: str, dtype: torch.dtype, group_size: int) -> PackedLinear:
    """One PackedLinear for the row-wise concatenation of `linears`: of their float weights, or, for
    Lesson 9's GroupQuantLinear layers, of their own codes (kind "int4pack" only)."""
    if not any(isinstance(linear, GroupQuantLinear) for linear in linears):
        return PackedLinear(torch.cat([linear.weight for linear in linears]), kind, dtype, group_size)
    if kind != "int4pack" or not all(isinstance(linear, GroupQuantLinear) for linear in linears):
        raise ValueError("Lesson 9's GroupQuantLinear layers deploy on kind='int4pack', all of a fused matmul together")
    gqs = [linear.group_quant() for linear in linears]
    if len({gq.group_size for gq in gqs}) > 1 or any(gq.levels is not None for gq in gqs):
        raise ValueError("the layers of one fused matmul need the same uniform grid and group size")
    cat = lambda field: torch.cat([getattr(gq, field) for gq in gqs])
    return PackedLinear.from_group_quant(GroupQuant(cat("codes"), cat("scale"), cat("zero"), gqs[0].group_size), dtype)


class FastDecoder(nn.Module):
    """A transformers Llama-architecture model (SmolLM2) rebuilt for fast batch-1 decoding on a CPU.

    What makes it lean compared to transformers' eager path: a preallocated (static) KV cache;
    q/k/v and gate/up fused into one matmul each (4 matmuls per layer, not 7); one short Python
    function per step, with no modules, hooks, masks or cache objects; the linear layers on the
    kernel `kind` (see PackedLinear), the lm_head on `head_kind` (default: the int8 kernel when the
    layers are int4, since a tied lm_head also serves the embedding rows).

    It answers `decoder(input_ids=ids).logits` (a fresh sequence each call, like a model without
    cache) and `decoder.generate(input_ids, max_new_tokens=..., min_new_tokens=...)` (greedy), so
    helper.token_nll and helper.decode_timings take it as they take a transformers model. Its
    tensors are registered as buffers, so helper.model_size counts the bytes it holds (the KV cache,
    working memory like activations, is not counted).
    """

    def __init__(
        self,
        model: nn.Module,
        kind: str = "float",
        dtype: torch.dtype = torch.float32,
        group_size: int = 32,
        head_kind: str | None = None,
        max_len: int = 1024,
    ):
        super().__init__()
        _check_llama(model)
        if head_kind is not None and head_kind not in LINEAR_KINDS:
            raise ValueError(f"head_kind must be one of {LINEAR_KINDS}, got {head_kind!r}")
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"max_len must be an int >= 2, got {max_len!r}")
        cfg = model.config
        self.kind, self.dtype, self.group_size, self.max_len = kind, dtype, group_size, max_len
        self.head_kind = head_kind or {"int4pack": "int8pack", "int4-dequant": "int8-dequant"}.get(kind, kind)
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps, self.eos = cfg.rms_norm_eps, cfg.eos_token_id
        with torch.no_grad():
            self.layers = [_Layer(layer, kind, dtype, group_size) for layer in model.model.layers]
            self.norm = model.model.norm.weight.detach().to(dtype)  # (hidden,)
            self.head = PackedLinear(model.lm_head.weight, self.head_kind, dtype, group_size)  # (vocab, hidden)
            # The embedding: rows of the tied lm_head as stored (int8 rows times their scales) where
            # it can give rows, else a copy of the embedding table in dtype.
            tied = model.lm_head.weight is model.model.embed_tokens.weight
            own_table = not tied or self.head_kind.startswith("int4")
            self.embed_table = model.model.embed_tokens.weight.detach().to(dtype) if own_table else None
            # RoPE tables from the model's own rotary module, one row per position: (max_len, 1, head_dim)
            positions = torch.arange(max_len)[None]
            cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)  # (1, max_len, hd)
            half = self.head_dim // 2
            signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)  # see apply_rope
            self.cos, self.sin = cos[0, :, None].to(dtype), signed_sin[0, :, None].to(dtype)
        # Static KV cache: (layers, kv heads, max_len, head_dim), written in place, never reallocated.
        shape = (len(self.layers), self.n_kv, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype)
        self.v_cache = torch.zeros(shape, dtype=dtype)
        self._compiled = None  # (attention_in, mlp_out) once compile_layers ran
        self._register_tensors()

    def _register_tensors(self) -> None:
        """Register every tensor the decoder holds (not the KV cache) as a buffer, for the size functions."""
        named = {"final_norm": self.norm, "rope_cos": self.cos, "rope_sin": self.sin}
        if self.embed_table is not None:
            named["embedding"] = self.embed_table
        for i, layer in enumerate(self.layers):
            named |= {f"layer{i}_norm1": layer.norm1, f"layer{i}_norm2": layer.norm2}
            for part in ("qkv", "o", "gate_up", "down"):
                named |= {f"layer{i}_{part}_{k}": t for k, t in getattr(layer, part).tensors().items()}
        named |= {f"lm_head_{k}": t for k, t in self.head.tensors().items()}
        for name, tensor in named.items():
            self.register_buffer(name, tensor, persistent=False)

    # -- sizes ---------------------------------------------------------------
    def linears(self) -> list[PackedLinear]:
        """Every linear layer a decode step runs once (the lm_head last)."""
        return [lin for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)] + [self.head]

    def embedding_row_bytes(self) -> int:
        """Bytes of the one embedding row a decode step reads."""
        table = self.embed_table if self.embed_table is not None else self.head.weight
        return table.shape[1] * table.element_size()

    def kv_bytes_per_position(self) -> int:
        """Bytes of keys and values of all layers at one position."""
        return 2 * self.k_cache[:, :, 0].nbytes

    def get_memory_footprint(self) -> int:
        """Bytes of the decoder's tensors (as transformers' method of that name; no KV cache)."""
        return sum(t.nbytes for t in {id(b): b for b in self.buffers()}.values())

    # -- one step ------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(T,) token ids -> (T, hidden) in self.dtype."""
        return self.embed_table[ids] if self.embed_table is not None else self.head.rows(ids)

    def _attention(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """Write k, v at positions start.. of layer i's cache, attend q to positions 0..start+T-1.

        q: (T, heads, head_dim); k, v: (T, kv heads, head_dim) -> (T, heads * head_dim).
        """
        T = q.shape[0]
        end = start + T
        k_cache, v_cache = self.k_cache[i], self.v_cache[i]  # (kv heads, max_len, head_dim)
        k_cache[:, start:end] = k.transpose(0, 1)
        v_cache[:, start:end] = v.transpose(0, 1)
        keys, values = k_cache[None, :, :end], v_cache[None, :, :end]  # (1, kv heads, end, head_dim)
        if T == 1:  # decode: the query heads that share a kv head act as that head's queries (no mask)
            out = F.scaled_dot_product_attention(q.view(1, self.n_kv, -1, self.head_dim), keys, values)
            return out.view(1, -1)  # (1, kv heads, heads / kv heads, hd) is already the heads' order
        mask = torch.arange(end) <= torch.arange(start, end)[:, None]  # (T, end): token t sees positions <= start+t
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values, attn_mask=mask, enable_gqa=True)
        return out[0].transpose(0, 1).reshape(T, -1)  # (1, heads, T, hd) -> (T, heads * hd)

    def _layer_step(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int) -> torch.Tensor:
        """One decoder layer on x (T, hidden) at positions start..start+T-1 -> (T, hidden)."""
        layer = self.layers[i]
        compiled = self._compiled is not None and x.shape[0] == 1  # decode steps only: one shape
        attn_in, mlp = self._compiled if compiled else (attention_in, mlp_out)
        q, k, v = attn_in(x, cos, sin, layer.norm1, layer.qkv, self.n_heads, self.n_kv, self.eps)
        return mlp(x, self._attention(i, q, k, v, start), layer.o, layer.norm2, layer.gate_up, layer.down, self.eps)

    def step(self, ids: torch.Tensor, start: int, all_logits: bool = False) -> torch.Tensor:
        """Feed tokens `ids` (T,) at positions start..start+T-1; logits (T or 1, vocab) of all / the last token."""
        T = ids.shape[0]
        if T < 1 or start + T > self.max_len:
            raise ValueError(f"positions {start}..{start + T - 1} are not within the cache of {self.max_len} (max_len)")
        cos, sin = self.cos[start : start + T], self.sin[start : start + T]  # (T, 1, head_dim)
        x = self.embed(ids)  # (T, hidden)
        for i in range(len(self.layers)):
            x = self._layer_step(i, x, cos, sin, start)
        x = x if all_logits else x[-1:]
        return self.head(rms_norm(x, self.norm, self.eps))

    # -- what the course calls -----------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, **ignored) -> SimpleNamespace:
        """Logits (1, T, vocab) of a fresh sequence input_ids (1, T), as model(input_ids=...).logits."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"FastDecoder runs one sequence: input_ids must be (1, T), got {tuple(input_ids.shape)}")
        return SimpleNamespace(logits=self.step(input_ids[0], 0, all_logits=True)[None])

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 32,
        min_new_tokens: int = 0,
        do_sample: bool = False,
        **ignored,
    ) -> torch.Tensor:
        """Greedy decoding like transformers' generate: (1, prompt) -> (1, prompt + max_new_tokens).

        EOS is masked for the first `min_new_tokens` tokens (as transformers does), and decoding
        does not stop at EOS (the course always asks for exactly that many tokens).
        """
        if do_sample:
            raise NotImplementedError("FastDecoder decodes greedily only")
        prompt = torch.as_tensor(input_ids).reshape(-1)  # (T,): a (1, T) tensor or a list of ids
        logits = self.step(prompt, 0)  # prefill: (1, vocab)
        tokens = []
        for n in range(max_new_tokens):
            if n < min_new_tokens:
                logits[:, self.eos] = float("-inf")
            token = logits.argmax(-1)  # (1,)
            tokens.append(token)
            if n + 1 < max_new_tokens:
                logits = self.step(token, prompt.shape[0] + n)
        return torch.cat([prompt, *tokens])[None]

    # -- torch.compile -------------------------------------------------------
    def compile_layers(self, mode: str | None = None) -> None:
        """torch.compile the two halves of a layer around its attention, once for all layers.

        attention_in and mlp_out take the layer's weights as arguments, so every layer reuses the
        code compiled for the first (same shapes and dtypes: no recompilation). The attention over
        the growing cache stays eager (its length changes every step), and only decode steps
        (T = 1) run compiled: prefill lengths vary and would each recompile. Compiling happens
        at the first decode step, not here.
        """
        compile_ = lambda fn: torch.compile(fn, mode=mode, dynamic=False)
        self._compiled = (compile_(attention_in), compile_(mlp_out))


def attention_in(x, cos, sin, norm_weight, qkv: PackedLinear, n_heads: int, n_kv: int, eps: float):
    """Norm, fused q/k/v projection and RoPE: x (T, hidden) -> q (T, heads, hd), k and v (T, kv heads, hd)."""
    T, hd = x.shape[0], cos.shape[-1]
    out = qkv(rms_norm(x, norm_weight, eps))  # (T, (heads + 2 kv heads) * hd)
    qk = apply_rope(out[:, : (n_heads + n_kv) * hd].view(T, -1, hd), cos, sin)  # q and k heads at once
    return qk[:, :n_heads], qk[:, n_heads:], out[:, (n_heads + n_kv) * hd :].view(T, n_kv, hd)


def mlp_out(x, attn, o: PackedLinear, norm_weight, gate_up: PackedLinear, down: PackedLinear, eps: float):
    """Output projection, residual, norm, SiLU-gated MLP, residual: x, attn (T, hidden) -> (T, hidden)."""
    x = x + o(attn)
    gate, up = gate_up(rms_norm(x, norm_weight, eps)).chunk(2, dim=-1)  # (T, intermediate) each
    return x + down(F.silu(gate) * up)
