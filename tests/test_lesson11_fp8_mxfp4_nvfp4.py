"""Lesson 11: FP8, MXFP4 and NVFP4 from scratch against torch's casts, torchao's quantizers, gguf-py's
and ggml's MXFP4 quantizer; the KL divergence; the GGUF writer; the FP8 layer."""

import math

import numpy as np
import pytest
import torch

import helper

EVERY_BF16 = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()


@pytest.mark.parametrize("fmt", list(helper.FP8_FORMATS))
def test_fp8_encode_equals_torchs_cast_on_every_bf16_pattern_and_fp32_sample(fmt):
    f = helper.FP8_FORMATS[fmt]
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(200_000, generator=g) * torch.exp2(torch.randint(-40, 40, (200_000,), generator=g).float())
    for x in (EVERY_BF16, sample):
        assert torch.equal(helper.fp8_encode(x, fmt), x.to(f.torch_dtype).view(torch.uint8))


@pytest.mark.parametrize("fmt", list(helper.FP8_FORMATS))
def test_fp8_decode_equals_torchs_view_for_all_256_bytes(fmt):
    codes = torch.arange(256, dtype=torch.uint8)
    ours, theirs = helper.fp8_decode(codes, fmt), codes.view(helper.FP8_FORMATS[fmt].torch_dtype).float()
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    assert torch.equal(ours[~torch.isnan(ours)], theirs[~torch.isnan(theirs)])


def test_fp8_hand_values_saturation_and_infinity():
    x = torch.tensor([448.0, 464.0, 1e9, math.inf, 0.1, 2.0**-9, 2.0**-10 * 1.5])
    e4m3 = helper.fp8_decode(helper.fp8_encode(x, "e4m3fn"), "e4m3fn").tolist()
    assert e4m3 == [448.0, 448.0, 448.0, 448.0, 0.1015625, 2.0**-9, 2.0**-9]
    e5m2 = helper.fp8_decode(helper.fp8_encode(torch.tensor([57344.0, 61440.0, 0.1]), "e5m2"), "e5m2").tolist()
    assert e5m2 == [57344.0, math.inf, 0.09375]
    assert helper.fp8_decode(torch.tensor([0b0_1010_011], dtype=torch.uint8), "e4m3fn").item() == 11.0


def test_fp8_bad_input_is_refused():
    with pytest.raises(ValueError, match="fmt"):
        helper.fp8_encode(torch.ones(2), "e3m4")
    with pytest.raises(TypeError, match="float32"):
        helper.fp8_encode(torch.ones(2, dtype=torch.float64), "e4m3fn")
    with pytest.raises(TypeError, match="uint8"):
        helper.fp8_decode(torch.ones(2), "e5m2")
    with pytest.raises(ValueError, match="2-D"):
        helper.fp8_quantize_weight(torch.ones(4))


def test_fp8_quantize_weight_per_channel_and_per_tensor():
    w = torch.tensor([[1.0, -2.0, 0.5], [100.0, 0.0, -50.0]])
    codes, scale = helper.fp8_quantize_weight(w)
    assert torch.equal(scale.flatten(), torch.tensor([2.0, 100.0]) / 448)
    assert torch.allclose(helper.fp8_decode(codes, "e4m3fn") * scale, w, rtol=2**-4)
    _, one = helper.fp8_quantize_weight(w, per_channel=False)
    assert one.shape == (1, 1) and one.item() == pytest.approx(100.0 / 448)


def test_formats_and_e2m1_values_are_the_specs():
    e4m3, e5m2 = helper.FP8_FORMATS["e4m3fn"], helper.FP8_FORMATS["e5m2"]
    assert isinstance(e4m3, helper.FloatFormat) and (e4m3.ebits, e4m3.mbits, e4m3.bias, e4m3.inf) == (4, 3, 7, False)
    assert (e5m2.ebits, e5m2.mbits, e5m2.bias, e5m2.inf) == (5, 2, 15, True)
    assert helper.E2M1_VALUES.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert torch.equal(helper.e2m1_decode(torch.arange(8, dtype=torch.uint8)), helper.E2M1_VALUES)


