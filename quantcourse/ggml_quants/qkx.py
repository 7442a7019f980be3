"""Bit-exact PyTorch ports of ggml's Q4_K, Q5_K, Q2_K, Q4_1 and Q5_1 quantizers (ggml/src/ggml-quants.c).

Each public function returns the bytes `ggml_quantize_chunk(type, x, dst, 0, rows, n_per_row, imatrix)`
writes: with no importance matrix the reference quantizer (quantize_row_q4_K_ref & co.: make_qkx2_quants
with weights av_x + |x|), with one the `_impl` quantizer (make_qkx3_quants with weights
qw * sqrt(sigma2 + x^2), then make_qp_quants for the super-block scales).

How the port stays bit for bit:
- every value is float32 and every C expression is one torch op per C operation, in the C order
  (no fused multiply-add: libggml-base.so is built for plain x86-64, it has no FMA instructions);
- a sum the C code accumulates in a loop (`s += w*x` over the 16 or 32 weights of a block) is added in
  that order for every block at once (`_seqsum`: numpy's add.reduce over the outer axis, which adds row
  after row; never torch.sum, whose pairwise/vectorized order rounds differently);
- min/max use the C's strict comparisons in the C order, so ties and the sign of a zero come out alike;
- nearest_int is the 12582912.f trick itself (`_nearest_int`), or torch.round where the value is known
  to lie in the trick's exact range (|v| < 2**22, checked per block);
- `c / t` is always an element-wise division by a tensor (never `t.reciprocal() * c`);
- fp16 rounding is torch's .half() (round to nearest even, like GGML_FP32_TO_FP16);
- sqrtf is numpy's float32 sqrt: torch.sqrt (float32, AVX-512) is not correctly rounded.

Layout: the search over a block runs on (n, B) tensors, position-major (n = 16 or 32 weights, B blocks),
so that position i of every block is one contiguous row.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["quantize_q4_k", "quantize_q5_k", "quantize_q2_k", "quantize_q4_1_imatrix", "quantize_q5_1_imatrix"]

QK_K = 256  # weights per k-quant super-block
QK4_1 = 32  # weights per Q4_1 / Q5_1 block
_MAGIC = 12582912.0  # 1.5 * 2**23, nearest_int's constant
_EXACT_RANGE = 4194000.0  # |v| below this: nearest_int(v) == round-half-even(v)
_GROUP_MAX_EPS = float(np.float32(1e-15))
_CHUNK_WEIGHTS = 1 << 19  # weights per chunk of the search (measured best on this 2-core machine)


# ---------------------------------------------------------------------------------------------
# float32 helpers
# ---------------------------------------------------------------------------------------------


def _f32(v: float) -> np.float32:
    return np.float32(v)


def _nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int(fval), bit for bit: (bits(fval + 12582912.f) & 0x7fffff) - 0x400000, int32."""
    return ((v + _MAGIC).view(torch.int32) & 0x7FFFFF) - 0x400000


def _cdiv(c: float, t: torch.Tensor) -> torch.Tensor:
    """The C `c / t` for a float constant c: a true division, element by element."""
    return torch.full_like(t, c).div_(t)


def _divc(t: torch.Tensor, c: float) -> torch.Tensor:
    """The C `t / c` for a float constant c (torch.div by a tensor: no reciprocal shortcut)."""
    return t / torch.full_like(t, c)


def _sqrtf(t: torch.Tensor) -> torch.Tensor:
    """sqrtf, correctly rounded. Not torch.sqrt: its float32 AVX-512 kernel is off by one ulp for
    about 0.6% of inputs (measured with torch 2.13); numpy's float32 sqrt is the exact sqrtps."""
    return torch.from_numpy(np.sqrt(t.contiguous().numpy()))


