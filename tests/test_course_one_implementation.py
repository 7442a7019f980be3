"""One implementation per idea: what was written twice is either one function now, or tied here.

Merged (one function, the others thin calls), checked here so that a copy cannot grow back:
- per-row absmax int8: Lesson 3's quantize_per_channel(symmetric=True) is Lesson 8's
  quantize_rows_absmax, Lesson 12's quantize_int8_per_channel and W8A16Linear's weights;
- NF4 rounding: Lesson 4's absmax_level_codes is blockwise_nf4_rtn's and Lesson 9's nf4_quantize's;
- per-token NLL windows: core.llama_cpp's window_nll is token_nll's and llama_cpp_token_nll's;
- the linear swap: core.surgery's replace_linears is Lesson 3's, Lesson 4's and Lesson 9's;
- /proc/cpuinfo: core.machine's cpu_flags and cpu_model_name, for Lesson 12, Lesson 14, the
  benchmark and the course runner.

Tied (deliberately different, so both stay; the tests say where and how they differ):
- the group-wise min-max quantizers: Lesson 3's asymmetric grid and Lesson 9's rtn_quantize (the
  same integer-zero grid, Lesson 9's scale rounded to fp16), Lesson 4's blockwise_minmax_rtn and
  Lesson 12's quantize_int4_groups (a float minimum; the parameters rounded after or before the
  codes are chosen, ties rounded up or to even), Lesson 3's quantize_per_group (symmetric);
- Lesson 2's perplexity (one pass) and token_nll (windows).
"""

import ast
import copy
import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import helper

REPO = Path(helper.REPO_DIR)


