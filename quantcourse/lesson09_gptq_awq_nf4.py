"""Lesson 9 — calibrated 4-bit: GPTQ, AWQ and NF4 from first principles (notebooks/09_gptq_awq_nf4.ipynb)."""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import torch
from torch import nn

from quantcourse.core.surgery import replace_linears, run_with_input_hooks
from quantcourse.core.timing import one_thread
from quantcourse.lesson03_linear_quantization_from_scratch import _check_float, pack_weights, unpack_weights
from quantcourse.lesson04_gguf import absmax_level_codes
from quantcourse.lesson08_outliers_and_w8a8 import fold_input_scale, linear_inputs, llama_input_groups

__all__ = [
    "GroupQuant",
    "minmax_params",
    "quantize_codes",
    "rtn_quantize",
    "layer_output_error",
    "input_hessian",
    "gptq_quantize",
    "awq_search_scale",
    "nf4_levels",
    "nf4_quantize",
    "GroupQuantLinear",
    "input_hessians",
    "QUANT4_METHODS",
    "quantize_llama_4bit",
]


class GroupQuant(NamedTuple):
    """A 4-bit weight as a checkpoint holds it: codes (out, in) in [0, 15] and one grid per group.

    Uniform grid (RTN, GPTQ, AWQ): weight = (code - zero) * scale. Codebook (NF4): weight =
    levels[code] * scale (zero is None). Groups are runs of `group_size` columns of a row (the last
    one shorter when group_size does not divide in_features, as in GPTQ's and AutoGPTQ's code);
    scale and zero are (out, groups), scales fp16 values (kept in float32 here), zeros integers.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    group_size: int
    levels: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        group = torch.arange(self.codes.shape[1]) // self.group_size  # (in,) the group of each column
        scale = self.scale.float()[:, group]  # (out, in)
        if self.levels is not None:
            return self.levels.float()[self.codes.long()] * scale
        return (self.codes.float() - self.zero.float()[:, group]) * scale

    def nbytes(self) -> int:
        """Bytes a packed checkpoint needs: 4-bit codes plus fp16 steps and 1-byte zeros, or, for NF4,
        fp32 absmax and the 16 fp32 levels."""
        if self.levels is None:
            return self.codes.numel() // 2 + 2 * self.scale.numel() + self.zero.numel()
        return self.codes.numel() // 2 + 4 * self.scale.numel() + 4 * self.levels.numel()


def _group_size(w: torch.Tensor, group_size: int | None) -> int:
    """Columns per group; None means all of them (one group per output channel)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    g = w.shape[1] if group_size is None else group_size
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise ValueError(f"group_size must be None or a positive int, got {group_size!r}")
    return min(g, w.shape[1])