def test_e2m1_rounding_ties_and_saturation():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.1, -0.0, 0.26])
    assert helper.e2m1_decode(helper.e2m1_encode(x)).tolist() == [
        0.0,
        1.0,
        1.0,
        2.0,
        2.0,
        4.0,
        4.0,
        6.0,
        -0.0,
        -0.0,
        0.5,
    ]
    ggml = helper.e2m1_encode(x, rounding="ggml")
    assert helper.e2m1_decode(ggml).tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, 0.0, 0.5]
    assert ggml[8].item() == 0 and helper.e2m1_encode(x)[8].item() == 8  # ggml: +0 for a negative that rounds to 0
    with pytest.raises(ValueError, match="rounding"):
        helper.e2m1_encode(x, rounding="up")


def _real_weight():
    import gguf

    from quantcourse.lesson04_gguf import read_gguf_tensors

    kind, data = read_gguf_tensors()["model.layers.3.mlp.down_proj.weight"]
    return torch.from_numpy(gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType[kind]).astype(np.float32))


@pytest.fixture(scope="module")
def weights():
    g = torch.Generator().manual_seed(4)
    return [_real_weight(), torch.randn(128, 256, generator=g), torch.randn(64, 64, generator=g) * 1e-3]


def test_mxfp4_equals_torchao_to_mx(weights):
    from torchao.prototype.mx_formats.kernels import unpack_uint4
    from torchao.prototype.mx_formats.mx_tensor import MXTensor

    for w in weights:
        e, c = helper.mxfp4_quantize(w)
        mx = MXTensor.to_mx(w.contiguous(), torch.float4_e2m1fn_x2, 32)
        assert torch.equal(mx.scale.view(torch.uint8).reshape(-1), e)
        assert torch.equal(unpack_uint4(mx.qdata.view(torch.uint8)).reshape(-1, 32), c)
        assert torch.equal(helper.mxfp4_dequantize(e, c, w.shape), mx.dequantize(torch.float32))


def test_mxfp4_ggml_rounding_equals_gguf_py(weights):
    import gguf

    for w in weights:
        e, c = helper.mxfp4_quantize(w, rounding="ggml")
        ours = helper.mxfp4_ggml_blocks(e, c, w.shape[0]).numpy()
        assert np.array_equal(ours, gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.MXFP4))
        back = gguf.quants.dequantize(ours, gguf.GGMLQuantizationType.MXFP4)
        assert np.array_equal(back, helper.mxfp4_dequantize(e, c, w.shape).numpy())


def test_mxfp4_bad_input_is_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        helper.mxfp4_quantize(torch.ones(4, 48))
    with pytest.raises(ValueError, match="nan or inf"):
        helper.mxfp4_quantize(torch.full((1, 32), math.inf))


@pytest.mark.parametrize("two_level", [True, False])
def test_nvfp4_equals_torchao(weights, two_level):
    from torchao.prototype.mx_formats.kernels import unpack_uint4
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    for w in weights:
        ts = per_tensor_amax_to_scale(w.abs().max()) if two_level else None
        s, c, ts_out = helper.nvfp4_quantize(w, ts)
        ref = NVFP4Tensor.to_nvfp4(w.contiguous(), per_tensor_scale=ts)
        assert torch.equal(ref.scale.view(torch.uint8), s)
        assert torch.equal(unpack_uint4(ref.qdata.view(torch.uint8)), c)
        assert torch.equal(helper.nvfp4_dequantize(s, c, ts_out), ref.dequantize(torch.float32))
    with pytest.raises(ValueError, match="multiple of 16"):
        helper.nvfp4_quantize(torch.ones(2, 24))


