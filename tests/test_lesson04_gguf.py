"""Lesson 4 (GGUF): the from-scratch block formats against gguf-py, bit for bit, and their errors."""

import copy

import gguf
import numpy as np
import pytest
import torch
from torch import nn

import helper

T = gguf.GGMLQuantizationType


def hand_made_rows() -> torch.Tensor:
    """Blocks that exercise the edge cases: zeros, a constant, exact halves, negative extremes, ties."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 128, generator=g) * torch.rand(16, 1, generator=g) * 3
    x[0, :32] = 0.0  # scale 0: every code must still be defined
    x[1, :32] = 2.5  # constant block
    x[2, :32] = torch.arange(32) - 16.0  # integers: x / d lands on exact halves
    x[3, :32] = torch.linspace(-1, 1, 32)
    x[3, 7] = -4.0  # the largest magnitude is negative (Q4_0 keeps its sign)
    x[4, :32] = torch.tensor([1.0, -1.0] * 16)  # a tie between +max and -max
    x[5, :32] = 1e-6 * torch.arange(32)  # scale below fp16's normal range
    return x


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32)


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantize_matches_gguf_py_byte_for_byte(fmt):
    x = hand_made_rows()
    mine = helper.gguf_quantize(x, fmt).numpy()
    ref = gguf.quants.quantize(x.numpy(), T[fmt])
    assert mine.shape == ref.shape and mine.dtype == ref.dtype == np.uint8
    assert np.array_equal(mine, ref)


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q4_1", "Q4_K"])
def test_dequantize_matches_gguf_py_bit_for_bit_on_every_byte_pattern(fmt):
    f = helper.GGUF_FORMATS[fmt]
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 256, (64, f.type_size), dtype=torch.uint8, generator=g)
    raw[:, 0:2] = torch.tensor([0x00, 0x3C], dtype=torch.uint8)  # fp16 1.0: random scale bytes could be inf/nan
    if fmt in ("Q4_1", "Q4_K"):
        raw[:, 2:4] = torch.tensor([0x66, 0x2E], dtype=torch.uint8)  # fp16 0.1
    mine = helper.gguf_dequantize(raw, fmt).numpy()
    ref = gguf.quants.dequantize(raw.numpy(), T[fmt])
    assert mine.shape == ref.shape == (64, f.block_size)
    assert np.array_equal(bits(mine), bits(ref))


def test_one_q4_1_block_decoded_by_hand():
    # d = 0.5 (fp16 0x3800), m = -1.0 (fp16 0xBC00); byte j = code j | code (j + 16) << 4
    codes = list(range(16)) + [15 - i for i in range(16)]
    qs = [codes[j] | (codes[j + 16] << 4) for j in range(16)]
    block = torch.tensor([[0x00, 0x38, 0x00, 0xBC] + qs], dtype=torch.uint8)
    w = helper.gguf_dequantize(block, "Q4_1")[0]
    assert w.tolist() == [0.5 * c - 1.0 for c in codes]


def test_q4_0_block_decoded_by_hand():
    block = torch.tensor([[0x00, 0x40] + [0x8F] * 16], dtype=torch.uint8)  # d = 2.0; low 15, high 8
    assert helper.gguf_dequantize(block, "Q4_0")[0].tolist() == [14.0] * 16 + [0.0] * 16


def test_bits_per_weight_from_the_block_layout():
    bpw = {k: f.bits_per_weight for k, f in helper.GGUF_FORMATS.items()}
    assert bpw == {"Q8_0": 8.5, "Q4_0": 4.5, "Q4_1": 5.0, "Q4_K": 4.5}


def test_the_block_layouts_are_gguf_pys():
    for fmt, layout in helper.GGUF_FORMATS.items():
        assert isinstance(layout, helper.GGUFFormat)
        assert (layout.block_size, layout.type_size) == gguf.GGML_QUANT_SIZES[T[fmt]], fmt
    q6_k = helper.GGUFFormat(*gguf.GGML_QUANT_SIZES[T.Q6_K])  # a layout the course does not implement
    assert q6_k.bits_per_weight == 8 * 210 / 256 == 6.5625


def test_round_half_away_from_zero_is_c_roundf():
    x = torch.tensor([2.5, -2.5, 0.5, -0.5, 1.49999988, 0.49999997, 3.0])
    assert helper.round_half_away_from_zero(x).tolist() == [3.0, -3.0, 1.0, -1.0, 1.0, 0.0, 3.0]


def test_minmax_rtn_at_32_is_q4_1_and_larger_groups_lose():
    x = hand_made_rows()
    q4_1 = helper.gguf_dequantize(helper.gguf_quantize(x, "Q4_1"), "Q4_1")
    assert torch.equal(helper.blockwise_minmax_rtn(x, 32), q4_1)
    err = {g: (helper.blockwise_minmax_rtn(x, g) - x).pow(2).mean().item() for g in (32, 64, 128, None)}
    assert err[32] < err[64] < err[128] <= err[None] * 1.0001


def test_requantizing_dequantized_q4_1_gives_the_same_bytes():
    x = hand_made_rows()[6:]  # random rows
    blocks = helper.gguf_quantize(x, "Q4_1")
    again = helper.gguf_quantize(helper.gguf_dequantize(blocks, "Q4_1"), "Q4_1")
    assert (again == blocks).all(1).float().mean() > 0.95


def test_distinct_values_per_block():
    x = torch.tensor([[1.0] * 16 + [2.0] * 16, list(range(32))], dtype=torch.float32)
    assert helper.distinct_values_per_block(x).tolist() == [2, 32]


def test_unpermute_rope_rows_inverts_the_converter():
    w = torch.arange(12 * 3, dtype=torch.float32).reshape(12, 3)
    n_head = 2  # llama.cpp's converter: reshape(n_head, 2, dim/2, ...).swapaxes(1, 2)
    permuted = w.reshape(n_head, 2, 3, 3).swapaxes(1, 2).reshape(12, 3)
    assert torch.equal(helper.unpermute_rope_rows(permuted, n_head), w)


def test_gguf_name_to_hf():
    assert helper.gguf_name_to_hf("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert helper.gguf_name_to_hf("token_embd.weight") == "model.embed_tokens.weight"
    with pytest.raises(ValueError, match="not a Llama GGUF tensor name"):
        helper.gguf_name_to_hf("blk.3.attn_qkv.weight")


def test_gguf_linear_matches_dequantized_weights_and_counts_its_bytes():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 8, bias=True)
    layer = helper.GGUFLinear.from_linear(lin, "Q4_1")
    assert helper.model_size(layer) == 8 * 2 * 20 + 8 * 4  # 2 blocks of 20 bytes per row + fp32 bias
    x = torch.randn(3, 64)
    blocks = gguf.quants.quantize(lin.weight.detach().numpy(), T.Q4_1)  # gguf-py's bytes and its dequantization
    assert np.array_equal(layer.blocks.numpy(), blocks)
    w = torch.from_numpy(gguf.quants.dequantize(blocks, T.Q4_1))
    assert torch.equal(layer(x), torch.nn.functional.linear(x, w, lin.bias))


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda: helper.gguf_quantize(torch.ones(3, 30), "Q4_1"), "multiple of 32"),
        (lambda: helper.gguf_quantize(torch.ones(1, 32), "Q5_0"), "unknown GGUF format"),
        (lambda: helper.gguf_quantize(torch.ones(1, 256), "Q4_K"), "dequantize-only"),
        (lambda: helper.gguf_quantize(torch.tensor([[float("nan")] * 32]), "Q8_0"), "nan or inf"),
        (lambda: helper.gguf_dequantize(torch.zeros(1, 21, dtype=torch.uint8), "Q4_1"), "multiple of 20 bytes"),
        (lambda: helper.gguf_dequantize(torch.zeros(1, 20), "Q4_1"), "uint8"),
        (lambda: helper.blockwise_minmax_rtn(torch.ones(3, 48), 32), "dividing the 144 weights"),
        (lambda: helper.GGUFLinear(torch.zeros(4, 19, dtype=torch.uint8), "Q4_1", 32), "must be uint8"),
    ],
)
def test_bad_input_is_refused_clearly(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_integer_weights_are_refused():
    with pytest.raises(TypeError, match="floating-point"):
        helper.gguf_quantize(torch.ones(1, 32, dtype=torch.int32), "Q8_0")


@pytest.mark.slow
def test_every_tensor_of_the_packaged_file_round_trips():
    """All 272 tensors: dequantized (mine) == the course's cached model weights, and mine == gguf-py."""
    tensors = helper.read_gguf_tensors()
    model, _ = helper.load_smollm2()
    state = model.state_dict()
    kinds = {}
    for name, (kind, data) in tensors.items():
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind in helper.GGUF_FORMATS:
            mine = helper.gguf_dequantize(data, kind)
            ref = gguf.quants.dequantize(data.numpy(), T[kind])
            assert np.array_equal(bits(mine.numpy()), bits(ref)), name
            data = mine
        assert torch.equal(data.reshape(state[name].shape), state[name]), name
    assert kinds == {"Q4_1": 210, "F32": 61, "Q8_0": 1}


