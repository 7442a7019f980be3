"""Compare every quantization method of the course on SmolLM2-135M-Instruct, on this machine.

For each method the script loads the model once, quantizes it, and measures the bytes really held
(helper.model_size), the ratio to fp32, perplexity on 4,096 tokens of helper.eval_text() in windows
of 512 with its standard error (helper.token_nll; the per-token NLLs go to smollm2_cpu_nll.npz so
that two methods can be compared token by token), greedy decode speed by the course's timing
protocol (helper.decode_timings: a warm-up, then --repeats rounds interleaved with an fp32 copy of
the model in the same process; the median tokens/s and the median and range of the per-round
speed-ups over fp32, exactly what the lessons print), the load+quantize time and the process's
peak resident memory (taken before the fp32 copy is loaded). Every method runs in a fresh
subprocess (this script re-invoked with --method NAME, printing one JSON row) so that peak RSS is per method.

Usage:
    python benchmarks/compare_methods.py                       # all methods -> benchmarks/results/
    python benchmarks/compare_methods.py --methods fp32 bf16 quanto-int8 --out /tmp/bench
    python benchmarks/compare_methods.py --tiny --out /tmp/bench  # tiny random model (tests)
    python benchmarks/compare_methods.py --update --methods awq-int4-g128  # re-measure one row in place

--update re-measures only the named methods (fp32 is not added) and replaces their rows in the files
already in --out (the CSV, the markdown table, the per-token NLLs), keeping every other row as it is;
the CSV's first line then also says which rows were re-measured, on which date and machine.

The fast-* rows run helper.FastDecoder (Lesson 12), a lean decoder with a static KV cache, on
PyTorch's weight-only int8/int4 CPU kernels with bf16 activations; their lm_head is int8. The *-fast
rows deploy the codes of a Lesson 9 row (RTN, GPTQ, AWQ at groups of 128) on the same int4 kernel. The
fp32-static-compiled row is transformers' own recipe (static cache + torch.compile), its compile
time in load_quantize_s.

In every other quantized method the tied lm_head (it shares its weight with the token embedding) stays
in full precision, and so does the embedding: only the decoder's nn.Linear layers are quantized.
The exception is llama.cpp-q4_1-file: llama.cpp runs the GGUF file as shipped (Q4_1 linear layers,
a Q8_0 embedding that is also the output layer); it is measured only where `make setup-llama`
installed it (the default run skips it otherwise, saying so).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import helper  # (sets the torchao loggers before torchao is imported)

REPO = helper.REPO_DIR

RESULTS_DIR = helper.BENCHMARK_DIR
CSV_NAME = "smollm2_cpu.csv"
MD_NAME = "smollm2_cpu.md"
NLL_NAME = "smollm2_cpu_nll.npz"
REGENERATE = "python benchmarks/compare_methods.py"
COLUMNS = list(helper.BENCHMARK_COLUMNS)
METHOD_TIMEOUT_S = 1800
SKIP = "lm_head"  # tied to the embedding: kept in full precision by every method


# ---------------------------------------------------------------------------
# The methods: name -> (library, loader(folder) -> model in eval mode)
# ---------------------------------------------------------------------------


def _load(folder: Path, dtype: torch.dtype = torch.float32, **kwargs) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).eval()


def _quanto(weights: str) -> Callable[[Path], nn.Module]:
    def load(folder: Path) -> nn.Module:
        from optimum.quanto import freeze, quantize

        model = _load(folder)
        quantize(model, weights=weights, exclude=SKIP)
        freeze(model)
        return model

    return load


def _w8a16(folder: Path) -> nn.Module:
    return helper.replace_linear_with_w8a16(_load(folder), exclude=(SKIP,))


def _torch_ao_dynamic(folder: Path) -> nn.Module:
    model = _load(folder)
    qconfig = torch.ao.quantization.default_dynamic_qconfig
    spec = {name: qconfig for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != SKIP}
    with warnings.catch_warnings():  # the API is deprecated (lesson 6 shows the warning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated")
        return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)


def _torchao(config_name: str) -> Callable[[Path], nn.Module]:
    def load(folder: Path) -> nn.Module:
        import torchao.quantization as tq

        model = _load(folder)
        keep = lambda module, fqn: isinstance(module, nn.Linear) and fqn != SKIP  # noqa: E731
        tq.quantize_(model, getattr(tq, config_name)(), filter_fn=keep)
        return model

    return load


def _bnb(**config) -> Callable[[Path], nn.Module]:
    def load(folder: Path) -> nn.Module:
        from transformers import BitsAndBytesConfig

        bnb = BitsAndBytesConfig(**config, llm_int8_skip_modules=[SKIP])
        return _load(folder, quantization_config=bnb, device_map="cpu")

    return load


def _gguf(fmt: str) -> Callable[[Path], nn.Module]:
    def load(folder: Path) -> nn.Module:
        return helper.replace_linear_with_gguf(_load(folder), fmt=fmt, exclude=(SKIP,))

    return load


def _gguf_file(folder: Path) -> nn.Module:
    """The file's own Q4_1 blocks in helper.GGUFLinear layers (dequantized at every forward pass)."""
    if folder != helper.smollm2_dir():
        raise RuntimeError("gguf-q4_1-file needs the packaged SmolLM2 (its blocks come from the GGUF file)")
    return helper.replace_linear_with_gguf(_load(folder), tensors=helper.read_gguf_tensors(), exclude=(SKIP,))


