"""Lesson 13 (the KV cache): its size, the course's quantized cache, and the libraries' caches it is checked against."""

import math
from types import SimpleNamespace

import pytest
import torch

import helper

SMOLLM2 = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576)


# -- 1. how big the cache is ---------------------------------------------------


def test_bytes_per_token_from_the_config():
    assert helper.kv_values_per_token(SMOLLM2) == 30 * 2 * 3 * 64 == 11_520
    assert helper.kv_bytes_per_token(SMOLLM2) == 46_080
    assert helper.kv_bytes_per_token(SMOLLM2, bits=4.5) == 6_480
    llama7b = SimpleNamespace(num_hidden_layers=32, num_attention_heads=32, hidden_size=4096, head_dim=128)
    assert helper.kv_bytes_per_token(llama7b, bits=16) == 524_288  # no num_key_value_heads: multi-head attention
    for bad in (0, -8, True, "16"):
        with pytest.raises(ValueError, match="bits"):
            helper.kv_bytes_per_token(SMOLLM2, bits=bad)


def test_crossover_context_is_the_first_that_holds_the_weights():
    assert helper.context_where_cache_exceeds(100, 10) == 10
    assert helper.context_where_cache_exceeds(101, 10) == 11
    assert helper.context_where_cache_exceeds(538_060_032, 46_080) == 11_677
    with pytest.raises(ValueError, match="positive"):
        helper.context_where_cache_exceeds(0, 10)


