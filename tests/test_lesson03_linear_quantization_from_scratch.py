"""Unit tests for Lesson 3's helpers: linear quantization, W8A16Linear, packing."""

import warnings

import pytest
import torch
from torch import nn

import helper

# ---------------------------------------------------------------------------
# int_range, linear_q_params, linear_quantize, linear_dequantize
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits, expected", [(2, (-2, 1)), (4, (-8, 7)), (8, (-128, 127))])
def test_int_range(bits, expected):
    assert helper.int_range(bits) == expected


@pytest.mark.parametrize("bits", [1, 9, 0])
def test_int_range_rejects_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        helper.int_range(bits)


def test_int_range_rejects_non_int():
    with pytest.raises(TypeError):
        helper.int_range(8.0)


def test_two_bit_example_by_hand():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0])
    scale, zero_point = helper.linear_q_params(x, bits=2)
    assert (scale, zero_point) == (1.0, -2)  # s = 3 / 3, z = -2 - 0 / 1
    q = helper.linear_quantize(x, scale, zero_point, bits=2)
    assert q.dtype == torch.int8
    assert torch.equal(q, torch.tensor([-2, -1, 0, 1], dtype=torch.int8))
    assert torch.equal(helper.linear_dequantize(q, scale, zero_point), x)


def test_asymmetric_2x3_by_hand():
    x = torch.tensor([[-1.5, 0.0, 1.5], [3.0, 1.0, -0.4]])
    scale, zero_point = helper.linear_q_params(x, bits=2)
    assert (scale, zero_point) == (1.5, -1)  # s = 4.5 / 3, z = round(-2 + 1)
    q = helper.linear_quantize(x, scale, zero_point, bits=2)
    assert torch.equal(q, torch.tensor([[-2, -1, 0], [1, 0, -1]], dtype=torch.int8))


def test_asymmetric_range_widened_to_zero():
    x = torch.tensor([1.0, 2.0, 3.0])  # all positive: the range becomes [0, 3]
    scale, zero_point = helper.linear_q_params(x, bits=2)
    assert (scale, zero_point) == (1.0, -2)
    q = helper.linear_quantize(x, scale, zero_point, bits=2)
    assert torch.equal(helper.linear_dequantize(q, scale, zero_point), x)


def test_zero_point_in_range_and_zero_exact():
    torch.manual_seed(0)
    for bits in (2, 4, 8):
        x = torch.randn(50) * 3 + 1
        scale, zero_point = helper.linear_q_params(x, bits=bits)
        qmin, qmax = helper.int_range(bits)
        assert qmin <= zero_point <= qmax
        q0 = helper.linear_quantize(torch.tensor([0.0]), scale, zero_point, bits)
        assert helper.linear_dequantize(q0, scale, zero_point).item() == 0.0


def test_round_trip_error_at_most_half_a_step():
    torch.manual_seed(0)
    x = torch.randn(1000)
    for symmetric in (False, True):
        scale, zero_point = helper.linear_q_params(x, bits=8, symmetric=symmetric)
        x_hat = helper.linear_dequantize(helper.linear_quantize(x, scale, zero_point), scale, zero_point)
        assert helper.quantization_error(x, x_hat)["max_abs"] <= scale / 2 + 1e-6


def test_symmetric_params():
    x = torch.tensor([-0.5, 1.27, 0.3])
    scale, zero_point = helper.linear_q_params(x, bits=8, symmetric=True)
    assert zero_point == 0
    assert scale == pytest.approx(1.27 / 127)
    q = helper.linear_quantize(x, scale, zero_point)
    assert torch.equal(q, torch.tensor([-50, 127, 30], dtype=torch.int8))


def test_quantize_clamps_out_of_range():
    q = helper.linear_quantize(torch.tensor([-100.0, 100.0]), 1.0, 0, bits=4)
    assert torch.equal(q, torch.tensor([-8, 7], dtype=torch.int8))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("value", [0.0, 5.0, -2.5])
def test_constant_tensor_gives_finite_exact_result(value, symmetric):
    x = torch.full((3, 4), value)
    scale, zero_point = helper.linear_q_params(x, bits=8, symmetric=symmetric)
    assert scale > 0 and torch.isfinite(torch.tensor(scale))
    x_hat = helper.linear_dequantize(helper.linear_quantize(x, scale, zero_point), scale, zero_point)
    assert torch.isfinite(x_hat).all()
    assert torch.allclose(x_hat, x, atol=1e-6)