def _calibration(folder: Path, n_tokens: int) -> torch.Tensor:
    """Calibration windows of 512 tokens from helper.calibration_text() (disjoint from eval_text)."""
    from transformers import AutoTokenizer

    return helper.calibration_ids(AutoTokenizer.from_pretrained(folder), n_tokens, 512)


def _w8a8(smooth: bool) -> Callable[[Path], nn.Module]:
    """W8A8 with per-token activations (Lesson 8), after SmoothQuant (alpha 0.5) when `smooth`."""

    def load(folder: Path) -> nn.Module:
        model = _load(folder)
        if smooth:
            act = helper.activation_absmax(model, None, ids=_calibration(folder, W8A8_CALIBRATION_TOKENS))
            helper.smooth_llama(model, act, alpha=0.5)
        return helper.replace_linears(model, helper.W8A8Linear.from_linear, exclude=(SKIP,))

    return load


def _llm_int8(folder: Path) -> nn.Module:
    return helper.replace_linears(_load(folder), lambda linear: helper.LLMInt8Linear(linear, 6.0), exclude=(SKIP,))


def _int4(method: str, group_size: int | None) -> Callable[[Path], nn.Module]:
    """4-bit codes in helper.GroupQuantLinear (Lesson 9); GPTQ and AWQ calibrate on calibration_text (GPTQ on
    all of it, AWQ on its first 512-token row: quantize_llama_4bit's awq_tokens)."""

    def load(folder: Path) -> nn.Module:
        ids = _calibration(folder, INT4_CALIBRATION_TOKENS) if method in ("gptq", "awq") else None
        return helper.quantize_llama_4bit(_load(folder), method, ids, group_size)

    return load


def _fp8(activations: str | None) -> Callable[[Path], nn.Module]:
    """E4M3 weights with a scale per output channel (Lesson 11's FP8Linear); activations None keeps them
    fp32 (W8A16-FP8), "per_tensor" casts them to E4M3 with one dynamic scale per call (W8A8-FP8)."""

    def load(folder: Path) -> nn.Module:
        return helper.replace_linears(
            _load(folder), lambda linear: helper.FP8Linear(linear, activations), exclude=(SKIP,)
        )

    return load


def _fp4(fmt: str) -> Callable[[Path], nn.Module]:
    """MXFP4 or NVFP4 weights held as stored (Lesson 11's FP4Linear), decoded to fp32 at every call."""

    def load(folder: Path) -> nn.Module:
        return helper.replace_linears(_load(folder), lambda linear: helper.FP4Linear(linear, fmt), exclude=(SKIP,))

    return load