def test_cache_tensor_bytes_is_the_formula_on_a_real_generate(tiny_llama):
    model, ids = tiny_llama
    out = model.generate(ids[:1], max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    positions = out.past_key_values.get_seq_length()
    assert positions == ids.shape[1] + 4  # the last new token is never fed back
    assert helper.cache_tensor_bytes(out.past_key_values) == positions * helper.kv_bytes_per_token(model.config)
    with pytest.raises(TypeError, match="Cache"):
        helper.cache_tensor_bytes([torch.zeros(2)])


def test_decode_step_seconds_times_each_context(tiny_llama):
    decoder = helper.FastDecoder(tiny_llama[0], max_len=40)
    seconds = helper.decode_step_seconds(decoder, [4, 30], steps=2, repeats=1)
    assert list(seconds) == [4, 30] and all(s > 0 for s in seconds.values())
    with pytest.raises(ValueError, match="max_len"):
        helper.decode_step_seconds(decoder, [39], steps=2)


# -- 2. quantizing it ------------------------------------------------------------


def test_quantize_kv_per_token_and_per_channel_by_hand():
    keys = torch.tensor([[0.0, 1.0, 30.0], [3.0, 2.0, 33.0]])  # (positions, channels): the Exercise 2 matrix
    codes, scale, lo = helper.quantize_kv(keys, bits=2, axis="token", group_size=3)
    assert codes.tolist() == [[0, 0, 3], [0, 0, 3]] and lo.flatten().tolist() == [0.0, 2.0]
    back = helper.dequantize_kv(codes, scale, lo, keys.shape, "token")
    assert torch.allclose(back, torch.tensor([[0.0, 0.0, 30.0], [2.0, 2.0, 33.0]]))
    codes, scale, lo = helper.quantize_kv(keys, bits=2, axis="channel", group_size=2)
    assert codes.tolist() == [[0, 3], [0, 3], [0, 3]]  # one row per channel: its two values are its min and max
    assert torch.equal(helper.dequantize_kv(codes, scale, lo, keys.shape, "channel"), keys)
    codes, scale, lo = helper.quantize_kv(torch.full((2, 4), 0.5), bits=4, group_size=4)  # a constant group
    assert not codes.any() and torch.equal(helper.dequantize_kv(codes, scale, lo, (2, 4)), torch.full((2, 4), 0.5))
    with pytest.raises(ValueError, match="tile"):
        helper.quantize_kv(keys, bits=4, axis="token", group_size=2)
    assert helper.KV_AXES == ("token", "channel")
    with pytest.raises(ValueError, match="axis"):
        helper.quantize_kv(keys, bits=4, axis="head", group_size=3)
    with pytest.raises(ValueError, match="bits"):
        helper.quantize_kv(keys, bits=5, group_size=3)


@pytest.mark.parametrize("axis, quanto_axis", [("token", 0), ("channel", -1)])
def test_quantize_kv_is_quantos_quantizer_code_for_code(axis, quanto_axis):
    """transformers' QuantizedCache (quanto backend) quantizes with MaxOptimizer + quantize_weight."""
    from optimum.quanto import MaxOptimizer, qint4, quantize_weight

    x = torch.randn(1, 3, 256, 64, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 5, 64)
    scale, shift = MaxOptimizer()(x, qint4, quanto_axis, 64)
    reference = quantize_weight(x, qint4, quanto_axis, scale, shift, 64)
    codes, s, lo = helper.quantize_kv(x, 4, axis, 64)
    assert torch.equal(helper.dequantize_kv(codes, s, lo, x.shape, axis), reference.dequantize())
    assert helper.kv_code_bytes(codes, s, lo, 4) == (
        reference._data._data.nbytes + reference._scale.nbytes + reference._shift.nbytes
    )


def test_hadamard_is_orthogonal_and_needs_a_power_of_two():
    for n in (1, 2, 16, 64):
        h = helper.hadamard_matrix(n, torch.float64)
        assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(h.abs(), torch.full((n, n), n**-0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="power of 2"):
        helper.hadamard_matrix(48)


def _stream(decoder, ids, chunk=8, score_from=8):
    return helper.stream_log_probs(lambda c, s: decoder.step(c, s, all_logits=True), ids, chunk, score_from)


def test_a_float_cache_is_fastdecoders_and_the_rotation_cancels(tiny_llama):
    model, ids = tiny_llama
    ids = torch.cat([ids[0], ids[1]])  # 32 tokens
    plain = _stream(helper.FastDecoder(model, max_len=32), ids)
    float_cache = helper.QuantizedKVDecoder(model, None, None, group_size=8, residual=8, max_len=32)
    assert torch.equal(_stream(float_cache, ids), plain)
    assert float_cache.cache_bytes() == 32 * float_cache.kv_bytes_per_position()
    float_cache.set_cache(None, None, rotate_keys=True)  # q H (k H)^T = q k^T
    assert torch.allclose(_stream(float_cache, ids), plain, atol=1e-5)
    whole = helper.FastDecoder(model, max_len=32).step(ids, 0, all_logits=True)[7:31].log_softmax(-1)
    assert torch.allclose(plain, whole, atol=1e-5)  # chunks extend one cache: the same predictions as one pass


def test_the_residual_stays_float_until_it_is_full(tiny_llama):
    model, ids = tiny_llama
    decoder = helper.QuantizedKVDecoder(model, 4, 4, "channel", "token", group_size=8, residual=16, max_len=32)
    per_layer = decoder.kv_bytes_per_position() // 2  # 2 layers
    with torch.inference_mode():
        decoder.step(ids[0, :8], 0)
        assert decoder.cache_bytes() == 8 * 2 * per_layer  # 8 < 16: nothing quantized yet
        before = decoder.k_cache[:, :, :8].clone()
        decoder.step(ids[0, 8:16], 8)  # 16 positions: two groups of 8 quantized
    code_bytes = 16 * 2 * 16 // 2  # 16 positions x 2 kv heads x head_dim 16, two 4-bit codes per byte
    groups = 16 * 2 * 16 // 8  # groups of 8 (along positions for k, along head_dim for v), each a scale and a min
    assert decoder.cache_bytes() == 2 * 2 * (code_bytes + groups * 2 * 4)  # 2 layers x (k, v)
    assert not torch.equal(decoder.k_cache[:, :, :8], before)  # now dequantized values
    codes, scale, lo = helper.quantize_kv(before[0], 4, "channel", 8)
    assert torch.allclose(decoder.k_cache[0, :, :8], helper.dequantize_kv(codes, scale, lo, before[0].shape, "channel"))
    with torch.inference_mode():
        with pytest.raises(ValueError, match="in order"):  # a quantized cache cannot be rewound or skip ahead
            decoder.step(ids[0, :4], 8)
        decoder.step(ids[1, :4], 16)  # 20 positions: 16 quantized, 4 in the float residual
        assert decoder.cache_bytes() == 2 * 2 * (code_bytes + groups * 2 * 4) + 4 * 2 * per_layer
        decoder.step(ids[0, :4], 0)  # a fresh sequence starts over
        assert decoder.cache_bytes() == 4 * 2 * per_layer
        with pytest.raises(ValueError, match="stream_log_probs"):
            decoder(input_ids=ids[:1])  # one pass would never read a quantized position
    with torch.inference_mode():  # decode steps of one token fill the residual as a chunk does
        decoder.step(ids[0, :10], 0)
        for position in range(10, 16):
            decoder.step(ids[0, position : position + 1], position)
    assert decoder.cache_bytes() == 2 * 2 * (code_bytes + groups * 2 * 4)
    with pytest.raises(ValueError, match="multiple"):
        helper.QuantizedKVDecoder(model, group_size=8, residual=12)
    with pytest.raises(ValueError, match="tile head_dim"):
        helper.QuantizedKVDecoder(model, group_size=32, residual=64)  # head_dim 16
    with pytest.raises(ValueError, match="bits"):
        decoder.set_cache(key_bits=5)


def test_stream_scores_is_stream_log_probs_then_stream_nll_kl_in_one_pass(tiny_llama):
    model, ids = tiny_llama
    ids = torch.cat([ids[0], ids[1]])  # 32 tokens
    ref = _stream(helper.FastDecoder(model, max_len=32), ids)  # (24, vocab): scored from token 8
    decoder = helper.QuantizedKVDecoder(model, 4, 4, "token", "token", group_size=8, residual=8, max_len=32)
    step = lambda c, s: decoder.step(c, s, all_logits=True)
    lp = helper.stream_log_probs(step, ids, 8, 8)
    nll, kl, last = helper.stream_scores(step, ids, ref, 8, 8, keep_last=10)  # 10 rows: across a chunk boundary
    expected_nll, expected_kl = helper.stream_nll_kl(lp, ids, ref, score_from=8)
    assert torch.equal(nll, expected_nll) and torch.equal(kl, expected_kl) and torch.equal(last, lp[-10:])
    assert kl.min() >= 0 and kl.max() > 0  # int4: the cache changes the predictions
    assert helper.stream_scores(step, ids, ref, 8, 8)[2] is None
    assert torch.equal(helper.kl_rows(ref, lp, block=5), expected_kl)  # blocks of rows: the same sums
    with pytest.raises(ValueError, match="scored"):
        helper.stream_scores(step, ids, ref[:-1], 8, 8)
    with pytest.raises(ValueError, match="keep_last"):
        helper.stream_scores(step, ids, ref, 8, 8, keep_last=25)
    with pytest.raises(ValueError, match="kl_rows"):
        helper.kl_rows(ref, lp[:, :5])


def test_stream_scoring_checks_its_arguments():
    with pytest.raises(ValueError, match="multiple"):
        helper.stream_log_probs(None, torch.arange(30), chunk=8)
    nll, kl = helper.stream_nll_kl(torch.zeros(4, 3).log_softmax(-1), torch.tensor([0, 1, 2, 0, 1, 2]), score_from=2)
    assert torch.allclose(nll, torch.full((4,), 3.0).log()) and kl is None
    with pytest.raises(ValueError, match="scored"):
        helper.stream_nll_kl(torch.zeros(3, 3), torch.arange(6), score_from=2)
    p = torch.tensor([[0.9, 0.1]]).log()  # KL(ref || this): the reference's probabilities weight the log ratio
    q = torch.tensor([[0.5, 0.5]]).log()
    _, kl = helper.stream_nll_kl(q, torch.tensor([0, 1]), ref_log_probs=p, score_from=1)
    assert kl.item() == pytest.approx(0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5))
    with pytest.raises(ValueError, match="reference"):
        helper.stream_nll_kl(q, torch.tensor([0, 1]), ref_log_probs=torch.zeros(1, 3), score_from=1)


# -- 3. against the libraries -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("key_axis, quanto_axis", [("token", 0), ("channel", -1)])
def test_the_course_cache_agrees_with_transformers_quantized_cache(key_axis, quanto_axis):
    """Same scheme (int4, groups of 64, residual 128), two model implementations: the course's cache and
    transformers' QuantizedCache hold the same bytes, and their predictions differ far less than either
    differs from the fp32 cache (the lesson measures it on 2,048 tokens)."""
    model, tokenizer = helper.load_smollm2()
    ids = tokenizer(helper.eval_text(), return_tensors="pt").input_ids[0][:640]
    decoder = helper.QuantizedKVDecoder(model, None, None, max_len=640)
    ref = _stream(decoder, ids, 128, 512)
    decoder.set_cache(4, 4, key_axis, "token")
    course = _stream(decoder, ids, 128, 512)
    logits_of = helper.quanto_cache_logits(model, 4, quanto_axis, 0)
    quanto = helper.stream_log_probs(logits_of, ids, 128, 512)
    assert helper.quantized_cache_bytes(logits_of.cache) == decoder.cache_bytes()
    _, to_fp32 = helper.stream_nll_kl(course, ids, ref)
    _, between = helper.stream_nll_kl(quanto, ids, course)
    assert between.mean() < 0.2 * to_fp32.mean()


@pytest.mark.slow
@pytest.mark.skipif(not helper.llama_cpp_installed(), reason="llama.cpp (llama-cpp-python) is not installed")
def test_llama_cpp_cache_types_rank_by_their_bits():
    model, tokenizer = helper.load_smollm2()
    ids = tokenizer(helper.eval_text(), return_tensors="pt").input_ids[0][:640]
    f16, seconds = helper.llama_cpp_cache_log_probs(helper.smollm2_gguf_path(), ids, "f16")
    assert f16.shape == (128, model.config.vocab_size) and seconds > 0
    kl = {t: helper.stream_nll_kl(helper.llama_cpp_cache_log_probs(helper.smollm2_gguf_path(), ids, t)[0], ids, f16)[1]
          for t in ("q8_0", "q4_0")}  # fmt: skip
    assert 0 < kl["q8_0"].mean() < kl["q4_0"].mean()
    with pytest.raises(ValueError, match="cache_type"):
        helper.llama_cpp_cache_log_probs(helper.smollm2_gguf_path(), ids, "q5_1")
