"""Lesson 13 — the memory that grows with the context: quantizing the KV cache (notebooks/13_kv_cache.ipynb).

Contents, in the order of the lesson
  1  How big the cache is: kv_values_per_token, kv_bytes_per_token, cache_tensor_bytes (a transformers
     cache after generate), context_where_cache_exceeds
  2  What it costs in speed: decode_step_seconds (Lesson 12's FastDecoder at several cache lengths)
  3  Quantizing it from scratch: quantize_kv / dequantize_kv (asymmetric min-max, per token or per
     channel, KIVI's two choices), kv_code_bytes, QuantizedKVDecoder (FastDecoder with a quantized
     cache and KIVI's full-precision residual), stream_log_probs / stream_nll_kl / stream_scores (one long
     text fed in chunks, scored past the first window; stream_scores in one pass)
  4  A rotation: hadamard_matrix (QuaRot's trick on the keys, applied after RoPE to queries and keys)
  5  Against the libraries: quanto_cache_logits and quantized_cache_bytes (transformers' QuantizedCache,
     quanto backend) and
     llama_cpp_cache_log_probs (llama.cpp's q8_0 / q4_0 cache types)

Shapes: the cache of one layer is (kv heads, positions, head_dim), as FastDecoder holds it; a
"token" group runs along head_dim (one head's vector at one position), a "channel" group along
positions (one channel of one head over `group_size` consecutive positions).
"""

from __future__ import annotations

import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from quantcourse.core.llama_cpp import kl_rows
from quantcourse.lesson12_decode_speed import FastDecoder

__all__ = [
    "kv_values_per_token",
    "kv_bytes_per_token",
    "cache_tensor_bytes",
    "context_where_cache_exceeds",
    "decode_step_seconds",
    "KV_AXES",
    "quantize_kv",
    "dequantize_kv",
    "kv_code_bytes",
    "hadamard_matrix",
    "QuantizedKVDecoder",
    "stream_log_probs",
    "stream_nll_kl",
    "stream_scores",
    "quanto_cache_logits",
    "quantized_cache_bytes",
    "llama_cpp_cache_log_probs",
]

KV_AXES = ("token", "channel")
"""The two ways to group a cache tensor for its scales: along head_dim (per token) or along positions."""


