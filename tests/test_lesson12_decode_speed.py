"""Lesson 12 (decode speed on a CPU): the roofline, the kernels' weight layouts, the lean decoder."""

import copy
import statistics

import pytest
import torch
from torch import nn

import helper

BF16 = torch.bfloat16


# -- 1. the roofline ---------------------------------------------------------


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


def _on_the_grid_of(kind: str) -> torch.Tensor:
    """A (32, 64) weight that the storage of `kind` holds exactly, in fp32 and bf16 alike, built by hand."""
    g = torch.Generator().manual_seed(2)
    if kind == "float":  # 8-bit integers times a power of two: exact in bf16
        return torch.randint(-128, 128, (32, 64), generator=g) * 2.0**-6
    if kind.startswith("int8"):  # codes -127..127, row r's absmax 127 steps of 2**-(5 + r % 4)
        codes = torch.randint(-127, 128, (32, 64), generator=g).float()
        codes[:, 0] = 127
        return codes * 2.0 ** -(5 + torch.arange(32) % 4)[:, None]
    # int4: per group of 32, codes 0..15 (both ends used) on a step of 1/4 or 1/2 from -2 or -4: the middle
    # code, the kernel's zero, is then exactly 0
    codes = torch.randint(0, 16, (32, 64), generator=g)
    codes[:, ::32], codes[:, 1::32] = 0, 15
    step = torch.tensor([0.25, 0.5]).repeat_interleave(32).expand(32, 64)
    return -8 * step + codes * step


