"""core/sizes.py: byte counts of plain and quantized tensors and models, against independent truths (files on
disk, hand counts of what each library stores)."""

import json
import math
import struct
import warnings

import pytest
import torch
import transformers
from optimum.quanto import freeze, qint4, qint8, quantize
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


def test_tensor_parts_of_each_storage_by_hand():
    plain = torch.zeros(3, 5, dtype=torch.bfloat16)
    assert list(helper.tensor_parts(plain)) == [(helper.PLAIN, 3 * 5 * 2)]
    assert list(helper.tensor_parts(torch.zeros(7, dtype=torch.int4))) == [(helper.DATA, 4)]  # 3.5 bytes, rounded up
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's quantized tensors are deprecated
        per_tensor = torch.quantize_per_tensor(w, 0.1, 0, torch.quint8)
        scales, zeros = torch.full((4,), 0.05, dtype=torch.float64), torch.zeros(4, dtype=torch.int64)
        per_channel = torch.quantize_per_channel(w, scales, zeros, 0, torch.qint8)
    # one byte per weight, then one float64 scale and one int64 zero point for the tensor or for each row
    assert list(helper.tensor_parts(per_tensor)) == [(helper.DATA, 32), (helper.SCALES, 8 + 8)]
    assert list(helper.tensor_parts(per_channel)) == [(helper.DATA, 32), (helper.SCALES, 4 * 8 + 4 * 8)]
    quanto = _quantized(nn.Sequential(nn.Linear(16, 4)), qint8)[0].weight
    assert list(helper.tensor_parts(quanto)) == [(helper.DATA, 4 * 16), (helper.SCALES, 4 * 4)]  # fp32 row scales
    nf4 = helper.bnb_quantize_linear(nn.Linear(64, 128), "nf4").weight
    # packed codes, one fp32 absmax per block of 64, the 16-entry fp32 code table
    assert list(helper.tensor_parts(nf4)) == [
        (helper.DATA, 128 * 64 // 2),
        (helper.SCALES, 128 * 4),
        (helper.SCALES, 64),
    ]


def test_named_module_tensors_finds_torch_aos_packed_weights_and_recurses_only_when_asked():
    model = _quantize_dynamic(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3, bias=False)))
    assert list(helper.named_module_tensors(model)) == []  # the Sequential itself holds nothing
    found = {name: (tuple(t.shape), t.dtype) for name, t in helper.named_module_tensors(model, recurse=True)}
    assert found == {
        "0._packed_params.weight": ((4, 8), torch.qint8),
        "0._packed_params.bias": ((4,), torch.float32),
        "2._packed_params.weight": ((3, 4), torch.qint8),  # no bias: no bias entry
    }
    plain = nn.Linear(3, 2)
    plain.register_buffer("mask", torch.ones(2))
    assert [name for name, _ in helper.named_module_tensors(plain)] == ["weight", "bias", "mask"]


@pytest.mark.parametrize(
    "n, text", [(0, "0.0 MB"), (49_999, "0.0 MB"), (50_000, "0.1 MB"), (1_234_567, "1.2 MB"), (2.5e9, "2,500.0 MB")]
)
def test_format_bytes_in_megabytes_of_a_million_bytes(n, text):
    assert helper.format_bytes(n) == text


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


def test_compute_module_sizes_rejects_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        helper.compute_module_sizes(torch.zeros(3))


def test_quanto_int8_linear_counts_int8_data_and_scales():
    model = nn.Sequential(nn.Linear(64, 32))
    quantize(model, weights=qint8)
    freeze(model)
    assert model[0].weight.dtype == torch.float32  # what it reports ...
    data, scales, bias, io_scales = 32 * 64 * 1, 32 * 4, 32 * 4, 2 * 4
    assert helper.model_size(model) == data + scales + bias + io_scales  # ... and what it holds


def test_quanto_int4_linear_counts_packed_nibbles_scales_and_shifts():
    model = nn.Sequential(nn.Linear(256, 32))
    quantize(model, weights=qint4)
    freeze(model)
    groups = 32 * 256 // 128  # quanto's default group size is 128
    packed, scales, shifts, bias, io_scales = 32 * 256 // 2, groups * 4, groups * 4, 32 * 4, 2 * 4
    assert helper.model_size(model) == packed + scales + shifts + bias + io_scales


def test_one_walk_counts_every_packed_weight_of_a_deep_torch_ao_model():
    """Regression: 60 dynamic-int8 layers whose packed weights are temporaries (reused ids)."""
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


# --- optimum-quanto (Lesson 5): its weights report float32 and hold int8 or packed int4 data ---


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


# --- torch.ao and torchao (Lesson 6) -------------------------------------------------------


def _quantize_dynamic(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated (the lesson shows the warning)
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=8, n_layer=2, n_head=2, vocab_size=11, n_positions=16, tie_word_embeddings=True)
    return GPT2LMHeadModel(config).eval()


