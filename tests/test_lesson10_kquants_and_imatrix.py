"""Lesson 10: the K-quant layouts, the importance matrix, GPTQ on Q4_0's grid, the type rules of a file
type, the GGUF writer and its checks, and the course's files against llama.cpp's own quantizer.
(The ports against ggml_quantize_chunk, byte for byte: tests/test_course_reference_equivalence.py.)"""

import collections
import re

import gguf
import numpy as np
import pytest
import torch

import helper
from quantcourse.lesson04_gguf import unpermute_rope_rows


@pytest.mark.parametrize(
    ("kind", "bits"), [("Q2_K", 2.625), ("Q3_K", 3.4375), ("Q4_K", 4.5), ("Q5_K", 5.5), ("Q6_K", 6.5625)]
)
def test_bits_per_weight_of_the_k_quants(kind, bits):
    assert helper.bits_per_weight(kind) == bits


@pytest.mark.parametrize("kind", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "Q8_0"])
def test_quantize_tensor_round_trips_through_gguf_py_within_its_grid(kind):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 512, generator=g)
    for im in (None, torch.rand(512, generator=g) + 0.1):
        blocks = helper.quantize_tensor(w, kind, im)
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
        assert blocks.dtype == torch.uint8 and tuple(blocks.shape) == (8, 512 // block * size)
        back = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[kind]))
        error = ((back - w).norm() / w.norm()).item()
        assert error < {"Q2_K": 0.45, "Q3_K": 0.25}.get(kind, 0.12)


def test_quantize_tensor_runs_the_port_of_each_type():
    """quantize_tensor dispatches to the ports (which tests/test_course_reference_equivalence.py checks
    against ggml); Q4_0..Q5_1 without an importance matrix run the ports' reference rounding."""
    g = torch.Generator().manual_seed(1)
    w, im = torch.randn(4, 512, generator=g), torch.rand(512, generator=g) + 0.1
    ports = {
        "Q2_K": helper.quantize_q2_k,
        "Q3_K": helper.quantize_q3_k,
        "Q4_K": helper.quantize_q4_k,
        "Q5_K": helper.quantize_q5_k,
        "Q6_K": helper.quantize_q6_k,
        "Q4_0": helper.quantize_q4_0_imatrix,
        "Q5_0": helper.quantize_q5_0_imatrix,
        "Q4_1": helper.quantize_q4_1_imatrix,
        "Q5_1": helper.quantize_q5_1_imatrix,
    }
    for kind, port in ports.items():
        for weights in (None, im):
            assert torch.equal(helper.quantize_tensor(w, kind, weights), port(w, weights))
    assert not torch.equal(helper.quantize_q4_k(w, im), helper.quantize_q4_k(w))  # the imatrix changes the search


def test_quantize_tensor_refuses_what_a_type_cannot_hold():
    with pytest.raises(ValueError, match="multiple of 256"):
        helper.quantize_tensor(torch.randn(4, 576), "Q4_K")
    with pytest.raises(ValueError, match="2-D float32"):
        helper.quantize_tensor(torch.randn(512), "Q4_K")
    with pytest.raises(ValueError, match="2-D float32"):
        helper.quantize_tensor(torch.randn(4, 512).half(), "Q6_K")
    with pytest.raises(ValueError, match="does not write"):
        helper.quantize_tensor(torch.randn(4, 512), "IQ4_NL")
    with pytest.raises(ValueError, match="imatrix"):
        helper.quantize_tensor(torch.randn(4, 512), "Q4_K", torch.ones(256))
    with pytest.raises(ValueError, match="imatrix"):
        helper.quantize_tensor(torch.randn(4, 512), "Q4_0", -torch.ones(512))


