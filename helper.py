"""The one import of every notebook, benchmark and script: `import helper` gives every name of the course.

Each lesson's code lives in the module named after its notebook; what several lessons share is in
`quantcourse/core/`. This file only re-exports each module's `__all__` (a name exported twice is an
error), so `helper.gptq_quantize` is `quantcourse.lesson09_gptq_awq_nf4.gptq_quantize`.

Contents (lesson -> module -> what it holds)
  1  notebooks/01_data_types                       quantcourse/lesson01_data_types.py
       float_bits, largest_exact_integer
  2  notebooks/02_loading_models_in_dtypes         quantcourse/lesson02_loading_models_in_dtypes.py
       DummyModel, print_param_dtype, default_dtype
  3  notebooks/03_linear_quantization_from_scratch quantcourse/lesson03_linear_quantization_from_scratch.py
       linear_quantize, quantize_per_channel/_per_group, W8A16Linear, pack_weights
  4  notebooks/04_gguf                             quantcourse/lesson04_gguf.py
       gguf_quantize/gguf_dequantize (Q8_0, Q4_0, Q4_1, Q4_K), absmax_level_codes, gguf_tensor_infos, GGUFLinear
  5  notebooks/05_quantization_with_quanto         quantcourse/lesson05_quantization_with_quanto.py
       quanto_size_breakdown
  6  notebooks/06_dynamic_quantization             quantcourse/lesson06_dynamic_quantization.py
       count_modules, logits_diff, activation_absmax
  7  notebooks/07_bitsandbytes                     quantcourse/lesson07_bitsandbytes.py
       bnb_quantize_linear, detach_from_checkpoint
  8  notebooks/08_outliers_and_w8a8                quantcourse/lesson08_outliers_and_w8a8.py
       int8_matmul, W8A8Linear (dynamic or static), w8a8_model, llm_int8_matmul, smooth_llama
  9  notebooks/09_gptq_awq_nf4                     quantcourse/lesson09_gptq_awq_nf4.py
       rtn_quantize, gptq_quantize, awq_search_scale, awq_search_clip, awq_layer, nf4_levels,
       quantize_llama_4bit
  10 notebooks/10_kquants_and_imatrix             quantcourse/lesson10_kquants_and_imatrix.py
       quantize_q2_k..quantize_q6_k and the importance-matrix Q4_0/Q5_0/Q4_1/Q5_1 (ports of ggml-quants.c in
       quantcourse/ggml_quants/), llama_tensor_types (llama-quant.cpp's rules), importance_matrix,
       gptq_q4_0_blocks, write_gguf_with, quantize_gguf, llama_cpp_quantize, check_gguf_file
  11 notebooks/11_fp8_mxfp4_nvfp4                  quantcourse/lesson11_fp8_mxfp4_nvfp4.py
       fp8_encode/fp8_decode (E4M3fn, E5M2), FP8Linear, e2m1_encode, mxfp4_quantize, nvfp4_quantize
  12 notebooks/12_decode_speed                     quantcourse/lesson12_decode_speed.py
       memory_bandwidth_gbs, PackedLinear, FastDecoder
  13 notebooks/13_kv_cache                         quantcourse/lesson13_kv_cache.py
       kv_bytes_per_token, quantize_kv (per token / per channel), hadamard_matrix, QuantizedKVDecoder,
       stream_log_probs, quanto_cache_logits (transformers' QuantizedCache), llama_cpp_cache_log_probs
  14 notebooks/14_capstone_comparison              quantcourse/lesson14_capstone_comparison.py
       pareto_front, paired_pareto_front

Shared (quantcourse/core/, each module importing only those above it)
  machine     cpu_capability, cpu_flags (CPU_FLAGS, KERNEL_FLAGS), cpu_model_name, cpu_instruction_sets, claim
  config      REPO_DIR, cache_dir, use_hub (HUB_SWITCH), setup_notebook, versions, check_versions
  memory      rss_mb, peak_rss_mb, fresh_process_peak(s)_mb, malloc_trim
  models      load_smollm2 (the verified cache), load_minilm, load_efficientnet_lite0, load_hub_model
  images      load_image, asset_path
  llama_cpp   load_llama_cpp, llama_cpp_generate, llama_cpp_token_nll(_kl), window_nll(_kl) (scoring both share)
  generation  get_generation, chat, with_generation_config
  sizes       tensor_parts, tensor_nbytes, model_size, compute_module_sizes, format_bytes
  timing      time_variants, speed_verdict, decode_timings, one_thread
  evaluation  eval_text, perplexity, token_nll, perplexity_with_error, paired_nll_difference,
              paired_verdict, token_log_probs, token_nll_kl (KL divergence), calibration_text
  surgery     replace_linears, linears_swapped, run_with_input_hooks
  benchmark   read_benchmark, read_benchmark_nll

Tooling (quantcourse/tooling.py, for scripts and tests): NOTEBOOKS, output_checks, load_script
"""

from __future__ import annotations

import importlib

MODULES = [f"quantcourse.core.{name}" for name in "machine config memory models images llama_cpp generation".split()]
MODULES += [f"quantcourse.core.{name}" for name in "sizes timing evaluation surgery benchmark".split()]
MODULES += [
    "quantcourse.lesson01_data_types",
    "quantcourse.lesson02_loading_models_in_dtypes",
    "quantcourse.lesson03_linear_quantization_from_scratch",
    "quantcourse.lesson04_gguf",
    "quantcourse.lesson05_quantization_with_quanto",
    "quantcourse.lesson06_dynamic_quantization",
    "quantcourse.lesson07_bitsandbytes",
    "quantcourse.lesson08_outliers_and_w8a8",
    "quantcourse.lesson09_gptq_awq_nf4",
    "quantcourse.lesson10_kquants_and_imatrix",
    "quantcourse.lesson11_fp8_mxfp4_nvfp4",
    "quantcourse.lesson12_decode_speed",
    "quantcourse.lesson13_kv_cache",
    "quantcourse.lesson14_capstone_comparison",
    "quantcourse.tooling",  # not a lesson's: the notebooks' checks and the script loader, for scripts and tests
]
"""Every module helper re-exports, in course order (tests/test_course_layout.py checks it lists them all)."""

__all__: list[str] = []
HOME: dict[str, str] = {}
"""{name: the module that defines it}: where to read a helper.<name> the lessons call."""

for _module_name in MODULES:
    _module = importlib.import_module(_module_name)
    for _name in _module.__all__:
        if _name in HOME:
            raise ImportError(f"{_name!r} is exported by both {HOME[_name]} and {_module_name}")
        HOME[_name] = _module_name
        _defined_in = getattr(getattr(_module, _name), "__module__", None) or ""
        if _defined_in.startswith("quantcourse.ggml_quants."):  # a port a lesson module re-exports
            HOME[_name] = _defined_in
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
del _module, _module_name, _name, _defined_in


def where(name: str) -> str:
    """The file that holds helper.<name>: where(\"gptq_quantize\") -> 'quantcourse/lesson09_gptq_awq_nf4.py'."""
    if name not in HOME:
        raise KeyError(f"helper has no {name!r}; its names are in helper.__all__")
    return HOME[name].replace(".", "/") + ".py"