# -- 1 How big the cache is --------------------------------------------------
def kv_values_per_token(config) -> int:
    """Values the KV cache holds per position: layers x 2 (keys and values) x kv heads x head_dim."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers * 2 * kv_heads * head_dim


def kv_bytes_per_token(config, bits: float = 32.0) -> float:
    """Bytes of cache per position at `bits` per stored value (scales included in `bits` if any)."""
    if not isinstance(bits, (int, float)) or isinstance(bits, bool) or not bits > 0:
        raise ValueError(f"bits must be a positive number, got {bits!r}")
    return kv_values_per_token(config) * bits / 8


def cache_tensor_bytes(cache) -> int:
    """Bytes of the key and value tensors a transformers cache holds (DynamicCache, StaticCache)."""
    layers = getattr(cache, "layers", None)
    if not layers:
        raise TypeError(f"expected a transformers Cache with .layers, got {type(cache).__name__}")
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in layers)


def context_where_cache_exceeds(weight_bytes: float, bytes_per_token: float) -> int:
    """The smallest context length (positions) whose cache holds at least `weight_bytes`."""
    if not weight_bytes > 0 or not bytes_per_token > 0:
        raise ValueError(f"both sizes must be positive, got {weight_bytes!r} and {bytes_per_token!r}")
    return math.ceil(weight_bytes / bytes_per_token)


# -- 2 What it costs in speed ------------------------------------------------
def decode_step_seconds(
    decoder: FastDecoder, contexts: list[int], steps: int = 8, repeats: int = 3
) -> dict[int, float]:
    """{context: median seconds of one decode step with `context` positions already in the cache}.

    A step's time does not depend on the values the cache holds, only on how many positions it
    attends to, so the steps run on whatever the cache holds (the lesson fills it with real text
    first). Rounds are interleaved across contexts, as core.timing.time_variants does.
    """
    if any(c < 1 or c + steps > decoder.max_len for c in contexts):
        raise ValueError(f"every context + steps must fit the decoder's max_len ({decoder.max_len})")
    token = torch.tensor([1])
    rounds: dict[int, list[float]] = {c: [] for c in contexts}
    with torch.inference_mode():
        for r in range(repeats + 1):  # round 0 warms up
            for c in contexts:
                t0 = time.perf_counter()
                for s in range(steps):
                    decoder.step(token, c + s)
                if r:
                    rounds[c].append((time.perf_counter() - t0) / steps)
    return {c: statistics.median(v) for c, v in rounds.items()}


# -- 3 Quantizing it from scratch --------------------------------------------
def _grouped(x: torch.Tensor, axis: str, group_size: int) -> torch.Tensor:
    """x (..., positions, head_dim) -> (n_groups, group_size): the groups that share a scale."""
    if axis not in KV_AXES:
        raise ValueError(f"axis must be one of {KV_AXES}, got {axis!r}")
    xx = x if axis == "token" else x.transpose(-1, -2)  # groups run along the last dim of xx
    if xx.shape[-1] % group_size:
        raise ValueError(f"{axis} groups of {group_size} do not tile a dimension of {xx.shape[-1]}")
    return xx.reshape(-1, group_size)


def quantize_kv(x: torch.Tensor, bits: int, axis: str = "token", group_size: int = 64):
    """Asymmetric min-max quantization of a cache tensor x (..., positions, head_dim) in groups.

    axis "token": each group is `group_size` consecutive values of one position's head vector;
    axis "channel": each group is one channel over `group_size` consecutive positions (KIVI's keys).
    Returns (codes uint8 in 0..2^bits-1, scale, minimum), codes shaped (n_groups, group_size),
    scale and minimum (n_groups, 1) in x's dtype; dequantize_kv undoes it. The same arithmetic as
    optimum-quanto's MaxOptimizer + quantize_weight (the test checks it code for code), except for a
    constant group, where quanto divides by a zero scale and this keeps scale 1 and codes 0. Unlike
    Lesson 3's grid, the minimum is a float (no integer zero point, no widening of the range to 0).
    """
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits!r}")
    g = _grouped(x, axis, group_size)  # (n_groups, group_size)
    lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
    scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # a constant group: every code 0
    codes = ((g - lo) / scale).round().clamp(0, 2**bits - 1).to(torch.uint8)
    return codes, scale, lo


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, shape, axis: str = "token"):
    """codes * scale + minimum, back in the layout quantize_kv read: a tensor of `shape`."""
    g = codes.to(scale.dtype) * scale + lo  # (n_groups, group_size)
    if axis == "token":
        return g.reshape(shape)
    *lead, positions, head_dim = shape
    return g.reshape(*lead, head_dim, positions).transpose(-1, -2)


def kv_code_bytes(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int) -> int:
    """Bytes a quantized cache tensor really takes: codes packed at `bits` each, plus scales and minima."""
    return math.ceil(codes.numel() * bits / 8) + scale.nbytes + lo.nbytes


# -- 4 A rotation ------------------------------------------------------------
def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix divided by sqrt(n): orthogonal (H @ H.T = I), n a power of 2."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"n must be a power of 2, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return (h / math.sqrt(n)).to(dtype)


class QuantizedKVDecoder(FastDecoder):
    """Lesson 12's FastDecoder with its KV cache quantized: keys and values at `key_bits` /
    `value_bits` (None keeps them float), grouped along `key_axis` / `value_axis` in groups of
    `group_size`, and the newest positions kept in full precision until `residual` of them have
    gathered (transformers' `residual_length`). Then they are quantized, at the end of the step that
    filled the residual, after its attention: a chunk of `residual` tokens attends to itself
    unquantized, and the next step reads it quantized. Keys and values are flushed alike, as
    transformers does; KIVI flushes its keys so but keeps the newest `residual` values in float as a
    sliding window, quantizing the oldest one at each step.

    rotate_keys multiplies queries and keys by an orthogonal Hadamard matrix after RoPE, before the
    keys are quantized: q H (k H)^T = q k^T, so the rotation cancels in the attention scores and only
    changes what the quantizer sees (QuaRot's online rotation of the keys).

    The cache is simulated: it holds the dequantized values in the decoder's float dtype (what
    attention reads from an int cache), and `cache_bytes()` counts the codes, scales and minima
    that quantize_kv returned plus the float residual, as an int cache would hold them.
    """

    def __init__(
        self,
        model,
        key_bits: int | None = 4,
        value_bits: int | None = 4,
        key_axis: str = "channel",
        value_axis: str = "token",
        group_size: int = 64,
        residual: int = 128,
        rotate_keys: bool = False,
        **kwargs,
    ):
        super().__init__(model, **kwargs)
        if residual < group_size or residual % group_size:
            raise ValueError(f"residual ({residual}) must be a positive multiple of group_size ({group_size})")
        self.group_size, self.residual = group_size, residual
        self.set_cache(key_bits, value_bits, key_axis, value_axis, rotate_keys)

    def set_cache(self, key_bits=4, value_bits=4, key_axis="channel", value_axis="token", rotate_keys=False):
        """Change the cache's scheme (the weights stay): it applies from the next fresh sequence on."""
        for bits in (key_bits, value_bits):
            if bits is not None and bits not in (2, 3, 4, 8):
                raise ValueError(f"bits must be None (float), 2, 3, 4 or 8, got {bits!r}")
        for axis in (key_axis, value_axis):
            if axis not in KV_AXES:
                raise ValueError(f"axes must be one of {KV_AXES}, got {axis!r}")
        if "token" in (key_axis, value_axis) and self.head_dim % self.group_size:
            raise ValueError(f"per-token groups of {self.group_size} do not tile head_dim {self.head_dim}")
        self.parts = {"k": (key_bits, key_axis), "v": (value_bits, value_axis)}
        self.rotation = hadamard_matrix(self.head_dim, self.dtype) if rotate_keys else None
        self._quantized_upto = [0] * len(self.layers)  # per layer: positions < this are quantized
        self._code_bytes = [0] * len(self.layers)
        self._end = [0] * len(self.layers)  # per layer: positions < this have been written

    def cache_bytes(self) -> int:
        """Bytes the cache holds for the positions written so far: quantized codes and scales, float residual."""
        per_position_float = self.kv_bytes_per_position() // len(self.layers)  # keys + values of one layer
        return sum(
            b + (end - q) * per_position_float for b, q, end in zip(self._code_bytes, self._quantized_upto, self._end)
        )

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, **ignored):
        """Refused: one pass attends to its own keys and values before they are quantized, so its
        logits would be the float cache's. Feed a long text in chunks with stream_log_probs."""
        raise ValueError(
            "QuantizedKVDecoder quantizes positions only after they have been attended to: score it with "
            "stream_log_probs (chunks extending one cache), not with one pass (token_nll, perplexity)"
        )

    def _attention(self, i, q, k, v, start):
        quantized = any(bits is not None for bits, _ in self.parts.values())
        if start == 0:  # a fresh sequence
            self._quantized_upto[i], self._code_bytes[i], self._end[i] = 0, 0, 0
        elif quantized and start != self._end[i]:  # a float cache may be rewritten anywhere, as FastDecoder's
            raise ValueError(
                f"a quantized cache is extended in order: the next position is {self._end[i]}, got {start} "
                "(start again at 0 for a new sequence)"
            )
        if self.rotation is not None:
            q, k = q @ self.rotation, k @ self.rotation  # (T, heads, hd), (T, kv heads, hd)
        out = super()._attention(i, q, k, v, start)  # writes k, v at start.. and attends
        end, done = start + q.shape[0], self._quantized_upto[i]
        self._end[i] = max(self._end[i], end)
        if end - done >= self.residual:  # flush every whole group of the residual
            stop = done + (end - done) // self.group_size * self.group_size
            for name, cache in (("k", self.k_cache[i]), ("v", self.v_cache[i])):
                bits, axis = self.parts[name]
                block = cache[:, done:stop]  # (kv heads, positions, hd)
                if bits is None:
                    self._code_bytes[i] += block.nbytes
                    continue
                codes, scale, lo = quantize_kv(block, bits, axis, self.group_size)
                cache[:, done:stop] = dequantize_kv(codes, scale, lo, block.shape, axis)
                self._code_bytes[i] += kv_code_bytes(codes, scale, lo, bits)
            self._quantized_upto[i] = stop
        return out


def _stream_blocks(logits_of, ids: torch.Tensor, chunk: int, score_from: int):
    """(first scored row, log-probabilities (rows, vocab)) of each chunk of `ids` that predicts a
    scored token: the chunks of stream_log_probs, each extending the same cache."""
    n = ids.numel()
    if n % chunk or not 0 < score_from < n:
        raise ValueError(f"need len(ids) ({n}) a multiple of chunk ({chunk}) and 0 < score_from < len(ids)")
    for start in range(0, n, chunk):
        logits = logits_of(ids[start : start + chunk], start).float()  # (chunk, vocab)
        lo = max(score_from - 1 - start, 0)  # position p predicts token p + 1
        hi = min(chunk, n - 1 - start)
        if lo < hi:
            yield start + lo - (score_from - 1), F.log_softmax(logits[lo:hi], dim=-1)


def stream_log_probs(logits_of, ids: torch.Tensor, chunk: int = 128, score_from: int = 512) -> torch.Tensor:
    """(n - score_from, vocab) log-probabilities of tokens score_from..n-1 of one long sequence `ids`.

    The sequence is fed in chunks of `chunk` tokens to logits_of(chunk_ids, start) -> (T, vocab),
    each chunk extending the same cache, so token t is predicted from all t tokens before it (no
    windows): what a quantized cache changes is exactly what the context holds.
    """
    ids = torch.as_tensor(ids).flatten()
    out = None  # (n - score_from, vocab), filled in place: no second copy at the end
    with torch.inference_mode():
        for row, lp in _stream_blocks(logits_of, ids, chunk, score_from):
            if out is None:
                out = torch.empty(ids.numel() - score_from, lp.shape[-1])
            out[row : row + lp.shape[0]] = lp
    return out


def stream_nll_kl(
    log_probs: torch.Tensor, ids: torch.Tensor, ref_log_probs: torch.Tensor | None = None, score_from=512
):
    """(NLL per scored token, KL(ref || this) per token or None) from stream_log_probs' output."""
    targets = torch.as_tensor(ids).flatten()[score_from:]
    if targets.numel() != log_probs.shape[0]:
        raise ValueError(f"{log_probs.shape[0]} predictions for {targets.numel()} scored tokens")
    nll = -log_probs.gather(1, targets[:, None])[:, 0]
    if ref_log_probs is None:
        return nll, None
    if ref_log_probs.shape != log_probs.shape:
        raise ValueError(f"reference log-probs {tuple(ref_log_probs.shape)}, these {tuple(log_probs.shape)}")
    return nll, kl_rows(ref_log_probs, log_probs)


def stream_scores(
    logits_of, ids: torch.Tensor, ref_log_probs: torch.Tensor, chunk: int = 128, score_from: int = 512, keep_last=0
):
    """stream_log_probs and stream_nll_kl in one pass: (NLL, KL(ref || this) per scored token, the
    log-probabilities of the last `keep_last` scored tokens or None), scoring each chunk as it comes,
    so the (n - score_from, vocab) log-probabilities (300 MB for 1,536 tokens) are never held at once.
    A chunk that predicts a single scored token (the first, with score_from 512 and chunks of 128) is
    a block of one row, whose KL can differ from stream_nll_kl's in the last bits (kl_rows)."""
    ids = torch.as_tensor(ids).flatten()
    targets = ids[score_from:]
    if ref_log_probs.shape[0] != targets.numel() or not 0 <= keep_last <= targets.numel():
        raise ValueError(
            f"reference log-probs for {ref_log_probs.shape[0]} tokens, {targets.numel()} scored; keep_last {keep_last}"
        )
    nll, kl, kept = torch.empty(targets.numel()), torch.empty(targets.numel()), []
    with torch.inference_mode():
        for row, lp in _stream_blocks(logits_of, ids, chunk, score_from):
            rows = slice(row, row + lp.shape[0])
            nll[rows] = -lp.gather(1, targets[rows, None])[:, 0]
            kl[rows] = kl_rows(ref_log_probs[rows], lp)
            if row + lp.shape[0] > targets.numel() - keep_last:
                kept.append(lp[max(targets.numel() - keep_last - row, 0) :])
    return nll, kl, torch.cat(kept) if keep_last else None


# -- 5 Against the libraries -------------------------------------------------
def quanto_cache_logits(model, nbits: int = 4, axis_key: int = 0, axis_value: int = 0, group_size=64, residual=128):
    """logits_of(chunk_ids, start) for stream_log_probs through a transformers model and its
    QuantizedCache (quanto backend), created at start 0 and extended by every chunk after it; the
    cache of the last sequence is `logits_of.cache`. Quanto's axis 0 groups along head_dim (per
    token), axis -1 along positions (per channel): quantize_kv's "token" and "channel". Quanto groups
    the flattened (batch x heads x positions) axis, so axis -1 groups per channel only while the cache's
    length at each re-quantization is a multiple of group_size (chunks of `residual` tokens are)."""
    from transformers import QuantizedCache

    def logits_of(chunk_ids: torch.Tensor, start: int) -> torch.Tensor:
        if start == 0:
            logits_of.cache = QuantizedCache(
                "quanto", model.config, nbits=nbits, axis_key=axis_key, axis_value=axis_value,
                q_group_size=group_size, residual_length=residual,
            )  # fmt: skip
        out = model(input_ids=chunk_ids[None], past_key_values=logits_of.cache, use_cache=True)
        return out.logits[0]

    return logits_of


def quantized_cache_bytes(cache) -> int:
    """Bytes a transformers QuantizedCache (quanto backend) holds: the packed codes (two 4-bit or four
    2-bit codes per byte), the scales and shifts of its quantized keys and values, and its float residual."""
    total = 0
    for layer in cache.layers:
        for q in (layer._quantized_keys, layer._quantized_values):
            total += q._data._data.nbytes + q._scale.nbytes + q._shift.nbytes  # PackedTensor's uint8 storage
        total += layer.keys.nbytes + layer.values.nbytes
    return total


def llama_cpp_cache_log_probs(path, ids, cache_type: str = "f16", score_from: int = 512, rotate: bool = True):
    """(log-probabilities (n - score_from, vocab) of tokens score_from.. of `ids`, seconds to evaluate
    them): `ids` fed as one context to llama.cpp with its KV cache in `cache_type` ("f16", llama.cpp's
    default, "q8_0" or "q4_0"; keys and values both; flash attention on, which llama.cpp needs for a
    quantized value cache). The seconds include the logits of every position (logits_all).

    With a quantized cache and head_dim a multiple of 64, llama.cpp rotates queries, keys and values
    by a Hadamard matrix (its log: attn_rot_k = 1, attn_rot_v = 1); rotate=False sets
    LLAMA_ATTN_ROT_DISABLE=1 for this context, which turns that off."""
    import llama_cpp

    types = {"f16": 1, "q4_0": 2, "q8_0": 8}  # ggml_type numbers
    if cache_type not in types:
        raise ValueError(f"cache_type must be one of {list(types)}, got {cache_type!r}")
    ids = torch.as_tensor(ids).flatten()
    if not 0 < score_from < ids.numel():
        raise ValueError(f"score_from must be within 1..{ids.numel() - 1}, got {score_from}")
    before = os.environ.get("LLAMA_ATTN_ROT_DISABLE")
    if not rotate:
        os.environ["LLAMA_ATTN_ROT_DISABLE"] = "1"  # read when the context (its KV cache) is created
    try:
        llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=ids.numel(), n_batch=ids.numel(), logits_all=True,
            n_threads=torch.get_num_threads(), n_threads_batch=torch.get_num_threads(),
            type_k=types[cache_type], type_v=types[cache_type], flash_attn=True, verbose=False,
        )  # fmt: skip
    finally:
        if before is None:
            os.environ.pop("LLAMA_ATTN_ROT_DISABLE", None)
        else:
            os.environ["LLAMA_ATTN_ROT_DISABLE"] = before
    try:
        t0 = time.perf_counter()
        llm.eval(ids.tolist())
        seconds = time.perf_counter() - t0
        logits = torch.from_numpy(llm.scores[score_from - 1 : ids.numel() - 1].copy())
    finally:
        llm.close()
    return F.log_softmax(logits, -1), seconds