def _weights(seed: int, rows: int = 64, cols: int = 512) -> torch.Tensor:
    """A weight-like tensor: rows of different scales, an all-zero row, a constant row, an outlier."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)
    w[0], w[1], w[2, 7] = 0.0, 0.75, 40.0
    return w


# -- per-row absmax int8: one function ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_every_per_row_absmax_quantizer_is_lesson3s(dtype, bits):
    w = _weights(0, 48, 96).to(dtype)
    q, scale, zero = helper.quantize_per_channel(w, bits=bits, axis=0, symmetric=True)
    q8, s8 = helper.quantize_rows_absmax(w, bits)
    assert torch.equal(q8, q) and torch.equal(s8, scale) and not zero.any()
    qmax = 2 ** (bits - 1) - 1
    assert q.abs().max() <= qmax  # symmetric: the code -2**(bits-1) is never used
    if bits == 8:
        q10, s10 = helper.quantize_int8_per_channel(w)
        assert torch.equal(q10, q) and torch.equal(s10, scale.flatten()) and s10.shape == (48,)
        layer = helper.W8A16Linear.from_linear(_linear_with(w))
        assert torch.equal(layer.int8_weights, q) and torch.equal(layer.scales, scale.flatten().to(dtype))


def _linear_with(w: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
    return linear


def test_per_row_absmax_per_tensor_and_per_group_are_the_same_rows_regrouped():
    w = _weights(1, 16, 128)
    q, s = helper.quantize_rows_absmax(w.reshape(1, -1))  # W8A8Linear's "per_tensor" activations
    assert torch.equal(q.reshape(w.shape), helper.linear_quantize(w, s.item(), 0)) and s.numel() == 1
    qg, sg = helper.quantize_per_group(w, 32, bits=4)
    qr, sr = helper.quantize_rows_absmax(w.reshape(-1, 32), 4)
    assert torch.equal(qg, qr.reshape(w.shape)) and torch.equal(sg, sr.reshape(16, 4))


# -- NF4: one rounding, two groupings -------------------------------------------------------------


def test_nf4_roundings_are_one_and_differ_only_in_their_groups():
    pytest.importorskip("bitsandbytes")
    w = _weights(2, 24, 576)  # SmolLM2's row length: 128 does not divide it
    levels = helper.nf4_levels()
    for g in (32, 64, 576):  # groups that divide the row: the same quantizer
        gq = helper.nf4_quantize(w, g)
        codes, absmax = helper.absmax_level_codes(w.reshape(24, -1, g), levels)
        assert torch.equal(gq.codes, codes.reshape(24, -1)) and torch.equal(gq.scale, absmax.reshape(24, -1))
        assert torch.equal(helper.blockwise_nf4_rtn(w, g), gq.dequantize())
    # 128: blockwise_nf4_rtn's runs go through the flattened weight (across rows), nf4_quantize's
    # groups along each row (4 of 128 and a last one of 64)
    across_rows = helper.nf4_quantize(w.reshape(-1, 128), 128).dequantize().reshape(w.shape)
    assert torch.equal(helper.blockwise_nf4_rtn(w, 128), across_rows)
    along_rows = helper.nf4_quantize(w, 128)
    assert along_rows.scale.shape == (24, 5)
    assert not torch.equal(along_rows.dequantize(), across_rows)
    # where the runs happen to coincide (each even row starts on a multiple of 128), so do the weights
    assert torch.equal(along_rows.dequantize()[::2, :512], across_rows[::2, :512])


# -- the group-wise min-max quantizers: tied ------------------------------------------------------


@pytest.mark.parametrize("group_size", [32, 128, 512])
def test_rtn_grid_is_lesson3s_asymmetric_grid_with_its_scale_rounded_to_fp16(group_size):
    """Lesson 9's rtn_quantize (GPTQ's grid) and Lesson 3's asymmetric quantize_per_channel on
    groups both widen the range to contain 0 and use an integer zero point; Lesson 3's codes are
    signed (-8..7), Lesson 9's unsigned (0..15). The only difference: Lesson 9 rounds the scale to
    fp16 before choosing the codes. On Lesson 9's grid, Lesson 3's rounding gives its codes exactly."""
    w = _weights(3)
    q3, s3, z3 = helper.quantize_per_channel(w.reshape(-1, group_size), bits=4, axis=0, symmetric=False)
    gq = helper.rtn_quantize(w, 4, group_size)
    s9, z9 = gq.scale.reshape(-1, 1), gq.zero.reshape(-1, 1).long()
    assert torch.equal(s9, s3.half().float())  # the same scale, rounded to fp16
    assert not torch.equal(s9, s3)
    shifted = q3.reshape(w.shape).int() + 8
    differ = gq.codes.int() != shifted
    assert differ.any() and (gq.codes.int() - shifted).abs().max() == 1  # a few codes, by one step
    on_rtn_grid = helper.linear_quantize(w.reshape(-1, group_size), s9, z9 - 8, bits=4)
    assert torch.equal(on_rtn_grid.reshape(w.shape).int() + 8, gq.codes.int())


def test_rtn_and_lesson3_agree_where_the_scale_is_an_fp16_number():
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 16, (8, 64), generator=g)
    codes[:, ::32], codes[:, 1::32] = 0, 15  # every group spans [-7, 8] steps: scale 0.125, zero 7
    w = (codes - 7) * 0.125
    q3, s3, z3 = helper.quantize_per_channel(w.reshape(-1, 32), bits=4, axis=0, symmetric=False)
    gq = helper.rtn_quantize(w, 4, 32)
    assert torch.equal(gq.codes.int(), q3.reshape(w.shape).int() + 8) and torch.equal(gq.codes, codes.to(torch.uint8))
    assert torch.equal(gq.zero.reshape(-1, 1).int(), z3 + 8) and torch.equal(gq.scale.reshape(-1, 1), s3)
    assert torch.equal(gq.dequantize(), helper.dequantize_per_channel(q3, s3, z3).reshape(w.shape))


def _int4_groups_dequantized(w: torch.Tensor, group_size: int, param_dtype: torch.dtype) -> torch.Tensor:
    q, scale, zero = helper.quantize_int4_groups(w, group_size, param_dtype)
    groups = q.float().reshape(w.shape[0], -1, group_size)
    return ((groups - 8) * scale.float()[..., None] + zero.float()[..., None]).reshape(w.shape)


def test_float_minimum_grids_of_lessons_4_and_10_agree_on_an_exact_grid():
    """Lesson 4's blockwise_minmax_rtn (Q4_1's arithmetic) and Lesson 12's quantize_int4_groups (the
    int4 kernel's convention, zero = the value of code 8) both keep the group's own minimum (not
    widened to 0): on weights on such a grid, with exact parameters, they give the same weights."""
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (16, 64), generator=g)
    codes[:, ::32], codes[:, 1::32] = 0, 15
    step = torch.tensor([0.25, 0.5]).repeat_interleave(32).repeat(16, 1)
    low = torch.tensor([-2.0, -4.0]).repeat_interleave(32).repeat(16, 1)
    w = low + codes * step
    for param_dtype in (torch.float16, torch.float32):
        assert torch.equal(helper.blockwise_minmax_rtn(w, 32, param_dtype=param_dtype), w)
        assert torch.equal(_int4_groups_dequantized(w, 32, param_dtype), w)


def test_float_minimum_grids_of_lessons_4_and_10_differ_in_ties_and_in_when_they_round_parameters():
    # 1. A weight exactly half a step above a level: Q4_1 rounds up (C's (x + 0.5) truncated),
    #    Lesson 12 rounds half to even (torch.round).
    w = torch.tensor([[0.0, 15.0, 0.5, 2.5]])  # min 0, max 15: step 1
    assert helper.blockwise_minmax_rtn(w, 4).tolist() == [[0.0, 15.0, 1.0, 3.0]]
    assert _int4_groups_dequantized(w, 4, torch.float32).tolist() == [[0.0, 15.0, 0.0, 2.0]]
    # 2. Real-valued weights. Lesson 4 chooses the codes with the exact step and minimum and rounds
    #    the parameters to fp16 after; Lesson 12 rounds its step and zero first and chooses the codes
    #    for them. With fp32 parameters the codes agree (the weights to float rounding); with fp16
    #    parameters a few weights land one step apart.
    w = _weights(6)
    step = ((w.reshape(64, -1, 32).amax(-1) - w.reshape(64, -1, 32).amin(-1)) / 15)[..., None]
    for param_dtype, most in ((torch.float32, 1e-4), (torch.float16, 1.01)):
        lesson4 = helper.blockwise_minmax_rtn(w, 32, param_dtype=param_dtype)
        apart = (lesson4 - _int4_groups_dequantized(w, 32, param_dtype)).reshape(64, -1, 32).abs() / step.clamp(
            min=1e-12
        )
        assert apart.max() < most
    assert apart.max() > 0.5  # fp16: some weights one step apart


def test_lesson3s_per_group_is_symmetric_not_min_max():
    """quantize_per_group (Lesson 3) scales each group by its absmax: on a group of weights in [1, 4]
    it uses the 4-bit codes 2..7 only; rtn_quantize's grid, widened to 0, the codes 4..15; the float
    minimum of Lessons 4 and 12 all 16."""
    w = torch.linspace(1.0, 4.0, 32).reshape(1, 32)
    q, _ = helper.quantize_per_group(w, 32, bits=4)
    assert q.unique().tolist() == [2, 3, 4, 5, 6, 7]
    assert helper.rtn_quantize(w, 4, 32).codes.unique().tolist() == list(range(4, 16))
    assert helper.quantize_int4_groups(w, 32)[0].unique().tolist() == list(range(16))
    assert helper.blockwise_minmax_rtn(w, 32).unique().numel() == 16
    with pytest.raises(ValueError, match="quantize_per_channel"):  # it names the asymmetric grid to use
        helper.quantize_per_group(w, 32, bits=4, symmetric=False)


# -- per-token NLLs: one windowing; perplexity: one pass --------------------------------------------


class _Ids:
    """A stand-in tokenizer: every text is the same token ids."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __call__(self, text, return_tensors="pt"):
        return type("Encoding", (), {"input_ids": self.ids[None]})