def test_fp8_linear_scaled_mm_is_the_decoded_fp32_product():
    g = torch.Generator().manual_seed(5)
    lin = torch.nn.Linear(64, 32, bias=True)
    x = torch.randn(3, 7, 64, generator=g)
    x[0, 0, 3] = 200.0  # an outlier
    for acts in ("per_token", "per_tensor"):
        layer = helper.FP8Linear(lin, acts)
        x2 = x.reshape(-1, 64)
        amax = x2.abs().amax(1, keepdim=True)
        if acts == "per_tensor":
            amax = amax.max().expand_as(amax)
        sx = amax / 448
        w = layer.weight_fp8.float() * layer.scale.T
        expected = ((x2 / sx).to(torch.float8_e4m3fn).float() * sx) @ w.T + lin.bias
        assert torch.equal(layer(x).reshape(-1, 32), expected)
    w16 = helper.FP8Linear(lin)(x)
    ref = lin(x)
    assert 0 < ((w16 - ref).norm() / ref.norm()).item() < 0.05
    with pytest.raises(ValueError, match="activations"):
        helper.FP8Linear(lin, "per_channel")


def test_fp4_linear_holds_the_formats_bytes_and_decodes_the_lessons_weights(weights):
    """FP4Linear: codes packed two per byte plus the scales (4.25 / 4.5 bits per weight, counted by
    model_size), its weight bit for bit the lesson's mxfp4 (ggml rounding) and nvfp4 (torchao's
    tensor scale) round trip, its output F.linear with that weight."""
    w = weights[0]  # a real SmolLM2 weight (576 x 1536)
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    mx, nv = helper.FP4Linear(lin, "mxfp4"), helper.FP4Linear(lin, "nvfp4")
    assert torch.equal(mx.dequantized(), helper.mxfp4_dequantize(*helper.mxfp4_quantize(w, rounding="ggml"), w.shape))
    assert torch.equal(nv.dequantized(), helper.nvfp4_dequantize(*helper.nvfp4_quantize(w, w.abs().max() / (448 * 6))))
    assert helper.model_size(mx) * 8 == w.numel() * 4.25  # 4-bit codes + an E8M0 byte per 32
    assert helper.model_size(nv) * 8 == w.numel() * 4.5 + 32  # + an E4M3 byte per 16, one fp32 tensor scale
    x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(6))
    assert torch.equal(mx(x), torch.nn.functional.linear(x, mx.dequantized()))
    with pytest.raises(ValueError, match="fmt"):
        helper.FP4Linear(lin, "fp4")
    with pytest.raises(ValueError, match="multiple of 16"):
        helper.FP4Linear(torch.nn.Linear(24, 2), "nvfp4")


def test_linears_swapped_restores_the_originals(tiny_llama):
    model, ids = tiny_llama
    before = {n: m for n, m in model.named_modules()}
    with torch.no_grad():
        ref = model(ids).logits
        with helper.linears_swapped(model, lambda lin: helper.FP8Linear(lin)):
            assert any(isinstance(m, helper.FP8Linear) for m in model.modules())
            changed = model(ids).logits
        after = model(ids).logits
    assert not torch.equal(ref, changed) and torch.equal(ref, after)
    assert all(before[n] is m for n, m in model.named_modules())


