"""Lesson 8 (outliers and 8-bit activations): the integer matmul, LLM.int8() and SmoothQuant."""

import pytest
import torch
from torch import nn

import helper


def test_calibration_text_is_disjoint_from_eval_text():
    cal, ev = helper.calibration_text(), helper.eval_text()
    assert len(cal) > 40_000
    # no 80-character window of the evaluation text appears in the calibration text
    assert not any(ev[i : i + 80] in cal for i in range(0, len(ev) - 80, 20))


def test_calibration_ids_shape_and_errors():
    _, tok = helper.load_smollm2()
    ids = helper.calibration_ids(tok, 1024, 256)
    assert ids.shape == (4, 256) and ids.dtype == torch.long
    for bad in [(1000, 256), (100, 256), (256, 0)]:
        with pytest.raises(ValueError):
            helper.calibration_ids(tok, *bad)
    with pytest.raises(ValueError, match="calibration text has"):
        helper.calibration_ids(tok, 512 * 1000, 512)


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
def test_w8a8linear_float_path_equals_integer_reference(activations):
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(64, 24, bias=True)
    x = torch.randn(2, 5, 64, generator=g)
    layer = helper.W8A8Linear.from_linear(lin, activations)
    y = layer(x)
    x2 = x.reshape(-1, 64)
    if activations == "per_tensor":
        qx, sx = helper.quantize_rows_absmax(x2.reshape(1, -1))
        qx, sx = qx.reshape(x2.shape), sx
    else:
        qx, sx = helper.quantize_rows_absmax(x2)
    ref = helper.int8_matmul(qx, layer.qweight).double() * sx.double() * layer.scale.T.double() + lin.bias.double()
    assert y.shape == (2, 5, 24)
    assert torch.allclose(y.reshape(-1, 24).double(), ref, rtol=1e-6, atol=1e-6)
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


def test_replace_linears_errors():
    with pytest.raises(ValueError, match="no nn.Linear"):
        helper.replace_linears(nn.Sequential(nn.ReLU()), helper.W8A8Linear.from_linear)


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