def _fast(kind: str, dtype: torch.dtype, group_size: int = 32) -> Callable[[Path], nn.Module]:
    """helper.FastDecoder (Lesson 12): the same weights in a lean decoder with a static KV cache.

    Its lm_head (and the embedding rows it serves) runs on the int8 kernel when the layers are
    quantized, as llama.cpp's file keeps its output layer in Q8_0: the one exception to SKIP.
    """

    def load(folder: Path) -> nn.Module:
        model = _load(folder)
        decoder = helper.FastDecoder(model, kind, dtype, group_size)
        del model  # the decoder holds its own copies, in its own layout
        gc.collect()
        return decoder

    return load


def _int4_fast(method: str) -> Callable[[Path], nn.Module]:
    """The <method>-int4-g128 recipe (Lesson 9; its codes recomputed in this row's process) deployed on
    PyTorch's fused int4 kernel in helper.FastDecoder (Lesson 12, PackedLinear.from_group_quant): the
    codes as they are, the scale and the kernel's float zero (8 - zero) * scale in bf16 (groups of 128
    held as kernel groups of 64 where a row of 576 needs them), bf16 activations, and the int8 lm_head
    of fast-int4-g32-bf16."""

    def load(folder: Path) -> nn.Module:
        model = _int4(method, 128)(folder)
        decoder = helper.FastDecoder(model, "int4pack", torch.bfloat16)
        del model  # the decoder holds the codes in its own layout
        gc.collect()
        return decoder

    return load


