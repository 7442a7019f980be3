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
    w = torch.randn(16, 64, generator=g)
    s, alpha, errors = helper.awq_search_scale([w], x, 4, 32, grid=10)
    assert set(errors) == {k / 10 for k in range(10)}
    assert errors[alpha] <= errors[0.0]
    assert alpha > 0 and s.argmax().item() == 5
    rtn_error = helper.layer_output_error(w, helper.rtn_quantize(w, 4, 32).dequantize(), x)
    assert errors[0.0] == pytest.approx(rtn_error, rel=1e-4)


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