def test_gguf_names_map_both_ways():
    for hf in ("model.layers.3.mlp.down_proj", "model.layers.0.self_attn.q_proj", "model.embed_tokens"):
        name = helper.hf_to_gguf_name(hf)
        assert helper.gguf_name_to_hf(name) == hf + ".weight"
    assert helper.hf_to_gguf_name("model.layers.3.mlp.down_proj.weight") == "blk.3.ffn_down.weight"
    with pytest.raises(ValueError, match="not a Llama module"):
        helper.hf_to_gguf_name("model.layers.3.mlp.act_fn")


def test_importance_matrix_is_half_the_diagonal_of_gptqs_hessian(tiny_llama):
    model, ids = tiny_llama
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    im = helper.importance_matrix(model, ids, names)
    hessians = helper.input_hessians(model, ids, names)
    assert sorted(im) == ["blk.0.attn_q.weight", "blk.1.ffn_down.weight"]
    for name in names:
        torch.testing.assert_close(im[helper.hf_to_gguf_name(name)].double(), torch.diagonal(hessians[name]) / 2)


def test_importance_matrix_by_hand():
    """The mean of x^2 per column, over every token of every row of ids (exercise 3's numbers)."""
    x = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.0, 1.0]])
    assert (x**2).mean(0).tolist() == [5.0, 2.0, 0.5]


