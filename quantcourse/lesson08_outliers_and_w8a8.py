"""Lesson 8 — outliers and 8-bit activations (notebooks/08_outliers_and_w8a8.ipynb).

The integer matmul (int8 x int8 -> int32), W8A8Linear, LLM.int8() and SmoothQuant from scratch.
"""

from __future__ import annotations

import torch
from torch import nn

from quantcourse.core.surgery import replace_linears, run_with_input_hooks
from quantcourse.lesson03_linear_quantization_from_scratch import (
    _check_float,
    _linear_quantize,
    _quantize_per_channel,
)

__all__ = [
    "linear_inputs",
    "quantize_rows_absmax",
    "quantize_rows_asymmetric",
    "int8_matmul",
    "w8a8_linear",
    "W8A8_ACTIVATIONS",
    "W8A8Linear",
    "w8a8_model",
    "llm_int8_matmul",
    "LLMInt8Linear",
    "llama_input_groups",
    "fold_input_scale",
    "smoothing_factors",
    "smoothing_scales",
    "smooth_llama",
]


def linear_inputs(
    model: nn.Module, ids: torch.Tensor, names: list[str], max_rows: int | None = None, skip_first: int = 0
) -> dict[str, torch.Tensor]:
    """The inputs (tokens, in_features), fp32, that reach each named nn.Linear while `model` reads `ids`.

    `max_rows` keeps an evenly spaced sample of the tokens per layer (memory: tokens x
    in_features x 4 bytes per layer); `skip_first` as in run_with_input_hooks.
    """
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    per_row = None if max_rows is None else -(-max_rows // ids.shape[0])  # sample each row as it arrives

    def keep(name, x):
        if per_row is not None and x.shape[0] > per_row:
            x = x[torch.linspace(0, x.shape[0] - 1, per_row).long()]
        rows[name].append(x.float())

    run_with_input_hooks(model, ids, names, keep, skip_first)
    out = {}
    for name, parts in rows.items():
        x = torch.cat(parts)  # (tokens, in_features)
        if max_rows is not None and x.shape[0] > max_rows:
            x = x[torch.linspace(0, x.shape[0] - 1, max_rows).long()]
        out[name] = x
    return out


def quantize_rows_absmax(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int quantization: (q int8 (rows, cols), scale (rows, 1)); x ~ q * scale.

    For activations a row is a token ("per token"); for a weight (out, in) a row is an output
    channel ("per channel"). An all-zero row gets scale 1 (q = 0). Lesson 3's
    quantize_per_channel(x, bits, axis=0, symmetric=True), named for what Lesson 8 applies it to:
    scale = max |row| / qmax, q = round(x / scale) in [-qmax, qmax].
    """
    _check_float(x, "quantize_rows_absmax")
    if x.dim() != 2:
        raise ValueError(f"quantize_rows_absmax expects a 2-D tensor, got shape {tuple(x.shape)}")
    q, scale, _ = _quantize_per_channel(x, bits, 0, True)
    return q, scale


def quantize_rows_asymmetric(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-row quantization to unsigned ints: (q uint8, scale (rows, 1), zero point (rows, 1)).

    x ~ (q - zero) * scale, with q in [0, 2**bits - 1] and the row's [min, max] (widened to
    contain 0, so that 0 is exact) mapped onto it.
    """
    _check_float(x, "quantize_rows_asymmetric")
    if x.dim() != 2:
        raise ValueError(f"quantize_rows_asymmetric expects a 2-D tensor, got shape {tuple(x.shape)}")
    qmax = 2**bits - 1
    low = x.amin(dim=1, keepdim=True).float().clamp(max=0)
    high = x.amax(dim=1, keepdim=True).float().clamp(min=0)
    scale = torch.where(high > low, (high - low) / qmax, torch.ones_like(high))
    zero = torch.round(-low / scale)
    q = torch.clamp(torch.round(x.float() / scale) + zero, 0, qmax).to(torch.uint8)
    return q, scale, zero.to(torch.int32)


def int8_matmul(qx: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """Exact integer product qx @ qw.T: (tokens, in) x (out, in) -> (tokens, out) in int32.

    This is what an int8 GEMM computes (int8 x int8 products summed in a 32-bit accumulator).
    Written with int32 tensors, which torch multiplies exactly on any CPU (but slowly).
    """
    if qx.dtype not in (torch.int8, torch.uint8) or qw.dtype != torch.int8:
        raise TypeError(f"int8_matmul expects int8/uint8 activations and int8 weights, got {qx.dtype}, {qw.dtype}")
    return qx.to(torch.int32) @ qw.to(torch.int32).T


def w8a8_linear(
    x: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None, asymmetric: bool = True
) -> torch.Tensor:
    """A linear layer computed in integers: activations quantized per token, int8 weights per channel.

    With an asymmetric (uint8, zero point z) activation x ~ (qx - z) s_x and weight w ~ qw s_w:
        y[t, o] = s_x[t] s_w[o] (sum_i qx[t, i] qw[o, i]  -  z[t] sum_i qw[o, i])
    The integer matmul does the heavy part; the zero point costs one precomputable row sum of
    qw per output channel. Symmetric activations (z = 0) drop that term.
    """
    x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
    if asymmetric:
        qx, s_x, z = quantize_rows_asymmetric(x2)
        acc = int8_matmul(qx, qw) - z * qw.to(torch.int32).sum(dim=1)  # (tokens, out) int32
    else:
        qx, s_x = quantize_rows_absmax(x2)
        acc = int8_matmul(qx, qw)
    y = acc.float() * s_x * w_scale.reshape(1, -1).float()
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], qw.shape[0]).to(x.dtype)


W8A8_ACTIVATIONS = ("per_token", "per_tensor", "static")


class W8A8Linear(nn.Module):
    """W8A8: int8 weights (per output channel) and int8 activations (symmetric).

    Activations get one scale per token ("per_token", computed from each call's input: dynamic),
    one for the whole input of each call ("per_tensor", dynamic too: the scale still comes from
    the input itself), or one fixed in advance ("static": max |x| of this layer's input on
    calibration text / 127, what a static int8 kernel uses; values beyond it are clipped to
    +-127). torch.ao's quantize_dynamic is different again: 7-bit asymmetric activations per
    tensor and one weight scale per tensor (Lesson 6).

    `forward` multiplies the integers in fp32 (as bitsandbytes' portable CPU path does):
    products of two int8 are exact in fp32, and so are their sums while they stay below
    2**24; beyond that a sum is rounded by at most 1 part in 2**24 (6e-8).
    `int8_matmul` is the exact integer reference (Lesson 8 compares the two).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, activations: str = "per_token"):
        super().__init__()
        if activations not in W8A8_ACTIVATIONS:
            raise ValueError(f"activations must be one of {W8A8_ACTIVATIONS}, got {activations!r}")
        self.in_features, self.out_features, self.activations = in_features, out_features, activations
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, 1))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("input_scale", torch.ones(()) if activations == "static" else None)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, activations: str = "per_token", input_absmax: float | torch.Tensor | None = None
    ) -> W8A8Linear:
        """Quantize `linear`'s weight; "static" needs `input_absmax`, the largest |input| seen on
        calibration text (a number, or the per-channel maxima of helper.activation_absmax)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        if (activations == "static") != (input_absmax is not None):
            raise ValueError('input_absmax is needed for activations="static", and only for it')
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, activations)
        layer.qweight, layer.scale = quantize_rows_absmax(linear.weight.detach().float())
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        if input_absmax is not None:
            absmax = torch.as_tensor(input_absmax, dtype=torch.float32).max()
            if not (torch.isfinite(absmax) and absmax > 0):
                raise ValueError(f"input_absmax must be finite and positive, got {absmax.item()}")
            layer.input_scale = absmax / 127
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        if self.activations == "static":  # the calibrated scale; values beyond its range clip to +-127
            qx, s_x = _linear_quantize(x2, self.input_scale, None, 8).clamp_(min=-127), self.input_scale
        elif self.activations == "per_tensor":
            qx, s_x = quantize_rows_absmax(x2.reshape(1, -1))
            qx = qx.reshape(x2.shape)
        else:
            qx, s_x = quantize_rows_absmax(x2)
        y = (qx.float() @ self.qweight.float().T) * s_x * self.scale.T  # (tokens, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def w8a8_model(
    model: nn.Module, activations: str = "per_token", input_absmax: dict[str, torch.Tensor] | None = None
) -> nn.Module:
    """Swap every nn.Linear but lm_head for a W8A8Linear, in place; returns the model.

    "static" needs `input_absmax`: linear name -> the max |input| per channel on calibration
    text (helper.activation_absmax); each layer's one fixed scale is its largest entry / 127.
    """
    if (activations == "static") != (input_absmax is not None):
        raise ValueError('input_absmax is needed for activations="static", and only for it')
    names = {id(m): n for n, m in model.named_modules()}

    def make(linear: nn.Linear) -> W8A8Linear:
        absmax = None if input_absmax is None else input_absmax[names[id(linear)]]
        return W8A8Linear.from_linear(linear, activations, absmax)

    return replace_linears(model, make)


