"""Bit-exact, vectorized PyTorch ports of ggml's Q6_K, Q3_K, Q4_0 and Q5_0 quantizers (ggml/src/ggml-quants.c).

Every public function returns the bytes that
``ggml_quantize_chunk(type, x, dst, 0, rows, n_per_row, imatrix)`` writes: with no importance matrix ggml
runs the ``quantize_row_*_ref`` quantizer, with one the ``quantize_row_*_impl`` quantizer.

How the C arithmetic is reproduced:

* float32 everywhere; C's float literals (``1e-15f``, ``0.1f``) are float32 constants here.
* A sum that C accumulates in a loop (``sum += w*x``) is accumulated position by position from +0.0, each
  step vectorized over all blocks (``_seq_sum``), never with ``torch.sum`` (pairwise summation rounds
  differently). ``a*b*c`` is ``(a*b)*c`` as in C; no fused multiply-adds.
* ``nearest_int`` (the ``12582912.f`` trick) is emulated bit for bit (``_nearest_int``), or is
  ``torch.round`` (half to even, the same) where the argument is provably below 2**22 in magnitude.
* Max scans are C's strict ``>`` loops (``_first_absmax``), so ties go to the first index and an all-zero
  block keeps ``max = +0.0``; make_qx_quants' candidate scales are compared in C's order with C's strict test.
* Division by a constant is done against a full tensor (``_div``), never by a scalar divisor.
* ``sqrtf`` is numpy's float32 sqrt (correctly rounded): torch 2.13's CPU ``torch.sqrt`` is 1 ulp off for
  about 0.6% of float32 inputs, which changed Q3_K imatrix blocks before it was replaced.
* ``GGML_FP32_TO_FP16`` is round-to-nearest-even, which is ``Tensor.half()``.

Layouts (ggml-common.h): block_q6_K = ql[128], qh[64], int8 scales[16], fp16 d (210 bytes);
block_q3_K = hmask[32], qs[64], scales[12], fp16 d (110 bytes); block_q4_0 = fp16 d, qs[16] (18 bytes);
block_q5_0 = fp16 d, qh[4], qs[16] (22 bytes).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["quantize_q3_k", "quantize_q4_0_imatrix", "quantize_q5_0_imatrix", "quantize_q6_k"]

QK_K = 256
QK = 32  # QK4_0 == QK5_0
_TEMP = 1 << 16  # elements (candidates x blocks) per temporary in _candidate_sums, to stay in cache
_ROWS_ELEMS = 1 << 21  # weights per row chunk in the public functions


def _f32(v: float) -> torch.Tensor:
    """A 0-dim float32 constant, like a C ``v##f`` literal."""
    return torch.tensor(v, dtype=torch.float32)


_EPS = _f32(1e-15)  # GROUP_MAX_EPS
_MAGIC = _f32(12582912.0)  # 1.5 * 2**23, nearest_int's constant


# ----------------------------------------------------------------------------- helpers


def _nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int, bit for bit for any float32 input: float32 (...) -> int32 (...)."""
    return ((v + _MAGIC).view(torch.int32) & 0x7FFFFF) - 0x400000


def _seq_sum(p: torch.Tensor) -> torch.Tensor:
    """C's ``s = 0; for (i...) s += p[i];`` over dim 0, in order: (n, ...) -> (...)."""
    s = torch.zeros_like(p[0])
    for i in range(p.shape[0]):
        s += p[i]
    return s


def _div(a: torch.Tensor, v: float) -> torch.Tensor:
    """a / v with v a float32 constant, as a tensor-by-tensor true division."""
    return a / torch.full_like(a, v)


def _first_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """C's ``amax = max = 0; if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }`` over dim 0:
    x (n, B) -> (amax (B,), max (B,)); the first of equal maxima wins, max stays +0.0 when no |x| > 0."""
    amax = torch.zeros_like(x[0])
    mx = torch.zeros_like(x[0])
    for i in range(x.shape[0]):
        a = x[i].abs()
        better = a > amax
        amax = torch.where(better, a, amax)
        mx = torch.where(better, x[i], mx)
    return amax, mx