def _static_compiled(folder: Path) -> nn.Module:
    """transformers' own fast path: a static KV cache and torch.compile, compiled here (load time includes it).

    transformers compiles generate()'s decode step on CPU only when told (CompileConfig's
    _compile_all_devices); the static cache's length is part of the graph, so the warm-up generates
    the timed number of tokens.
    """
    from transformers import CompileConfig, GenerationConfig

    model = _load(folder)
    config = CompileConfig(dynamic=False)
    config._compile_all_devices = True
    model = helper.with_generation_config(model, cache_implementation="static", compile_config=config)
    assert isinstance(model.generation_config, GenerationConfig)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(COMPILE_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        model.generate(ids, max_new_tokens=COMPILE_TOKENS, min_new_tokens=COMPILE_TOKENS, do_sample=False)
    return model


COMPILE_TOKENS = 32  # the default --new-tokens and decode_timings' prompt: the graph is compiled for
COMPILE_PROMPT = "The history of"  # the cache length the timed rounds use
W8A8_CALIBRATION_TOKENS = 2048  # SmoothQuant needs only each channel's max
INT4_CALIBRATION_TOKENS = 12288  # all of calibration_text: GPTQ overfits 2,048 tokens (Lesson 9)

LLAMA_CPP = "llama.cpp-q4_1-file"  # not a PyTorch model: measured by measure_llama_cpp

METHODS: dict[str, tuple[str, Callable[[Path], nn.Module]]] = {
    "fp32": ("torch (baseline)", lambda f: _load(f, torch.float32)),
    "bf16": ("torch dtype", lambda f: _load(f, torch.bfloat16)),
    "fp16": ("torch dtype", lambda f: _load(f, torch.float16)),
    "quanto-int8": ("optimum-quanto qint8 weights", _quanto("qint8")),
    "quanto-int4": ("optimum-quanto qint4 weights", _quanto("qint4")),
    "w8a16-scratch": ("course helper W8A16Linear", _w8a16),
    "torch.ao-dynamic-int8": ("torch.ao quantize_dynamic (deprecated)", _torch_ao_dynamic),
    "torchao-int8-weight-only": ("torchao Int8WeightOnlyConfig", _torchao("Int8WeightOnlyConfig")),
    "torchao-int8-dynamic": (
        "torchao Int8DynamicActivationInt8WeightConfig",
        _torchao("Int8DynamicActivationInt8WeightConfig"),
    ),
    "bnb-int8": ("bitsandbytes LLM.int8()", _bnb(load_in_8bit=True)),
    "bnb-nf4": ("bitsandbytes NF4", _bnb(load_in_4bit=True, bnb_4bit_quant_type="nf4")),
    "gguf-q4_1-file": ("course helper GGUFLinear, the GGUF file's own Q4_1 blocks", _gguf_file),
    "gguf-q4_0": ("course helper GGUFLinear, Q4_0 re-quantized", _gguf("Q4_0")),
    "gguf-q8_0": ("course helper GGUFLinear, Q8_0 re-quantized", _gguf("Q8_0")),
    "w8a8-rtn": ("course helper W8A8Linear, int8 per-token activations", _w8a8(smooth=False)),
    "w8a8-smoothquant": ("course helper SmoothQuant (alpha 0.5) + W8A8Linear", _w8a8(smooth=True)),
    "llm-int8-scratch": ("course helper LLMInt8Linear (threshold 6)", _llm_int8),
    "rtn-int4-g128": ("course helper GroupQuantLinear, round-to-nearest", _int4("rtn", 128)),
    "gptq-int4-g128": ("course helper GroupQuantLinear, GPTQ", _int4("gptq", 128)),
    "awq-int4-g128": ("course helper GroupQuantLinear, AWQ scales and clipping + RTN", _int4("awq", 128)),
    "nf4-g128": ("course helper GroupQuantLinear, NF4 levels", _int4("nf4", 128)),
    "rtn-int4-channel": ("course helper GroupQuantLinear, RTN per channel", _int4("rtn", None)),
    "gptq-int4-channel": ("course helper GroupQuantLinear, GPTQ per channel", _int4("gptq", None)),
    "fp8-e4m3-w8a16": ("course helper FP8Linear, E4M3 weights per channel, fp32 activations", _fp8(None)),
    "fp8-e4m3-w8a8": (
        "course helper FP8Linear, E4M3 weights and activations (per tensor), torch._scaled_mm",
        _fp8("per_tensor"),
    ),
    "mxfp4": ("course helper FP4Linear, MXFP4 (E2M1, an E8M0 scale per 32)", _fp4("mxfp4")),
    "nvfp4": ("course helper FP4Linear, NVFP4 (E2M1, an E4M3 scale per 16, fp32 per tensor)", _fp4("nvfp4")),
    "fp32-static-compiled": ("transformers static KV cache + torch.compile (fp32)", _static_compiled),
    "fast-fp32": ("course helper FastDecoder, fp32 (lean decoder, static KV cache)", _fast("float", torch.float32)),
    "fast-int8-bf16": (
        "course helper FastDecoder, int8 weights (_weight_int8pack_mm) + bf16 activations, int8 lm_head",
        _fast("int8pack", torch.bfloat16),
    ),
    "fast-int4-g32-bf16": (
        "course helper FastDecoder, int4 g32 weights (_weight_int4pack_mm_for_cpu) + bf16, int8 lm_head",
        _fast("int4pack", torch.bfloat16, 32),
    ),
    "rtn-int4-g128-fast": (
        "rtn-int4-g128's codes on FastDecoder's int4 kernel + bf16, int8 lm_head",
        _int4_fast("rtn"),
    ),
    "gptq-int4-g128-fast": (
        "gptq-int4-g128's codes on FastDecoder's int4 kernel + bf16, int8 lm_head",
        _int4_fast("gptq"),
    ),
    "awq-int4-g128-fast": (
        "awq-int4-g128's codes on FastDecoder's int4 kernel + bf16, int8 lm_head",
        _int4_fast("awq"),
    ),
    LLAMA_CPP: ("llama.cpp (llama-cpp-python), the GGUF file as shipped", None),
}


# ---------------------------------------------------------------------------
# One method, measured inside its own process
# ---------------------------------------------------------------------------


def measure(method: str, folder: Path, args: argparse.Namespace) -> dict:
    """Load+quantize one method and measure it; runs in a fresh process (peak RSS is per method)."""
    from transformers import AutoTokenizer

    if method == LLAMA_CPP:
        return measure_llama_cpp(folder, args)
    library, loader = METHODS[method]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    start = time.perf_counter()
    model = loader(folder)
    load_s = time.perf_counter() - start
    # sizes first: at their first forward pass bitsandbytes layers reorganise what they hold
    # (Linear8bitLt moves its row scales out of the weight; on AVX512-BF16 CPUs Linear4bit
    # repacks its weight and casts absmax to bf16), Lesson 7 shows it
    held, reported = helper.model_size(model), model.get_memory_footprint()
    nll = helper.token_nll(model, tokenizer, n_tokens=args.ppl_tokens, window=args.window)
    peak_mb = helper.peak_rss_mb()  # this method's own peak: before the fp32 reference is loaded
    # decode speed by the lessons' protocol: interleaved rounds against an fp32 copy in this process
    models = {method: model} if method == "fp32" else {"fp32": loader_fp32(folder), method: model}
    times = helper.decode_timings(
        models, tokenizer, new_tokens=args.new_tokens, repeats=args.repeats, warmup_tokens=args.new_tokens
    )
    row = make_row(method, library, held, reported, nll, times, load_s, peak_mb, args.new_tokens)
    del model, models
    gc.collect()
    return row


def measure_llama_cpp(folder: Path, args: argparse.Namespace) -> dict:
    """The GGUF file in llama.cpp: same tokens, windows and decode protocol as the PyTorch methods.

    Bytes held: the file's tensor data (its embedding is Q8_0 and also serves as the output layer,
    unlike the PyTorch rows, which keep that matrix in fp32).
    """
    from transformers import AutoTokenizer

    if folder != helper.smollm2_dir():
        raise RuntimeError(f"{LLAMA_CPP} needs the packaged SmolLM2 GGUF file")
    if not helper.llama_cpp_installed():
        raise RuntimeError(helper.LLAMA_CPP_MISSING)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    start = time.perf_counter()
    llm = helper.load_llama_cpp(n_ctx=args.window + 1)
    load_s = time.perf_counter() - start
    held = sum(t["n_bytes"] for t in helper.gguf_tensor_infos().values())  # the file's tensor data
    file_bytes = helper.smollm2_gguf_path().stat().st_size
    ids = tokenizer(helper.eval_text(), return_tensors="pt").input_ids[0]
    nll = helper.llama_cpp_token_nll(llm, ids, n_tokens=args.ppl_tokens, window=args.window)
    peak_mb = helper.peak_rss_mb()
    models = {"fp32": loader_fp32(folder), LLAMA_CPP: llm}
    times = helper.decode_timings(
        models, tokenizer, new_tokens=args.new_tokens, repeats=args.repeats, warmup_tokens=args.new_tokens
    )
    return make_row(LLAMA_CPP, METHODS[LLAMA_CPP][0], held, file_bytes, nll, times, load_s, peak_mb, args.new_tokens)


def make_row(method, library, held, reported, nll, times, load_s, peak_mb, new_tokens) -> dict:
    """One result row (the columns of helper.BENCHMARK_COLUMNS, but the ratio, plus the per-token NLLs)."""
    ppl, ppl_se = helper.perplexity_with_error(nll)
    speedup = (1.0, 1.0, 1.0) if method == "fp32" else helper.speedup(times, method, "fp32")
    return {
        "method": method,
        "library": library,
        "bytes": held,
        "reported_bytes": reported,
        "perplexity": ppl,
        "perplexity_se": ppl_se,
        "decode_tokens_per_s": new_tokens / statistics.median(times[method]),
        "decode_speedup": speedup[0],
        "decode_speedup_low": speedup[1],
        "decode_speedup_high": speedup[2],
        "load_quantize_s": load_s,
        "peak_rss_mb": peak_mb,
        "nll": [round(v, 5) for v in nll.tolist()],
    }


def loader_fp32(folder: Path) -> nn.Module:
    """The fp32 reference every method's decode rounds are interleaved with."""
    return METHODS["fp32"][1](folder)


def run_isolated(method: str, folder: Path, args: argparse.Namespace) -> dict:
    """Run `measure` for one method in a fresh Python process and return its row.

    Raises RuntimeError, whatever went wrong: a crash, a time-out, or output that is not a row.
    """
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--method",
        method,
        "--model-dir",
        str(folder),
        "--ppl-tokens",
        str(args.ppl_tokens),
        "--window",
        str(args.window),
        "--new-tokens",
        str(args.new_tokens),
        "--repeats",
        str(args.repeats),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=METHOD_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"method {method!r} did not finish within {METHOD_TIMEOUT_S} s") from error
    except OSError as error:  # the child could not even start
        raise RuntimeError(f"method {method!r} could not start a Python process: {error}") from error
    if proc.returncode != 0:
        raise RuntimeError(f"method {method!r} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    try:
        row = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError) as error:
        raise RuntimeError(f"method {method!r} printed no result row:\n{proc.stdout[-1000:]}") from error
    if not isinstance(row, dict) or set(row) != set(COLUMNS) - {"ratio_to_fp32"} | {"nll"}:
        raise RuntimeError(f"method {method!r} returned an unexpected row: {str(row)[:300]}")
    return row


