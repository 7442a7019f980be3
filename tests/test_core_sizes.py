"""Byte counts of plain and quantized tensors, against independent truths."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import helper


@pytest.mark.parametrize(
    "dtype, expected",
    [
        (torch.float64, 8),
        (torch.float32, 4),
        (torch.bfloat16, 2),
        (torch.float16, 2),
        (torch.float8_e4m3fn, 1),
        (torch.int8, 1),
        (torch.uint8, 1),
        (torch.bool, 1),
        (torch.uint4, 0.5),
        (torch.int4, 0.5),
        (torch.uint2, 0.25),
        (torch.uint1, 0.125),
    ],
)
def test_dtype_byte_size(dtype, expected):
    assert helper.dtype_byte_size(dtype) == expected


def test_dtype_byte_size_rejects_non_dtype():
    with pytest.raises(TypeError, match="torch.dtype"):
        helper.dtype_byte_size("float32")


def test_tensor_nbytes_rejects_non_tensor():
    with pytest.raises(TypeError, match="tensor"):
        helper.tensor_nbytes([1, 2, 3])


def test_bool_tensor_takes_one_byte_per_element():
    # torch stores bool as one byte each (not one bit), and so must the count.
    flags = torch.zeros(100, dtype=torch.bool)
    assert helper.tensor_nbytes(flags) == flags.untyped_storage().nbytes() == 100


def _safetensors_payload(path) -> int:
    """Bytes of tensor data in a safetensors file: file size minus the 8-byte length and header."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    offsets = [v["data_offsets"] for k, v in header.items() if k != "__metadata__"]
    assert max(end for _, end in offsets) == len(raw) - 8 - header_len
    return len(raw) - 8 - header_len


def test_plain_model_size_matches_safetensors_file(tmp_path):
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 8), nn.LayerNorm(8))
    model[1].to(torch.bfloat16)
    model.register_buffer("mask", torch.ones(7, dtype=torch.bool))
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    assert helper.model_size(model) == _safetensors_payload(path)


def test_module_sizes_nest_and_count_shared_weights_once():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied, as in SmolLM2's lm_head
    sizes = helper.compute_module_sizes(model)
    assert sizes["0"] == 10 * 4 * 4
    assert sizes[""] == 10 * 4 * 4


def test_dummy_model_is_44_bytes():
    # 11 parameter tensors: embedding 2x2, three linears (2x2 + 2), two layernorms (2 + 2)
    assert helper.model_size(helper.DummyModel()) == (4 + 3 * 6 + 2 * 4) * 4


def test_compute_module_sizes_rejects_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        helper.compute_module_sizes(torch.zeros(3))


def test_quanto_int8_linear_counts_int8_data_and_scales():
    from optimum.quanto import freeze, qint8, quantize

    model = nn.Sequential(nn.Linear(64, 32))
    quantize(model, weights=qint8)
    freeze(model)
    assert model[0].weight.dtype == torch.float32  # what it reports ...
    data, scales, bias, io_scales = 32 * 64 * 1, 32 * 4, 32 * 4, 2 * 4
    assert helper.model_size(model) == data + scales + bias + io_scales  # ... and what it holds


def test_quanto_int4_linear_counts_packed_nibbles_scales_and_shifts():
    from optimum.quanto import freeze, qint4, quantize

    model = nn.Sequential(nn.Linear(256, 32))
    quantize(model, weights=qint4)
    freeze(model)
    groups = 32 * 256 // 128  # quanto's default group size is 128
    packed, scales, shifts, bias, io_scales = 32 * 256 // 2, groups * 4, groups * 4, 32 * 4, 2 * 4
    assert helper.model_size(model) == packed + scales + shifts + bias + io_scales


def test_one_walk_counts_every_packed_weight_of_a_deep_torch_ao_model():
    """Regression: 60 dynamic-int8 layers whose packed weights are temporaries (reused ids)."""
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(60)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    names = [name for name, _ in helper.unique_module_tensors(qmodel)]
    assert sum(name.endswith("_packed_params.weight") for name in names) == 60
    # per layer: 256 int8 weights + per-tensor float64 scale and int64 zero point + 16 fp32 biases
    assert helper.model_size(qmodel) == 60 * (256 + 16 + 16 * 4)
    parts = helper.quanto_size_breakdown(qmodel)
    assert parts == {helper.DATA: 60 * 256, helper.SCALES: 60 * 16, helper.PLAIN: 60 * 16 * 4}


def test_breakdown_adds_up_to_model_size_for_quanto_int4():
    from optimum.quanto import freeze, qint4, quantize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 32), nn.Linear(32, 256))
    quantize(model, weights=qint4)
    freeze(model)
    parts = helper.quanto_size_breakdown(model)
    assert sum(parts.values()) == helper.model_size(model)
    assert parts[helper.DATA] == (256 * 32 + 32 * 256) // 2  # two 4-bit codes per byte
    # the fp32 biases, and two fp32 scalars per QLinear (input_scale, output_scale: unused by weight-only)
    assert parts[helper.PLAIN] == (32 + 256) * 4 + 2 * 2 * 4