def test_model_size_torch_ao_dynamic_linear_by_hand():
    model = _quantize_dynamic(nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 3, bias=False)))
    # int8 weight + one float64 scale + one int64 zero point (per tensor) + fp32 bias
    expected = (8 * 4 + 8 + 8 + 4 * 4) + (4 * 3 + 8 + 8)
    assert helper.model_size(model) == expected


def test_model_size_torchao_int8_linear_by_hand():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    for config in (Int8DynamicActivationInt8WeightConfig(), Int8WeightOnlyConfig()):
        model = nn.Sequential(nn.Linear(8, 4))
        quantize_(model, config)
        # int8 weight + per-row fp32 scale + per-row int8 zero point + fp32 bias
        assert helper.model_size(model) == 8 * 4 + 4 * 4 + 4 * 1 + 4 * 4


def test_model_size_plain_and_tied():
    model = _tiny_gpt2()
    params = {id(p): p for p in model.parameters()}  # tied lm_head counts once
    assert helper.model_size(model) == sum(p.numel() * 4 for p in params.values())
    with pytest.raises(TypeError):
        helper.model_size("not a model")


# --- bitsandbytes through transformers (Lesson 7): hand counts of what a loaded model holds ---


FP32 = 4  # bytes of one float32
NF4_CODE = 16 * FP32  # the 16-entry 4-bit lookup table every Linear4bit holds
NESTED_CODE = 256 * FP32  # the 256-entry 8-bit table of the nested (double-quant) state


def nf4_bytes(out_features: int, in_features: int, blocksize: int = 64) -> int:
    """Hand count: two 4-bit codes per byte, one fp32 absmax per block, the code table."""
    n = out_features * in_features
    return n // 2 + math.ceil(n / blocksize) * FP32 + NF4_CODE


def nf4_double_quant_bytes(out_features: int, in_features: int, blocksize: int = 64, nested: int = 256) -> int:
    """Hand count with double quantization: absmax as uint8 + one fp32 offset + a nested fp32 absmax per 256."""
    n = out_features * in_features
    blocks = math.ceil(n / blocksize)
    return n // 2 + blocks * 1 + FP32 + math.ceil(blocks / nested) * FP32 + NESTED_CODE + NF4_CODE


def int8_bytes(out_features: int, in_features: int) -> int:
    """Hand count: one int8 per weight and one fp32 scale (SCB) per output row."""
    return out_features * in_features + out_features * FP32


def test_the_hand_counts_give_lesson_7s_worked_examples():
    """The formulas above against the byte counts Lesson 7 works out for single layers (its tests hold them)."""
    assert nf4_bytes(128, 64) == 4096 + 128 * 4 + 64 == 4672
    assert nf4_double_quant_bytes(128, 64) == 4096 + 128 + 4 + 4 + 1024 + 64 == 5320
    assert nf4_bytes(1536, 576) == 442_368 + 13_824 * 4 + 64
    assert nf4_double_quant_bytes(1536, 576) == 442_368 + 13_824 + 4 + 54 * 4 + 1024 + 64
    assert int8_bytes(128, 64) == 8192 + 512


# A tiny Llama (random weights: fine for SIZE tests) saved and reloaded through from_pretrained.
HIDDEN, INTER, VOCAB = 64, 128, 256
LINEARS = [(HIDDEN, HIDDEN)] * 4 + [(INTER, HIDDEN)] * 2 + [(HIDDEN, INTER)]  # q k v o, gate up, down


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_llama")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _load(folder, **quant):
    config = transformers.BitsAndBytesConfig(**quant)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu")


def _other_fp32_bytes() -> int:
    """Embedding, untied lm_head (bitsandbytes skips it), 3 RMSNorms and 2 rotary buffers of 16."""
    return (2 * VOCAB * HIDDEN + 3 * HIDDEN + 2 * (HIDDEN // 2 // 2)) * FP32


def test_tiny_llama_fp32_size(tiny_llama_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    linear_bytes = sum(o * i for o, i in LINEARS) * FP32
    assert helper.model_size(model) == model.get_memory_footprint() == linear_bytes + _other_fp32_bytes()


@pytest.mark.parametrize(
    "quant, per_linear",
    [
        (dict(load_in_8bit=True), int8_bytes),
        (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"), nf4_bytes),
        (dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"), nf4_bytes),
        (dict(load_in_4bit=True, bnb_4bit_use_double_quant=True), nf4_double_quant_bytes),
    ],
)
def test_tiny_llama_quantized_size_by_hand(tiny_llama_dir, quant, per_linear):
    model = _load(tiny_llama_dir, **quant)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.dtype == torch.float32
    expected = sum(per_linear(o, i) for o, i in LINEARS) + _other_fp32_bytes()
    assert helper.model_size(model) == expected
    # get_memory_footprint counts only the parameters' own storage: it misses the scales
    weights_only = sum(o * i for o, i in LINEARS) // (1 if "load_in_8bit" in quant else 2)
    assert model.get_memory_footprint() == weights_only + _other_fp32_bytes()
    assert model.get_memory_footprint() < helper.model_size(model)