# ---------------------------------------------------------------------------
# The tiny model (tests) and the machine description
# ---------------------------------------------------------------------------


def build_tiny_model(target: Path) -> Path:
    """Save a tiny random Llama (SmolLM2 tokenizer) whose Linear layers outweigh its embedding."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(helper.smollm2_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=8192,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (helper.cpu_model_name; platform.processor() elsewhere)."""
    name = helper.cpu_model_name()
    return name if name is not None else platform.processor() or "unknown CPU"


def simd_flags() -> str:
    """The CPU's vector extensions that matter for int8/bf16 kernels (helper.KERNEL_FLAGS), from /proc/cpuinfo."""
    flags = helper.cpu_flags(wanted=helper.KERNEL_FLAGS)
    if flags is None:
        return "flags unknown"
    found = [flag for flag, has in flags.items() if has]
    return "+".join(found) if found else "no AVX2/AVX-512/AMX"


def machine_description() -> str:
    """The CPU, its vector extensions, the torch kernels, the cores and torch's version, in one phrase."""
    return (
        f"{cpu_model()} ({simd_flags()}; torch kernels {helper.cpu_capability()}), "
        f"{os.cpu_count()} cores, torch {torch.__version__}"
    )


def machine_line(model_name: str, load_avg: float) -> str:
    """One line saying what was measured, where, when, and how to regenerate it."""
    today = dt.datetime.now(dt.timezone.utc).date().isoformat()
    return (
        f"{model_name} on {machine_description()}, "
        f"{today}, 1-min load average {load_avg:.1f} at start; regenerate: {REGENERATE}"
    )


