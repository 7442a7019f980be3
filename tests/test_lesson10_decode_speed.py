"""Lesson 10 (decode speed on a CPU): the roofline, the kernels' weight layouts, the lean decoder."""

import statistics

import pytest
import torch
from torch import nn

import helper

BF16 = torch.bfloat16


# -- 1. the roofline ---------------------------------------------------------


def test_cpu_instruction_sets_reads_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert helper.cpu_instruction_sets(info) == {
        "avx2": True,
        "avx512f": True,
        "avx512_vnni": False,
        "avx512_bf16": True,
        "amx_tile": False,
    }
    assert not any(helper.cpu_instruction_sets(tmp_path / "missing").values())


def test_roofline_is_bandwidth_over_bytes():
    assert helper.roofline_tokens_per_s(100e6, 25) == pytest.approx(250)
    assert helper.roofline_tokens_per_s(538_060_288, 30) == pytest.approx(30e9 / 538_060_288)
    for nbytes, gbs in ((0, 25), (100e6, 0), (-1, 25), (float("nan"), 25)):
        with pytest.raises(ValueError, match="positive"):
            helper.roofline_tokens_per_s(nbytes, gbs)


def test_memory_bandwidth_is_positive_and_checks_its_size():
    assert helper.memory_bandwidth_gbs(mb=8, repeats=1, rounds=1) > 0
    for bad in (0, -4, 1.5, True):
        with pytest.raises(ValueError, match="mb"):
            helper.memory_bandwidth_gbs(mb=bad)


# -- 2. weight layouts and kernels ---------------------------------------------


def test_int8_per_channel_is_lesson3s_symmetric_per_channel():
    w = torch.randn(16, 32)
    q, scale = helper.quantize_int8_per_channel(w)
    q3, scale3, zero3 = helper.quantize_per_channel(w, bits=8, axis=0, symmetric=True)
    assert torch.equal(q, q3) and torch.equal(scale, scale3.flatten()) and not zero3.any()
    q0, s0 = helper.quantize_int8_per_channel(torch.zeros(2, 4))  # an all-zero row keeps scale 1, codes 0
    assert s0.tolist() == [1.0, 1.0] and not q0.any()


def test_int4_groups_on_a_hand_made_group():
    q, scale, zero = helper.quantize_int4_groups(torch.tensor([[-3.0, 1.0, 4.5]]), group_size=3)
    assert q.tolist() == [[0, 8, 15]] and scale.tolist() == [[0.5]] and zero.tolist() == [[1.0]]


def test_int4_groups_of_32_recover_a_q4_1_grid_exactly():
    """Weights on a min-max 4-bit grid per block of 32 (as Q4_1 stores them) come back exactly."""
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (16, 64), generator=g)
    codes[:, ::32], codes[:, 1::32] = 0, 15  # every block uses its whole range
    step = torch.tensor([0.25, 0.5]).repeat(16, 1)  # (16 rows, 2 blocks), powers of two: exact
    low = torch.tensor([-2.0, -4.0]).repeat(16, 1)
    w = low.repeat_interleave(32, 1) + codes * step.repeat_interleave(32, 1)
    q, scale, zero = helper.quantize_int4_groups(w, 32)
    assert torch.equal(q, codes.to(torch.int32)) and torch.equal(scale, step)
    assert torch.equal(zero, low + 8 * step)


def test_int4_groups_reject_bad_group_sizes():
    with pytest.raises(ValueError, match="does not divide"):
        helper.quantize_int4_groups(torch.randn(4, 48), 32)
    for bad in (0, 1, 2.0, True):
        with pytest.raises(ValueError, match="group_size"):
            helper.quantize_int4_groups(torch.randn(4, 32), bad)
    with pytest.raises(ValueError, match="2-D float"):
        helper.quantize_int4_groups(torch.ones(4, 32, dtype=torch.int32), 32)


def test_pack_scales_and_zeros_layout():
    scale = torch.arange(6.0).reshape(2, 3)  # (out=2, groups=3)
    zero = -scale
    packed = helper.pack_scales_and_zeros(scale, zero)
    assert packed.shape == (3, 2, 2)
    assert packed[2, 1].tolist() == [5.0, -5.0] and packed[0, 1].tolist() == [3.0, -3.0]
    with pytest.raises(ValueError, match="out, groups"):
        helper.pack_scales_and_zeros(scale, zero[:, :2])