def _seqsum(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """`float s = 0; for (i...) s += t[i];` along dim, in order: (..., n, ...) -> (..., ...).

    numpy's add.reduce along an axis that is not the innermost one of a C-contiguous array runs
    `out[j] += a[i, j]` for i = 0, 1, ...: the C order for every column, in one call. (numpy sums
    pairwise only along the innermost axis, hence the loop when there is a single column.) It starts
    from a[0], not from 0.0f; the two differ only for a sum of negative zeros, which `+ 0.0` makes +0."""
    if t.shape[dim] > 1 and math.prod(t.shape[dim + 1 :]) > 1:  # the reduced axis is not the innermost
        out = np.add.reduce(t.contiguous().numpy(), axis=dim)
        return torch.from_numpy(np.add(out, np.float32(0.0), out=out))
    return _seqsum_loop(t.movedim(dim, 0))


def _seqsum_loop(t: torch.Tensor) -> torch.Tensor:
    """_seqsum as the plain loop of vector adds over axis 0 (the tests check _seqsum against it)."""
    acc = t[0] + 0.0
    for i in range(1, t.shape[0]):
        acc.add_(t[i])
    return acc


def _seqsum_from_first(t: torch.Tensor) -> torch.Tensor:
    """`float s = t[0]; for (i = 1...) s += t[i];` over axis 0 (numpy's reduce starts from t[0] too)."""
    if t.shape[0] > 1 and math.prod(t.shape[1:]) > 1:
        return torch.from_numpy(np.add.reduce(t.contiguous().numpy(), axis=0))
    acc = t[0].clone()
    for i in range(1, t.shape[0]):
        acc.add_(t[i])
    return acc


def _running_max(t: torch.Tensor) -> torch.Tensor:
    """`float m = 0; for (j...) if (t[j] > m) m = t[j];` over the last axis (t: (B, n) -> (B,))."""
    m = torch.zeros(t.shape[0], dtype=t.dtype)
    for j in range(t.shape[1]):
        m = torch.where(t[:, j] > m, t[:, j], m)
    return m


def _fp16(t: torch.Tensor) -> torch.Tensor:
    """GGML_FP32_TO_FP16 (round to nearest even), kept as torch.float16."""
    return t.half()


def _fp16_bytes(h: torch.Tensor) -> torch.Tensor:
    """(B,) float16 -> (B, 2) uint8, little-endian as in the block structs."""
    return h.reshape(-1, 1).view(torch.uint8)


# ---------------------------------------------------------------------------------------------
# make_qkx2_quants / make_qkx3_quants: the per-block (scale, min) search
# ---------------------------------------------------------------------------------------------


def _block_min(x: torch.Tensor) -> torch.Tensor:
    """`min = x[0]; for (i = 1...) if (x[i] < min) min = x[i];` over axis 0 of (n, B), signed zeros
    included: where the minimum is a zero, C keeps the first zero it meets (strict <)."""
    lo = x.amin(dim=0)
    zero = lo == 0
    if bool(zero.any()):
        cols = zero.nonzero().squeeze(1)
        sub = x[:, cols]
        first = (sub == 0).to(torch.uint8).argmax(dim=0)
        lo[cols] = sub[first, torch.arange(cols.numel())]
    return lo


def _levels(x, mn, iscale, xlo, nmax, out):
    """Laux[i] for every block: MAX(0, MIN(nmax, nearest_int(iscale*(x - min)))), as both
    make_qkx2_quants and make_qkx3_quants of the vendored llama.cpp (0c1e570) compute it,
    written into out (n, B) as float.

    v = iscale*(x - min) is monotone in x, so it lies between its values at the block's min and max;
    at the max it is about the trial's nmax + rmin + rdelta*is whenever iscale is finite. So when
    |iscale*(xlo - min)| is below 2**22 (and not NaN) for every block, the whole chunk is in
    nearest_int's exact range and torch.round (half to even) is nearest_int; otherwise the blocks out
    of range get the C expression itself."""
    torch.sub(x, mn, out=out)
    out.mul_(iscale)  # v = iscale*(x[i] - min)
    low = (iscale * (xlo - mn)).abs_()
    fixed = None
    if not float(low.max()) < _EXACT_RANGE:  # NaN compares false: it takes this branch too
        idx = (~(low < _EXACT_RANGE)).nonzero().squeeze(1)
        fixed = _nearest_int(out[:, idx]).clamp_(0, nmax).float()
    out.clamp_(0, nmax).round_()
    if fixed is not None:
        out[:, idx] = fixed
    return out


def _weighted_error(lev, scale, mn, x, w, use_mad, out):
    """sum_i w[i] * f(scale*L[i] + min - x[i]), f = fabsf or square, accumulated in order."""
    torch.mul(lev, scale, out=out)
    out.add_(mn)
    out.sub_(x)
    if use_mad:
        out.abs_()
    else:
        out.mul_(out)
    out.mul_(w)
    return _seqsum(out)


class _Trials:
    """The buffers and per-block constants of one chunk's search (x, w: (n, B))."""

    def __init__(self, x, w):
        n, nb = x.shape
        self.x, self.w = x, w
        self.lev_x = torch.empty(2, n, nb)  # [Laux, x]: Laux is written in place by _levels
        self.lev_x[1] = x
        self.lev = self.lev_x[0]
        self.prods = torch.empty(3, n, nb)  # w*l, w*l*l, w*l*x[i]
        self.err = torch.empty(n, nb)
        self.sum_w = _seqsum_from_first(w)
        self.sum_x = _seqsum_from_first(w * x)
        self.w_w_x = torch.stack([self.sum_w, self.sum_w, self.sum_x])

    def fit(self):
        """The trial's least-squares fit from self.lev: D, this_scale, this_min, each (B,)."""
        torch.mul(self.w, self.lev, out=self.prods[0])  # w*l
        torch.mul(self.prods[0], self.lev_x, out=self.prods[1:])  # w*l*l, w*l*x[i]
        sums = _seqsum(self.prods, dim=1)  # sum_l, sum_l2, sum_xl
        sum_l = sums[0:1]
        # [sum_w*sum_l2 - sum_l*sum_l, sum_w*sum_xl - sum_x*sum_l, sum_x*sum_l2 - sum_l*sum_xl]
        dn = self.w_w_x * torch.cat([sums[1:3], sums[1:2]]) - sum_l * torch.cat([sum_l, self.sum_x[None], sums[2:3]])
        this_scale, this_min = dn[1] / dn[0], dn[2] / dn[0]
        positive = this_min > 0  # then this_min = 0, this_scale = sum_xl/sum_l2
        this_scale = torch.where(positive, sums[2] / sums[1], this_scale)
        return dn[0], this_scale, this_min.masked_fill_(positive, 0.0)


def _qkx_search(x, w, nmax, rmin, rdelta, nstep, use_mad, clamp_first):
    """make_qkx2_quants (clamp_first=False) or make_qkx3_quants (True) on every block at once.

    x, w: (n, B) float32, position-major. Returns scale (B,), the_min (B,) (= -min, as *the_min)
    and L (n, B) float levels in 0..nmax.

    The levels of the best trial are not copied at each trial (torch.where on (n, B) is slow): the
    trial's (iscale, min) are kept and its levels recomputed once at the end."""
    xlo, mx = _block_min(x), x.amax(dim=0)
    mn = torch.where(xlo > 0, 0.0, xlo)
    flat = mx == mn  # qkx2: max == min; qkx3: max <= min (the same here: min <= max always)
    flat_f = flat.float()
    trials = _Trials(x, w)

    # flat blocks return early in C; here they run along with a harmless range of 1 (x - min is 0)
    iscale = _cdiv(float(nmax), (mx - mn) + flat_f)
    first = _levels(x, mn, iscale, xlo, nmax, torch.empty_like(x))
    best = _weighted_error(first, _cdiv(1.0, iscale), mn, x, w, use_mad, trials.err)
    zeros = torch.zeros_like(mn)
    state = torch.stack([best, _cdiv(1.0, iscale), mn, zeros, zeros, zeros])  # + the winner's iscale, min, won
    ones = torch.ones_like(mn)
    for step in range(nstep + 1):
        best, mn = state[0], state[2]
        iscale = _cdiv(float(_f32(rmin) + _f32(rdelta) * _f32(step) + _f32(nmax)), (mx - mn) + flat_f)
        _levels(x, mn, iscale, xlo, nmax, trials.lev)
        d, this_scale, this_min = trials.fit()
        cur = _weighted_error(trials.lev, this_scale, this_min, x, w, use_mad, trials.err)
        better = (d > 0) & (cur < best)
        state = torch.where(better, torch.stack([cur, this_scale, this_min, iscale, mn, ones]), state)
    _, scale, mn, win_iscale, win_min, won = state.unbind(0)
    levels = first
    if bool(won.any()):
        winner = _levels(x, win_min, win_iscale, xlo, nmax, trials.lev)
        levels = first + (winner - first) * won  # small integers: exact
    levels.mul_(1.0 - flat_f)
    return torch.where(flat, 0.0, scale), -mn, levels


def _search_chunked(xt, w, nmax, rmin, rdelta, nstep, use_mad, clamp_first):
    """_qkx_search over chunks of blocks small enough for the cache. xt, w: (n, NB) -> (NB,), (NB,), (n, NB)."""
    n, nb = xt.shape
    scale, the_min, levels = torch.empty(nb), torch.empty(nb), torch.empty(n, nb)
    step = max(1, _CHUNK_WEIGHTS // n)
    for a in range(0, nb, step):
        b = min(nb, a + step)
        found = _qkx_search(
            xt[:, a:b].contiguous(), w[:, a:b].contiguous(), nmax, rmin, rdelta, nstep, use_mad, clamp_first
        )
        scale[a:b], the_min[a:b], levels[:, a:b] = found
    return scale, the_min, levels


# ---------------------------------------------------------------------------------------------
# make_qp_quants: the super-block scale of the sub-block scales (imatrix path)
# ---------------------------------------------------------------------------------------------


def _qp_trial_mse(x, qw, scale, levels):
    diff = x - scale * levels
    return _seqsum(qw * diff * diff)  # w*diff*diff = (w*diff)*diff


def _qp_refine(x, qw, levels, sumlx, suml2, nmax):
    """make_qp_quants' five passes of one-weight changes (in place on levels)."""
    for _ in range(5):  # a pass that changes nothing leaves the state as it was: no need to break
        for i in range(x.shape[0]):
            w, xi, li = qw[i], x[i], levels[i]
            wx = w * xi
            slx = sumlx - wx * li
            sl2 = suml2 - w * li * li
            new_l = _nearest_int(xi * sl2 / slx).clamp_(max=nmax)
            new_f = new_l.float()
            change = (slx > 0) & (sl2 > 0) & (new_f != li)
            slx = slx + wx * new_f
            sl2 = sl2 + w * new_f * new_f
            change &= slx * slx * suml2 > sumlx * sumlx * sl2
            levels[i] = torch.where(change, (new_l & 0xFF).float(), li)
            sumlx = torch.where(change, slx, sumlx)
            suml2 = torch.where(change, sl2, suml2)
    return sumlx, suml2


def _qp_quants(x, qw, nmax):
    """make_qp_quants(n, nmax, x, L, quant_weights) on every super-block at once.

    x, qw: (n, B). Returns the scale (B,) and L (n, B) as float (the uint8 values 0..255)."""
    mx = torch.zeros(x.shape[1], dtype=x.dtype)
    for i in range(x.shape[0]):
        mx = torch.where(mx > x[i], mx, x[i])  # MAX(max, x[i])
    zero = mx < _GROUP_MAX_EPS
    iscale = _cdiv(float(nmax), mx)
    levels = (_nearest_int(iscale * x) & 0xFF).float()
    best = _qp_trial_mse(x, qw, _cdiv(1.0, iscale), levels)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_is = _cdiv(float(_f32(0.1) * _f32(step) + _f32(nmax)), mx)
        trial = _nearest_int(iscale_is * x).clamp_(max=nmax).float()
        mse = _qp_trial_mse(x, qw, _cdiv(1.0, iscale_is), trial)
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, iscale_is, iscale)
    lint = _nearest_int(iscale * x).clamp_(max=nmax)
    lf = lint.float()
    levels = (lint & 0xFF).float()
    sumlx = _seqsum(qw * x * lf)
    suml2 = _seqsum(qw * lf * lf)
    sumlx, suml2 = _qp_refine(x, qw, levels, sumlx, suml2, nmax)
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    scale = torch.where(zero, 0.0, scale)
    levels.masked_fill_(zero, 0.0)
    return scale, levels


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


def _pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """The 12 scale bytes of Q4_K/Q5_K from 8 (scale, min) uint8 values: (B, 8) int64 each -> (B, 12)."""
    s = torch.zeros(ls.shape[0], 12, dtype=torch.int64)
    s[:, 0:4] = ls[:, 0:4]
    s[:, 4:8] = lm[:, 0:4]
    s[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    s[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    s[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return s & 0xFF


def _unpack_scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """get_scale_min_k4 for j = 0..7: (B, 12) int64 -> sc (B, 8), m (B, 8)."""
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], dim=1)
    m = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return sc, m


def _requantize(x, levels, d, dm, nmax):
    """L = MAX(0, MIN(nmax, nearest_int((x + dm)/d))) where d != 0, else the search's L.

    x, levels: (n, B, S) position-major; d, dm: (B, S). Returns (B, S*n) int64, weights in row order."""
    q = _nearest_int((x + dm) / d).clamp_(0, nmax)
    found = levels.to(torch.int32)
    q = found + (q - found) * (d != 0).to(torch.int32)
    return q.permute(1, 2, 0).reshape(q.shape[1], -1).to(torch.int64)


def _pack_nibbles(levels: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K qs: q[32k + l] = (L[64k + l] & 15) | (L[64k + 32 + l] & 15) << 4. (B, 256) -> (B, 128)."""
    g = levels.reshape(-1, 4, 2, 32) & 0xF
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(-1, 128)


def _pack_q5k_high(levels: torch.Tensor) -> torch.Tensor:
    """Q5_K qh: bit 2k of qh[j] is L[64k + j] > 15, bit 2k+1 is L[64k + 32 + j] > 15. (B, 256) -> (B, 32)."""
    hi = (levels.reshape(-1, 8, 32) >> 4) & 1  # row 2k + t holds L[64k + 32t + j]
    shifts = torch.arange(8, dtype=torch.int64).reshape(1, 8, 1)
    return (hi << shifts).sum(dim=1)


def _pack_q2k(levels: torch.Tensor) -> torch.Tensor:
    """Q2_K qs: qs[32h + l] = L[128h + l] | L[128h+l+32] << 2 | L[128h+l+64] << 4 | L[128h+l+96] << 6."""
    g = levels.reshape(-1, 2, 4, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int64).reshape(1, 1, 4, 1)
    return (g << shifts).sum(dim=2).reshape(-1, 64)


def _u8(*parts: torch.Tensor) -> torch.Tensor:
    return torch.cat([p.to(torch.uint8) for p in parts], dim=1)


# ---------------------------------------------------------------------------------------------
# Input checks and layout
# ---------------------------------------------------------------------------------------------


def _check(x, imatrix, block: int, what: str):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{what}: x must be 2-D (rows, n_per_row), got shape {tuple(x.shape)}")
    if x.dtype != torch.float32:
        raise ValueError(f"{what}: x must be float32, got {x.dtype}")
    if x.shape[1] % block:
        raise ValueError(f"{what}: n_per_row = {x.shape[1]} is not a multiple of {block}")
    x = x.detach().cpu().contiguous()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what}: x has inf or NaN values")
    if imatrix is None:
        return x, None
    if not isinstance(imatrix, torch.Tensor) or imatrix.dtype != torch.float32:
        raise ValueError(f"{what}: imatrix must be a float32 torch.Tensor or None")
    if imatrix.shape != (x.shape[1],):
        raise ValueError(f"{what}: imatrix must have shape ({x.shape[1]},), got {tuple(imatrix.shape)}")
    imatrix = imatrix.detach().cpu().contiguous()
    if not bool((imatrix >= 0).all()):
        raise ValueError(f"{what}: imatrix must be non-negative (and not NaN)")
    return x, imatrix


def _position_major(xb: torch.Tensor) -> torch.Tensor:
    """(B, S, n) blocks -> (n, B*S) contiguous: row i holds weight i of every sub-block."""
    return xb.permute(2, 0, 1).reshape(xb.shape[2], -1).contiguous()


def _impl_weights(xsb, qw, factor, sub):
    """The _impl weights qw[l] * sqrtf(sigma2 + x^2), sigma2 = factor*sum_x2/QK_K per super-block.

    xsb, qw: (B, 256) super-blocks and their imatrix. Returns xt, w (sub, B*256/sub) position-major
    and sw (B, 256/sub), each sub-block's sum of weights."""
    xr = xsb.t().contiguous()  # (256, B)
    sigma2 = _divc(_seqsum(xr * xr) * float(factor), float(QK_K))
    nsub = QK_K // sub
    xt = _position_major(xsb.reshape(-1, nsub, sub))
    qwt = _position_major(qw.reshape(-1, nsub, sub))
    w = qwt * _sqrtf(sigma2.repeat_interleave(nsub) + xt * xt)
    return xt, w, _seqsum(w).reshape(-1, nsub)


def _superblock_imatrix(imatrix, rows):
    """(n_per_row,) -> (rows * n_per_row/256, 256): each row's super-blocks restart at imatrix[0]."""
    return imatrix.reshape(-1, QK_K).repeat(rows, 1)


# ---------------------------------------------------------------------------------------------
# Q4_K and Q5_K
# ---------------------------------------------------------------------------------------------


def _k45_ref_scales(scales, mins):
    """The ref's 6-bit scales: (B, 8) each -> ls, lm (B, 8) int64, d, dmin float16 (B,)."""
    max_scale, max_min = _running_max(scales), _running_max(mins)
    inv_scale = torch.where(max_scale > 0, _cdiv(63.0, max_scale), 0.0)
    inv_min = torch.where(max_min > 0, _cdiv(63.0, max_min), 0.0)
    ls = (_nearest_int(inv_scale[:, None] * scales) & 0xFF).clamp_(max=63).to(torch.int64)
    lm = (_nearest_int(inv_min[:, None] * mins) & 0xFF).clamp_(max=63).to(torch.int64)
    return ls, lm, _fp16(_divc(max_scale, 63.0)), _fp16(_divc(max_min, 63.0))


def _k45_quantize(x, imatrix, nmax, what):
    """Q4_K (nmax 15) or Q5_K (nmax 31): (rows, n) -> bytes (rows, n/256 * 144 or 176)."""
    x, imatrix = _check(x, imatrix, QK_K, what)
    rows, n_per_row = x.shape
    nb = rows * n_per_row // QK_K
    if nb == 0:
        return torch.empty(rows, n_per_row // QK_K * (144 if nmax == 15 else 176), dtype=torch.uint8)
    if imatrix is None:  # quantize_row_q{4,5}_K_ref
        xt = _position_major(x.reshape(nb, 8, 32))  # (32, nb*8)
        w = _sqrtf(_divc(_seqsum(xt * xt), 32.0)) + xt.abs()  # av_x + fabsf(x[l])
        rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
        scale, the_min, levels = _search_chunked(xt, w, nmax, rmin, 0.1, nstep, False, False)
        ls, lm, d16, dmin16 = _k45_ref_scales(scale.reshape(nb, 8), the_min.reshape(nb, 8))
    else:  # quantize_row_q{4,5}_K_impl
        xt, w, sw = _impl_weights(x.reshape(nb, QK_K), _superblock_imatrix(imatrix, rows), 2, 32)
        scale, the_min, levels = _search_chunked(xt, w, nmax, -0.9, 0.05, 36, False, True)
        d_block, ls = _qp_quants(scale.reshape(nb, 8).t(), sw.t(), 63)
        m_block, lm = _qp_quants(the_min.reshape(nb, 8).t(), sw.t(), 63)
        ls, lm = ls.t().to(torch.int64), lm.t().to(torch.int64)
        if nmax == 31:  # quantize_row_q5_K_impl clamps to 63; q4_K_impl does not
            ls, lm = ls.clamp(max=63), lm.clamp(max=63)
        d16, dmin16 = _fp16(d_block), _fp16(m_block)
    packed = _pack_scale_min_k4(ls, lm)
    sc, m = _unpack_scale_min_k4(packed)
    d = d16.float()[:, None] * sc.float()  # (nb, 8)
    dm = dmin16.float()[:, None] * m.float()
    q = _requantize(xt.reshape(32, nb, 8), levels.reshape(32, nb, 8), d, dm, nmax)  # (nb, 256)
    parts = [_fp16_bytes(d16), _fp16_bytes(dmin16), packed]
    if nmax == 31:
        parts.append(_pack_q5k_high(q))
    parts.append(_pack_nibbles(q))
    return _u8(*parts).reshape(rows, -1)


def quantize_q4_k(x: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """Q4_K bytes of x (rows, n_per_row), bit-exact with ggml's quantize_q4_K.

    imatrix None: quantize_row_q4_K_ref (make_qkx2_quants, weights av_x + |x|, scales by max/63);
    else quantize_row_q4_K_impl (make_qkx3_quants, weights imatrix*sqrt(sigma2 + x^2), make_qp_quants).
    Returns uint8 (rows, n_per_row // 256 * 144): per block d, dmin (fp16), scales[12], qs[128]."""
    return _k45_quantize(x, imatrix, 15, "quantize_q4_k")


def quantize_q5_k(x: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """Q5_K bytes of x (rows, n_per_row), bit-exact with ggml's quantize_q5_K.

    imatrix None: quantize_row_q5_K_ref; else quantize_row_q5_K_impl.
    Returns uint8 (rows, n_per_row // 256 * 176): per block d, dmin (fp16), scales[12], qh[32], qs[128]."""
    return _k45_quantize(x, imatrix, 31, "quantize_q5_k")


# ---------------------------------------------------------------------------------------------
# Q2_K
# ---------------------------------------------------------------------------------------------


def _q2k_ref_scales(scales, mins):
    """quantize_row_q2_K_ref's 4-bit scales: (B, 16) each -> scale bytes (B, 16) int64, d, dmin fp16."""
    max_scale, max_min = _running_max(scales), _running_max(mins)
    ls = _nearest_int(_cdiv(15.0, max_scale)[:, None] * scales).to(torch.int64)
    lm = _nearest_int(_cdiv(15.0, max_min)[:, None] * mins).to(torch.int64)
    sb = torch.where((max_scale > 0)[:, None], ls & 0xFF, 0)
    sb = torch.where((max_min > 0)[:, None], (sb | (lm << 4)) & 0xFF, sb)
    d16 = _fp16(torch.where(max_scale > 0, _divc(max_scale, 15.0), 0.0))
    dmin16 = _fp16(torch.where(max_min > 0, _divc(max_min, 15.0), 0.0))
    return sb, d16, dmin16


def quantize_q2_k(x: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """Q2_K bytes of x (rows, n_per_row), bit-exact with ggml's quantize_q2_K.

    imatrix None: quantize_row_q2_K_ref (make_qkx2_quants on 16 weights, weights |x|, mean absolute
    error, 4-bit scales by max/15); else quantize_row_q2_K_impl (make_qkx3_quants, make_qp_quants).
    Returns uint8 (rows, n_per_row // 256 * 84): per block scales[16], qs[64], d, dmin (fp16)."""
    x, imatrix = _check(x, imatrix, QK_K, "quantize_q2_k")
    rows, n_per_row = x.shape
    nb = rows * n_per_row // QK_K
    if nb == 0:
        return torch.empty(rows, n_per_row // QK_K * 84, dtype=torch.uint8)
    if imatrix is None:
        xt = _position_major(x.reshape(nb, 16, 16))  # (16, nb*16)
        scale, the_min, levels = _search_chunked(xt, xt.abs(), 3, -0.5, 0.1, 15, True, False)
        sb, d16, dmin16 = _q2k_ref_scales(scale.reshape(nb, 16), the_min.reshape(nb, 16))
    else:
        xt, w, sw = _impl_weights(x.reshape(nb, QK_K), _superblock_imatrix(imatrix, rows), 1, 16)
        scale, the_min, levels = _search_chunked(xt, w, 3, -0.9, 0.05, 36, False, True)
        dm, ls = _qp_quants(scale.reshape(nb, 16).t(), sw.t(), 15)
        mm, lm = _qp_quants(the_min.reshape(nb, 16).t(), sw.t(), 15)
        sb = (ls.t().to(torch.int64) | (lm.t().to(torch.int64) << 4)) & 0xFF
        d16, dmin16 = _fp16(dm), _fp16(mm)
    d = d16.float()[:, None] * (sb & 0xF).float()
    dm = dmin16.float()[:, None] * (sb >> 4).float()
    q = _requantize(xt.reshape(16, nb, 16), levels.reshape(16, nb, 16), d, dm, 3)  # (nb, 256)
    out = _u8(sb, _pack_q2k(q), _fp16_bytes(d16), _fp16_bytes(dmin16))
    return out.reshape(rows, -1)


# ---------------------------------------------------------------------------------------------
# Q4_1 and Q5_1 (32-weight blocks)
# ---------------------------------------------------------------------------------------------


def _q_1_ref(xt, nmax):
    """quantize_row_q{4,5}_1_ref: min/max, d = (max - min)/nmax. xt (32, B) -> L (32, B) int64, d, m."""
    lo, hi = _block_min(xt), xt.amax(dim=0)
    d = _divc(hi - lo, float(nmax))
    inv = torch.where(d != 0, _cdiv(1.0, d), 0.0)
    q = torch.trunc((xt - lo) * inv + 0.5).to(torch.int64)  # the (int8_t)/(uint8_t) casts truncate
    if nmax == 15:
        q = q.clamp(max=15)
    return q & 0xFF, _fp16(d), _fp16(lo)


def _q_1_quantize(x, imatrix, nmax, what):
    x, imatrix = _check(x, imatrix, QK4_1, what)
    rows, n_per_row = x.shape
    per_row = n_per_row // QK4_1
    if rows * per_row == 0:
        return torch.empty(rows, per_row * (20 if nmax == 15 else 24), dtype=torch.uint8)
    xt = x.reshape(-1, QK4_1).t().contiguous()  # (32, rows*per_row)
    if imatrix is None:
        q, d16, m16 = _q_1_ref(xt, nmax)
    else:
        xr = x.t().contiguous()  # (n_per_row, rows): the whole row's sum of squares, in order
        sigma2 = _divc(_seqsum(xr * xr), float(n_per_row)).repeat_interleave(per_row)
        qw = imatrix.reshape(per_row, QK4_1).repeat(rows, 1).t()
        w = qw * _sqrtf(sigma2 + xt * xt)
        scale, the_min, levels = _search_chunked(xt, w, nmax, -0.9, 0.05, 36, False, True)
        q, d16, m16 = levels.to(torch.int64), _fp16(scale), _fp16(-the_min)
    q = q.t()  # (B, 32)
    qs = (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)
    if nmax == 15:
        out = _u8(_fp16_bytes(d16), _fp16_bytes(m16), qs)
    else:
        bits = ((q >> 4) & 1).reshape(-1, 4, 8) << torch.arange(8, dtype=torch.int64)
        out = _u8(_fp16_bytes(d16), _fp16_bytes(m16), bits.sum(dim=2), qs)
    return out.reshape(rows, per_row * (20 if nmax == 15 else 24))


def quantize_q4_1_imatrix(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    """Q4_1 bytes of x (rows, n_per_row), bit-exact with ggml's quantize_q4_1.

    With an imatrix: quantize_row_q4_1_impl (make_qkx3_quants on 32 weights, weights
    imatrix*sqrt(sigma2 + x^2), sigma2 the row's mean square); None: quantize_row_q4_1_ref.
    Returns uint8 (rows, n_per_row // 32 * 20): per block d, m (fp16), qs[16]."""
    return _q_1_quantize(x, imatrix, 15, "quantize_q4_1_imatrix")


def quantize_q5_1_imatrix(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    """Q5_1 bytes of x (rows, n_per_row), bit-exact with ggml's quantize_q5_1.

    With an imatrix: quantize_row_q5_1_impl (make_qkx3_quants, nmax 31); None: quantize_row_q5_1_ref.
    Returns uint8 (rows, n_per_row // 32 * 24): per block d, m (fp16), qh (uint32 LE), qs[16]."""
    return _q_1_quantize(x, imatrix, 31, "quantize_q5_1_imatrix")