def update_note(methods: list[str], load_avg: float) -> str:
    """What --update appends to the first line: which rows were re-measured, when, and where."""
    today = dt.datetime.now(dt.timezone.utc).date().isoformat()
    return (
        f"rows {', '.join(methods)} re-measured on {today} with --update: {machine_description()}, "
        f"1-min load average {load_avg:.1f} at start"
    )


# ---------------------------------------------------------------------------
# Output files
# ---------------------------------------------------------------------------


def add_ratios(rows: list[dict]) -> list[dict]:
    """Fill ratio_to_fp32 (bytes / fp32 bytes) in every row; needs the fp32 row."""
    base = next((r["bytes"] for r in rows if r["method"] == "fp32"), None)
    for row in rows:  # without the fp32 row (it failed) the ratios are unknown, not wrong
        row["ratio_to_fp32"] = row["bytes"] / base if base else math.nan
    return rows


def _csv_cells(row: dict) -> dict:
    """A row as the CSV writes it: floats rounded to 4 decimals (strings, as read back, are kept as they are)."""
    return {k: (round(row[k], 4) if isinstance(row[k], float) else row[k]) for k in COLUMNS}


def write_csv(rows: list[dict], header: str, path: Path) -> None:
    """CSV with a first comment line (# machine ...) then one row per method."""
    with open(path, "w", newline="") as handle:
        handle.write(f"# {header}\n")
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(_csv_cells(row))


def write_nll(rows: list[dict], path: Path) -> None:
    """The per-token NLLs of every method, one float32 array per method name (numpy .npz)."""
    import numpy as np

    np.savez_compressed(path, **{r["method"]: np.asarray(r["nll"], dtype=np.float32) for r in rows})


