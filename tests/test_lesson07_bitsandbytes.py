"""Lesson 7: bitsandbytes layers built from an nn.Linear (their bytes counted by hand), the transformers 5
loading API, and detaching a loaded model from its checkpoint file.

What a whole model loaded through transformers' BitsAndBytesConfig holds is counted in test_core_sizes.py."""

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
import transformers
from torch import nn

import helper


def _linear(out_features: int = 128, in_features: int = 64, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features, bias=bias)


def test_nf4_linear_64x128_bytes_by_hand():
    layer = helper.bnb_quantize_linear(_linear(), "nf4")
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert layer.weight.dtype == torch.uint8 and tuple(layer.weight.shape) == (4096, 1)
    # two 4-bit codes per byte, one fp32 absmax per block of 64, the 16-entry fp32 code table
    assert helper.tensor_nbytes(layer.weight) == 4096 + 128 * 4 + 64 == 4672
    assert helper.model_size(layer) == 4672 + 128 * 4  # plus the fp32 bias


def test_fp4_holds_the_same_bytes_as_nf4():
    fp4 = helper.bnb_quantize_linear(_linear(), "fp4")
    assert fp4.weight.quant_state.quant_type == "fp4"
    assert helper.tensor_nbytes(fp4.weight) == 4096 + 128 * 4 + 64


def test_double_quant_tiny_layer_costs_more_than_it_saves():
    layer = helper.bnb_quantize_linear(_linear(), "nf4", double_quant=True)
    state = layer.weight.quant_state
    assert state.nested and state.absmax.dtype == torch.uint8 and state.state2 is not None
    # codes, uint8 absmax per block, an fp32 offset, one nested fp32 absmax, the 256-entry nested table, the code table
    expected = 4096 + 128 + 4 + 4 + 1024 + 64
    assert helper.tensor_nbytes(layer.weight) == expected == 5320
    assert expected > helper.tensor_nbytes(helper.bnb_quantize_linear(_linear(), "nf4").weight) == 4672


def test_double_quant_saves_on_a_real_sized_layer():
    linear = _linear(1536, 576, bias=False)  # a SmolLM2-135M MLP projection
    single = helper.tensor_nbytes(helper.bnb_quantize_linear(linear, "nf4").weight)
    double = helper.tensor_nbytes(helper.bnb_quantize_linear(linear, "nf4", double_quant=True).weight)
    assert single == 442_368 + 13_824 * 4 + 64  # 884,736 codes; 13,824 blocks of 64
    assert double == 442_368 + 13_824 + 4 + 54 * 4 + 1024 + 64  # 54 nested blocks of 256 absmax values
    assert double < single


def test_int8_linear_bytes_and_accuracy():
    linear = _linear()
    layer = helper.bnb_quantize_linear(linear, "int8")
    assert isinstance(layer, bnb.nn.Linear8bitLt)
    assert layer.weight.dtype == torch.int8 and tuple(layer.weight.shape) == (128, 64)
    assert layer.weight.SCB.shape == (128,)
    assert helper.tensor_nbytes(layer.weight) == 8192 + 512  # one int8 per weight, one fp32 scale (SCB) per row
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


@pytest.mark.parametrize("mode", helper.BNB_MODES)
def test_every_mode_holds_what_bitsandbytes_itself_computes_and_stays_close(mode):
    linear = _linear()
    layer = helper.bnb_quantize_linear(linear, mode)
    weight = linear.weight.detach()
    if mode == "int8":  # Int8Params quantizes the weight cast to fp16, one absmax per row
        cb, scb, _ = bnbf.int8_vectorwise_quant(weight.half())
        assert isinstance(layer, bnb.nn.Linear8bitLt)
        assert torch.equal(layer.weight.data, cb) and torch.equal(layer.weight.SCB, scb)
    else:
        packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type=mode)
        assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_state.quant_type == mode
        assert torch.equal(layer.weight.data, packed) and torch.equal(layer.weight.quant_state.absmax, state.absmax)
    assert not layer.training  # eval mode: the activations go through the quantized path
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        error = ((layer(x) - linear(x)).abs().max() / linear(x).abs().max()).item()
    assert 0 < error < (0.02 if mode == "int8" else 0.15)  # measured: 0.009 (int8), 0.09 (nf4), 0.10 (fp4)


def test_load_in_4bit_argument_was_removed(tiny_llama, tmp_path):
    tiny_llama[0].save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="load_in_4bit"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, load_in_4bit=True)
    with pytest.raises(TypeError, match="load_in_8bit"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, load_in_8bit=True)


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
    # the fp32 tensors bitsandbytes left alone: the 96 x 64 embedding (lm_head is tied to it: counted once)
    # and the 64 weights of 2 x 2 layer norms and the final norm
    assert copied == (96 * 64 + 5 * 64) * 4
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
