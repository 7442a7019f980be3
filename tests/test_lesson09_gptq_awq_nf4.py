"""Lesson 9 (calibrated 4-bit): RTN, GPTQ, AWQ and NF4 from first principles."""

import pytest
import torch
from torch import nn

import helper


def test_nf4_levels_equal_bitsandbytes_table_bit_for_bit():
    import bitsandbytes.functional as bnbf

    levels = helper.nf4_levels()
    assert levels.dtype == torch.float32 and levels.shape == (16,)
    assert torch.equal(levels, bnbf.get_4bit_type("nf4", device="cpu").float())
    assert levels[7].item() == 0.0 and levels[0].item() == -1.0 and levels[-1].item() == 1.0


def test_nf4_quantize_equals_bitsandbytes_quantize_4bit_when_groups_fit_rows():
    import bitsandbytes.functional as bnbf

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 128, generator=g)
    for size in (32, 64, 128):
        ours = helper.nf4_quantize(w, size)
        packed, state = bnbf.quantize_4bit(w, blocksize=size, quant_type="nf4")
        flat = packed.flatten()  # two codes per byte, the first in the high nibble
        assert torch.equal(ours.codes, torch.stack([flat >> 4, flat & 0x0F], 1).reshape(8, 128))
        assert torch.equal(ours.scale.flatten(), state.absmax)
        if size < 128:  # bitsandbytes 0.50's CPU dequantize_4bit is wrong at blocks of 128 (Lesson 4)
            assert torch.equal(ours.dequantize(), bnbf.dequantize_4bit(packed, state))
        assert torch.equal(ours.dequantize(), helper.blockwise_nf4_rtn(w, size))  # Lesson 4's NF4, the same numbers


def test_group_quant_dequantizes_and_counts_its_bytes_by_hand():
    uniform = helper.GroupQuant(
        codes=torch.tensor([[0, 15, 7, 8]], dtype=torch.uint8),
        scale=torch.tensor([[0.5, 2.0]]),
        zero=torch.tensor([[8, 1]], dtype=torch.uint8),
        group_size=2,
    )
    assert uniform.dequantize().tolist() == [[(0 - 8) * 0.5, (15 - 8) * 0.5, (7 - 1) * 2.0, (8 - 1) * 2.0]]
    assert uniform.nbytes() == 4 // 2 + 2 * 2 + 2  # 4-bit codes, fp16 steps, one-byte zeros
    levels = torch.linspace(-1, 1, 16)
    codebook = helper.GroupQuant(
        torch.tensor([[0, 15, 3, 12]], dtype=torch.uint8), torch.tensor([[3.0, 0.5]]), None, 2, levels
    )
    assert codebook.dequantize().tolist() == [[-3.0, 3.0, 0.5 * levels[3].item(), 0.5 * levels[12].item()]]
    assert codebook.nbytes() == 4 // 2 + 4 * 2 + 4 * 16  # codes, fp32 absmax, the 16 fp32 levels


def test_minmax_params_by_hand():
    import numpy as np

    scale, zero = helper.minmax_params(torch.tensor([[-1.0, 0.0, 2.0], [0.5, 2.0, 1.0], [0.0, 0.0, 0.0]]), bits=2)
    # row 0: [-1, 2] in 3 steps of 1, 0 is code 1; row 1: widened to [0, 2], steps of 2/3 stored in fp16, 0 is code 0;
    # row 2: no range at all, a step of 1
    assert scale.tolist() == [[1.0], [float(np.float16(2 / 3))], [1.0]]
    assert zero.tolist() == [[1.0], [0.0], [0.0]]
    _, zero4 = helper.minmax_params(torch.tensor([[-3.0, 12.0]]))  # 4 bits: 15 steps of 1, 0 is code 3
    assert zero4.item() == 3.0