def read_committed(out: Path) -> tuple[str, list[dict], list[str], dict]:
    """What --update starts from in `out`: (the first line without '# ', the CSV rows as strings, the
    markdown lines, {method: per-token NLLs}). Raises RuntimeError when a file is missing."""
    import numpy as np

    paths = [out / CSV_NAME, out / MD_NAME, out / NLL_NAME]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise RuntimeError(f"--update needs the results of an earlier run; missing: {', '.join(missing)}")
    lines = paths[0].read_text().splitlines()
    if not lines or not lines[0].startswith("# "):
        raise RuntimeError(f"{paths[0]} does not start with the '# ...' line naming the machine")
    rows = list(csv.DictReader(lines[1:]))
    with np.load(paths[2], allow_pickle=False) as data:
        nll = {name: data[name] for name in data.files}
    return lines[0][2:], rows, paths[1].read_text().splitlines(), nll


def merge_results(out: Path, new_rows: list[dict], note: str) -> None:
    """Replace (or append) the rows of `new_rows` in the CSV, markdown table and NLLs in `out`, keep
    every other row as written, and append `note` to the first line of the CSV and the markdown."""
    import numpy as np

    header, old_rows, md_lines, nll = read_committed(out)
    new = {r["method"]: r for r in new_rows}
    fp32 = new.get("fp32") or next((r for r in old_rows if r["method"] == "fp32"), None)
    for row in new_rows:  # the ratio against the fp32 row, re-measured or kept
        row["ratio_to_fp32"] = row["bytes"] / int(fp32["bytes"]) if fp32 else math.nan
    old_methods = [r["method"] for r in old_rows]
    rows = [new.get(r["method"], r) for r in old_rows] + [r for m, r in new.items() if m not in old_methods]
    header = f"{header}; {note}"
    write_csv(rows, header, out / CSV_NAME)
    table = [i for i, line in enumerate(md_lines) if line.startswith("| ") and not line.startswith("| method |")]
    if not md_lines or not md_lines[0].startswith("Measured: ") or not table:
        raise RuntimeError(f"{out / MD_NAME} is not a table written by this script")
    md_lines[0] = f"Measured: {header}"
    for i in table:
        method = md_lines[i].split("|")[1].strip()
        if method in new:
            md_lines[i] = markdown_row(new[method])
    md_lines[table[-1] + 1 : table[-1] + 1] = [markdown_row(r) for m, r in new.items() if m not in old_methods]
    (out / MD_NAME).write_text("\n".join(md_lines) + "\n")
    nll.update({m: np.asarray(r["nll"], dtype=np.float32) for m, r in new.items()})
    np.savez_compressed(out / NLL_NAME, **nll)


def markdown_row(r: dict) -> str:
    """One method's line of the markdown table."""
    return (
        f"| {r['method']} | {r['library']} | {r['bytes'] / 1e6:.1f} | {r['ratio_to_fp32']:.3f} "
        f"| {r['perplexity']:.2f} ± {r['perplexity_se']:.2f} | {r['decode_tokens_per_s']:.1f} "
        f"| {r['decode_speedup']:.2f} ({r['decode_speedup_low']:.2f}–{r['decode_speedup_high']:.2f}) "
        f"| {r['load_quantize_s']:.1f} | {r['peak_rss_mb']:.0f} |"
    )