def _sqrt(t: torch.Tensor) -> torch.Tensor:
    """sqrtf, correctly rounded: numpy's float32 sqrt (hardware sqrtps). torch.sqrt is not: it can be 1 ulp off."""
    return torch.from_numpy(np.sqrt(t.contiguous().numpy()))


def _fp16_bytes(d: torch.Tensor) -> torch.Tensor:
    """(B,) float16 -> (B, 2) uint8, little endian (ggml_half)."""
    return d.contiguous().view(torch.uint8).reshape(-1, 2)


def _candidate_iscales(nmax: int) -> torch.Tensor:
    """The numerators of make_qx_quants' scales, in its order: -nmax, then -(nmax + 0.1f*is), is = -9..9, is != 0."""
    steps = [0, *range(-9, 0), *range(1, 10)]
    c = [np.float32(nmax) + np.float32(0.1) * np.float32(s) for s in steps]  # float32 arithmetic, as in C
    return -torch.from_numpy(np.array(c, dtype=np.float32))  # (19,)


def _check(x, imatrix, block: int, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not torch.is_tensor(x):
        raise ValueError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name}: x must be 2-D (rows, n_per_row), got shape {tuple(x.shape)}")
    if x.dtype != torch.float32:
        raise ValueError(f"{name}: x must be float32, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: x has NaN or infinite values")
    n = x.shape[1]
    if n == 0 or n % block:
        raise ValueError(f"{name}: n_per_row must be a positive multiple of {block}, got {n}")
    if imatrix is not None:
        if not torch.is_tensor(imatrix) or imatrix.dtype != torch.float32:
            raise ValueError(f"{name}: imatrix must be a float32 torch.Tensor or None")
        if tuple(imatrix.shape) != (n,):
            raise ValueError(f"{name}: imatrix must have shape ({n},), got {tuple(imatrix.shape)}")
        if not bool((imatrix >= 0).all()):
            raise ValueError(f"{name}: imatrix must be non-negative (and not NaN)")
        imatrix = imatrix.contiguous()
    return x.contiguous(), imatrix