def test_quantize_codes_rounds_half_to_even_and_clamps():
    w = torch.tensor([[-1.0, 0.2, 0.5, 1.5, 2.6, -9.0, 10.0]])
    codes = helper.quantize_codes(w, torch.tensor([[1.0]]), torch.tensor([[1.0]]), bits=2)
    assert codes.tolist() == [[0.0, 1.0, 1.0, 3.0, 3.0, 0.0, 3.0]]  # round(w) + 1 within [0, 3]


def test_input_hessians_are_two_over_n_xtx_of_each_layers_inputs(tiny_llama):
    model, ids = tiny_llama  # (2 rows, 16 tokens)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    seen = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, args, out, n=n: seen.update({n: args[0]})) for n in names
    ]
    with torch.no_grad():
        model(input_ids=ids)  # one batched pass, inputs caught by forward hooks
    for hook in hooks:
        hook.remove()
    for skip in (0, 3):
        hessians = helper.input_hessians(model, ids, names, skip_first=skip)
        for name in names:
            x = seen[name][:, skip:].reshape(-1, seen[name].shape[-1]).double()  # (2 * (16 - skip), in)
            assert hessians[name].dtype == torch.float64 and x.shape[0] == 2 * (16 - skip)
            torch.testing.assert_close(hessians[name], 2.0 / x.shape[0] * x.T @ x, rtol=1e-5, atol=1e-6)


def test_rtn_quantize_exact_on_a_hand_made_grid():
    w = torch.arange(16.0).reshape(1, 16)  # min 0, max 15: scale 1, zero 0, codes = the values
    gq = helper.rtn_quantize(w, 4, 16)
    assert gq.codes.tolist() == [list(range(16))]
    assert gq.scale.tolist() == [[1.0]] and gq.zero.tolist() == [[0]]
    assert torch.equal(gq.dequantize(), w)


def test_rtn_quantize_ragged_last_group_and_zero_exact():
    w = torch.tensor([[-1.0, 0.0, 2.0, 0.5, 3.0, -3.0, 0.0, 1.0, 7.0, -7.0]])
    gq = helper.rtn_quantize(w, 4, 4)  # groups of 4, 4 and 2 columns
    assert gq.scale.shape == (1, 3) and gq.codes.shape == (1, 10)
    deq = gq.dequantize()
    assert deq[0, 1].item() == 0.0 and deq[0, 6].item() == 0.0  # 0 is on every grid
    # rounding the zero point shifts the grid by up to half a step, so an edge value can be a step off
    assert ((deq - w).abs() <= gq.scale[:, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]] + 1e-6).all()
    per_channel = helper.rtn_quantize(w, 4, None)
    assert per_channel.scale.shape == (1, 1)
    with pytest.raises(ValueError):
        helper.rtn_quantize(w, 4, 0)
    with pytest.raises(ValueError):
        helper.rtn_quantize(w[0], 4, 4)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_identity_hessian_is_rtn(act_order):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 256, generator=g)
    for size in (128, 64, None):
        gptq = helper.gptq_quantize(w, torch.eye(256), 4, size, damp=0.0, act_order=act_order)
        rtn = helper.rtn_quantize(w, 4, size)
        assert torch.equal(gptq.codes, rtn.codes) and torch.equal(gptq.scale, rtn.scale)