def test_nearest_level_codes_is_bucketize_with_ties_to_the_lower_level():
    midpoints = torch.tensor([0.5, 2.0])  # levels 0, 1, 3
    x = torch.tensor([-1.0, 0.0, 0.5, 0.6, 2.0, 2.1, 5.0])
    codes = helper.nearest_level_codes(x, midpoints)
    assert codes.dtype == torch.uint8
    assert codes.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert torch.equal(codes.long(), torch.bucketize(x, midpoints))


def _same_as_gguf_py(path):
    infos = helper.gguf_tensor_infos(path)
    tensors = gguf.GGUFReader(path).tensors
    assert list(infos) == [t.name for t in tensors]
    for t in tensors:
        assert infos[t.name] == {
            "type": t.tensor_type.name,
            "shape": tuple(int(n) for n in t.shape),
            "offset": int(t.data_offset),
            "n_bytes": int(t.n_bytes),
        }
    return infos


def test_gguf_tensor_infos_equal_gguf_py_on_the_packaged_file():
    infos = _same_as_gguf_py(helper.smollm2_gguf_path())
    assert len(infos) == 272 and infos["token_embd.weight"]["type"] == "Q8_0"


def test_gguf_tensor_infos_on_a_hand_written_file_with_every_value_kind(tmp_path):
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_custom_alignment(64)  # general.alignment, not the default 32: the data section moves
    writer.add_array("tokenizer.ggml.tokens", ["a", "bé", ""])  # strings of other lengths
    writer.add_array("some.floats", [0.5, 1.5])
    writer.add_array("nested", [[1, 2], [3]])  # an array of arrays
    writer.add_bool("flag", True)
    writer.add_float64("pi", 3.14159)
    writer.add_tensor("f32", np.arange(6, dtype=np.float32).reshape(2, 3))
    q4_1 = helper.gguf_quantize(torch.randn(2, 64), "Q4_1").numpy()
    writer.add_tensor("q4_1", q4_1, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    infos = _same_as_gguf_py(path)
    assert infos["q4_1"]["type"] == "Q4_1" and infos["q4_1"]["n_bytes"] == 2 * 2 * 20  # 2 rows of 2 blocks
    assert all(info["offset"] % 64 == 0 for info in infos.values())


def test_gguf_tensor_infos_refuses_what_is_not_a_whole_gguf_header(tmp_path):
    other = tmp_path / "not.gguf"
    other.write_bytes(b"PK\x03\x04" + bytes(40))
    with pytest.raises(ValueError, match="not a GGUF file"):
        helper.gguf_tensor_infos(other)
    wrong = tmp_path / "wrong.gguf"
    writer = gguf.GGUFWriter(str(wrong), "llama")
    writer.add_uint64("general.alignment", 64)  # the format says uint32
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match="must be a uint32"):
        helper.gguf_tensor_infos(wrong)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(helper.smollm2_gguf_path().read_bytes()[:5000])  # inside the tokenizer's strings
    with pytest.raises(ValueError, match="ends early"):
        helper.gguf_tensor_infos(cut)
    header = b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little")
    key = (1).to_bytes(8, "little") + b"k" + (9).to_bytes(4, "little")  # one key whose value is an array
    huge = tmp_path / "huge.gguf"
    huge.write_bytes(header + key + (9).to_bytes(4, "little") + (2**62).to_bytes(8, "little"))  # of 2**62 arrays
    with pytest.raises(ValueError, match="ends early"):
        helper.gguf_tensor_infos(huge)  # refused at once, not a loop over 2**62 elements