def _by_rows(fn, x: torch.Tensor, imatrix: torch.Tensor | None, type_size: int, block: int) -> torch.Tensor:
    """Apply fn(x_rows, imatrix) -> (rows, bytes) over chunks of rows (every quantizer here is row-local)."""
    rows, n = x.shape
    if rows == 0:
        return torch.zeros((0, n // block * type_size), dtype=torch.uint8)
    step = max(1, _ROWS_ELEMS // n)
    return torch.cat([fn(x[r : r + step], imatrix) for r in range(0, rows, step)])


# ----------------------------------------------------------------------------- make_qx_quants / make_q3_quants


def _candidate_sums(x: torch.Tensor, w: torch.Tensor, iscale: torch.Tensor, nmax: int):
    """For every candidate iscale (C, B): sumlx = sum w*x[i]*l, suml2 = sum w*l*l in C's order over the n positions
    of x, w (n, B), with l = clamp(nearest_int(iscale*x[i]), -nmax, nmax-1). Columns go in cache-sized chunks."""
    n, nb = x.shape
    wx = w * x  # (n, B): C's w*x[i]
    sumlx = torch.zeros_like(iscale)
    suml2 = torch.zeros_like(iscale)
    step = max(1, _TEMP // iscale.shape[0])
    for s in range(0, nb, step):
        e = min(nb, s + step)
        isc, slx, sl2 = iscale[:, s:e], sumlx[:, s:e], suml2[:, s:e]
        li, t = torch.empty_like(isc), torch.empty_like(isc)
        for i in range(n):  # |iscale*x| <= nmax + 1 here, so torch.round (half to even) == nearest_int
            torch.mul(isc, x[i, s:e], out=li)
            li.round_().clamp_(-nmax, nmax - 1)
            slx += torch.mul(li, wx[i, s:e], out=t)  # sumlx += (w*x[i])*l
            torch.mul(li, w[i, s:e], out=t)
            sl2 += t.mul_(li)  # suml2 += (w*l)*l
    return sumlx, suml2


def _make_qx_quants(x: torch.Tensor, nmax: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=w) on every column: x, w (n, B) -> (scale (B,), L (n, B) uint8).

    L is in [0, 2*nmax - 1] (l + nmax); a column with max |x| < GROUP_MAX_EPS gives scale 0 and L 0.
    """
    x, w = x.contiguous(), w.contiguous()
    nb = x.shape[1]
    amax, mx = _first_absmax(x)
    zero = amax < _EPS  # all zero: L = 0, return 0
    iscale = _candidate_iscales(nmax)[:, None] / torch.where(zero, 1.0, mx)  # (19, B)
    sumlx, suml2 = _candidate_sums(x, w, iscale, nmax)
    scale = torch.where(suml2[0] != 0, sumlx[0] / suml2[0], 0.0)
    best = scale * sumlx[0]
    pick = torch.zeros(nb, dtype=torch.int64)
    for k in range(1, iscale.shape[0]):
        s = sumlx[k] / suml2[k]
        better = (suml2[k] > 0) & (sumlx[k] * sumlx[k] > best * suml2[k])
        scale = torch.where(better, s, scale)
        best = torch.where(better, s * sumlx[k], best)
        pick = torch.where(better, k, pick)
    chosen = iscale.gather(0, pick[None])  # (1, B)
    L = torch.round(chosen * x).clamp_(-nmax, nmax - 1) + nmax
    return torch.where(zero, 0.0, scale), torch.where(zero[None], 0.0, L).to(torch.uint8)


def _q3_refine_pass(x, w, wx, L, sumlx, suml2, nmax: int) -> torch.Tensor:
    """One pass of make_q3_quants' `for (i...)` refinement, in place on L (n, B), sumlx, suml2 (B,): -> changed (B,)."""
    changed = torch.zeros(x.shape[1], dtype=torch.bool)
    for i in range(x.shape[0]):
        li = L[i]
        slx = sumlx - wx[i] * li
        sl2 = suml2 - (w[i] * li) * li
        new_l = _nearest_int((x[i] * sl2) / slx).clamp_(-nmax, nmax - 1).float()
        slx_new = slx + wx[i] * new_l
        sl2_new = sl2 + (w[i] * new_l) * new_l
        ok = (slx > 0) & (new_l != li) & (sl2_new > 0) & ((slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new)
        L[i] = torch.where(ok, new_l, li)
        sumlx.copy_(torch.where(ok, slx_new, sumlx))
        suml2.copy_(torch.where(ok, sl2_new, suml2))
        changed |= ok
    return changed


def _make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true) on every column: x (n, B) -> (scale (B,), L (n, B) uint8).

    Weights are x*x; after the first rounding it refines one L at a time (5 passes at most). L is l + nmax.
    A column whose pass changes nothing keeps its state, so later passes (C's `break`) run on the others only.
    """
    amax, mx = _first_absmax(x)
    zero = amax < _EPS
    iscale = _f32(-float(nmax)) / torch.where(zero, 1.0, mx)  # (B,)
    w = x * x
    wx = w * x
    L = torch.round(iscale * x).clamp_(-nmax, nmax - 1) + 0.0  # (n, B) float (+0.0 for -0.0), |iscale*x| <= nmax
    sumlx = _seq_sum(wx * L)
    suml2 = _seq_sum((w * L) * L)
    active = _q3_refine_pass(x, w, wx, L, sumlx, suml2, nmax).nonzero().squeeze(1)
    for _ in range(4):
        if active.numel() == 0:
            break
        xa, wa, wxa, La = (t.index_select(1, active) for t in (x, w, wx, L))
        slx, sl2 = sumlx.index_select(0, active), suml2.index_select(0, active)
        changed = _q3_refine_pass(xa, wa, wxa, La, slx, sl2, nmax)
        L.index_copy_(1, active, La)
        sumlx.index_copy_(0, active, slx)
        suml2.index_copy_(0, active, sl2)
        active = active[changed]
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    return torch.where(zero, 0.0, scale), torch.where(zero[None], 0.0, L + nmax).to(torch.uint8)


def _sub_blocks(t: torch.Tensor, size: int) -> torch.Tensor:
    """(..., k*size) -> (size, B): position within the sub-block first, sub-blocks (row-major) along dim 1."""
    return t.reshape(-1, size).T.contiguous()


# ----------------------------------------------------------------------------- Q6_K


def _pack_q6_k(L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nb, 256) uint8 quants in 0..63 -> ql (nb, 128), qh (nb, 64)."""
    q = L.reshape(-1, 2, 4, 32)  # q[:, h, k, l] = L[128h + 32k + l]
    lo, hi = q & 0xF, q >> 4
    ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], 2)  # (nb, 2, 64)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # (nb, 2, 32)
    return ql.reshape(-1, 128), qh.reshape(-1, 64)


def _q6_k_rows(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    rows, n = x.shape
    xb = x.reshape(-1, QK_K)  # (nb, 256) super-blocks, row-major
    nb = xb.shape[0]
    xs = _sub_blocks(xb, 16)  # (16, nb*16)
    if imatrix is None:  # quantize_row_q6_K_ref: make_qx_quants(16, 32, x, L, 1, NULL): weights x*x
        w = xs * xs
    else:  # quantize_row_q6_K_impl: make_qx_quants(16, 32, x, L, 1, qw): the imatrix itself
        w = _sub_blocks(imatrix.expand(rows, n), 16)
    scales, L = _make_qx_quants(xs, 32, w)
    scales = scales.reshape(nb, 16)
    L = L.T.reshape(nb, 16, 16)
    max_abs, max_scale = _first_absmax(scales.T)
    zero = max_abs < _EPS  # the whole super-block is written as zeros
    iscale = _f32(-128.0) / torch.where(zero, 1.0, max_scale)  # (nb,)
    d = (_f32(1.0) / iscale).half()
    sc = _nearest_int(iscale[:, None] * scales).clamp_(max=127).to(torch.int8)  # (nb, 16)
    dsub = d.float()[:, None] * sc.float()  # (nb, 16)
    q = (_nearest_int(xb.reshape(nb, 16, 16) / dsub[:, :, None]).clamp_(-32, 31) + 32).to(torch.uint8)
    L = torch.where((dsub != 0)[:, :, None], q, L).reshape(nb, QK_K)  # `if (!d) continue;` keeps L
    ql, qh = _pack_q6_k(L)
    out = torch.cat([ql, qh, sc.view(torch.uint8), _fp16_bytes(d)], 1)
    out[zero] = 0
    return out.reshape(rows, -1)


def quantize_q6_k(x: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """Q6_K bytes of x (rows, n_per_row), n_per_row a multiple of 256 -> uint8 (rows, n_per_row // 256 * 210).

    Mirrors ggml's quantize_q6_K: quantize_row_q6_K_ref without an imatrix, quantize_row_q6_K_impl with one.
    """
    x, imatrix = _check(x, imatrix, QK_K, "quantize_q6_k")
    return _by_rows(_q6_k_rows, x, imatrix, 210, QK_K)


# ----------------------------------------------------------------------------- Q3_K


def _pack_q3_scales(ls: torch.Tensor) -> torch.Tensor:
    """(nb, 16) uint8 6-bit scales -> (nb, 12): low nibbles of 0..7 | 8..15 << 4, then the 2 high bits, 4 per byte."""
    low = (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4)  # (nb, 8)
    h = (ls >> 4).reshape(-1, 4, 4)  # h[:, k, m] = ls[4k + m] >> 4 goes to byte 8 + m, bits 2k
    high = h[:, 0] | (h[:, 1] << 2) | (h[:, 2] << 4) | (h[:, 3] << 6)  # (nb, 4)
    return torch.cat([low, high], 1)


def _q3_k_finish(xb: torch.Tensor, L: torch.Tensor, ls: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Requantize with the stored scales and pack: xb (nb, 256), L (nb, 256) in 0..7, ls (nb, 16) in 0..63,
    d (nb,) float16 -> (nb, 110) uint8 block_q3_K."""
    nb = xb.shape[0]
    dsub = d.float()[:, None] * (ls.float() - 32)  # (nb, 16): fp16 d * (int8) sc
    q = (_nearest_int(xb.reshape(nb, 16, 16) / dsub[:, :, None]).clamp_(-4, 3) + 4).to(torch.uint8)
    L = torch.where((dsub != 0)[:, :, None], q, L.reshape(nb, 16, 16)).reshape(nb, QK_K)
    high = L > 3  # (nb, 256); hmask[m] bit k <- L[32k + m] > 3
    hb = high.reshape(nb, 8, 32).to(torch.uint8)
    hmask = hb[:, 0]
    for k in range(1, 8):
        hmask = hmask | (hb[:, k] << k)
    q = (L - (high.to(torch.uint8) << 2)).reshape(nb, 2, 4, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(nb, 64)
    return torch.cat([hmask, qs, _pack_q3_scales(ls), _fp16_bytes(d)], 1)


def _q3_k_ref_rows(x: torch.Tensor) -> torch.Tensor:
    """quantize_row_q3_K_ref on (rows, n) -> (rows * n / 256, 110)."""
    xb = x.reshape(-1, QK_K)
    nb = xb.shape[0]
    scales, L = _make_q3_quants(_sub_blocks(xb, 16), 4)
    scales = scales.reshape(nb, 16)
    L = L.T.reshape(nb, QK_K)
    _, max_scale = _first_absmax(scales.T)
    nonzero = max_scale != 0  # `if (max_scale)`
    iscale = _f32(-32.0) / torch.where(nonzero, max_scale, 1.0)
    l8 = _nearest_int(iscale[:, None] * scales).to(torch.int8).to(torch.int32)  # int8_t l = nearest_int(...)
    ls = torch.where(nonzero[:, None], l8.clamp(-32, 31) + 32, 0).to(torch.uint8)  # memset to 0 if max_scale == 0
    d = torch.where(nonzero, _f32(1.0) / iscale, 0.0).half()
    return _q3_k_finish(xb, L, ls, d)


def _q3_k_impl_rows(x: torch.Tensor, imatrix: torch.Tensor) -> torch.Tensor:
    """quantize_row_q3_K_impl on (rows, n) with quant_weights -> (rows * n / 256, 110)."""
    rows, n = x.shape
    xb = x.reshape(-1, QK_K)
    nb = xb.shape[0]
    sumx2 = _seq_sum((xb * xb).T.contiguous())  # (nb,)
    sigma2 = _div(_f32(2.0) * sumx2, float(QK_K))  # 2*sumx2/QK_K
    weight = imatrix.expand(rows, n).reshape(nb, QK_K) * _sqrt(sigma2[:, None] + xb * xb)
    ws = _sub_blocks(weight, 16)  # (16, nb*16)
    sw = _seq_sum(ws).reshape(nb, 16)
    scales, L = _make_qx_quants(_sub_blocks(xb, 16), 4, ws)
    d_block, ls = _make_qx_quants(scales.reshape(nb, 16).T.contiguous(), 32, sw.T.contiguous())
    return _q3_k_finish(xb, L.T.reshape(nb, QK_K), ls.T, d_block.half())


def _q3_k_rows(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    out = _q3_k_ref_rows(x) if imatrix is None else _q3_k_impl_rows(x, imatrix)
    return out.reshape(x.shape[0], -1)


def quantize_q3_k(x: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """Q3_K bytes of x (rows, n_per_row), n_per_row a multiple of 256 -> uint8 (rows, n_per_row // 256 * 110).

    Mirrors ggml's quantize_q3_K: quantize_row_q3_K_ref (make_q3_quants) without an imatrix,
    quantize_row_q3_K_impl (make_qx_quants weighted by qw*sqrtf(sigma2 + x^2), sigma2 = 2*sum(x^2)/256) with one.
    """
    x, imatrix = _check(x, imatrix, QK_K, "quantize_q3_k")
    return _by_rows(_q3_k_rows, x, imatrix, 110, QK_K)


# ----------------------------------------------------------------------------- Q4_0 / Q5_0


def _type0_ref_quants(xb: torch.Tensor, nq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_row_q4_0_ref (nq=8) / _q5_0_ref (nq=16) on (B, 32) -> (d (B,) float16, L (B, 32) uint8)."""
    _, mx = _first_absmax(xb.T.contiguous())  # all zero: max = +0.0, d = -0.0 (fp16 0x8000)
    d = _div(mx, float(-nq))  # max / -8
    inv = torch.where(d != 0, _f32(1.0) / d, 0.0)
    L = (xb * inv[:, None] + (nq + 0.5)).to(torch.int32).clamp_(max=2 * nq - 1)  # MIN(15, (int8_t)(x0 + 8.5f))
    return d.half(), L.to(torch.uint8)


def _type0_impl_quants(x: torch.Tensor, imatrix: torch.Tensor, nq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_row_q4_0_impl (nq=8) / _q5_0_impl (nq=16) on (rows, n) -> (d (B,) float16, L (B, 32) uint8)."""
    n = x.shape[1]
    sum_x2 = _seq_sum((x * x).T.contiguous())  # (rows,), over the whole row
    sigma2 = _div(sum_x2, float(n))
    weight = imatrix * _sqrt(sigma2[:, None] + x * x)  # (rows, n)
    d, L = _make_qx_quants(_sub_blocks(x, QK), nq, _sub_blocks(weight, QK))
    return d.half(), L.T


def _type0_quants(x: torch.Tensor, imatrix: torch.Tensor | None, nq: int) -> tuple[torch.Tensor, torch.Tensor]:
    if imatrix is None:
        return _type0_ref_quants(x.reshape(-1, QK), nq)
    return _type0_impl_quants(x, imatrix, nq)


def _q4_0_rows(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    d, L = _type0_quants(x, imatrix, 8)
    qs = L[:, :16] | (L[:, 16:] << 4)  # (B, 16)
    return torch.cat([_fp16_bytes(d), qs], 1).reshape(x.shape[0], -1)


def _q5_0_rows(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    d, L = _type0_quants(x, imatrix, 16)
    qs = (L[:, :16] & 0xF) | ((L[:, 16:] & 0xF) << 4)  # (B, 16)
    bit5 = (L >> 4).reshape(-1, 4, 8)  # qh bit j <- L[j] >> 4; little-endian uint32 -> byte j // 8, bit j % 8
    qh = bit5[:, :, 0]
    for k in range(1, 8):
        qh = qh | (bit5[:, :, k] << k)
    return torch.cat([_fp16_bytes(d), qh, qs], 1).reshape(x.shape[0], -1)


def quantize_q4_0_imatrix(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    """Q4_0 bytes of x (rows, n_per_row), n_per_row a multiple of 32 -> uint8 (rows, n_per_row // 32 * 18).

    Mirrors ggml's quantize_q4_0 -> quantize_row_q4_0_impl: make_qx_quants(32, 8, x, L, 1, qw*sqrtf(sigma2 + x^2))
    with sigma2 the row's mean square. imatrix=None gives quantize_row_q4_0_ref, as ggml does.
    """
    x, imatrix = _check(x, imatrix, QK, "quantize_q4_0_imatrix")
    return _by_rows(_q4_0_rows, x, imatrix, 18, QK)


def quantize_q5_0_imatrix(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    """Q5_0 bytes of x (rows, n_per_row), n_per_row a multiple of 32 -> uint8 (rows, n_per_row // 32 * 22).

    Mirrors ggml's quantize_q5_0 -> quantize_row_q5_0_impl: make_qx_quants(32, 16, x, L, 1, qw*sqrtf(sigma2 + x^2))
    with sigma2 the row's mean square. imatrix=None gives quantize_row_q5_0_ref, as ggml does.
    """
    x, imatrix = _check(x, imatrix, QK, "quantize_q5_0_imatrix")
    return _by_rows(_q5_0_rows, x, imatrix, 22, QK)