def test_gptq_two_columns_by_hand():
    """H^-1 = [[2, -1], [-1, 2]] / 3: after column 0 is rounded, column 1 moves by (w0 - q0) / 2."""
    h = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    w = torch.tensor([[0.5, 0.0], [-1.0, 1.0]])  # values on fp16 grids: no rounding at all
    # a grid of step 1 per group of one column is forced by the values: 1 column per group
    gq = helper.gptq_quantize(w, h, bits=1, group_size=1, damp=0.0)
    q = gq.dequantize()
    # row 0: col 0 is 0.5 on the grid {0, 0.5}: exact; nothing moves
    assert q[0].tolist() == [0.5, 0.0]
    # row 1: col 0 = -1.0 on grid {-1, 0}: exact; col 1 = 1.0 on {0, 1}: exact
    assert q[1].tolist() == [-1.0, 1.0]
    w2 = torch.tensor([[0.3, 1.0, 1.0]])
    h3 = torch.eye(3, dtype=torch.float64)
    h3[0, 1] = h3[1, 0] = 0.5
    gq2 = helper.gptq_quantize(w2, h3, bits=4, group_size=None, damp=0.0)
    scale = gq2.scale[0, 0].item()
    q0 = gq2.dequantize()[0, 0].item()
    hinv = torch.linalg.inv(h3)
    moved = 1.0 - (0.3 - q0) * hinv[0, 1].item() / hinv[0, 0].item()  # column 1 after column 0's update
    assert scale == pytest.approx(1.0 / 15, rel=1e-3)
    assert gq2.dequantize()[0, 1].item() == pytest.approx(round(moved / scale) * scale, abs=1e-6)


def test_gptq_lowers_the_output_error_on_correlated_inputs():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(512, 8, generator=g)
    x = base @ torch.randn(8, 64, generator=g) + 0.1 * torch.randn(512, 64, generator=g)  # correlated columns
    x[:, 7] *= 20  # one large input channel: act_order quantizes its column first
    w = torch.randn(32, 64, generator=g)
    rtn = helper.rtn_quantize(w, 4, 32).dequantize()
    for act_order in (False, True):
        gq = helper.gptq_quantize(w, helper.input_hessian(x), 4, 32, act_order=act_order)
        assert gq.scale.shape == (32, 2) and gq.codes.shape == (32, 64)
        assert helper.layer_output_error(w, gq.dequantize(), x) < 0.5 * helper.layer_output_error(w, rtn, x)


def test_gptq_bad_input():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="hessian"):
        helper.gptq_quantize(w, torch.eye(7))
    with pytest.raises(ValueError, match="block_size"):
        helper.gptq_quantize(w, torch.eye(8), group_size=3, block_size=4)
    with pytest.raises(TypeError):
        helper.gptq_quantize(w.long(), torch.eye(8))


def test_gptq_dead_inputs_get_zero_weight():
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    h = torch.eye(8, dtype=torch.float64)
    h[2, 2] = 0  # input 2 was always zero
    assert (helper.gptq_quantize(w, h, 4, None).dequantize()[:, 2] == 0).all()


def test_awq_search_scale_never_worse_than_rtn_and_finds_salient_channel():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(256, 64, generator=g)
    x[:, 5] *= 30  # one salient input channel
    lin = nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(16, 64, generator=g))
    w = lin.weight.detach().clone()
    s, alpha, errors = helper.awq_search_scale(None, [lin], x, 4, 32, grid=10)
    assert set(errors) == {k / 10 for k in range(10)}
    assert errors[alpha] <= errors[0.0]
    assert alpha > 0 and s.argmax().item() == 5
    assert torch.equal(lin.weight, w)  # the search restores the weights
    rtn_error = helper.layer_output_error(w, helper.rtn_quantize(w, 4, 32).dequantize(), x)
    assert errors[0.0] == pytest.approx(rtn_error, rel=1e-4)
    with pytest.raises(TypeError, match="nn.Linear"):
        helper.awq_search_scale(None, [w], x)
    with pytest.raises(ValueError, match="grid"):
        helper.awq_search_scale(None, [lin], x, grid=0)


# ---------------------------------------------------------------------------------------------------------------
# llm-awq, ported: mit-han-lab/llm-awq at commit d6e797a, awq/quantize/auto_scale.py (_search_module_scale,
# get_act_scale, scale_ln_fcs, scale_fc_fc, the Llama branch of auto_scale_block, apply_scale), auto_clip.py
# (auto_clip_layer, auto_clip_block, apply_clip), quantizer.py (pseudo_quantize_tensor, zero-point branch) and
# pre_quant.py (run_awq's layer loop). Kept line for line but where a comment says "port:". The quantizer is a
# parameter (w_quantize_func, as auto_scale_block builds it), so that the course's grid can be plugged in.
# ---------------------------------------------------------------------------------------------------------------


