"""Lesson 7: bitsandbytes sizes, counted by hand, and the transformers 5 loading API."""

import logging
import math

import pytest
import torch
from torch import nn

import helper

# bitsandbytes logs a warning at import on CPUs with AVX512-BF16 when the optional `kernels`
# package (a Hub download) is missing; it is irrelevant to these tests.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

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


def _linear(out_features: int = 128, in_features: int = 64, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features, bias=bias)


def test_nf4_linear_64x128_bytes_by_hand():
    layer = helper.bnb_quantize_linear(_linear(), "nf4")
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert layer.weight.dtype == torch.uint8 and tuple(layer.weight.shape) == (4096, 1)
    assert helper.tensor_nbytes(layer.weight) == 4096 + 128 * 4 + 64 == 4672
    assert helper.tensor_nbytes(layer.weight) == nf4_bytes(128, 64)
    assert helper.model_size(layer) == 4672 + 128 * 4  # plus the fp32 bias


def test_fp4_holds_the_same_bytes_as_nf4():
    fp4 = helper.bnb_quantize_linear(_linear(), "fp4")
    assert fp4.weight.quant_state.quant_type == "fp4"
    assert helper.tensor_nbytes(fp4.weight) == nf4_bytes(128, 64)


def test_double_quant_tiny_layer_costs_more_than_it_saves():
    layer = helper.bnb_quantize_linear(_linear(), "nf4", double_quant=True)
    state = layer.weight.quant_state
    assert state.nested and state.absmax.dtype == torch.uint8 and state.state2 is not None
    expected = 4096 + 128 + 4 + 4 + 1024 + 64
    assert helper.tensor_nbytes(layer.weight) == expected == nf4_double_quant_bytes(128, 64) == 5320
    assert expected > nf4_bytes(128, 64)


def test_double_quant_saves_on_a_real_sized_layer():
    linear = _linear(1536, 576, bias=False)  # a SmolLM2-135M MLP projection
    single = helper.tensor_nbytes(helper.bnb_quantize_linear(linear, "nf4").weight)
    double = helper.tensor_nbytes(helper.bnb_quantize_linear(linear, "nf4", double_quant=True).weight)
    assert single == 442_368 + 13_824 * 4 + 64 == nf4_bytes(1536, 576)
    assert double == 442_368 + 13_824 + 4 + 54 * 4 + 1024 + 64 == nf4_double_quant_bytes(1536, 576)
    assert double < single


def test_int8_linear_bytes_and_accuracy():
    linear = _linear()
    layer = helper.bnb_quantize_linear(linear, "int8")
    assert isinstance(layer, bnb.nn.Linear8bitLt)
    assert layer.weight.dtype == torch.int8 and tuple(layer.weight.shape) == (128, 64)
    assert layer.weight.SCB.shape == (128,)
    assert helper.tensor_nbytes(layer.weight) == 8192 + 512 == int8_bytes(128, 64)
    x = torch.randn(4, 64)
    with torch.no_grad():
        err = (layer(x) - linear(x)).abs().max().item()
    assert 0 < err < 0.05  # quantized, but close


def test_bnb_quantize_linear_rejects_bad_input():
    with pytest.raises(TypeError, match="nn.Linear"):
        helper.bnb_quantize_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="mode"):
        helper.bnb_quantize_linear(_linear(), "int4")
    with pytest.raises(ValueError, match="double quantization"):
        helper.bnb_quantize_linear(_linear(), "int8", double_quant=True)


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


def test_load_in_4bit_argument_was_removed(tiny_llama_dir):
    with pytest.raises(TypeError, match="load_in_4bit"):
        transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, load_in_4bit=True)
    with pytest.raises(TypeError, match="load_in_8bit"):
        transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, load_in_8bit=True)


def test_detach_from_checkpoint_copies_the_views_of_the_file_and_keeps_ties(tiny_llama, tmp_path):
    """A bitsandbytes load of a saved tiny Llama: after detaching, no parameter lives in the mapped file."""
    model, ids = tiny_llama
    model.save_pretrained(tmp_path)
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["lm_head"])
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cpu")
    mapped = [(int(a, 16), int(b, 16)) for a, b in _file_ranges(tmp_path / "model.safetensors")]
    in_file = lambda t: any(a <= t.untyped_storage().data_ptr() < b for a, b in mapped)
    plain = [p for p in loaded.parameters() if type(p) is nn.Parameter]
    assert mapped and any(in_file(p) for p in plain)  # from_pretrained left views of the file
    with torch.no_grad():
        before = loaded(ids).logits
    copied = helper.detach_from_checkpoint(loaded)
    assert copied == sum(helper.tensor_nbytes(p) for p in plain)
    assert not any(in_file(p) for p in loaded.parameters() if type(p) is nn.Parameter)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # the tie survives
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)  # same values, now in the process's own memory
    with pytest.raises(TypeError, match="nn.Module"):
        helper.detach_from_checkpoint("model")


def _file_ranges(path):
    """Address ranges where this process maps `path` (from /proc/self/maps)."""
    with open("/proc/self/maps") as maps:
        return [line.split()[0].split("-") for line in maps if line.rstrip().endswith(str(path))]