class _TorchLlama:
    """llama_cpp.Llama's reset/eval/scores, answered by a torch model (scores: a numpy array, as llama.cpp's)."""

    def __init__(self, model):
        self.model, self.scores = model, None

    def reset(self):
        self.scores = None

    def eval(self, tokens):
        assert isinstance(tokens, list) and all(isinstance(t, int) for t in tokens)
        with torch.no_grad():
            self.scores = self.model(input_ids=torch.tensor([tokens])).logits[0].float().numpy()


def test_token_nll_and_llama_cpp_token_nll_score_the_same_windows(tiny_llama):
    model, _ = tiny_llama
    ids = torch.randint(0, 96, (70,), generator=torch.Generator().manual_seed(2))
    for n_tokens, window in ((32, 16), (60, 30), (16, 16)):
        nll = helper.token_nll(model, _Ids(ids), n_tokens=n_tokens, window=window)
        assert nll.shape == (n_tokens,)
        assert torch.equal(helper.llama_cpp_token_nll(_TorchLlama(model), ids, n_tokens, window), nll)
        assert torch.equal(helper.llama_cpp_token_nll(_TorchLlama(model), ids.tolist(), n_tokens, window), nll)
    for n_tokens, window in ((100, 64), (0, 16)):
        with pytest.raises(ValueError, match=rf"n_tokens \({n_tokens}\) must be a positive multiple"):
            helper.token_nll(model, _Ids(ids), n_tokens=n_tokens, window=window)
        with pytest.raises(ValueError, match=rf"n_tokens \({n_tokens}\) must be a positive multiple"):
            helper.llama_cpp_token_nll(_TorchLlama(model), ids, n_tokens, window)
    with pytest.raises(ValueError, match="the text has 70 tokens; 129 are needed"):
        helper.llama_cpp_token_nll(_TorchLlama(model), ids, 128, 64)