def _ref_pseudo_quantize_tensor(w, n_bit=4, q_group_size=-1):
    org_w_shape = w.shape
    if q_group_size > 0:
        assert org_w_shape[-1] % q_group_size == 0
        w = w.reshape(-1, q_group_size)
    max_val = w.amax(dim=1, keepdim=True)
    min_val = w.amin(dim=1, keepdim=True)
    max_int = 2**n_bit - 1
    min_int = 0
    scales = (max_val - min_val).clamp(min=1e-5) / max_int
    zeros = (-torch.round(min_val / scales)).clamp_(min_int, max_int)
    w = (torch.clamp(torch.round(w / scales) + zeros, min_int, max_int) - zeros) * scales
    return w.reshape(org_w_shape)


def _course_grid(group_size):
    """The course's grid as llm-awq's w_quantize_func: RTN per group of the last dimension (rtn_quantize)."""

    def quantize(w):
        return helper.rtn_quantize(w.reshape(-1, w.shape[-1]), 4, group_size).dequantize().reshape(w.shape)

    return quantize


def _ref_get_act_scale(x):
    return x.abs().view(-1, x.shape[-1]).mean(0)


@torch.no_grad()
def _ref_search_module_scale(block, linears2scale, x, w_quantize_func, kwargs={}):  # noqa: B006 (as in llm-awq)
    with torch.no_grad():
        org_out = block(x, **kwargs)
        if isinstance(org_out, tuple):
            org_out = org_out[0]
    x_max = _ref_get_act_scale(x)
    best_error = float("inf")
    best_ratio = -1
    best_scales = None
    n_grid = 20
    history = []
    # port: clone (llm-awq's .cpu() copies the GPU weights; on the CPU it would alias them, and nothing is restored)
    org_sd = {k: v.detach().clone() for k, v in block.state_dict().items()}
    for ratio in range(n_grid):
        ratio = ratio * 1 / n_grid
        scales = x_max.pow(ratio).clamp(min=1e-4).view(-1)
        scales = scales / (scales.max() * scales.min()).sqrt()
        for fc in linears2scale:
            fc.weight.mul_(scales.view(1, -1))
            fc.weight.data = w_quantize_func(fc.weight.data) / (scales.view(1, -1))
        out = block(x, **kwargs)
        if isinstance(out, tuple):
            out = out[0]
        loss = (org_out - out).float().pow(2).mean().item()
        history.append(loss)
        is_best = loss < best_error
        if is_best:
            best_error = loss
            best_ratio = ratio
            best_scales = scales
        block.load_state_dict(org_sd)
    best_scales = best_scales.view(-1)
    return best_scales.detach(), best_ratio, history  # port: the ratio and the losses too