def _dequantized_by_hand(w: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The fp32 weight a PackedLinear(w, kind, dtype, 32) must multiply by, from other code than PackedLinear's:
    w in dtype, Lesson 3's per-channel int8 codes with their scales in dtype, or the int4 codes and grid of
    quantize_int4_groups dequantized as its documented convention says, w ~ (q - 8) * scale + zero."""
    if kind == "float":
        return w.to(dtype).float()
    if kind.startswith("int8"):
        q, scale, _ = helper.quantize_per_channel(w, bits=8, axis=0, symmetric=True)
        return q.float() * scale.to(dtype).float()
    q, scale, zero = helper.quantize_int4_groups(w, 32, dtype)
    return (q - 8) * scale.float().repeat_interleave(32, 1) + zero.float().repeat_interleave(32, 1)


@pytest.mark.parametrize("kind", helper.LINEAR_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
def test_packed_linear_computes_with_a_weight_on_its_grid(kind, dtype):
    """A hand-made weight its storage holds exactly: every kernel must compute x @ w.T with w itself."""
    w, x = _on_the_grid_of(kind), torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    linear = helper.PackedLinear(w, kind, dtype, 32)
    error = helper.kernel_error(linear, x, w)
    assert error < (1e-5 if dtype == torch.float32 else 2e-2), error  # bf16: the activations' rounding
    assert torch.equal(helper.reference_weight(w, kind, dtype, 32), w)
    assert linear(x.to(dtype)).dtype == dtype and linear(x.to(dtype)).shape == (3, 32)


@pytest.mark.parametrize("kind", helper.LINEAR_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
def test_packed_linear_on_random_weights_computes_with_an_independent_dequantization(kind, dtype):
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(32, 64, generator=g), torch.randn(3, 64, generator=g)
    linear = helper.PackedLinear(w, kind, dtype, 32)
    expected = _dequantized_by_hand(w, kind, dtype)
    error = helper.kernel_error(linear, x, expected)
    assert error < (1e-5 if dtype == torch.float32 else 2e-2), error
    reference = helper.reference_weight(w, kind, dtype, 32)
    torch.testing.assert_close(reference, expected, rtol=0, atol=1e-6)
    # and the reference is the quantized weight, close to the original but not equal to it
    gap = (reference - w).abs().max().item()
    assert (gap == 0) if (kind == "float" and dtype == torch.float32) else (0 < gap < 0.5)


def test_kernel_error_compares_with_a_float64_product():
    """An fp32 layer multiplying by exactly the reference still shows fp32 rounding: it is not compared with itself."""
    g = torch.Generator().manual_seed(4)
    w, x = torch.randn(64, 1536, generator=g), torch.randn(1, 1536, generator=g)
    error = helper.kernel_error(helper.PackedLinear(w, "float"), x, w)
    assert 0 < error < 1e-5
    expected = (x.double() @ w.double().T).squeeze(0)
    by_hand = ((x @ w.T).squeeze(0).double() - expected).abs().max() / expected.abs().max()
    assert error == pytest.approx(by_hand.item(), rel=1e-6)
    with pytest.raises(ValueError, match="kind"):
        helper.reference_weight(w, "int3", torch.float32)


def test_last_level_cache_bytes_reads_the_highest_cache_level(tmp_path):
    for name, (level, kind, size) in {
        "index0": (1, "Data", "48K"),
        "index1": (1, "Instruction", "32K"),
        "index2": (2, "Unified", "2048K"),
        "index3": (3, "Unified", "32M"),
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "level").write_text(f"{level}\n")
        (tmp_path / name / "type").write_text(f"{kind}\n")
        (tmp_path / name / "size").write_text(f"{size}\n")
    assert helper.last_level_cache_bytes(str(tmp_path)) == 32 * 2**20
    (tmp_path / "index3" / "size").write_text("garbage")
    assert helper.last_level_cache_bytes(str(tmp_path)) == 2048 * 2**10  # an unreadable level is skipped
    assert helper.last_level_cache_bytes(str(tmp_path / "missing")) is None
    here = helper.last_level_cache_bytes()
    assert here is None or here > 0


def test_packed_linear_bytes_are_what_it_holds():
    w = torch.zeros(576, 1536)
    assert helper.PackedLinear(w, "float").nbytes == 576 * 1536 * 4
    assert helper.PackedLinear(w, "int8pack", BF16).nbytes == 576 * 1536 + 576 * 2
    assert helper.PackedLinear(w, "int4pack", BF16, 32).nbytes == 576 * 1536 // 2 + 576 * 48 * 2 * 2


def test_the_int4_group_sizes_are_those_torchs_kernel_accepts():
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(16, 512, generator=g), torch.randn(2, 512, generator=g).to(BF16)
    for group_size in (16, 32, 64, 128, 256, 512):
        q, scale, zero = helper.quantize_int4_groups(w, group_size, BF16)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        args = (x, packed, group_size, helper.pack_scales_and_zeros(scale, zero))
        if group_size in helper.INT4_GROUP_SIZES:
            assert torch.ops.aten._weight_int4pack_mm_for_cpu(*args).shape == (2, 16)
            error = helper.kernel_error(helper.PackedLinear(w, "int4pack", BF16, group_size), x, w)
            assert 0 < error < 0.3  # the error of 4-bit groups of that size (0.10 to 0.18 here), not garbage
        else:
            with pytest.raises(RuntimeError, match="qGroupSize"):
                torch.ops.aten._weight_int4pack_mm_for_cpu(*args)
            with pytest.raises(ValueError, match="group size"):
                helper.PackedLinear(w, "int4pack", BF16, group_size)


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


def test_attention_in_and_mlp_out_are_the_two_halves_of_a_transformers_llama_layer(tiny_llama):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    llama, _ = tiny_llama  # hidden 64, 4 heads and 2 kv heads of 16
    decoder = helper.FastDecoder(llama, max_len=16)
    ours, theirs = decoder.layers[0], llama.model.layers[0]
    g = torch.Generator().manual_seed(4)
    T, x, attn = 5, torch.randn(5, 64, generator=g), torch.randn(5, 64, generator=g)
    q, k, v = helper.attention_in(x, decoder.cos[:T], decoder.sin[:T], ours.norm1, ours.qkv, 4, 2, decoder.eps)
    with torch.no_grad():
        h = theirs.input_layernorm(x)
        cos, sin = llama.model.rotary_emb(x[None], torch.arange(T)[None])  # (1, T, head_dim)
        heads = lambda proj, n: proj(h).view(T, n, 16).transpose(0, 1)[None]  # (1, n, T, head_dim)
        q_hf, k_hf = apply_rotary_pos_emb(
            heads(theirs.self_attn.q_proj, 4), heads(theirs.self_attn.k_proj, 2), cos, sin
        )
        v_hf = theirs.self_attn.v_proj(h).view(T, 2, 16)
        residual = x + theirs.self_attn.o_proj(attn)
        expected = residual + theirs.mlp(theirs.post_attention_layernorm(residual))
    torch.testing.assert_close(q, q_hf[0].transpose(0, 1), rtol=0, atol=1e-5)
    torch.testing.assert_close(k, k_hf[0].transpose(0, 1), rtol=0, atol=1e-5)
    torch.testing.assert_close(v, v_hf, rtol=0, atol=1e-5)
    out = helper.mlp_out(x, attn, ours.o, ours.norm2, ours.gate_up, ours.down, decoder.eps)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


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
    # per layer: q, k, v fused (64 + 32 + 32 rows of 64), o (64 x 64), gate and up fused (256 x 64), down (64 x 128):
    # 36,864 weights; the tied lm_head 96 x 64. int4 layers: packed codes, a (groups, out, 2) bf16 scale and zero;
    # the int8 head (int4's default): int8 codes and a bf16 scale per row, its int8 rows also give the embedding
    layer_weights, head_weights = 128 * 64 + 64 * 64 + 256 * 64 + 64 * 128, 96 * 64
    int4_scales = (2 * 128 + 2 * 64 + 2 * 256 + 4 * 64) * 2 * 2  # groups of 32 x out x (scale, zero) x 2 bytes
    expected = {
        fp32: {"weights": (2 * layer_weights + head_weights) * 4, "scales": 0, "embedding row": 64 * 4},
        int4: {
            "weights": 2 * layer_weights // 2 + head_weights,
            "scales": 2 * int4_scales + 96 * 2,
            "embedding row": 64,
        },
    }
    for decoder in (fp32, int4):
        per_token = helper.bytes_per_token(decoder, position=10)
        linears = decoder.linears()
        assert len(linears) == 2 * 4 + 1 and linears[-1] is decoder.head
        assert {k: v for k, v in per_token.items() if k != "kv cache"} == expected[decoder]
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


def test_packed_linear_from_group_quant_multiplies_by_the_checkpoints_own_weight():
    g = torch.Generator().manual_seed(6)
    w, x = torch.randn(32, 576, generator=g), torch.randn(3, 576, generator=g).to(BF16)
    gq = helper.rtn_quantize(w, 4, 128)  # groups 128, 128, 128, 128 and a last one of 64
    linear = helper.PackedLinear.from_group_quant(gq)
    assert linear.group_size == 64 and linear.scales.shape == (9, 32, 2)  # each 128-group as two of 64
    scale = gq.scale.to(BF16).float().repeat_interleave(128, 1)[:, :576]  # (out, in), rounded as the kernel holds it
    zero = ((8 - gq.zero.float()) * gq.scale.float()).to(BF16).float().repeat_interleave(128, 1)[:, :576]
    expected = (gq.codes.float() - 8) * scale + zero  # the checkpoint's weight with bf16 parameters
    assert (expected - gq.dequantize()).abs().max() < 0.01 * gq.dequantize().abs().max()  # bf16 scales: small change
    assert helper.kernel_error(linear, x, expected) < 0.01  # bf16 activations and accumulation only
    assert linear.nbytes == 32 * 576 // 2 + 9 * 32 * 2 * 2
    with pytest.raises(ValueError, match="uniform grid"):
        helper.PackedLinear.from_group_quant(helper.nf4_quantize(w, 128))
    with pytest.raises(ValueError, match="uniform grid"):
        helper.PackedLinear.from_group_quant(helper.rtn_quantize(w, 4, 48))  # no kernel group divides 48 and 576


@pytest.mark.parametrize("method", ["rtn", "awq"])  # AWQ: scales folded into the norms FastDecoder reads
def test_fast_decoder_deploys_lesson_9_codes_on_the_int4_kernel(tiny_llama, method):
    llama, ids = tiny_llama
    calibration = ids if method == "awq" else None
    quantized = helper.quantize_llama_4bit(copy.deepcopy(llama), method, calibration, group_size=64)
    decoder = helper.FastDecoder(quantized, "int4pack", BF16, max_len=64)
    with torch.no_grad():
        expected = quantized(input_ids=ids[:1]).logits[0]  # GroupQuantLinear: the codes dequantized in fp32
        got = decoder(input_ids=ids[:1]).logits[0].float()
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()  # bf16 activations, int8 lm_head
    assert decoder.layers[0].qkv.group_size == 64 and decoder.head_kind == "int8pack"
    folded = quantized.model.layers[0].input_layernorm.weight  # AWQ divided it by its scales
    assert torch.equal(decoder.layers[0].norm1, folded.detach().to(BF16))
    assert torch.equal(folded, llama.model.layers[0].input_layernorm.weight) == (method == "rtn")
    with pytest.raises(ValueError, match="int4pack"):
        helper.FastDecoder(quantized, "int8pack", BF16)
    with pytest.raises(ValueError, match="uniform grid"):
        helper.FastDecoder(helper.quantize_llama_4bit(copy.deepcopy(llama), "nf4", group_size=64), "int4pack", BF16)