@pytest.mark.parametrize("kind", helper.LINEAR_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
def test_packed_linear_computes_with_its_reference_weight(kind, dtype):
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(32, 64, generator=g), torch.randn(3, 64, generator=g)
    linear = helper.PackedLinear(w, kind, dtype, 32)
    reference = helper.reference_weight(w, kind, dtype, 32)
    error = helper.kernel_error(linear, x, reference)
    assert error < (1e-5 if dtype == torch.float32 else 2e-2), error
    assert linear(x.to(dtype)).dtype == dtype and linear(x.to(dtype)).shape == (3, 32)
    # and the reference is the quantized weight, close to the original but not equal to it
    gap = (reference - w).abs().max().item()
    assert (gap == 0) if (kind == "float" and dtype == torch.float32) else (0 < gap < 0.5)


def test_packed_linear_bytes_are_what_it_holds():
    w = torch.zeros(576, 1536)
    assert helper.PackedLinear(w, "float").nbytes == 576 * 1536 * 4
    assert helper.PackedLinear(w, "int8pack", BF16).nbytes == 576 * 1536 + 576 * 2
    assert helper.PackedLinear(w, "int4pack", BF16, 32).nbytes == 576 * 1536 // 2 + 576 * 48 * 2 * 2


def test_packed_linear_rejects_what_its_kernel_cannot_do():
    with pytest.raises(ValueError, match="kind"):
        helper.PackedLinear(torch.randn(16, 32), "int3")
    with pytest.raises(ValueError, match="dtype"):
        helper.PackedLinear(torch.randn(16, 32), "float", torch.int8)
    with pytest.raises(ValueError, match="2-D float"):
        helper.PackedLinear(torch.randn(16), "float")
    with pytest.raises(ValueError, match="group size"):
        helper.PackedLinear(torch.randn(16, 96), "int4pack", BF16, 48)  # 48: not a kernel group size
    with pytest.raises(ValueError, match="out_features % 16"):
        helper.PackedLinear(torch.randn(24, 64), "int4pack", BF16, 32)
    with pytest.raises(NotImplementedError, match="reference_weight"):
        helper.PackedLinear(torch.randn(16, 32), "int4pack", BF16, 32).dequantized()


def test_time_kernels_gives_seconds_per_call_per_round():
    calls = {"a": lambda: sum(range(100)), "b": lambda: sum(range(10_000))}
    times = helper.time_kernels(calls, inner=5, repeats=3)
    assert set(times) == {"a", "b"} and all(len(s) == 3 for s in times.values())
    assert statistics.median(times["a"]) < statistics.median(times["b"])
    with pytest.raises(ValueError, match="inner"):
        helper.time_kernels(calls, inner=0)
    with pytest.raises(ValueError, match="at least one"):
        helper.matmul_seconds([])
    assert helper.matmul_seconds([helper.PackedLinear(torch.randn(16, 32))], repeats=1) > 0


# -- 3. the lean decoder -------------------------------------------------------


def test_rms_norm_and_rope_equal_transformers_in_fp32():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    norm = LlamaRMSNorm(64, eps=1e-5)
    norm.weight.data = torch.randn(64)
    x = torch.randn(5, 64)
    assert torch.equal(helper.rms_norm(x, norm.weight, 1e-5), norm(x))
    q = torch.randn(5, 4, 16)  # (T, heads, head_dim)
    angle = torch.randn(5, 8)
    cos, sin = torch.cat([angle, angle], -1).cos(), torch.cat([angle, angle], -1).sin()  # (T, head_dim)
    expected, _ = apply_rotary_pos_emb(q.transpose(0, 1)[None], q.transpose(0, 1)[None], cos[None], sin[None])
    signed_sin = torch.cat([-sin[:, :8], sin[:, 8:]], -1)
    got = helper.apply_rope(q, cos[:, None], signed_sin[:, None])
    torch.testing.assert_close(got, expected[0].transpose(0, 1), rtol=0, atol=1e-6)


def test_fast_decoder_fp32_equals_transformers(tiny_llama):
    llama, _ = tiny_llama  # conftest.py's (model, ids)
    decoder = helper.FastDecoder(llama, max_len=64)
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        expected = llama(input_ids=ids).logits
    torch.testing.assert_close(decoder(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    kwargs = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
    with torch.no_grad():
        hf = llama.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    assert torch.equal(decoder.generate(ids, **kwargs), hf)
    assert decoder.generate(ids[0].tolist(), max_new_tokens=3).shape == (1, 15)  # a list of ids works too


def test_fast_decoder_counts_what_it_holds(tiny_llama):
    llama, _ = tiny_llama  # conftest.py's (model, ids)
    fp32 = helper.FastDecoder(llama, max_len=64)
    int4 = helper.FastDecoder(llama, "int4pack", BF16, 32, max_len=64)
    for decoder in (fp32, int4):
        per_token = helper.bytes_per_token(decoder, position=10)
        linears = decoder.linears()
        assert len(linears) == 2 * 4 + 1 and linears[-1] is decoder.head
        assert per_token["weights"] + per_token["scales"] == sum(lin.nbytes for lin in linears)
        assert per_token["kv cache"] == 10 * 2 * 2 * 2 * 16 * decoder.k_cache.element_size()  # layers kv heads hd
        assert helper.model_size(decoder) == decoder.get_memory_footprint() > per_token["weights"]
    assert int4.head_kind == "int8pack" and int4.embed_table is None  # the tied head gives the embedding rows
    assert helper.model_size(int4) < helper.model_size(fp32) / 3


def test_fast_decoder_generates_with_every_kind(tiny_llama):
    llama, _ = tiny_llama  # conftest.py's (model, ids)
    ids = torch.randint(0, 96, (1, 6))
    for kind, dtype in (("float", BF16), ("int8pack", BF16), ("int4pack", BF16), ("int8-dequant", torch.float32)):
        out = helper.FastDecoder(llama, kind, dtype, 32, max_len=32).generate(ids, max_new_tokens=5)
        assert out.shape == (1, 11) and torch.equal(out[:, :6], ids)


def test_fast_decoder_rejects_bad_input(tiny_llama):
    llama, _ = tiny_llama  # conftest.py's (model, ids)
    with pytest.raises(ValueError, match="Llama-architecture"):
        helper.FastDecoder(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="Llama-architecture"):
        helper.FastDecoder((llama, None))  # what load_smollm2 returns, not unpacked
    with pytest.raises(ValueError, match="head_kind"):
        helper.FastDecoder(llama, head_kind="int2")
    with pytest.raises(ValueError, match="max_len"):
        helper.FastDecoder(llama, max_len=1)
    decoder = helper.FastDecoder(llama, max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        decoder.generate(torch.zeros(1, 6, dtype=torch.long), max_new_tokens=4)
    with pytest.raises(ValueError, match=r"\(1, T\)"):
        decoder(input_ids=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(NotImplementedError, match="greedily"):
        decoder.generate(torch.zeros(1, 3, dtype=torch.long), do_sample=True)


def test_with_generation_config_shares_weights_not_settings(tiny_llama):
    llama, _ = tiny_llama  # conftest.py's (model, ids)
    static = helper.with_generation_config(llama, cache_implementation="static")
    assert static.generation_config.cache_implementation == "static"
    assert llama.generation_config.cache_implementation != "static"
    assert static.lm_head.weight is llama.lm_head.weight
    ids = torch.randint(0, 96, (1, 5))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        assert torch.equal(static.generate(ids, **kwargs), llama.generate(ids, **kwargs))
    with pytest.raises(ValueError, match="no setting"):
        helper.with_generation_config(llama, cache_kind="static")
    with pytest.raises(TypeError, match="generation_config"):
        helper.with_generation_config(nn.Linear(2, 2))


@pytest.mark.slow
def test_fast_decoders_on_smollm2_keep_its_greedy_tokens_and_perplexity():
    model, tokenizer = helper.load_smollm2()
    batch = tokenizer("The history of", return_tensors="pt")
    kwargs = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
    with torch.no_grad():
        expected = model.generate(**batch, **kwargs)
    assert torch.equal(helper.FastDecoder(model).generate(batch.input_ids, **kwargs), expected)
    base = helper.perplexity(model, tokenizer, max_tokens=256)
    int4 = helper.FastDecoder(model, "int4pack", BF16, 32)
    assert abs(helper.perplexity(int4, tokenizer, max_tokens=256) / base - 1) < 0.01  # the Q4_1 grid again