def test_constant_rows_per_channel_and_group_are_finite():
    w = torch.zeros(2, 8)
    w[1] = 3.0
    q, scale, zero_point = helper.quantize_per_channel(w, bits=4)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.allclose(helper.dequantize_per_channel(q, scale, zero_point), w)
    qg, sg = helper.quantize_per_group(w, 4, bits=4)
    assert torch.allclose(helper.dequantize_per_group(qg, sg), w)


def test_bf16_input_is_accepted():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.bfloat16)
    scale, zero_point = helper.linear_q_params(x, bits=2)
    assert torch.equal(helper.linear_quantize(x, scale, zero_point, 2), torch.tensor([-2, -1, 0, 1], dtype=torch.int8))


# every entry point of the from-scratch quantizer, for the bad-input tests
QUANTIZERS = [
    lambda t: helper.linear_q_params(t),
    lambda t: helper.linear_quantize(t, 1.0, 0),
    lambda t: helper.quantize_per_channel(t),
    lambda t: helper.quantize_per_group(t, 2),
]


@pytest.mark.parametrize("fn", QUANTIZERS)
def test_empty_tensor_raises_value_error(fn):
    with pytest.raises(ValueError, match="empty"):
        fn(torch.empty(0, 4))


@pytest.mark.parametrize("fn", QUANTIZERS)
def test_integer_tensor_raises_type_error(fn):
    with pytest.raises(TypeError, match="floating"):
        fn(torch.ones(2, 4, dtype=torch.int32))


def test_non_tensor_and_nan_inputs():
    with pytest.raises(TypeError):
        helper.linear_q_params([1.0, 2.0])
    with pytest.raises(ValueError, match="nan"):
        helper.linear_q_params(torch.tensor([1.0, float("nan")]))


def test_quantize_rejects_bad_scale_and_zero_point():
    x = torch.tensor([1.0])
    for scale in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="scale"):
            helper.linear_quantize(x, scale, 0)
    with pytest.raises(TypeError, match="zero_point"):
        helper.linear_quantize(x, 1.0, 0.5)


def test_dequantize_validates_input():
    with pytest.raises(TypeError):
        helper.linear_dequantize(torch.tensor([1.0]), 1.0, 0)
    with pytest.raises(ValueError, match="empty"):
        helper.linear_dequantize(torch.empty(0, dtype=torch.int8), 1.0, 0)
    out = helper.linear_dequantize(torch.tensor([2], dtype=torch.int8), torch.tensor(0.5, dtype=torch.bfloat16), 1)
    assert out.dtype == torch.bfloat16 and out.item() == 0.5


# ---------------------------------------------------------------------------
# per channel, per group, errors
# ---------------------------------------------------------------------------


def test_per_channel_by_hand():
    w = torch.tensor([[0.5, -1.27, 0.254], [2.0, 1.2, -0.5]])
    q, scale, zero_point = helper.quantize_per_channel(w, bits=8, axis=0)
    assert torch.equal(q, torch.tensor([[50, -127, 25], [127, 76, -32]], dtype=torch.int8))
    assert scale.shape == (2, 1) and torch.equal(zero_point, torch.zeros(2, 1, dtype=torch.int32))
    assert torch.allclose(scale.flatten(), torch.tensor([1.27 / 127, 2.0 / 127]))


def test_per_channel_axis_1_and_asymmetric():
    w = torch.tensor([[0.0, -1.0], [3.0, 2.0]])
    q, scale, zero_point = helper.quantize_per_channel(w, bits=2, axis=1, symmetric=False)
    assert scale.shape == (1, 2)
    # column 0: range [0, 3] -> s = 1, z = -2; column 1: range [-1, 2] -> s = 1, z = round(-2 + 1) = -1
    assert torch.equal(zero_point, torch.tensor([[-2, -1]], dtype=torch.int32))
    assert torch.equal(q, torch.tensor([[-2, -2], [1, 1]], dtype=torch.int8))
    assert torch.allclose(helper.dequantize_per_channel(q, scale, zero_point), w)


def test_per_channel_rejects_bad_axis_and_shapes():
    with pytest.raises(ValueError, match="axis"):
        helper.quantize_per_channel(torch.ones(2, 3), axis=2)
    with pytest.raises(ValueError, match="dims"):
        helper.dequantize_per_channel(torch.ones(2, 3, dtype=torch.int8), torch.ones(2), torch.zeros(2))