def test_gptq_on_q4_0s_grid_with_uncorrelated_inputs_is_rounding_on_that_grid():
    """H = identity: GPTQ spreads no error, so each weight is rounded on Q4_0's grid, d = fp16(signed max / -8)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 128, generator=g)
    blocks = helper.gptq_q4_0_blocks(w, torch.eye(128, dtype=torch.float64), act_order=False)
    assert tuple(blocks.shape) == (16, 4 * 18)
    back = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType.Q4_0))
    groups = w.reshape(-1, 32)
    d = (groups.gather(1, groups.abs().argmax(1, keepdim=True)) / -8).half().float()
    expected = (torch.round(groups / d).clamp(-8, 7) * d).reshape(w.shape)
    assert torch.equal(back, expected)
    scale, zero = helper.q4_0_grid(torch.zeros(2, 32))
    assert scale.tolist() == [[1.0], [1.0]] and zero.tolist() == [[8.0], [8.0]]


def test_permute_rope_rows_undoes_unpermute():
    rows = torch.arange(24 * 3).reshape(24, 3)
    for heads in (1, 2, 3, 6):
        assert torch.equal(helper.permute_rope_rows(unpermute_rope_rows(rows, heads), heads), rows)
    with pytest.raises(ValueError, match="heads"):
        helper.permute_rope_rows(rows, 5)


@pytest.mark.slow
def test_gguf_weights_of_the_model_are_the_files_own():
    model, _ = helper.load_smollm2(torch.float32)
    ours, file_weights = helper.gguf_weights(model=model), helper.gguf_weights()
    assert sorted(ours) == sorted(file_weights)
    assert all(torch.equal(ours[name], file_weights[name]) for name in ours)


def test_use_more_bits_and_a_hand_made_mixture():
    assert [i for i in range(30) if helper.use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    shapes = {
        "token_embd.weight": (576, 100),
        "blk.0.attn_q.weight": (576, 576),
        "blk.0.attn_v.weight": (576, 192),
        "blk.0.ffn_down.weight": (1536, 576),
        "blk.0.attn_norm.weight": (576,),
    }
    types = helper.llama_tensor_types(shapes, "Q4_K_M", n_layer=1, n_gqa=3)
    # a tied embedding is quantized as the output (Q6_K, here Q8_0: 576 % 256); Q4_K falls back to Q5_0,
    # attn_v's use_more_bits Q6_K to Q8_0; ffn_down's rows of 1536 hold Q6_K; norms stay F32
    assert types == {
        "token_embd.weight": "Q8_0",
        "blk.0.attn_q.weight": "Q5_0",
        "blk.0.attn_v.weight": "Q8_0",
        "blk.0.ffn_down.weight": "Q6_K",
        "blk.0.attn_norm.weight": "F32",
    }
    with pytest.raises(ValueError, match="unsupported ftype"):
        helper.llama_tensor_types(shapes, "Q4_K_X", n_layer=1)


def test_file_tensor_types_of_the_shipped_file():
    types = helper.file_tensor_types("Q4_K_M")
    counts = collections.Counter(types.values())
    assert len(types) == 272 and counts["F32"] == 61
    assert all(types[f"blk.{i}.ffn_down.weight"] in ("Q4_K", "Q6_K") for i in range(30))
    assert all(types[f"blk.{i}.attn_q.weight"] == "Q5_0" for i in range(30))  # rows of 576: Q4_K's fallback


def _small_mixture() -> dict[str, str]:
    """Q8_0 everywhere but one Q4_K and one Q5_0 tensor: a file that is quick to write from scratch."""
    types = {name: ("F32" if kind == "F32" else "Q8_0") for name, kind in helper.file_tensor_types("Q8_0").items()}
    types["blk.0.ffn_down.weight"], types["blk.0.attn_q.weight"] = "Q4_K", "Q5_0"
    return types


@pytest.mark.slow
def test_quantize_gguf_writes_what_gguf_py_reads_back_and_copies_the_rest(tmp_path):
    weights = helper.gguf_weights()
    types = _small_mixture()
    imatrix = {"blk.0.ffn_down.weight": torch.rand(1536) + 0.5}
    path = tmp_path / "mixture.gguf"
    written = helper.quantize_gguf(path, types, imatrix, weights=weights)
    assert written == types
    reader = gguf.GGUFReader(path)
    source = {t.name: t for t in gguf.GGUFReader(helper.smollm2_gguf_path()).tensors}
    for t in reader.tensors:
        assert t.tensor_type.name == types[t.name]
        if t.name in ("blk.0.ffn_down.weight", "blk.0.attn_q.weight"):
            im = imatrix.get(t.name)
            assert np.array_equal(
                np.asarray(t.data), helper.quantize_tensor(weights[t.name], types[t.name], im).numpy()
            )
        elif t.name == "token_embd.weight" or types[t.name] == "F32":  # already of its type: copied
            assert np.array_equal(np.asarray(t.data), np.asarray(source[t.name].data))
    assert (
        reader.fields["tokenizer.ggml.tokens"].contents()[:5]
        == gguf.GGUFReader(helper.smollm2_gguf_path()).fields["tokenizer.ggml.tokens"].contents()[:5]
    )
    assert helper.gguf_tensor_bytes(path)["blk.0.attn_q.weight"][0] == "Q5_0"


def test_quantize_gguf_and_the_writer_refuse_bad_input(tmp_path):
    with pytest.raises(ValueError, match="types has no entry"):
        helper.quantize_gguf(tmp_path / "a.gguf", {"token_embd.weight": "Q8_0"})

    def wrong(name, w):
        return (
            (gguf.GGMLQuantizationType.Q8_0, torch.zeros(3, 34, dtype=torch.uint8))
            if name.endswith("q.weight")
            else None
        )

    with pytest.raises(ValueError, match="do not hold"):
        helper.write_gguf_with(helper.smollm2_gguf_path(), tmp_path / "b.gguf", wrong)


def test_check_gguf_file_catches_truncation_and_a_bad_magic(tmp_path):
    data = helper.smollm2_gguf_path().read_bytes()
    assert len(helper.check_gguf_file(helper.smollm2_gguf_path())) == 272
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match="is truncated"):
        helper.check_gguf_file(cut)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(data[:5000])
    with pytest.raises(ValueError, match="header ends early|truncated"):
        helper.check_gguf_file(header_only)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + data[4:1000])
    with pytest.raises(ValueError, match="not a GGUF file"):
        helper.check_gguf_file(bad)


def test_ggml_quantize_in_threads_equals_the_course_where_ggml_is_installed():
    if not helper.ggml_installed():
        pytest.skip("llama.cpp's libggml-base.so is not installed")
    g = torch.Generator().manual_seed(5)
    w = torch.randn(2048, 768, generator=g)  # over 2**20 weights: split over the threads
    im = torch.rand(768, generator=g) + 0.1
    for kind in ("Q4_K", "Q5_0"):
        assert torch.equal(helper.ggml_quantize(w, kind, im), helper.quantize_tensor(w, kind, im))
    with pytest.raises(ValueError, match="multiple of 256"):
        helper.ggml_quantize(w[:, :576], "Q4_K")


@pytest.mark.slow
@pytest.mark.parametrize(("ftype", "with_imatrix"), [("Q4_K_M", False), ("Q4_K_M", True), ("Q4_0", True)])
def test_file_types_and_bytes_equal_llama_model_quantize(tmp_path, ftype, with_imatrix):
    """The course's file (its type rules, quantizers and writer) against llama.cpp's llama_model_quantize
    on the same input: every tensor's type and bytes. The imatrix is a real one (mean x^2 on calibration
    text, every linear); llama.cpp's own rules with an imatrix (Q4_0: the first ffn_down tensors Q4_1)."""
    if not helper.llama_cpp_installed():
        pytest.skip(helper.LLAMA_CPP_MISSING)
    model, tokenizer = helper.load_smollm2(torch.float32)
    imatrix = None
    if with_imatrix:
        linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
        imatrix = helper.importance_matrix(model, helper.calibration_ids(tokenizer, 512, 256), linears)
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    types = helper.file_tensor_types(ftype, imatrix=with_imatrix)
    helper.quantize_gguf(ours, types, imatrix, weights=helper.gguf_weights(model=model))
    helper.llama_cpp_quantize(theirs, ftype, imatrix)
    a, b = helper.gguf_tensor_bytes(ours), helper.gguf_tensor_bytes(theirs)
    assert sorted(a) == sorted(b)
    assert [n for n in a if a[n] != b[n]] == []