def llm_int8_matmul(
    x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, threshold: float = 6.0, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """LLM.int8() as bitsandbytes 0.50 computes it: y = x @ W.T (+ bias), with W ~ cb * scb / 127 (int8 rows).

    1. x is cast to fp16; every column (input feature) holding a value with |x| >= threshold is
       an outlier column. (Only this detection and the int8 quantization use fp16.)
    2. The other columns are quantized per token (absmax over the non-outlier values) to int8,
       multiplied with cb in int32, and rescaled in fp32 by row_scale * scb / 127**2; `bias` is
       added to that fp32 result, which is then cast to x's dtype (bitsandbytes' order).
    3. The outlier columns are multiplied in x's own dtype (fp32 for fp32 input) with the same
       columns of the dequantized weight, and added. threshold = 0 turns the decomposition off.
    """
    if cb.dtype != torch.int8 or cb.dim() != 2:
        raise TypeError("llm_int8_matmul expects cb as a 2-D int8 tensor (out, in)")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
    a = x2.to(torch.float16)
    outlier_cols = torch.empty(0, dtype=torch.long)
    if threshold > 0:
        outliers = a.abs() >= threshold
        outlier_cols = torch.argwhere(outliers.any(dim=0)).view(-1)
        a = a.masked_fill(outliers, 0)
    row_stats = a.abs().amax(dim=1).float()  # (tokens,)
    qa = torch.round(a * (127.0 / row_stats.unsqueeze(-1))).to(torch.int8)
    if x2.shape[0] > 1:
        qa[:, outlier_cols] = 0
    acc = int8_matmul(qa, cb)  # (tokens, out) int32
    y = acc * (row_stats.unsqueeze(-1) * scb.float().reshape(1, -1)) * 6.200124e-05  # 6.200124e-05 = 1/127**2
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    if outlier_cols.numel():
        w_cols = (cb[:, outlier_cols].float() * (scb.float().reshape(-1, 1) / 127)).to(x.dtype)  # (out, n_outliers)
        y = y.addmm(x2[:, outlier_cols], w_cols.T)
    return y.reshape(*x.shape[:-1], cb.shape[0])


class LLMInt8Linear(nn.Module):
    """A linear layer that runs `llm_int8_matmul` (int8 weights per output channel, outliers in x's dtype).

    The output has x's dtype, as bitsandbytes' Linear8bitLt's. The bias is kept in fp32. With
    fp16/bf16 input it joins the fp32 int8 part before that part is cast (bitsandbytes' order:
    the result equals bitsandbytes' bit for bit). With fp32 input it is added last, after the
    outlier columns; bitsandbytes adds it before them, and the two orders differ by fp32 rounding
    (with the 1-ulp difference of the outlier weights: within 1e-7 relative).
    """

    def __init__(self, linear: nn.Linear, threshold: float = 6.0):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LLMInt8Linear expects an nn.Linear, got {type(linear).__name__}")
        self.in_features, self.out_features, self.threshold = linear.in_features, linear.out_features, threshold
        w16 = linear.weight.detach().to(torch.float16)
        scb = w16.abs().amax(dim=1).float()  # (out,) as bitsandbytes computes it, from fp16
        self.register_buffer("cb", torch.round(w16.float() * (127.0 / scb.unsqueeze(1))).to(torch.int8))
        self.register_buffer("scb", scb)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None and x.dtype != torch.float32:
            return llm_int8_matmul(x, self.cb, self.scb, self.threshold, bias=self.bias)
        y = llm_int8_matmul(x, self.cb, self.scb, self.threshold)
        return y if self.bias is None else y + self.bias


def llama_input_groups(model: nn.Module) -> list[tuple[list[str], nn.Module | None, str | None]]:
    """The linears of each Llama layer that read the same input, and where a per-input-channel scale
    can be folded: (names, source module, "norm" | "rows"), or (names, None, None) for o_proj.

    - input_layernorm -> q_proj, k_proj, v_proj (divide the RMSNorm weight by s);
    - v_proj ... -> o_proj: not folded here. A factor per v_proj output channel could be folded,
      but through grouped-query attention it would be shared by the query heads of its group, so
      o_proj's input channels cannot get independent factors; SmoothQuant's code skips o_proj
      for every model, AWQ's skips this pair for GQA models;
    - post_attention_layernorm -> gate_proj, up_proj (the RMSNorm weight);
    - up_proj -> down_proj (down's input is act(gate) * up: divide up's output rows by s).
    """
    groups = []
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        groups.append(([f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")], layer.input_layernorm, "norm"))
        groups.append(([f"{p}.self_attn.o_proj"], None, None))
        groups.append(([f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], layer.post_attention_layernorm, "norm"))
        groups.append(([f"{p}.mlp.down_proj"], layer.mlp.up_proj, "rows"))
    return groups


def fold_input_scale(model: nn.Module, source: nn.Module, how: str, names: list[str], s: torch.Tensor) -> None:
    """Divide the activation entering `names` by s (in `source`) and multiply those weights' columns by s.

    The product X W.T is unchanged (X diag(1/s)) (W diag(s)).T, so the float model computes
    the same function; only what gets quantized changes.
    """
    modules = dict(model.named_modules())
    with torch.no_grad():
        if how == "norm":
            source.weight.div_(s.to(source.weight.dtype))
        elif how == "rows":
            source.weight.div_(s.to(source.weight.dtype).unsqueeze(1))
        else:
            raise ValueError(f"fold_input_scale: unknown fold {how!r}")
        for name in names:
            modules[name].weight.mul_(s.to(modules[name].weight.dtype).unsqueeze(0))


def smoothing_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's per-input-channel factor s_j = max|X_j|**alpha / max|W_j|**(1 - alpha).

    Dividing channel j of X by s_j and multiplying column j of W by s_j moves a share alpha of
    the outlier's range (on a log scale) from the activation into the weight. alpha = 0 leaves
    the activation alone; alpha = 1 makes every activation channel's max equal 1.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a = act_absmax.float().clamp(min=1e-5)
    w = weight_absmax.float().clamp(min=1e-5)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)


def smoothing_scales(
    model: nn.Module, act_absmax: dict[str, torch.Tensor], alpha: float = 0.5, down_proj: bool = True
) -> dict[str, torch.Tensor]:
    """SmoothQuant's factor s of every smoothed linear of a Llama model: linear name -> s (in_features,).

    The linears of a group of llama_input_groups share one input, so they share s, computed from
    the largest |weight| of each column over the group. Smoothed: input_layernorm -> q, k, v and
    post_attention_layernorm -> gate, up (mit-han-lab's smooth_lm for Llama), and with
    `down_proj` also up_proj -> down_proj (the course's addition; AWQ scales this pair).
    After smooth_llama the input of linear n is x / s[n]: its channel maxima are act_absmax[n] / s[n].
    """
    modules = dict(model.named_modules())
    scales = {}
    for names, source, how in llama_input_groups(model):
        if source is None or (how == "rows" and not down_proj):  # o_proj: see llama_input_groups
            continue
        w_absmax = torch.stack([modules[n].weight.detach().abs().amax(dim=0).float() for n in names]).amax(dim=0)
        s = smoothing_factors(act_absmax[names[0]], w_absmax, alpha)
        scales.update(dict.fromkeys(names, s))
    return scales


def smooth_llama(
    model: nn.Module, act_absmax: dict[str, torch.Tensor], alpha: float = 0.5, down_proj: bool = True
) -> nn.Module:
    """SmoothQuant on a Llama model in place: the factors of smoothing_scales, folded; returns the model.

    `act_absmax` maps linear names to the max |input| per channel on calibration text
    (helper.activation_absmax). down_proj=False smooths only the two RMSNorm groups, as
    mit-han-lab's smooth_lm does; the default also folds up_proj -> down_proj.
    """
    scales = smoothing_scales(model, act_absmax, alpha, down_proj)
    for names, source, how in llama_input_groups(model):
        if names[0] in scales:
            fold_input_scale(model, source, how, names, scales[names[0]])
    return model