def test_replace_linear_with_gguf_requantizes_every_layer_but_lm_head_with_gguf_pys_bytes(tiny_llama):
    model, ids = tiny_llama
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert helper.replace_linear_with_gguf(model, "Q8_0") is model
    swapped = {n: m for n, m in model.named_modules() if isinstance(m, helper.GGUFLinear)}
    assert sorted(swapped) == sorted(n for n in original if n != "lm_head") and type(model.lm_head) is nn.Linear
    for name, layer in swapped.items():
        assert np.array_equal(layer.blocks.numpy(), gguf.quants.quantize(original[name].numpy(), T.Q8_0)), name
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert 0 < (after - before).abs().max() < 0.01 * before.abs().max()  # 8-bit blocks: close, not equal


def test_replace_linear_with_gguf_takes_a_files_blocks_and_keeps_its_f32_layers(tiny_llama):
    model, _ = tiny_llama
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    tensors = {}
    for name, linear in linears.items():  # as read_gguf_tensors gives them: q and k in Q4_1, the rest in F32
        w = linear.weight.detach()
        if name.endswith(("q_proj", "k_proj")):
            tensors[f"{name}.weight"] = ("Q4_1", torch.from_numpy(gguf.quants.quantize(w.numpy(), T.Q4_1)))
        else:
            tensors[f"{name}.weight"] = ("F32", w.clone())
    x = torch.randn(3, 64)
    swapped = helper.replace_linear_with_gguf(model, tensors=tensors)
    for name, linear in linears.items():
        kind, data = tensors[f"{name}.weight"]
        now = swapped.get_submodule(name)
        if kind == "F32":
            assert now is linear  # the very same layer, untouched
        else:
            assert isinstance(now, helper.GGUFLinear) and torch.equal(now.blocks, data)
            w = torch.from_numpy(gguf.quants.dequantize(data.numpy(), T.Q4_1))
            assert torch.equal(now(x), x @ w.T)
    with pytest.raises(ValueError, match="no tensor for layer"):
        helper.replace_linear_with_gguf(copy.deepcopy(model), tensors={})
    for fmt, given in ((None, None), ("Q8_0", tensors)):
        with pytest.raises(ValueError, match="exactly one"):
            helper.replace_linear_with_gguf(model, fmt, tensors=given)