def test_kl_divergence_is_zero_for_itself_and_matches_a_hand_computation(tiny_llama):
    model, _ = tiny_llama
    ids = torch.randint(0, 96, (33,), generator=torch.Generator().manual_seed(2))

    def logits_of(inputs):
        return model(input_ids=inputs[None]).logits[0]

    with torch.no_grad():
        ref = helper.window_log_probs(logits_of, ids, 32, 16)
        nll, kl = helper.window_nll_kl(logits_of, ids, ref, 16)
        assert torch.allclose(kl, torch.zeros(32), atol=1e-6)
        assert torch.allclose(nll, helper.window_nll(logits_of, ids, 32, 16))
        flat = torch.zeros(32, 96)  # a uniform model: KL = sum p log p + log 96
        _, kl_u = helper.window_nll_kl(lambda inputs: flat[: inputs.numel()], ids, ref, 16)
    expected = (ref.exp() * ref).sum(1) + math.log(96)
    assert torch.allclose(kl_u, expected, atol=1e-5)
    with pytest.raises(ValueError, match="ref_log_probs"):
        helper.window_nll_kl(logits_of, ids, ref[:, :50], 16)
    # windows longer than the 128 rows window_nll_kl sums at a time: every row as the whole-window formula
    long_ids = torch.randint(0, 96, (321,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        long_ref = helper.window_log_probs(logits_of, long_ids, 320, 160)
        cooler = lambda inputs: 0.5 * logits_of(inputs)  # another model: the same logits at temperature 2
        _, kl_long = helper.window_nll_kl(cooler, long_ids, long_ref, 160)
        other = helper.window_log_probs(cooler, long_ids, 320, 160)
    assert torch.equal(kl_long, (long_ref.exp() * (long_ref - other)).sum(1))
    mean, se = helper.mean_with_error(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5 and se == pytest.approx(math.sqrt(5 / 3) / 2)
    with pytest.raises(ValueError):
        helper.mean_with_error(torch.tensor([1.0]))


def test_token_log_probs_and_nll_kl_on_a_model(tiny_llama):
    model, _ = tiny_llama

    class Tok:  # a tokenizer of the course's interface over the tiny model's 96 ids
        def __call__(self, text, return_tensors="pt"):
            class Out:
                input_ids = torch.tensor([[ord(ch) % 96 for ch in text]])

            return Out()

    ref = helper.token_log_probs(model, Tok(), n_tokens=32, window=16, text="x" * 40 + "hello world " * 3)
    nll, kl = helper.token_nll_kl(model, Tok(), ref, window=16, text="x" * 40 + "hello world " * 3)
    assert ref.shape == (32, 96) and nll.shape == kl.shape == (32,)
    assert torch.allclose(kl, torch.zeros(32), atol=1e-6)


def test_write_gguf_with_copies_and_converts(tmp_path):
    import gguf

    LIN = ("attn_q", "ffn_down")
    written = {}

    def convert(name, w):
        if not (name.startswith("blk.0.") and name.split(".")[2] in LIN):
            return None
        e, c = helper.mxfp4_quantize(w, rounding="ggml")
        written[name] = helper.mxfp4_ggml_blocks(e, c, w.shape[0])
        return gguf.GGMLQuantizationType.MXFP4, written[name]

    path = tmp_path / "out.gguf"
    types = helper.write_gguf_with(helper.smollm2_gguf_path(), path, convert)
    src, out = gguf.GGUFReader(helper.smollm2_gguf_path()), gguf.GGUFReader(path)
    assert [t.name for t in src.tensors] == [t.name for t in out.tensors]
    assert {k for k in src.fields if not k.startswith("GGUF.")} == {k for k in out.fields if not k.startswith("GGUF.")}
    for s, o in zip(src.tensors, out.tensors):
        if o.name in written:
            assert types[o.name] == "MXFP4" and np.array_equal(np.asarray(o.data), written[o.name].numpy())
        else:
            assert o.tensor_type == s.tensor_type and np.array_equal(np.asarray(o.data), np.asarray(s.data))

    def wrong(name, w):
        return (
            (gguf.GGMLQuantizationType.MXFP4, torch.zeros(w.shape[0], 3, dtype=torch.uint8))
            if name.startswith("blk.0.attn_q")
            else None
        )

    with pytest.raises(ValueError, match="do not hold|not a multiple of MXFP4"):
        helper.write_gguf_with(helper.smollm2_gguf_path(), tmp_path / "bad.gguf", wrong)


@pytest.mark.skipif(not helper.llama_cpp_installed(), reason="llama.cpp (llama-cpp-python) is not installed")
def test_llama_cpp_nll_kl_of_the_shipped_file_is_near_the_fp32_model():
    model, tok = helper.load_smollm2()
    ref = helper.token_log_probs(model, tok, n_tokens=64, window=64)
    ids = tok(helper.eval_text(), return_tensors="pt").input_ids[0]
    nll, kl = helper.llama_cpp_token_nll_kl(helper.load_llama_cpp(n_ctx=65), ids[:65], ref, window=64)
    assert nll.shape == kl.shape == (64,) and 0 <= kl.mean() < 0.05