def minmax_params(w: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max grid per row of w (rows, cols): (scale (rows, 1), zero (rows, 1)).

    The row's range, widened to contain 0, is split into 2**bits - 1 steps (the scale, rounded to
    fp16 as it will be stored); zero is the integer code of 0.0. GPTQ's reference quantizer, shared
    here by RTN, GPTQ and AWQ so that only how the codes are chosen differs between them.
    Lesson 3's asymmetric grid (quantize_per_channel(..., symmetric=False)) with two differences:
    the scale rounded to fp16, and unsigned codes (0..15, not -8..7); on the same scale both round
    to the same codes (tests/test_course_one_implementation.py).
    """
    qmax = 2**bits - 1
    low = w.amin(dim=1, keepdim=True).clamp(max=0)
    high = w.amax(dim=1, keepdim=True).clamp(min=0)
    scale = ((high - low) / qmax).half().to(w.dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.round(-low / scale).clamp(0, qmax)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Integer codes in [0, 2**bits - 1] of w on the grid (scale, zero): round to nearest, clamp."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def rtn_quantize(w: torch.Tensor, bits: int = 4, group_size: int | None = 128) -> GroupQuant:
    """Round-to-nearest on the min-max grid of each group of `group_size` columns (None: per channel).

    The baseline GPTQ and AWQ improve on: every weight is rounded on its own.
    """
    _check_float(w, "rtn_quantize")
    g = _group_size(w, group_size)
    w = w.detach().float()
    codes, scales, zeros = [], [], []
    for start in range(0, w.shape[1], g):
        scale, zero = minmax_params(w[:, start : start + g], bits)  # (out, 1) each
        codes.append(quantize_codes(w[:, start : start + g], scale, zero, bits))
        scales.append(scale)
        zeros.append(zero)
    return GroupQuant(torch.cat(codes, 1).to(torch.uint8), torch.cat(scales, 1), torch.cat(zeros, 1).to(torch.uint8), g)


def layer_output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    """Mean squared error of the layer's output on inputs x (rows, in): mean((x @ (w - w_hat).T)**2).

    What GPTQ and AWQ minimize, instead of the weights' own error.
    """
    return ((x.float() @ (w.float() - w_hat.float()).T) ** 2).mean().item()


def input_hessian(x: torch.Tensor) -> torch.Tensor:
    """H = 2/n X.T X (in, in) from n input rows: the curvature of the squared output error.

    Multiplied in fp32 (fast; relative rounding ~1e-6, far below what GPTQ's damping adds) and
    returned in float64, in which GPTQ inverts it."""
    x = x.reshape(-1, x.shape[-1]).float()
    return ((2.0 / x.shape[0]) * (x.T @ x)).double()


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 128,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> GroupQuant:
    """GPTQ (Frantar et al., 2022) on one weight (out, in), in float64.

    Columns are quantized one at a time, left to right. After column i is rounded, its error,
    divided by the diagonal entry of the upper Cholesky factor U of H^-1, is spread over the columns
    not yet quantized (in proportion to row i of U), so that later columns compensate what earlier
    ones lost. The update reaches the current block of `block_size` columns at once and the rest
    lazily, after the block (the reference code's "lazy batch": same result, fewer passes over W).
    A group's min-max grid is fixed when its first column is reached, from the weights as updated
    so far. `damp` adds damp * mean(diag H) to the diagonal, as the reference code does.
    With H = identity (inputs that are uncorrelated and equally large) GPTQ equals RTN.
    `act_order` quantizes the columns with the largest inputs (largest diag H) first, so that
    their errors can still be compensated by many others; each group's grid is then fixed
    beforehand from the original weights (AutoGPTQ's "static groups").
    """
    _check_float(w, "gptq_quantize")
    g = _group_size(w, group_size)
    n_cols = w.shape[1]
    if not torch.is_tensor(hessian) or hessian.shape != (n_cols, n_cols):
        raise ValueError(f"hessian must be a ({n_cols}, {n_cols}) tensor, got {getattr(hessian, 'shape', hessian)}")
    if block_size < 1 or (group_size is not None and block_size % g and g % block_size):
        raise ValueError(f"block_size {block_size} and group_size {g} must divide one another")
    W = w.detach().double().clone()
    H = hessian.double().clone()
    dead = torch.diag(H) == 0  # inputs that were always 0: their weights never matter
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(n_cols, dtype=H.dtype)
    static = None
    order = torch.arange(n_cols)
    if act_order:  # largest inputs first; grids fixed in advance from the weights' own groups
        static = [minmax_params(W[:, start : start + g], bits) for start in range(0, n_cols, g)]
        order = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, order], H[order][:, order]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # (in, in)
    codes = torch.zeros_like(W)
    scales, zeros = [], []
    with one_thread():
        _gptq_columns(W, U, codes, scales, zeros, bits, g, block_size, static, order)
    if act_order:
        codes = codes[:, torch.argsort(order)]
        scales, zeros = [sz[0] for sz in static], [sz[1] for sz in static]
    return GroupQuant(codes.to(torch.uint8), torch.cat(scales, 1).float(), torch.cat(zeros, 1).to(torch.uint8), g)


def _gptq_columns(W, U, codes, scales, zeros, bits: int, g: int, block_size: int, static, order) -> None:
    """GPTQ's column loop (see gptq_quantize): fills codes (and scales, zeros unless the grids are
    `static`, one per group of the original column order); updates W in place."""
    n_cols = W.shape[1]
    for b0 in range(0, n_cols, block_size):
        b1 = min(b0 + block_size, n_cols)
        W1, E1, U1 = W[:, b0:b1].clone(), torch.zeros_like(W[:, b0:b1]), U[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if static is not None:
                scale, zero = static[int(order[col]) // g]
            elif col % g == 0:  # a group starts: fix its grid from the weights as updated so far
                ahead = W1[:, i : i + g]
                if col + g > b1:  # the group runs past this block (per-channel grids)
                    ahead = torch.cat([ahead, W[:, b1 : col + g]], dim=1)
                scale, zero = minmax_params(ahead, bits)
                scales.append(scale)
                zeros.append(zero)
            code = quantize_codes(W1[:, i : i + 1], scale, zero, bits)  # (out, 1)
            codes[:, col] = code[:, 0]
            err = (W1[:, i] - ((code - zero) * scale)[:, 0]) / U1[i, i]  # (out,)
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, b1:] -= E1 @ U[b0:b1, b1:]  # the lazy update of every later column


def awq_search_scale(
    weights: list[torch.Tensor], x: torch.Tensor, bits: int = 4, group_size: int | None = 128, grid: int = 20
) -> tuple[torch.Tensor, float, dict[float, float]]:
    """AWQ (Lin et al., 2023): a per-input-channel scale s = mean|x|**alpha, alpha searched on a grid.

    Column j of every weight in `weights` (linears that share the input x (rows, in)) is multiplied
    by s_j before round-to-nearest, and the input divided by s_j (folded into the layer before, as
    SmoothQuant's factor is): channels that carry large inputs get finer steps. Each alpha in
    0, 1/grid, ..., (grid-1)/grid is scored by the group's output error on x; alpha = 0 is plain RTN.
    Returns (best s, its alpha, {alpha: error}). s is normalised as AWQ's code does it.
    """
    x = x.float()
    x_mean = x.abs().mean(dim=0)  # (in,)
    reference = [x @ w.float().T for w in weights]
    errors: dict[float, float] = {}
    best_s, best_alpha = torch.ones_like(x_mean), 0.0
    for k in range(grid):
        alpha = k / grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        errors[alpha] = sum(
            ((x @ (rtn_quantize(w.float() * s, bits, group_size).dequantize() / s).T - ref) ** 2).mean().item()
            for w, ref in zip(weights, reference)
        )
        if errors[alpha] < errors[best_alpha]:
            best_s, best_alpha = s, alpha
    return best_s, best_alpha, errors


def nf4_levels() -> torch.Tensor:
    """The 16 NormalFloat-4 levels (Dettmers et al., 2023), built from quantiles of N(0, 1).

    8 positive levels are the normal quantiles at 8 evenly spaced probabilities from
    offset = 0.9677083 down to 0.5 (exclusive), 7 negative ones at 7 such probabilities, plus an
    exact 0: one more level on the positive side, so that 0 is a level. offset is the mean of
    1 - 1/(2*15) and 1 - 1/(2*16), which keeps the extreme quantile finite. The levels are divided
    by the largest, so they span [-1, 1]. Precision as in bitsandbytes' create_normal_map: the
    probabilities in float32, the quantiles in float64, the division in float32 (bit for bit
    bitsandbytes' NF4 table; Lesson 9 shows which step changes which bits).
    """
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())  # 8 levels
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())  # 7 levels
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values.float()
    return levels / levels.max()


def nf4_quantize(w: torch.Tensor, group_size: int | None = 128) -> GroupQuant:
    """NF4 with absmax per group of `group_size` columns: each w / absmax goes to the nearest NF4 level.

    Groups run along a row (as in rtn_quantize), the last one shorter where group_size does not
    divide in_features. The rounding is Lesson 4's absmax_level_codes, with the levels rebuilt
    here (nf4_levels): for group sizes that divide the row it equals blockwise_nf4_rtn
    (bitsandbytes' arithmetic), whose groups run through the flattened weight instead.
    """
    _check_float(w, "nf4_quantize")
    g = _group_size(w, group_size)
    levels = nf4_levels()
    w = w.detach().float()
    out, cols = w.shape
    whole = cols - cols % g  # the columns in whole groups, done at once; a shorter last group after them
    blocks = [w[:, :whole].reshape(out, -1, g)] + ([w[:, whole:].reshape(out, 1, -1)] if whole < cols else [])
    codes, scales = [], []
    for block in blocks:  # (out, groups, group size)
        block_codes, absmax = absmax_level_codes(block, levels)  # absmax: (out, groups, 1)
        codes.append(block_codes.reshape(out, -1))
        scales.append(absmax.reshape(out, -1))
    return GroupQuant(torch.cat(codes, 1), torch.cat(scales, 1), None, g, levels)


class GroupQuantLinear(nn.Module):
    """A linear layer that holds a GroupQuant packed (two 4-bit codes per byte) and rebuilds the
    fp32 weight at every forward pass (like GGUFLinear in Lesson 4: small, not fast)."""

    def __init__(self, gq: GroupQuant, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = gq.codes.shape
        self.group_size = gq.group_size
        self.register_buffer("packed", pack_weights(gq.codes, 4))  # (out * in / 2,) uint8
        # (out, groups): fp16 steps for uniform grids, fp32 absmax for NF4 (as bitsandbytes stores it)
        self.register_buffer("scale", gq.scale.to(torch.float16 if gq.levels is None else torch.float32))
        self.register_buffer("zero", None if gq.zero is None else gq.zero.to(torch.uint8))
        self.register_buffer("levels", None if gq.levels is None else gq.levels.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def group_quant(self) -> GroupQuant:
        codes = unpack_weights(self.packed, 4, (self.out_features, self.in_features))
        return GroupQuant(codes, self.scale.float(), self.zero, self.group_size, self.levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.group_quant().dequantize().to(x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def input_hessians(model: nn.Module, ids: torch.Tensor, names: list[str], skip_first: int = 0) -> dict:
    """H = 2/n X.T X (float64) of the input of each named linear, accumulated over the rows of `ids`
    (batch, tokens) without keeping the inputs (memory: in_features**2 x 8 bytes per name)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = defaultdict(int)

    def consume(name, x):
        x = x.float()
        xtx = (x.T @ x).double()  # fp32 per row of ids, summed in float64
        sums[name] = sums[name] + xtx if name in sums else xtx
        counts[name] += x.shape[0]

    run_with_input_hooks(model, ids, names, consume, skip_first)
    return {n: 2.0 * sums[n] / counts[n] for n in names}


QUANT4_METHODS = ("rtn", "gptq", "awq", "nf4")


def quantize_llama_4bit(
    model: nn.Module,
    method: str,
    ids: torch.Tensor | None = None,
    group_size: int | None = 128,
    awq_rows: int = 2048,
    skip_first: int = 0,
    act_order: bool = True,
) -> nn.Module:
    """Quantize every linear of a Llama model but lm_head to 4 bits, in place, into GroupQuantLinear layers.

    method: "rtn" and "nf4" need no data; "gptq" and "awq" calibrate on `ids` (batch, tokens),
    text disjoint from the evaluation text (calibration_ids). Statistics come from the float model
    in one pass (the reference GPTQ re-runs each layer on the outputs of the already quantized
    ones; this is the simpler, one-pass variant). AWQ folds its scales into the layer before
    (llama_input_groups) and searches them on `awq_rows` sampled tokens per group. Both leave out
    the first `skip_first` tokens of every calibration row (its massive activations, Lesson 9).
    """
    if method not in QUANT4_METHODS:
        raise ValueError(f"method must be one of {QUANT4_METHODS}, got {method!r}")
    if method in ("gptq", "awq") and ids is None:
        raise ValueError(f"{method} needs calibration ids (helper.calibration_ids)")
    modules = dict(model.named_modules())
    groups = llama_input_groups(model)
    results: dict[str, GroupQuant] = {}
    if method == "gptq":
        hessians = input_hessians(model, ids, [names[0] for names, _, _ in groups], skip_first)
        for names, _, _ in groups:
            for name in names:
                results[name] = gptq_quantize(
                    modules[name].weight, hessians[names[0]], 4, group_size, act_order=act_order
                )
            del hessians[names[0]]
    elif method == "awq":
        leaders = [names[0] for names, source, _ in groups if source is not None]
        inputs = linear_inputs(model, ids, leaders, awq_rows, skip_first)
        for names, source, how in groups:
            if source is not None:
                s, _, _ = awq_search_scale([modules[n].weight for n in names], inputs[names[0]], 4, group_size)
                fold_input_scale(model, source, how, names, s)
        for names, _, _ in groups:
            for name in names:
                results[name] = rtn_quantize(modules[name].weight, 4, group_size)
    else:
        quantize = rtn_quantize if method == "rtn" else lambda w, bits, g: nf4_quantize(w, g)
        for names, _, _ in groups:
            for name in names:
                results[name] = quantize(modules[name].weight, 4, group_size)
    names = {module: name for name, module in modules.items()}
    return replace_linears(
        model,
        lambda linear: GroupQuantLinear(results[names[linear]], linear.bias) if names[linear] in results else None,
        exclude=(),
        replacement="the 4-bit copy",
    )
