"""Lesson 1 helpers: bit layouts of floats and exact-integer limits."""

import pytest
import torch

import helper


@pytest.mark.parametrize(
    "value, dtype, expected",
    [
        (1.0, torch.float32, ("0", "01111111", "0" * 23)),
        (-2.0, torch.bfloat16, ("1", "10000000", "0000000")),
        (-6.5, torch.float16, ("1", "10001", "1010000000")),  # -1.625 * 2**2
        (0.1, torch.float16, ("0", "01011", "1001100110")),  # rounded to nearest, 0x2E66
        (448.0, torch.float8_e4m3fn, ("0", "1111", "110")),  # e4m3fn's largest finite value
        (float("inf"), torch.float16, ("0", "11111", "0000000000")),
        (-0.0, torch.float64, ("1", "0" * 11, "0" * 52)),
    ],
)
def test_float_bits_known_patterns(value, dtype, expected):
    assert helper.float_bits(value, dtype) == expected


def test_float_bits_agrees_with_the_raw_bf16_pattern():
    values = torch.tensor([3.14159, -1e-3, 70000.0], dtype=torch.bfloat16)
    for value, raw in zip(values.tolist(), values.view(torch.int16).tolist()):
        assert "".join(helper.float_bits(value, torch.bfloat16)) == format(raw & 0xFFFF, "016b")


@pytest.mark.parametrize(
    "dtype",
    [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2],
)
def test_float_bits_split_matches_the_bias_in_the_pattern_of_one(dtype):
    """1.0 stores its exponent as the bias 2**(e-1) - 1, i.e. a 0 then e-1 ones: the eps-based split must agree."""
    sign, exponent, mantissa = helper.float_bits(1.0, dtype)
    raw = "".join((sign, exponent, mantissa))
    assert sign == "0" and set(mantissa) == {"0"}
    assert exponent == "0" + "1" * (raw.count("1")), (dtype, raw)
    assert len(raw) == torch.finfo(dtype).bits


@pytest.mark.parametrize("dtype, n", [(torch.bfloat16, 256), (torch.float16, 2048), (torch.float32, 2**24)])
def test_largest_exact_integer_is_the_last_before_a_gap(dtype, n):
    assert helper.largest_exact_integer(dtype) == n
    ints = torch.arange(n - 4, n + 2, dtype=torch.float64)
    survived = ints.to(dtype).double() == ints
    assert survived[:-1].all() and not survived[-1]  # n+1 is the first integer lost


@pytest.mark.parametrize("bad", [torch.int8, "float32", None])
def test_float_helpers_reject_non_float_dtypes(bad):
    with pytest.raises(TypeError, match="floating torch.dtype"):
        helper.float_bits(1.0, bad)
    with pytest.raises(TypeError, match="floating torch.dtype"):
        helper.largest_exact_integer(bad)
