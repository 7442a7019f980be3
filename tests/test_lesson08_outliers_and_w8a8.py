"""Lesson 8 (outliers and 8-bit activations): layer inputs, the integer matmul, W8A8, LLM.int8() and SmoothQuant's
folds (which AWQ reuses in Lesson 9)."""

import copy

import pytest
import torch
from torch import nn

import helper


def test_linear_inputs_are_what_reaches_each_layer_sampled_evenly_and_skipping_the_first_tokens(tiny_llama):
    model, ids = tiny_llama  # (2 rows, 16 tokens)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    seen = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, args, out, n=n: seen.update({n: args[0]})) for n in names
    ]
    with torch.no_grad():
        model(input_ids=ids)  # one ordinary batched pass, its inputs caught by forward hooks
    for hook in hooks:
        hook.remove()
    inputs = helper.linear_inputs(model, ids, names)
    for name in names:
        expected = seen[name].reshape(-1, seen[name].shape[-1])  # (32 tokens, in_features)
        assert inputs[name].dtype == torch.float32
        torch.testing.assert_close(inputs[name], expected, rtol=1e-5, atol=1e-5)
    sampled = helper.linear_inputs(model, ids, names, max_rows=8)  # 4 per row: tokens 0, 5, 10 and 15
    torch.testing.assert_close(sampled[names[1]], inputs[names[1]][[0, 5, 10, 15, 16, 21, 26, 31]])
    skipped = helper.linear_inputs(model, ids, names, skip_first=2)
    torch.testing.assert_close(skipped[names[0]], seen[names[0]][:, 2:].reshape(28, -1), rtol=1e-5, atol=1e-5)


def test_quantize_rows_absmax_exact_integers():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [127.0, 63.5, -127.0]])
    q, s = helper.quantize_rows_absmax(x)
    assert q.dtype == torch.int8 and s.shape == (3, 1)
    assert q.tolist() == [[64, -127, 32], [0, 0, 0], [127, 64, -127]]  # 63.5 -> 64: round half to even
    assert s[1].item() == 1.0  # an all-zero row gets scale 1


def test_quantize_rows_asymmetric_contains_zero():
    x = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 0.5]])
    q, s, z = helper.quantize_rows_asymmetric(x)
    assert q.dtype == torch.uint8 and z.dtype == torch.int32
    assert torch.allclose((q.float() - z) * s, x, atol=s.max().item() / 2)
    assert z[0].item() == 0  # the row [1, 3] is widened to [0, 3]: 0 is code 0
    assert q[1, 1].item() == z[1].item()  # 0.0 is code z: dequantized exactly to 0


def test_int8_matmul_is_exact():
    g = torch.Generator().manual_seed(0)
    qx = torch.randint(-127, 128, (5, 64), generator=g, dtype=torch.int8)
    qw = torch.randint(-127, 128, (7, 64), generator=g, dtype=torch.int8)
    expected = [[sum(int(a) * int(b) for a, b in zip(r, c)) for c in qw.tolist()] for r in qx.tolist()]
    assert helper.int8_matmul(qx, qw).tolist() == expected
    with pytest.raises(TypeError):
        helper.int8_matmul(qx.float(), qw)


@pytest.mark.parametrize("asymmetric", [True, False])
def test_w8a8_linear_within_quantization_error(asymmetric):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 32, generator=g)
    x = torch.randn(4, 32, generator=g) + (0.5 if asymmetric else 0.0)
    qw, sw = helper.quantize_rows_absmax(w)
    y = helper.w8a8_linear(x, qw, sw, asymmetric=asymmetric)
    ref = x @ w.T
    assert y.shape == ref.shape
    assert (y - ref).abs().max() < 0.05 * ref.abs().max()