def test_per_group_by_hand():
    w = torch.tensor([[0.1, -0.7, 0.3, 0.2, 8.0, -1.0, 2.0, 0.5]])
    q, scale = helper.quantize_per_group(w, 4, bits=4)
    assert torch.equal(q, torch.tensor([[1, -7, 3, 2, 7, -1, 2, 0]], dtype=torch.int8))
    assert scale.shape == (1, 2)
    assert torch.allclose(scale, torch.tensor([[0.1, 8.0 / 7]]))
    assert torch.allclose(helper.dequantize_per_group(q, scale), w, atol=scale.max().item() / 2)


def test_per_group_validation():
    w = torch.ones(2, 6)
    with pytest.raises(ValueError, match="divide"):
        helper.quantize_per_group(w, 4)
    with pytest.raises(ValueError, match="2-D"):
        helper.quantize_per_group(torch.ones(2, 2, 2), 2)
    with pytest.raises(ValueError, match="group_size"):
        helper.quantize_per_group(w, 0)
    with pytest.raises(ValueError, match="symmetric"):
        helper.quantize_per_group(w, 3, symmetric=False)
    with pytest.raises(ValueError, match="divide"):
        helper.dequantize_per_group(torch.ones(2, 6, dtype=torch.int8), torch.ones(2, 4))


def test_outlier_granularity_beats_per_tensor():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.02
    w[3, 5] = 10.0  # one huge outlier
    s, z = helper.linear_q_params(w, bits=4, symmetric=True)
    e_tensor = helper.quantization_error(w, helper.linear_dequantize(helper.linear_quantize(w, s, z, 4), s, z))["mse"]
    e_channel = helper.quantization_error(w, helper.dequantize_per_channel(*helper.quantize_per_channel(w, 4)))["mse"]
    e_group = helper.quantization_error(w, helper.dequantize_per_group(*helper.quantize_per_group(w, 32, 4)))["mse"]
    assert e_channel < e_tensor / 10  # only the outlier's row keeps a coarse grid
    assert e_group < e_channel / 2  # and with groups only the outlier's group does


def test_quantization_error_values_and_validation():
    err = helper.quantization_error(torch.tensor([1.0, 2.0]), torch.tensor([1.5, 2.0]))
    assert err == {"mse": 0.125, "max_abs": 0.5}
    with pytest.raises(ValueError, match="shapes"):
        helper.quantization_error(torch.ones(2), torch.ones(3))


# ---------------------------------------------------------------------------
# W8A16Linear and replace_linear_with_w8a16
# ---------------------------------------------------------------------------


def test_w8a16_linear_matches_dequantized_reference():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    layer = helper.W8A16Linear.from_linear(linear)
    assert layer.int8_weights.dtype == torch.int8 and layer.int8_weights.shape == (8, 16)
    assert layer.scales.dtype == torch.float32 and layer.scales.shape == (8,)
    x = torch.randn(3, 16)
    w_hat = layer.int8_weights.float() * layer.scales[:, None]
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ w_hat.T + linear.bias, atol=1e-5)
        assert torch.allclose(layer(x), linear(x), atol=0.05)


def test_w8a16_sizes_counted_as_buffers():
    layer = helper.W8A16Linear.from_linear(nn.Linear(16, 8))
    assert {n for n, _ in layer.named_buffers()} == {"int8_weights", "scales", "bias"}
    assert helper.model_size(layer) == 16 * 8 * 1 + 8 * 4 + 8 * 4
    no_bias = helper.W8A16Linear.from_linear(nn.Linear(16, 8, bias=False))
    assert no_bias.bias is None and helper.model_size(no_bias) == 16 * 8 + 8 * 4