def test_window_nll_feeds_each_window_its_own_tokens():
    fed = []

    def logits_of(inputs):  # predicts "the next id is this id + 1" with logit 3
        fed.append(inputs.tolist())
        return torch.nn.functional.one_hot((inputs + 1) % 5, 5).float() * 3

    ids = torch.tensor([0, 1, 2, 4, 0, 1, 1, 2, 3])
    nll = helper.window_nll(logits_of, ids, n_tokens=8, window=4)
    assert fed == [[0, 1, 2, 4], [0, 1, 1, 2]]
    right, wrong = math.log(math.exp(3) + 4) - 3, math.log(math.exp(3) + 4)
    hits = [b == (a + 1) % 5 for a, b in zip(ids[:8].tolist(), ids[1:].tolist())]
    torch.testing.assert_close(nll, torch.tensor([right if h else wrong for h in hits]))
    helper.check_windows(8, 4)
    for n_tokens, window in ((6, 4), (2, 4), (8, 0)):
        with pytest.raises(ValueError, match="positive multiple of window"):
            helper.check_windows(n_tokens, window)


def test_perplexity_is_one_window_of_token_nll_averaged(tiny_llama):
    """Lesson 2's perplexity feeds max_tokens tokens and scores max_tokens - 1 of them; token_nll
    with one window of max_tokens runs the same pass and scores one token more (the one after)."""
    model, _ = tiny_llama
    ids = torch.randint(0, 96, (70,), generator=torch.Generator().manual_seed(3))
    for k in (16, 40):
        nll = helper.token_nll(model, _Ids(ids), n_tokens=k, window=k)
        with torch.no_grad():
            logits = model(input_ids=ids[None, :k]).logits.float()[0]
        assert torch.equal(nll[: k - 1], torch.nn.functional.cross_entropy(logits[:-1], ids[1:k], reduction="none"))
        ppl = helper.perplexity(model, _Ids(ids), max_tokens=k)
        assert math.isclose(math.log(ppl), nll[: k - 1].double().mean().item(), rel_tol=1e-6)