@pytest.mark.slow
def test_llama_cpp_quantize_says_why_it_failed(tmp_path):
    if not helper.llama_cpp_installed():
        pytest.skip(helper.LLAMA_CPP_MISSING)
    with pytest.raises(RuntimeError, match="requires an imatrix"):
        helper.llama_cpp_quantize(tmp_path / "q2ks.gguf", "Q2_K_S")


_DRY_RUN_LINE = re.compile(
    r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\S+), size =\s*[\d.]+ MiB(?: ->\s*[\d.]+ MiB \((\S+)\))?"
)


@pytest.mark.slow
def test_type_rules_equal_llama_cpps_dry_runs_for_every_file_type(tmp_path):
    """llama_tensor_types (through file_tensor_types) against the type llama.cpp's dry run logs for each
    tensor of the shipped file ("type = q4_1, size = a MiB -> b MiB (q5_0)"), for all 15 file types
    (Q2_K_S only with an importance matrix, which it requires)."""
    if not helper.llama_cpp_installed():
        pytest.skip(helper.LLAMA_CPP_MISSING)
    names = list(helper.file_tensor_types("Q8_0"))
    fake = {
        n: torch.ones(helper.gguf_tensor_infos()[n]["shape"][0])
        for n in names
        if "norm" not in n and n != "token_embd.weight"
    }
    for ftype in helper.FTYPES:
        for with_imatrix in (False, True) if ftype in ("Q4_0", "Q5_0", "Q2_K_S") else (False,):
            if ftype == "Q2_K_S" and not with_imatrix:
                continue
            log = helper.llama_cpp_quantize(tmp_path / "dry.gguf", ftype, fake if with_imatrix else None, dry_run=True)
            logged = {m[1]: (m[3] or m[2]).upper() for m in _DRY_RUN_LINE.finditer(log)}
            assert len(logged) == 272, (ftype, len(logged))
            assert helper.file_tensor_types(ftype, imatrix=with_imatrix) == logged, ftype
