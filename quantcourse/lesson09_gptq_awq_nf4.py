"""Lesson 9 — calibrated 4-bit: GPTQ, AWQ and NF4 from first principles (notebooks/09_gptq_awq_nf4.ipynb)."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import NamedTuple

import torch
from torch import nn

from quantcourse.core.surgery import _StopForward, replace_linears, run_with_input_hooks
from quantcourse.core.timing import one_thread
from quantcourse.lesson03_linear_quantization_from_scratch import _check_float, pack_weights, unpack_weights
from quantcourse.lesson04_gguf import absmax_level_codes
from quantcourse.lesson08_outliers_and_w8a8 import fold_input_scale, llama_input_groups

__all__ = [
    "GroupQuant",
    "minmax_params",
    "quantize_codes",
    "rtn_quantize",
    "layer_output_error",
    "input_hessian",
    "gptq_quantize",
    "awq_search_scale",
    "awq_search_clip",
    "decoder_layer_inputs",
    "LlamaLayerInputs",
    "llama_layer_inputs",
    "awq_layer",
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
    grid=None,
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
    `grid(weights (out, g)) -> (scale (out, 1), zero (out, 1))` replaces the min-max grid: Lesson 10
    runs GPTQ on Q4_0's symmetric grid (scale = the signed largest weight / -8, zero 8) this way.
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
    grid = grid or (lambda group: minmax_params(group, bits))
    static = None
    order = torch.arange(n_cols)
    if act_order:  # largest inputs first; grids fixed in advance from the weights' own groups
        static = [grid(W[:, start : start + g]) for start in range(0, n_cols, g)]
        order = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, order], H[order][:, order]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # (in, in)
    codes = torch.zeros_like(W)
    scales, zeros = [], []
    with one_thread():
        _gptq_columns(W, U, codes, scales, zeros, bits, g, block_size, static, order, grid)
    if act_order:
        codes = codes[:, torch.argsort(order)]
        scales, zeros = [sz[0] for sz in static], [sz[1] for sz in static]
    return GroupQuant(codes.to(torch.uint8), torch.cat(scales, 1).float(), torch.cat(zeros, 1).to(torch.uint8), g)


def _gptq_columns(W, U, codes, scales, zeros, bits: int, g: int, block_size: int, static, order, grid) -> None:
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
                scale, zero = grid(ahead)
                scales.append(scale)
                zeros.append(zero)
            code = quantize_codes(W1[:, i : i + 1], scale, zero, bits)  # (out, 1)
            codes[:, col] = code[:, 0]
            err = (W1[:, i] - ((code - zero) * scale)[:, 0]) / U1[i, i]  # (out,)
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, b1:] -= E1 @ U[b0:b1, b1:]  # the lazy update of every later column


def _rtn_dequantized(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """rtn_quantize(w, bits, group_size).dequantize(), bit for bit (tested), without building a GroupQuant:
    the same grid and arithmetic on all whole groups at once (AWQ's searches call it hundreds of times)."""
    g = _group_size(w, group_size)
    w = w.detach().float()
    out, cols = w.shape
    whole = cols - cols % g
    parts = [w[:, :whole].reshape(-1, g)] + ([w[:, whole:]] if whole < cols else [])  # (out * groups, g), ragged end
    deq = []
    for part in parts:
        scale, zero = minmax_params(part, bits)
        # (quantize_codes - zero) * scale in fewer passes: the integers clamped to [-zero, qmax - zero] are exact
        codes = torch.div(part, scale).round_().clamp_(-zero, 2**bits - 1 - zero)
        deq.append(codes.mul_(scale).reshape(out, -1))
    return torch.cat(deq, 1) if len(deq) > 1 else deq[0]


def _first_output(out):  # attention modules return (output, weights)
    return out[0] if isinstance(out, tuple) else out


def awq_search_scale(
    block,
    linears: list[nn.Linear],
    x: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 128,
    grid: int = 20,
    kwargs: dict | None = None,
) -> tuple[torch.Tensor, float, dict[float, float]]:
    """AWQ's scale search (Lin et al., 2024; llm-awq's auto_scale.py): s = mean|x|**alpha, alpha on a grid.

    `linears` read the same input x (..., in). For each alpha in 0, 1/grid, ..., (grid-1)/grid,
    s = mean|x|**alpha (per input channel, clamped to >= 1e-4, divided by sqrt(max s * min s)),
    every weight is replaced by RTN(W diag(s)) diag(1/s) (the course's grid, rtn_quantize), and
    the loss is the mean squared change of the output of `block`, the module (or any callable)
    that holds the linears, called as block(x, **kwargs): for q/k/v_proj the whole attention
    (kwargs: its position embeddings and attention mask), for gate/up_proj the whole MLP, so an
    error counts as much as it changes what the block passes on. block=None scores each linear's
    own output (summed over `linears`): llm-awq's loss for a linear alone (down_proj), and for a
    group the simpler loss this lesson used before. alpha = 0 is plain RTN. The weights are
    restored afterwards; nothing is folded here (fold_input_scale does that).
    Returns (best s, its alpha, {alpha: loss}); the first alpha of smallest loss wins.
    """
    if not linears or not all(isinstance(m, nn.Linear) for m in linears):
        raise TypeError("awq_search_scale: `linears` must be a non-empty list of nn.Linear modules (in `block`)")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be a positive int, got {grid!r}")
    kwargs = kwargs or {}

    def outputs() -> list[torch.Tensor]:
        with torch.no_grad():
            return [_first_output(block(x, **kwargs))] if block is not None else [lin(x) for lin in linears]

    x_mean = x.detach().abs().reshape(-1, x.shape[-1]).float().mean(0)  # (in,)
    originals = [lin.weight.data for lin in linears]
    reference = outputs()
    errors: dict[float, float] = {}
    best_s, best_alpha = None, None
    try:
        for k in range(grid):
            alpha = k / grid
            s = x_mean.pow(alpha).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for lin, w in zip(linears, originals):
                lin.weight.data = (_rtn_dequantized(w.float() * s, bits, group_size) / s).to(w.dtype)
            errors[alpha] = sum((ref - out).float().pow(2).mean().item() for ref, out in zip(reference, outputs()))
            if best_alpha is None or errors[alpha] < errors[best_alpha]:
                best_s, best_alpha = s, alpha
    finally:
        for lin, w in zip(linears, originals):
            lin.weight.data = w
    return best_s, best_alpha, errors


def awq_search_clip(
    w: torch.Tensor,
    x: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 128,
    grid: int = 20,
    max_shrink: float = 0.5,
    n_tokens: int = 512,
) -> torch.Tensor:
    """AWQ's clipping search (llm-awq's auto_clip.py): the best max |weight| of every group, (out, groups).

    For each output channel and group of `group_size` columns, the candidates are
    max|w| * (1 - i/grid) for i = 0 .. max_shrink*grid - 1 (1 down to 0.55 by default); the group is
    clamped to +-that value, RTN-quantized on the course's grid, and scored by the mean squared
    error of its partial output (x_group @ w_group.T) on every (len(x) // n_tokens)-th row of x,
    llm-awq's sample of n_tokens tokens (all rows when there are fewer). The error of a weight
    change d is computed as d (XᵀX / n) dᵀ, the same number llm-awq takes from the outputs, for
    less work. Clipping trades a larger error on the few largest weights for finer steps for all
    the others. x: the linear's input, (..., in), already divided by any AWQ scale folded into w.
    The first candidate of smallest error wins (i = 0: no clipping).
    """
    _check_float(w, "awq_search_clip")
    g = _group_size(w, group_size)
    w = w.detach().float()
    x = x.detach().reshape(-1, x.shape[-1]).float()
    x = x[:: max(1, x.shape[0] // n_tokens)]
    factors = torch.tensor([1 - i / grid for i in range(int(max_shrink * grid))])  # (candidates,) as llm-awq's
    best = []
    for start in range(0, w.shape[1], g):
        w_g, x_g = w[:, start : start + g].contiguous(), x[:, start : start + g].contiguous()
        top = w_g.abs().amax(dim=1)  # (out,)
        max_val = (top * factors[:, None]).unsqueeze(-1)  # (candidates, out, 1): all candidates at once
        q = _rtn_dequantized(torch.clamp(w_g, -max_val, max_val).reshape(-1, w_g.shape[1]), bits, None)
        d = q - w_g.repeat(len(factors), 1)  # (candidates * out, g): each candidate's weight change
        err = ((d @ (x_g.T @ x_g)) * d).sum(dim=1).div_(x_g.shape[0]).view(len(factors), -1)  # (candidates, out)
        pick = err.argmin(dim=0)  # (out,): the first candidate of smallest error
        best.append(max_val[pick, torch.arange(len(top)), 0])
    return torch.stack(best, 1)


def _clamp_groups(w: torch.Tensor, max_val: torch.Tensor, group_size: int | None) -> None:
    """Clamp each group of w (out, in), in place, to +-its entry of max_val (out, groups)."""
    g = _group_size(w, group_size)
    with torch.no_grad():
        for j, start in enumerate(range(0, w.shape[1], g)):
            limit = max_val[:, j : j + 1].to(w.dtype)
            w[:, start : start + g].clamp_(-limit, limit)


def decoder_layer_inputs(model: nn.Module, ids: torch.Tensor, index: int = 0) -> tuple[torch.Tensor, dict]:
    """(hidden states (batch, tokens, hidden), kwargs) entering decoder layer `index` of a Llama model.

    The float model reads all rows of `ids` (batch, tokens) in one batch, without a KV cache; the
    pass stops at that layer. kwargs are what the model hands every layer: the rotary position
    embeddings, the causal attention mask (None where the attention kernel applies it itself),
    the position ids.
    """
    caught: dict = {}

    def pre(module, args, kwargs):
        caught["x"] = args[0] if args else kwargs["hidden_states"]
        caught["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    handle = model.model.layers[index].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad(), contextlib.suppress(_StopForward):
            model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return caught["x"], caught["kwargs"]


class LlamaLayerInputs(NamedTuple):
    """What AWQ's searches read in one Llama decoder layer (each (batch, tokens, features), fp as the model)."""

    attn: torch.Tensor  # self_attn's input: input_layernorm's output, read by q/k/v_proj
    attn_kwargs: dict  # the keyword arguments self_attn was called with (position embeddings, mask)
    o_proj: torch.Tensor  # o_proj's input: the attention heads' outputs
    mlp: torch.Tensor  # the MLP's input: post_attention_layernorm's output, read by gate/up_proj
    down_proj: torch.Tensor  # down_proj's input: act(gate) * up


def llama_layer_inputs(layer: nn.Module, hidden_states: torch.Tensor, kwargs: dict):
    """Run one Llama decoder layer on its input; returns (its output, LlamaLayerInputs).

    The output is the next layer's input (run_awq's `inps = layer(inps, **layer_kwargs)`), taken
    before anything in this layer is scaled or clipped: every layer is calibrated on what the
    float model's previous layers produce.
    """
    seen: dict = {}

    def keep(name):
        def pre(module, args, kw):
            seen[name] = args[0] if args else kw["hidden_states"]
            if name == "attn":
                seen["attn_kwargs"] = {k: v for k, v in kw.items() if k != "hidden_states"}

        return pre

    attn, mlp = layer.self_attn, layer.mlp
    parts = {"attn": attn, "o_proj": attn.o_proj, "mlp": mlp, "down_proj": mlp.down_proj}
    handles = [m.register_forward_pre_hook(keep(n), with_kwargs=True) for n, m in parts.items()]
    try:
        with torch.no_grad():
            out = _first_output(layer(hidden_states, **kwargs))
    finally:
        for handle in handles:
            handle.remove()
    return out, LlamaLayerInputs(seen["attn"], seen["attn_kwargs"], seen["o_proj"], seen["mlp"], seen["down_proj"])


def awq_layer(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    kwargs: dict,
    bits: int = 4,
    group_size: int | None = 128,
    clip_tokens: int = 512,
) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
    """AWQ on one Llama decoder layer, in place: llm-awq's auto_scale_block, apply_scale, auto_clip_block, apply_clip.

    1. Scales (awq_search_scale), each folded at once (fold_input_scale; the float layer computes
       the same function): q/k/v_proj scored on self_attn's output, folded into input_layernorm;
       o_proj on its own output, folded into v_proj's rows, only where v_proj and o_proj have the
       same shape (no grouped-query attention; llm-awq skips it otherwise, and so SmolLM2's);
       gate/up_proj on the MLP's output, into post_attention_layernorm; down_proj on its own
       output, into up_proj's rows.
    2. Clipping (awq_search_clip) of every linear but q_proj and k_proj (q and k meet in a product
       before the softmax, so their own output error says little), on its input divided by its
       scale; the weights are clamped.
    The weights stay in float: quantize them afterwards (quantize_llama_4bit does). Returns (the
    float layer's output, computed before any change: the next layer's input; {group: alpha};
    {linear name in the layer: its clip values (out, groups)}).
    """
    out, x = llama_layer_inputs(layer, hidden_states, kwargs)
    attn, mlp = layer.self_attn, layer.mlp
    qkv = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    searches = [(attn, qkv, x.attn, layer.input_layernorm, "norm", x.attn_kwargs)]
    inputs = {}  # linear name -> its input divided by the scale folded into it (what clipping reads)
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
        searches.append((None, ["self_attn.o_proj"], x.o_proj, attn.v_proj, "rows", None))
    else:
        inputs["self_attn.o_proj"] = x.o_proj
    searches.append((mlp, ["mlp.gate_proj", "mlp.up_proj"], x.mlp, layer.post_attention_layernorm, "norm", None))
    searches.append((None, ["mlp.down_proj"], x.down_proj, mlp.up_proj, "rows", None))
    alphas: dict[str, float] = {}
    for block, names, x_in, source, how, block_kwargs in searches:
        linears = [layer.get_submodule(n) for n in names]
        s, alpha, _ = awq_search_scale(block, linears, x_in, bits, group_size, kwargs=block_kwargs)
        alphas[" ".join(n.split(".")[-1] for n in names)] = alpha
        fold_input_scale(layer, source, how, names, s)
        inputs.update(dict.fromkeys(names, x_in / s.to(x_in.dtype)))
    clips = {}
    for name, x_in in inputs.items():
        if name.endswith(("q_proj", "k_proj")):
            continue
        weight = layer.get_submodule(name).weight
        clips[name] = awq_search_clip(weight, x_in, bits, group_size, n_tokens=clip_tokens)
        _clamp_groups(weight, clips[name], group_size)
    return out, alphas, clips


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
    awq_tokens: int = 512,
    skip_first: int = 0,
    act_order: bool = True,
) -> nn.Module:
    """Quantize every linear of a Llama model but lm_head to 4 bits, in place, into GroupQuantLinear layers.

    method: "rtn" and "nf4" need no data; "gptq" and "awq" calibrate on `ids` (batch, tokens),
    text disjoint from the evaluation text (calibration_ids). GPTQ's statistics come from the
    float model in one pass (the reference GPTQ re-runs each layer on the outputs of the already
    quantized ones; this is the simpler, one-pass variant) and leave out the first `skip_first`
    tokens of every row (its massive activations, Lesson 9). AWQ runs llm-awq's recipe layer by
    layer (awq_layer: scales scored on each block's output, folded, then clipping) on whole rows
    of `ids`: max(1, awq_tokens // tokens per row) of them, evenly spaced (rows 0 and the last
    for two); each layer reads the float model's previous layers' output, as in llm-awq's
    run_awq. Then every linear is RTN-quantized on the course's grid.
    """
    if method not in QUANT4_METHODS:
        raise ValueError(f"method must be one of {QUANT4_METHODS}, got {method!r}")
    if method in ("gptq", "awq") and ids is None:
        raise ValueError(f"{method} needs calibration ids (helper.calibration_ids)")
    if method == "awq" and skip_first:
        raise ValueError("skip_first applies to GPTQ's statistics; AWQ scores whole sequences")
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
    else:
        if method == "awq":
            n_rows = min(ids.shape[0], max(1, awq_tokens // ids.shape[1]))
            rows = torch.linspace(0, ids.shape[0] - 1, n_rows).round().long()
            hidden, layer_kwargs = decoder_layer_inputs(model, ids[rows], 0)
            for layer in model.model.layers:
                hidden, _, _ = awq_layer(layer, hidden, layer_kwargs, 4, group_size)
            del hidden
        quantize = nf4_quantize if method == "nf4" else lambda w, g: rtn_quantize(w, 4, g)
        for names, _, _ in groups:
            for name in names:
                results[name] = quantize(modules[name].weight, group_size)
    names = {module: name for name, module in modules.items()}
    return replace_linears(
        model,
        lambda linear: GroupQuantLinear(results[names[linear]], linear.bias) if names[linear] in results else None,
        exclude=(),
        replacement="the 4-bit copy",
    )