def test_w8a8_zero_point_term_matches_dequantized_product():
    """The zero-point algebra: integer result equals the product of the dequantized tensors."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 16, generator=g) * 4 - 1
    qw, sw = helper.quantize_rows_absmax(torch.randn(5, 16, generator=g))
    qx, sx, zx = helper.quantize_rows_asymmetric(x)
    ref = ((qx.double() - zx) * sx.double()) @ (qw.double() * sw.double()).T
    assert torch.allclose(helper.w8a8_linear(x, qw, sw).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activations", helper.W8A8_ACTIVATIONS)
def test_w8a8linear_on_a_grid_it_represents_exactly(activations):
    """Weights and activations on int8 grids: the layer's integer arithmetic gives x @ w.T exactly, except where
    one scale per tensor must round the second token (its own absmax, 63.5, would give it a grid of 0.5)."""
    codes = torch.tensor([[127.0, -64.0, 1.0, 0.0], [2.0, 2.0, -127.0, 10.0]])
    lin = nn.Linear(4, 2)
    with torch.no_grad():
        lin.weight.copy_(codes / 128)  # each row's absmax is 127 steps of 1/128
        lin.bias.copy_(torch.tensor([0.25, -1.0]))
    x = torch.tensor([[[127.0, -3.0, 50.0, 7.0], [63.5, 0.5, -1.5, 2.0]]])  # (1, 2 tokens, 4)
    layer = helper.W8A8Linear.from_linear(lin, activations, 127.0 if activations == "static" else None)
    assert torch.equal(layer.qweight, codes.to(torch.int8)) and torch.equal(layer.scale, torch.full((2, 1), 1 / 128))
    # per tensor (and static, calibrated on max |x| = 127), the step is 127 / 127 = 1: the second token rounds half
    # to even (63.5 -> 64, 0.5 -> 0, -1.5 -> -2)
    seen = x if activations == "per_token" else torch.tensor([[[127.0, -3.0, 50.0, 7.0], [64.0, 0.0, -2.0, 2.0]]])
    expected = seen.double() @ (codes.double() / 128).T + torch.tensor([0.25, -1.0], dtype=torch.float64)
    y = layer(x)
    assert y.shape == (1, 2, 2) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        helper.W8A8Linear(4, 4, activations="per_row")


def test_w8a8linear_static_uses_the_calibrated_scale_and_clips_beyond_it():
    """One scale fixed at from_linear time (max |x| on calibration / 127), whatever the input: codes are
    round(x / step), clipped to +-127 beyond the calibrated range."""
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[127.0, 127.0, 127.0, 127.0]]) / 127)  # codes 127, scale 1/127: W = 1 exactly
    layer = helper.W8A8Linear.from_linear(lin, "static", torch.tensor([2.54, 12.7, 0.5, 1.0]))  # max 12.7: step 0.1
    assert layer.input_scale.item() == pytest.approx(0.1) and layer.input_scale.dtype == torch.float32
    x = torch.tensor([[0.25, 0.04, -1.0, 0.0], [20.0, 0.0, 0.0, -0.35]])  # 20 is beyond the calibrated 12.7
    # codes: [2 (0.25/0.1 = 2.5 -> 2, half to even), 0, -10, 0] and [127 (clipped), 0, 0, -4 (-3.5 -> -4)]
    expected = torch.tensor([[(2 + 0 - 10 + 0) * 0.1], [(127 - 4) * 0.1]])
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
    # a dynamic per-tensor layer takes its step from this input instead: 20 / 127
    dynamic = helper.W8A8Linear.from_linear(lin, "per_tensor")(x)
    assert (dynamic[1] - 19.65).abs() < 0.2 and not torch.allclose(dynamic, expected, atol=1e-3)
    for activations, absmax in (("static", None), ("per_token", 1.0), ("static", 0.0), ("static", float("nan"))):
        with pytest.raises(ValueError):
            helper.W8A8Linear.from_linear(lin, activations, absmax)


def test_w8a8linear_from_linear_rejects_what_is_not_a_linear():
    for bad in (nn.Conv1d(4, 4, 1), torch.zeros(4, 4)):
        with pytest.raises(TypeError, match="nn.Linear"):
            helper.W8A8Linear.from_linear(bad)
        with pytest.raises(TypeError, match="nn.Linear"):
            helper.LLMInt8Linear(bad)


def test_w8a8_model_swaps_every_linear_but_lm_head_with_per_layer_static_scales(tiny_llama):
    model, ids = tiny_llama
    act = helper.activation_absmax(model, None, ids=ids)
    dynamic = helper.w8a8_model(copy.deepcopy(model))
    static = helper.w8a8_model(copy.deepcopy(model), "static", act)
    for swapped, activations in ((dynamic, "per_token"), (static, "static")):
        layers = {n: m for n, m in swapped.named_modules() if isinstance(m, helper.W8A8Linear)}
        assert len(layers) == 2 * 7 and type(swapped.lm_head) is nn.Linear  # 7 linears per layer, lm_head kept
        assert all(m.activations == activations for m in layers.values())
    for name, layer in static.named_modules():
        if isinstance(layer, helper.W8A8Linear):
            assert layer.input_scale.item() == pytest.approx(act[name].max().item() / 127, rel=1e-6)
    with torch.no_grad():  # calibrated on the same ids, the static model stays close to the float one
        ref, y = model(input_ids=ids).logits, static(input_ids=ids).logits
    assert (y - ref).norm() < 0.1 * ref.norm()
    with pytest.raises(ValueError):
        helper.w8a8_model(copy.deepcopy(model), "static")
    with pytest.raises(ValueError):
        helper.w8a8_model(copy.deepcopy(model), "per_tensor", act)


def test_llm_int8_matches_bitsandbytes_linear8bitlt():
    g = torch.Generator().manual_seed(4)
    lin = nn.Linear(128, 32, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 128, generator=g) * 0.05)
    x = torch.randn(6, 128, generator=g)
    x[:, [3, 77]] *= 20  # two outlier columns, far above the threshold of 6
    ours = helper.LLMInt8Linear(lin, threshold=6.0)
    bnb_layer = helper.bnb_quantize_linear(lin, "int8", threshold=6.0)
    with torch.no_grad():
        ref = bnb_layer(x)
        y = ours(x)
    assert torch.equal(ours.cb, bnb_layer.state.CB) and torch.equal(ours.scb, bnb_layer.state.SCB)
    assert (y - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_llm_int8_linear_with_a_bias_keeps_the_input_dtype(dtype):
    """bitsandbytes' order: the fp32 bias joins the fp32 int8 part, which is then cast to x's dtype; the outlier
    column is added in that dtype. Checked against that computation written out."""
    g = torch.Generator().manual_seed(6)
    lin = nn.Linear(32, 8)
    with torch.no_grad():
        lin.bias.copy_(torch.randn(8, generator=g))
    x = torch.randn(3, 32, generator=g)
    x[:, 5] = 10.0  # one outlier column
    layer = helper.LLMInt8Linear(lin, 6.0)
    with torch.no_grad():
        y = layer(x.to(dtype))
    # the int8 part without the outlier column (threshold 0, fp32 output), plus the bias, then cast like bitsandbytes
    int_fp32 = helper.llm_int8_matmul(x.to(dtype).float().masked_fill(torch.arange(32) == 5, 0), layer.cb, layer.scb, 0)
    w_col = (layer.cb[:, 5:6].float() * (layer.scb.reshape(-1, 1) / 127)).to(dtype)
    expected = (int_fp32 + layer.bias).to(dtype).addmm(x.to(dtype)[:, 5:6], w_col.T)
    assert y.dtype == dtype
    assert torch.equal(y, expected)
    with torch.no_grad():  # fp32 input: fp32 output, the bias added last
        y32 = layer(x)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32, helper.llm_int8_matmul(x, layer.cb, layer.scb, 6.0) + layer.bias, rtol=0, atol=0)


def test_llm_int8_threshold_moves_outlier_columns_to_float():
    g = torch.Generator().manual_seed(5)
    lin = nn.Linear(64, 16, bias=False)
    x = torch.randn(8, 64, generator=g)
    x[:, 10] *= 50
    ref = lin(x)
    with torch.no_grad():
        err_all_int8 = (helper.LLMInt8Linear(lin, 0.0)(x) - ref).abs().max()
        err_decomposed = (helper.LLMInt8Linear(lin, 6.0)(x) - ref).abs().max()
    assert err_decomposed < err_all_int8 / 3
    with pytest.raises(ValueError):
        helper.llm_int8_matmul(x, torch.zeros(16, 64, dtype=torch.int8), torch.ones(16), threshold=-1)


def test_smoothing_factors_and_fold_keep_the_function():
    a = torch.tensor([16.0, 1.0, 4.0])
    w = torch.tensor([0.25, 1.0, 4.0])
    assert helper.smoothing_factors(a, w, 0.5).tolist() == [8.0, 1.0, 1.0]
    assert helper.smoothing_factors(a, w, 1.0).tolist() == [16.0, 1.0, 4.0]
    with pytest.raises(ValueError):
        helper.smoothing_factors(a, w, 1.5)


def test_smooth_llama_keeps_the_float_model(tiny_llama):
    model, ids = tiny_llama
    with torch.no_grad():
        before = model(input_ids=ids).logits
    act = helper.activation_absmax(model, None, ids=ids)
    helper.smooth_llama(model, act, alpha=0.5)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)


def test_smoothing_scales_are_the_factors_smooth_llama_folds(tiny_llama):
    model, ids = tiny_llama
    act = helper.activation_absmax(model, None, ids=ids)
    scales = helper.smoothing_scales(model, act, 0.5)
    p = "model.layers.0"
    qkv = [f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")]
    w_absmax = torch.stack([model.get_submodule(n).weight.abs().amax(dim=0) for n in qkv]).amax(dim=0)
    assert torch.equal(scales[qkv[0]], helper.smoothing_factors(act[qkv[0]], w_absmax, 0.5))
    assert all(scales[n] is scales[qkv[0]] for n in qkv)  # one factor per group
    assert f"{p}.self_attn.o_proj" not in scales and f"{p}.mlp.down_proj" in scales and "lm_head" not in scales
    two_groups = helper.smoothing_scales(model, act, 0.5, down_proj=False)
    assert sorted(two_groups) == sorted(n for n in scales if not n.endswith("down_proj"))
    # after smoothing, the input of each smoothed linear is x / s: its channel maxima are act / s
    smoothed = helper.smooth_llama(copy.deepcopy(model), act, 0.5)
    after = helper.activation_absmax(smoothed, None, ids=ids)
    for name, s in scales.items():
        torch.testing.assert_close(after[name], act[name] / s, rtol=1e-4, atol=1e-6)


def test_smooth_llama_down_proj_false_smooths_only_the_two_rmsnorm_groups(tiny_llama):
    model, ids = tiny_llama
    act = helper.activation_absmax(model, None, ids=ids)
    course = helper.smooth_llama(copy.deepcopy(model), act, 0.5)
    authors = helper.smooth_llama(copy.deepcopy(model), act, 0.5, down_proj=False)
    for i in range(2):
        up, down = f"model.layers.{i}.mlp.up_proj", f"model.layers.{i}.mlp.down_proj"
        assert torch.equal(authors.get_submodule(down).weight, model.get_submodule(down).weight)  # no third fold
        assert not torch.equal(course.get_submodule(down).weight, model.get_submodule(down).weight)
        norm = f"model.layers.{i}.input_layernorm"
        assert torch.equal(authors.get_submodule(norm).weight, course.get_submodule(norm).weight)
        # up_proj: its columns scaled by the norm group in both, its rows divided by s in the course's only
        assert not torch.equal(authors.get_submodule(up).weight, course.get_submodule(up).weight)
    with torch.no_grad():
        assert torch.allclose(authors(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_llama_input_groups_cover_every_linear_but_lm_head(tiny_llama):
    model, _ = tiny_llama
    groups = helper.llama_input_groups(model)
    names = [n for names, _, _ in groups for n in names]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert sorted(names) == sorted(linears)
    assert [how for _, _, how in groups[:4]] == ["norm", None, "norm", "rows"]


def test_fold_input_scale_rejects_unknown_fold(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match="unknown fold"):
        helper.fold_input_scale(model, model.model.norm, "columns", [], torch.ones(64))


def test_awq_fold_keeps_the_float_model(tiny_llama):
    model, ids = tiny_llama
    with torch.no_grad():
        before = model(input_ids=ids).logits
    modules = dict(model.named_modules())
    for names, source, how in helper.llama_input_groups(model):
        if source is not None:
            in_features = modules[names[0]].in_features
            s = torch.linspace(0.5, 2.0, in_features)
            helper.fold_input_scale(model, source, how, names, s)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-4, rtol=1e-4)
