"""Tests for Lesson 5 (optimum-quanto): real sizes of quanto-quantized layers and models."""

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


def test_int8_linear_size_by_hand():
    model = _quantized(_linear(64, 32), qint8)
    data = 64 * 32 * 1  # one int8 per weight
    scales = 32 * 4  # one float32 scale per output row
    bias = 32 * 4  # the bias stays float32
    buffers = 2 * 4  # QLinear's scalar input_scale and output_scale (float32)
    assert helper.model_size(model) == data + scales + bias + buffers == 2312


def test_int4_linear_size_by_hand():
    model = _quantized(_linear(256, 32), qint4)
    groups = 32 * 256 // 128  # quanto groups 128 consecutive weights
    data = 32 * 256 // 2  # two 4-bit values per byte
    scales_and_shifts = 2 * groups * 4  # one float32 scale and one float32 shift per group
    expected = data + scales_and_shifts + 32 * 4 + 2 * 4
    assert helper.model_size(model) == expected == 4744


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


def test_get_memory_footprint_overstates_quanto_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    fp32_footprint = model.get_memory_footprint()
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    _quantized(model, qint8)
    # quanto weights report float32, so the footprint only grows by the two scalar buffers per layer
    assert model.get_memory_footprint() == fp32_footprint + 8 * n_linear
    assert helper.model_size(model) < 0.4 * model.get_memory_footprint()


@pytest.mark.slow
def test_flan_t5_small_int8_matches_course_figure():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config.from_json_file(helper.asset_path("configs/flan-t5-small.json"))
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config)
    lm_head = config.vocab_size * config.d_model * 4
    # transformers 5 ties lm_head to the embedding: the course's untied fp32 model had one more
    assert helper.model_size(model) + lm_head == 307_844_608
    _quantized(model, qint8)
    assert helper.model_size(model) == 126_828_680  # the course's 0.12682868 GB
