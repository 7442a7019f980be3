"""Lesson 5 (optimum-quanto): what a quanto weight reports and holds, and the size breakdown of a model.

The byte counts of quanto layers and models (core/sizes.py's model_size) are in test_core_sizes.py."""

import pytest
import torch
from optimum.quanto import freeze, qint4, qint8, quantize
from torch import nn

import helper


def _quantized(module: nn.Module, qtype) -> nn.Module:
    quantize(module, weights=qtype)
    freeze(module)
    return module


def _linear(in_features: int, out_features: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(in_features, out_features))


def test_quantized_weight_reports_float32():
    weight = _quantized(_linear(64, 32), qint8)[0].weight
    assert weight.dtype == torch.float32  # what naive byte counters see
    assert weight._data.dtype == torch.int8
    assert tuple(weight._scale.shape) == (32, 1)


def test_breakdown_of_int8_linear():
    model = _quantized(_linear(64, 32), qint8)
    parts = helper.quanto_size_breakdown(model)
    assert parts == {"integer data": 2048, "scales and shifts": 128, "unquantized tensors": 128 + 8}
    assert sum(parts.values()) == helper.model_size(model)


def test_breakdown_of_plain_model_and_bad_input():
    model = _linear(3, 2)
    assert helper.quanto_size_breakdown(model) == {
        "integer data": 0,
        "scales and shifts": 0,
        "unquantized tensors": (3 * 2 + 2) * 4,
    }
    with pytest.raises(TypeError, match="nn.Module"):
        helper.quanto_size_breakdown(torch.zeros(3))


def test_breakdown_adds_up_to_model_size_for_quanto_int4():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 32), nn.Linear(32, 256))
    quantize(model, weights=qint4)
    freeze(model)
    parts = helper.quanto_size_breakdown(model)
    assert sum(parts.values()) == helper.model_size(model)
    assert parts[helper.DATA] == (256 * 32 + 32 * 256) // 2  # two 4-bit codes per byte
    # the fp32 biases, and two fp32 scalars per QLinear (input_scale, output_scale: unused by weight-only)
    assert parts[helper.PLAIN] == (32 + 256) * 4 + 2 * 2 * 4
