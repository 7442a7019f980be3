"""Lesson 8 (outliers and 8-bit activations): layer inputs, the integer matmul, W8A8, LLM.int8() and SmoothQuant's
folds (which AWQ reuses in Lesson 9)."""

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
    layer = helper.W8A8Linear.from_linear(lin, activations)
    assert torch.equal(layer.qweight, codes.to(torch.int8)) and torch.equal(layer.scale, torch.full((2, 1), 1 / 128))
    # per tensor, the step is 127 / 127 = 1: the second token rounds half to even (63.5 -> 64, 0.5 -> 0, -1.5 -> -2)
    seen = x if activations == "per_token" else torch.tensor([[[127.0, -3.0, 50.0, 7.0], [64.0, 0.0, -2.0, 2.0]]])
    expected = seen.double() @ (codes.double() / 128).T + torch.tensor([0.25, -1.0], dtype=torch.float64)
    y = layer(x)
    assert y.shape == (1, 2, 2) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        helper.W8A8Linear(4, 4, activations="per_row")


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