# -- the linear swap: one loop --------------------------------------------------------------------


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 64)
        self.block = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64, bias=False))
        self.lm_head = nn.Linear(64, 10, bias=False)
        self.lm_head.weight = self.embed.weight


def _state(model: nn.Module) -> dict:
    return {"types": [(n, type(m).__name__) for n, m in model.named_modules()]} | {
        n: t for n, t in [*model.named_buffers(), *model.named_parameters()]
    }


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_every_linear_swap_is_replace_linears():
    model = _Tied()
    for exclude in (("lm_head",), "block.2"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lesson3 = helper.replace_linear_with_w8a16(copy.deepcopy(model), exclude=exclude)
            core = helper.replace_linears(copy.deepcopy(model), helper.W8A16Linear.from_linear, exclude=exclude)
        assert _same(_state(lesson3), _state(core))
        for fmt in ("Q8_0", "Q4_1"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lesson4 = helper.replace_linear_with_gguf(copy.deepcopy(model), fmt=fmt, exclude=exclude)
                core = helper.replace_linears(
                    copy.deepcopy(model),
                    lambda linear, f=fmt: helper.GGUFLinear.from_linear(linear, f),
                    exclude=exclude,
                )
            assert _same(_state(lesson4), _state(core))


def test_gguf_swap_from_a_files_tensors_keeps_its_f32_layers():
    model = _Tied()
    blocks = helper.gguf_quantize(model.block[0].weight, "Q8_0")
    tensors = {"block.0.weight": ("Q8_0", blocks), "block.2.weight": ("F32", model.block[2].weight.detach())}
    out = helper.replace_linear_with_gguf(model, tensors=tensors)
    assert isinstance(out.block[0], helper.GGUFLinear) and torch.equal(out.block[0].blocks, blocks)
    assert type(out.block[2]) is nn.Linear and type(out.lm_head) is nn.Linear
    with pytest.raises(ValueError, match="no tensor for layer 'block.0'"):
        helper.replace_linear_with_gguf(_Tied(), tensors={})


def test_the_swaps_share_one_validation_and_one_tie_warning():
    for swap in (
        helper.replace_linear_with_w8a16,
        lambda m, exclude=("lm_head",): helper.replace_linear_with_gguf(m, "Q8_0", exclude),
        lambda m, exclude=("lm_head",): helper.replace_linears(m, helper.W8A8Linear.from_linear, exclude),
    ):
        with pytest.raises(TypeError, match="nn.Module"):
            swap("model")
        with pytest.raises(TypeError, match="strings"):
            swap(_Tied(), exclude=(1,))
        with pytest.raises(ValueError, match="from_linear"):
            swap(nn.Linear(32, 32), exclude=())
        with pytest.raises(ValueError, match="no nn.Linear"):
            swap(nn.Sequential(nn.ReLU()))
        with pytest.warns(UserWarning, match="lm_head.weight is tied to embed.weight"):
            swap(_Tied(), exclude=())
    # the text Lesson 3's stored output prints
    with pytest.warns(UserWarning) as caught:
        helper.replace_linear_with_w8a16(_Tied(), exclude=())
    assert str(caught[0].message) == (
        "lm_head.weight is tied to embed.weight: the int8 copy does not replace the float tensor, "
        "which stays for the other user (exclude it to keep the tie)"
    )
    assert caught[0].filename == __file__  # the warning points at the caller, not into quantcourse/


def test_quantize_llama_4bit_swaps_through_replace_linears_and_keeps_the_tie(tiny_llama):
    model, _ = tiny_llama
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # lm_head is not swapped: no tie warning
        helper.quantize_llama_4bit(model, "rtn", group_size=32)
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith("_proj")}
    assert kinds == {"GroupQuantLinear"} and type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight


def _calls(path: Path) -> list[str]:
    """Source of every call in a Python file (or in a notebook's code cells)."""
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text())["cells"]
        sources = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    else:
        sources = [path.read_text()]
    out = []
    for source in sources:
        clean = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
        tree = ast.parse(clean)
        out += [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Call)]
    return out