def test_w8a16_bf16_keeps_activation_dtype():
    linear = nn.Linear(16, 8).to(torch.bfloat16)
    layer = helper.W8A16Linear.from_linear(linear)
    assert layer.scales.dtype == torch.bfloat16
    out = layer(torch.randn(2, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_w8a16_validation():
    with pytest.raises(TypeError):
        helper.W8A16Linear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(TypeError):
        helper.W8A16Linear(4, 4, dtype=torch.int8)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.lm_head = nn.Linear(8, 10, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(self.block(self.embed(ids)))


def test_replace_linear_default_excludes_tied_lm_head():
    torch.manual_seed(0)
    model = _Tied()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        before = model(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when lm_head is excluded
        out = helper.replace_linear_with_w8a16(model)
    assert out is model
    assert isinstance(model.block[0], helper.W8A16Linear) and isinstance(model.block[2], helper.W8A16Linear)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.embed.weight
    with torch.no_grad():
        assert torch.allclose(model(ids), before, atol=0.05)


def test_replace_linear_tied_head_warns_and_exclude_forms():
    with pytest.warns(UserWarning, match="tied"):
        model = helper.replace_linear_with_w8a16(_Tied(), exclude=())
    assert isinstance(model.lm_head, helper.W8A16Linear)
    with pytest.warns(UserWarning, match="tied"):  # lm_head is not excluded here
        model = helper.replace_linear_with_w8a16(_Tied(), exclude="block")  # a whole subtree, as a string
    assert type(model.block[0]) is nn.Linear and type(model.block[2]) is nn.Linear
    model = helper.replace_linear_with_w8a16(_Tied(), exclude=("lm_head", "block.2"))
    assert isinstance(model.block[0], helper.W8A16Linear) and type(model.block[2]) is nn.Linear


def test_replace_linear_validation():
    with pytest.raises(TypeError):
        helper.replace_linear_with_w8a16("model")
    with pytest.raises(TypeError):
        helper.replace_linear_with_w8a16(_Tied(), exclude=(1,))
    with pytest.raises(ValueError, match="from_linear"):
        helper.replace_linear_with_w8a16(nn.Linear(2, 2), exclude=())


# ---------------------------------------------------------------------------
# pack_weights, unpack_weights
# ---------------------------------------------------------------------------


def test_pack_by_hand():
    assert helper.pack_weights(torch.tensor([1, 0, 3, 2]), 2).tolist() == [0b10110001]  # 177
    assert helper.pack_weights(torch.tensor([0x3, 0xA]), 4).tolist() == [0xA3]
    assert helper.pack_weights(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [0b10000001]
    assert helper.pack_weights(torch.tensor([3, 1, 2]), 2).tolist() == [0b100111]  # padded with 0


def test_pack_bits_are_the_widths_whose_codes_fill_a_byte_exactly():
    assert sorted(helper.PACK_BITS) == [b for b in range(1, 8) if 8 % b == 0]  # 1, 2, 4: not 3, 5, 6, 7 (or 8)
    for bits in range(0, 10):
        if bits not in helper.PACK_BITS:
            with pytest.raises(ValueError, match="bits"):
                helper.pack_weights(torch.tensor([0]), bits)


@pytest.mark.parametrize("bits", helper.PACK_BITS)
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 4, 8)])
def test_pack_unpack_round_trip(bits, shape):
    torch.manual_seed(bits)
    q = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    packed = helper.pack_weights(q, bits)
    per_byte = 8 // bits
    assert packed.dtype == torch.uint8 and packed.numel() == -(-q.numel() // per_byte)
    assert torch.equal(helper.unpack_weights(packed, bits, shape), q)
    assert torch.equal(helper.unpack_weights(packed, bits, q.numel()), q.flatten())


def test_pack_accepts_int64_and_int8():
    assert helper.pack_weights(torch.tensor([15, 0], dtype=torch.int64), 4).item() == 15
    assert helper.pack_weights(torch.tensor([15, 0], dtype=torch.int8), 4).item() == 15


def test_pack_validation():
    with pytest.raises(TypeError):
        helper.pack_weights(torch.tensor([1.0, 2.0]), 2)
    with pytest.raises(TypeError):
        helper.pack_weights([1, 2], 2)
    with pytest.raises(ValueError, match="values"):
        helper.pack_weights(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="values"):
        helper.pack_weights(torch.tensor([-1]), 4)
    for bits in (3, 8, 0, True):
        with pytest.raises(ValueError, match="bits"):
            helper.pack_weights(torch.tensor([1]), bits)
    with pytest.raises(ValueError, match="empty"):
        helper.pack_weights(torch.empty(0, dtype=torch.uint8), 2)


def test_unpack_validation():
    with pytest.raises(TypeError):
        helper.unpack_weights(torch.tensor([1], dtype=torch.int8), 2, 4)
    with pytest.raises(ValueError, match="bits"):
        helper.unpack_weights(torch.tensor([1], dtype=torch.uint8), 3, 2)
    with pytest.raises(ValueError, match="cannot hold"):
        helper.unpack_weights(torch.tensor([1], dtype=torch.uint8), 2, 5)
    with pytest.raises(ValueError, match="cannot hold"):
        helper.unpack_weights(torch.tensor([1, 2], dtype=torch.uint8), 2, 4)