@torch.no_grad()
def _ref_auto_clip_layer(w, input_feat, w_quantize_func, group_size, n_grid=20, max_shrink=0.5, n_sample_token=512):
    # port: q_config's q_group_size -> group_size; pseudo_quantize_tensor(cur_w, ...) -> w_quantize_func(cur_w)
    input_feat = input_feat.view(-1, input_feat.shape[-1])
    input_feat = input_feat.reshape(1, input_feat.shape[0], -1, group_size)
    input_feat = input_feat[:, 0 :: input_feat.shape[1] // n_sample_token]
    w = w.reshape(w.shape[0], 1, -1, group_size)
    oc_batch_size = 256 if w.shape[0] % 256 == 0 else 64  # prevent OOM
    if w.shape[0] % oc_batch_size:  # port: llm-awq asserts here; the batches only split the work
        oc_batch_size = w.shape[0]
    w_all = w
    best_max_val_all = []
    for i_b in range(w.shape[0] // oc_batch_size):
        w = w_all[i_b * oc_batch_size : (i_b + 1) * oc_batch_size]
        org_max_val = w.abs().amax(dim=-1, keepdim=True)  # co, 1, n_group, 1
        best_max_val = org_max_val.clone()
        min_errs = torch.ones_like(org_max_val) * 1e9
        org_out = (input_feat * w).sum(dim=-1)  # co, n_token, n_group
        for i_s in range(int(max_shrink * n_grid)):
            max_val = org_max_val * (1 - i_s / n_grid)
            min_val = -max_val
            cur_w = torch.clamp(w, min_val, max_val)
            q_w = w_quantize_func(cur_w)
            cur_out = (input_feat * q_w).sum(dim=-1)
            err = (cur_out - org_out).pow(2).mean(dim=1).view(min_errs.shape)
            cur_best_idx = err < min_errs
            min_errs[cur_best_idx] = err[cur_best_idx]
            best_max_val[cur_best_idx] = max_val[cur_best_idx]
        best_max_val_all.append(best_max_val)
    best_max_val = torch.cat(best_max_val_all, dim=0)
    return best_max_val.squeeze(1)


@torch.no_grad()
def _ref_run_awq_llama(model, samples, group_size, n_sample_token=512):
    """run_awq's loop for Llama (auto_scale=True, mse_range=True), with auto_scale_block's Llama branch,
    apply_scale (scale_ln_fcs, scale_fc_fc), auto_clip_block and apply_clip inlined. Returns per layer
    ({group: ratio}, {linear: clip values}). port: the quantizer is the course's grid; no CUDA moves."""
    w_quantize_func = _course_grid(group_size)
    layers = model.model.layers
    inps, layer_kwargs = [], {}

    def catcher(module, args, kwargs):  # port: a pre-hook (with_kwargs) instead of the Catcher class
        inps.append(args[0])
        layer_kwargs.update(kwargs)
        raise ValueError  # early exit to break later inference

    handle = layers[0].register_forward_pre_hook(catcher, with_kwargs=True)
    try:
        model(samples, use_cache=False)  # port: use_cache=False (transformers 5 would hand every layer a cache)
    except ValueError:
        pass
    handle.remove()
    inps = inps[0]
    layer_kwargs.pop("use_cache", None)
    results = []
    for layer in layers:
        named_linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        input_feat = {name: [] for name in named_linears}
        handles = [
            m.register_forward_hook(
                lambda m, x, y, name=name, feat=input_feat: feat[name].append(x[0].detach().clone())
            )
            for name, m in named_linears.items()
        ]
        out = layer(inps, **layer_kwargs)
        inps = out[0] if isinstance(out, tuple) else out  # port: transformers 5's decoder layer returns a tensor
        for h in handles:
            h.remove()
        input_feat = {k: torch.cat(v, dim=0) for k, v in input_feat.items()}
        attn, mlp = layer.self_attn, layer.mlp
        groups = [  # (prev_op, layers, input, module2inspect, kwargs), as auto_scale_block lists them for Llama
            (layer.input_layernorm, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], attn, layer_kwargs)
        ]
        if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
            groups.append((attn.v_proj, ["self_attn.o_proj"], None, {}))
        groups.append((layer.post_attention_layernorm, ["mlp.gate_proj", "mlp.up_proj"], mlp, {}))
        groups.append((mlp.up_proj, ["mlp.down_proj"], None, {}))
        scales_list, ratios = [], {}
        for prev_op, names, module2inspect, kwargs in groups:
            fcs = [named_linears[n] for n in names]
            block = fcs[0] if module2inspect is None else module2inspect
            scales, ratio, _ = _ref_search_module_scale(block, fcs, input_feat[names[0]], w_quantize_func, kwargs)
            scales_list.append((prev_op, names, scales))
            ratios[" ".join(n.split(".")[-1] for n in names)] = ratio
        for prev_op, names, scales in scales_list:  # apply_scale
            if isinstance(prev_op, nn.Linear):  # scale_fc_fc
                prev_op.weight[-scales.size(0) :].div_(scales.view(-1, 1))
            else:  # scale_ln_fcs
                prev_op.weight.div_(scales)
            for n in names:
                named_linears[n].weight.mul_(scales.view(1, -1))
                input_feat[n].div_(scales.view(1, -1))
        clip_list = {}
        for name in named_linears:  # auto_clip_block
            if any(_ in name for _ in ["q_", "k_", "query", "key", "Wqkv"]):
                continue
            clip_list[name] = _ref_auto_clip_layer(
                named_linears[name].weight, input_feat[name], w_quantize_func, group_size, n_sample_token=n_sample_token
            )
        for name, max_val in clip_list.items():  # apply_clip
            weight = named_linears[name].weight
            org_shape = weight.shape
            weight.data = torch.clamp(weight.data.reshape(*max_val.shape[:2], -1), -max_val, max_val).reshape(org_shape)
        results.append((ratios, {n: v.squeeze(-1) for n, v in clip_list.items()}))
    return results


class _ProbeMLP(nn.Module):
    """A Llama MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, d: int = 64, h: int = 128, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.gate_proj, self.up_proj = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def _probe_input(seed: int, rows: int = 256, d: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, d, generator=g) * torch.exp(torch.randn(d, generator=g))  # channels of varied size


def test_rtn_dequantized_is_rtn_quantize_bit_for_bit():
    from quantcourse.lesson09_gptq_awq_nf4 import _rtn_dequantized

    g = torch.Generator().manual_seed(5)
    for shape in [(48, 576), (32, 160), (7, 13)]:
        w = torch.randn(*shape, generator=g) * torch.rand(shape[1], generator=g)
        for size in (128, 64, 5, None):
            assert torch.equal(_rtn_dequantized(w, 4, size), helper.rtn_quantize(w, 4, size).dequantize())


def test_course_grid_and_llm_awq_grid_agree_only_where_0_is_in_range_and_the_step_is_fp16():
    row = torch.tensor([[-1.0, 0.0, 0.5, 2.75]])  # range 3.75: a step of 0.25, exact in fp16; 0 inside
    assert torch.equal(helper.rtn_quantize(row, 4, None).dequantize(), _ref_pseudo_quantize_tensor(row))
    positive = torch.tensor([[1.0, 1.5, 4.75]])  # llm-awq spans [1, 4.75]; the course widens it to [0, 4.75]
    ours, theirs = helper.rtn_quantize(positive, 4, None).dequantize(), _ref_pseudo_quantize_tensor(positive)
    assert theirs[0, 0].item() == 1.0 and ours[0, 0].item() != 1.0
    odd = torch.tensor([[0.0, 0.1]])  # a step of 0.1 / 15: rounded to fp16 by the course only
    step = helper.rtn_quantize(odd, 4, None).scale.item()
    assert step != 0.1 / 15 and step == torch.tensor(0.1 / 15).half().float().item()


def test_awq_search_scale_equals_llm_awq_on_a_linear_and_a_probe_mlp():
    x = _probe_input(1)
    lin = nn.Linear(64, 48, bias=True)  # a linear alone (llm-awq's down_proj case): module2inspect is the linear
    s, alpha, errors = helper.awq_search_scale(None, [lin], x, 4, 32)
    s_ref, alpha_ref, history = _ref_search_module_scale(lin, [lin], x, _course_grid(32))
    assert alpha == alpha_ref and torch.equal(s, s_ref) and list(errors.values()) == history
    mlp = _ProbeMLP(seed=2)
    s, alpha, errors = helper.awq_search_scale(mlp, [mlp.gate_proj, mlp.up_proj], x, 4, 32)
    s_ref, alpha_ref, history = _ref_search_module_scale(mlp, [mlp.gate_proj, mlp.up_proj], x, _course_grid(32))
    assert alpha == alpha_ref and torch.equal(s, s_ref) and list(errors.values()) == history
    assert 0 < alpha < 1


def test_awq_block_output_loss_picks_another_alpha_than_the_sum_of_linears():
    x, mlp = _probe_input(12), _ProbeMLP(seed=12)
    pair = [mlp.gate_proj, mlp.up_proj]
    _, alpha_block, block_errors = helper.awq_search_scale(mlp, pair, x, 4, 32)
    _, alpha_sum, sum_errors = helper.awq_search_scale(None, pair, x, 4, 32)
    assert alpha_block != alpha_sum
    assert alpha_block == _ref_search_module_scale(mlp, pair, x, _course_grid(32))[1]  # llm-awq's choice
    # the old loss's choice costs the MLP's output more than the block loss's own
    assert block_errors[alpha_block] < 0.95 * block_errors[alpha_sum]
    assert sum_errors[alpha_sum] < sum_errors[alpha_block]


def test_awq_search_clip_equals_llm_awq():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(96, 128, generator=g)
    w[torch.rand(96, 128, generator=g) < 0.01] *= 6  # a few large weights: clipping pays
    for rows, n_tokens in ((2000, 512), (300, 300)):  # 2000 // 512: every 3rd row; 300 rows: all of them
        x = _probe_input(7, rows, 128)
        clip = helper.awq_search_clip(w, x, 4, 32, n_tokens=n_tokens)
        ref = _ref_auto_clip_layer(w, x, _course_grid(32), 32, n_sample_token=n_tokens)
        assert clip.shape == (96, 4) and torch.equal(clip, ref.squeeze(-1))
        top = w.abs().reshape(96, 4, 32).amax(-1)
        ratio = clip / top
        assert (ratio <= 1).all() and (ratio >= 0.55 - 1e-6).all() and (ratio < 1).any()
    # fewer rows than n_tokens: the course reads them all (llm-awq's step of len(x) // 512 would be 0)
    x = _probe_input(8, 100, 128)
    assert torch.equal(
        helper.awq_search_clip(w, x, 4, 32),
        _ref_auto_clip_layer(w, x, _course_grid(32), 32, n_sample_token=100).squeeze(-1),
    )
    ragged = helper.awq_search_clip(w[:, :112], x[:, :112], 4, 32)  # groups of 32, 32, 32 and 16
    assert ragged.shape == (96, 4)


def _mha_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,  # no grouped-query attention: o_proj gets a scale too
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(3)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
    return model, torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("attention", ["gqa", "mha"])
def test_awq_layer_equals_llm_awq_run_awq_on_a_tiny_llama(tiny_llama, attention):
    import copy

    model, ids = tiny_llama if attention == "gqa" else _mha_llama()
    reference = copy.deepcopy(model)
    expected = _ref_run_awq_llama(reference, ids, 32, n_sample_token=16)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    hidden, kwargs = helper.decoder_layer_inputs(model, ids, 0)
    for layer, (ratios, clips) in zip(model.model.layers, expected):
        hidden, alphas, ours = helper.awq_layer(layer, hidden, kwargs, 4, 32, clip_tokens=16)
        assert alphas == ratios and ("o_proj" in alphas) == (attention == "mha")
        assert ours.keys() == clips.keys() and all(torch.equal(ours[n], clips[n]) for n in clips)
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=1e-6, atol=1e-7, msg=name)
    with torch.no_grad():  # scaled and clipped, still in float: close to the model it was
        after = model(input_ids=ids).logits
    assert (after - before).abs().mean() < 0.1 * before.abs().mean()


def test_decoder_layer_inputs_and_llama_layer_inputs_are_the_float_models(tiny_llama):
    model, ids = tiny_llama
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states  # embeddings, then each layer's output
    hidden, kwargs = helper.decoder_layer_inputs(model, ids, 1)
    torch.testing.assert_close(hidden, states[1])
    assert {"position_embeddings", "attention_mask"} <= set(kwargs) and "hidden_states" not in kwargs
    layer = model.model.layers[1]
    out, x = helper.llama_layer_inputs(layer, hidden, kwargs)
    assert isinstance(x, helper.LlamaLayerInputs)
    with torch.no_grad():
        torch.testing.assert_close(x.attn, layer.input_layernorm(hidden))
        attn_out = layer.self_attn(x.attn, **x.attn_kwargs)[0]
        torch.testing.assert_close(x.mlp, layer.post_attention_layernorm(hidden + attn_out))
        gate, up = layer.mlp.gate_proj(x.mlp), layer.mlp.up_proj(x.mlp)
        torch.testing.assert_close(x.down_proj, layer.mlp.act_fn(gate) * up)
    assert x.o_proj.shape == (2, 16, 64) and x.attn.shape == (2, 16, 64) and x.down_proj.shape == (2, 16, 128)
    final = model.model.norm(out)
    torch.testing.assert_close(final, states[-1])  # the last layer's output, before the final norm


def test_quantize_llama_4bit_awq_is_awq_layer_then_rtn(tiny_llama):
    import copy

    model, ids = tiny_llama
    ids4 = torch.cat([ids, ids.flip(1)])  # 4 rows of 16 tokens; awq_tokens=32 reads rows 0 and 3
    by_hand = copy.deepcopy(model)
    hidden, kwargs = helper.decoder_layer_inputs(by_hand, ids4[[0, 3]], 0)
    for layer in by_hand.model.layers:
        hidden, _, _ = helper.awq_layer(layer, hidden, kwargs, 4, 32)
    helper.quantize_llama_4bit(model, "awq", ids4, group_size=32, awq_tokens=32)
    for name, m in by_hand.named_modules():
        if name.endswith("_proj"):
            q = model.get_submodule(name).group_quant()
            assert torch.equal(q.codes, helper.rtn_quantize(m.weight, 4, 32).codes), name
    with pytest.raises(ValueError, match="skip_first"):
        helper.quantize_llama_4bit(model, "awq", ids4, skip_first=1)


def test_group_quant_linear_packs_and_counts_bytes():
    lin = nn.Linear(64, 8, bias=True)
    gq = helper.rtn_quantize(lin.weight.detach(), 4, 32)
    layer = helper.GroupQuantLinear(gq, lin.bias)
    x = torch.randn(3, 64)
    expected = nn.functional.linear(x, gq.dequantize(), lin.bias)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert layer.packed.dtype == torch.uint8 and layer.packed.numel() == 64 * 8 // 2
    assert helper.model_size(layer) == 256 + 16 * 2 + 16 + 8 * 4  # codes, fp16 scales, zeros, bias
    assert gq.nbytes() == 256 + 32 + 16
    nf4 = helper.GroupQuantLinear(helper.nf4_quantize(lin.weight.detach(), 32))
    assert torch.allclose(nf4(x), x @ helper.nf4_quantize(lin.weight.detach(), 32).dequantize().T, atol=1e-6)


@pytest.mark.parametrize("method", helper.QUANT4_METHODS)
def test_quantize_llama_4bit_replaces_every_linear_but_lm_head(tiny_llama, method):
    model, ids = tiny_llama
    with torch.no_grad():
        before = model(input_ids=ids).logits
    helper.quantize_llama_4bit(model, method, ids, group_size=32)
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith(("_proj",))}
    assert kinds == {"GroupQuantLinear"} and isinstance(model.lm_head, nn.Linear)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert after.shape == before.shape and torch.isfinite(after).all()
    assert (after - before).abs().mean() < 0.5 * before.abs().mean()


def test_quantize_llama_4bit_bad_input(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match="method"):
        helper.quantize_llama_4bit(model, "hqq")
    with pytest.raises(ValueError, match="calibration"):
        helper.quantize_llama_4bit(model, "gptq")