def write_markdown(rows: list[dict], header: str, path: Path) -> None:
    """A markdown table of the same rows, under a line naming the machine."""
    lines = [
        f"Measured: {header}",
        "",
        "| method | library | bytes held (MB) | ratio to fp32 | perplexity ± SE | decode tokens/s "
        "| decode speed-up vs fp32 (range) "
        "| load+quantize s | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [markdown_row(r) for r in rows]
    lines += [
        "",
        "Bytes held are counted by helper.model_size (integer data plus scales); "
        "lm_head (tied to the embedding) stays in full precision in every PyTorch method but the "
        "fast-int* and *-g128-fast rows (int8 there; llama.cpp runs "
        "the file as shipped: Q8_0 embedding and output layer). Perplexity: "
        "4,096 tokens of helper.eval_text() in windows of 512, ± its standard error (per-token "
        "NLLs in smollm2_cpu_nll.npz). Decode: median tokens/s of the timed rounds; speed-up: median "
        "(lowest–highest) of the per-round ratios against an fp32 copy timed in the same process.",
    ]
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=list(METHODS),
        help="subset of methods (fp32 is always added: it is the ratio's baseline)",
    )
    parser.add_argument("--ppl-tokens", type=int, default=4096, help="tokens of eval_text scored for perplexity")
    parser.add_argument("--window", type=int, default=512, help="tokens per perplexity window (context)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated for decode speed")
    parser.add_argument("--repeats", type=int, default=5, help="timed decode rounds after one warm-up")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the CSV and markdown")
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama instead of SmolLM2 (fast; tests)")
    parser.add_argument(
        "--update",
        action="store_true",
        help="re-measure only --methods (fp32 is not added) and replace their rows in the files in --out, "
        "keeping every other row; the first line says which rows were re-measured when",
    )
    parser.add_argument("--method", choices=list(METHODS), help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.window < 2 or args.ppl_tokens < args.window or args.ppl_tokens % args.window:
        parser.error("--ppl-tokens must be a positive multiple of --window (>= 2)")
    if args.new_tokens < 1 or args.repeats < 1:
        parser.error("--new-tokens and --repeats must be >= 1")
    if args.update and args.methods == list(METHODS):
        parser.error("--update re-measures the methods named by --methods: name them")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.method:  # child: one method, one JSON line on stdout
        row = measure(args.method, args.model_dir or helper.smollm2_dir(), args)
        print(json.dumps(row))
        return 0

    from tqdm.auto import tqdm

    methods = list(dict.fromkeys(args.methods))
    if not args.update:  # fp32 first: the ratios' baseline
        methods = ["fp32"] + [m for m in methods if m != "fp32"]
    if args.tiny:  # the GGUF file's rows need the real model
        methods = [m for m in methods if m not in ("gguf-q4_1-file", LLAMA_CPP)]
    if LLAMA_CPP in methods and not helper.llama_cpp_installed() and args.methods == list(METHODS):
        methods.remove(LLAMA_CPP)  # optional: the default run skips it; asking for it by name fails clearly
        print(f"skipping {LLAMA_CPP}: {helper.LLAMA_CPP_MISSING}", file=sys.stderr)
    name = "tiny random Llama (tests)" if args.tiny else "SmolLM2-135M-Instruct"
    if args.update:  # check the files to update before measuring anything
        try:
            header, _, _, nll = read_committed(args.out)
        except RuntimeError as error:
            print(error, file=sys.stderr)
            return 2
        lengths = {len(v) for v in nll.values()}
        if not header.startswith(f"{name} on ") or lengths != {args.ppl_tokens}:
            held = f"'{header.split(' on ')[0]}' scored on {sorted(lengths)} tokens"
            print(
                f"--update: {args.out / CSV_NAME} holds {held}; this run would measure {name} on "
                f"{args.ppl_tokens} tokens: the rows would not compare",
                file=sys.stderr,
            )
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tiny-llama-") as tmp:
        folder = build_tiny_model(Path(tmp)) if args.tiny else helper.smollm2_dir()
        rows, failed = [], []
        load_avg = os.getloadavg()[0]  # other processes slow every timing down: say how busy it was
        start = time.perf_counter()
        bar = tqdm(methods, desc="methods", unit="method")
        for method in bar:
            bar.set_postfix_str(method)
            try:
                rows.append(run_isolated(method, folder, args))
            except RuntimeError as error:
                failed.append(method)
                tqdm.write(str(error), file=sys.stderr)
    if args.update:  # only the rows measured now are replaced; a failed method keeps its old row
        if rows:
            merge_results(args.out, rows, update_note([r["method"] for r in rows], load_avg))
    else:
        header = machine_line(name, load_avg)
        add_ratios(rows)  # written even when a method failed: the others' results stay usable
        write_csv(rows, header, args.out / CSV_NAME)
        write_markdown(rows, header, args.out / MD_NAME)
        write_nll(rows, args.out / NLL_NAME)
    print(f"{len(rows)} methods in {time.perf_counter() - start:.0f} s -> {args.out / CSV_NAME}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