CODE = sorted(
    [*(REPO / "quantcourse").rglob("*.py"), *(REPO / "benchmarks").glob("*.py"), *(REPO / "scripts").glob("*.py")]
    + [*(REPO / "notebooks").glob("*.ipynb"), REPO / "helper.py"]
)


def test_one_linear_swap_loop_and_one_cpuinfo_reader():
    swaps, readers = set(), set()
    for path in CODE:
        name = str(path.relative_to(REPO))
        text = path.read_text()
        if re.search(r"setattr\([^)]*get_submodule", text):
            swaps.add(name)
        if "/proc/cpuinfo" in text and any("cpuinfo" in call for call in _calls(path)):
            readers.add(name)
    assert swaps == {"quantcourse/core/surgery.py"}
    assert readers == {"quantcourse/core/machine.py"}


# -- /proc/cpuinfo: one reader ---------------------------------------------------------------------


CPUINFO = (
    "processor\t: 0\nmodel name\t: Example CPU @ 2.0GHz\n"
    "flags\t\t: fpu sse avx2 avx512f avx512_vnni amx_tile amx_int8\n"
    "processor\t: 1\nmodel name\t: Another\nflags\t\t: fpu\n"
)


def test_cpu_flags_and_model_name_read_the_first_cpu(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO)
    flags = helper.cpu_flags(info)
    assert list(flags) == list(helper.CPU_FLAGS)
    assert [f for f, has in flags.items() if has] == ["avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"]
    assert helper.cpu_model_name(info) == "Example CPU @ 2.0GHz"
    assert helper.cpu_instruction_sets(info) == helper.cpu_flags(info, helper.INSTRUCTION_SETS)
    assert helper.cpu_flags(tmp_path / "missing") is None and helper.cpu_model_name(tmp_path / "missing") is None
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd\n")
    assert not any(helper.cpu_flags(tmp_path / "arm").values()) and helper.cpu_model_name(tmp_path / "arm") is None


def test_one_flag_list():
    assert set(helper.INSTRUCTION_SETS) <= set(helper.CPU_FLAGS) and set(helper.KERNEL_FLAGS) <= set(helper.CPU_FLAGS)
    assert helper.INSTRUCTION_SETS == {f: helper.CPU_FLAGS[f] for f in helper.INSTRUCTION_SETS}
    # the order the benchmark's machine line and Lesson 14 print
    assert helper.KERNEL_FLAGS == ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def test_benchmark_and_course_runner_describe_the_cpu_with_core_machine(monkeypatch):
    cm = helper.load_script("benchmarks/compare_methods.py")
    run_course = helper.load_script("scripts/run_course.py")
    name = helper.cpu_model_name()
    if name is not None:
        assert cm.cpu_model() == name and run_course.machine().startswith(f"{name}, ")
    flags = helper.cpu_flags(wanted=helper.KERNEL_FLAGS)
    if flags is not None:
        assert cm.simd_flags() == ("+".join(f for f, has in flags.items() if has) or "no AVX2/AVX-512/AMX")
    monkeypatch.setattr(cm.helper, "cpu_flags", lambda wanted: None)
    assert cm.simd_flags() == "flags unknown"
    monkeypatch.setattr(cm.helper, "cpu_flags", lambda wanted: dict.fromkeys(wanted, False))
    assert cm.simd_flags() == "no AVX2/AVX-512/AMX"
    monkeypatch.setattr(cm.helper, "cpu_flags", lambda wanted: {f: f in ("avx2", "amx_bf16") for f in wanted})
    assert cm.simd_flags() == "avx2+amx_bf16"
