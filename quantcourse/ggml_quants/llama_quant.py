"""Which ggml type llama.cpp's quantizer gives each tensor of a file type ("Q4_K_M" and friends).

A minimal, faithful port of the type selection in llama.cpp's src/llama-quant.cpp, as vendored by
llama-cpp-python 0.3.36 (llama.cpp commit 0c1e57098bba43ac29e6e3b677cdceebdd22334f):

  llama_model_quantize_impl   -> the order the tensors are visited in (weights_map, sorted by
                                 weight_name_comparer: non-layer tensors first, then by layer number,
                                 then by name) and the counters (init_quantize_state_counters)
  llama_tensor_get_type       -> tensor_allows_quantization, then llama_tensor_get_type_impl,
                                 then tensor_type_fallback
  llama_tensor_get_type_impl  -> the per-category rules of each ftype (the "mixture")
  tensor_type_fallback        -> the type used when a row (ne0) is not a multiple of the block size

Only what a dense, non-Falcon model (LLaMA-like: SmolLM2, Llama, Qwen, ...) with up to one expert can
reach for the ftypes below is ported; the IQ*/TQ*/MXFP4 mixtures, n_expert == 8, LLM_TYPE_70B and
LLM_ARCH_FALCON branches are left out (they never fire for such a model with these ftypes).
Each rule cites the condition of the C++ line it ports.

Import it by path (importlib.util.spec_from_file_location("kq_types", ...)): a module named `types`
shadows, or is shadowed by, the standard library's.
"""

from __future__ import annotations

import re

__all__ = [
    "FTYPES",
    "LLAMA_FTYPE",
    "BLOCK_SIZE",
    "default_type",
    "use_more_bits",
    "tensor_category",
    "allows_quantization",
    "fallback_type",
    "requires_imatrix",
    "visit_order",
    "llama_tensor_types",
]

# enum llama_ftype (include/llama.h)
LLAMA_FTYPE = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q8_0": 7,
    "Q5_0": 8,
    "Q5_1": 9,
    "Q2_K": 10,
    "Q3_K_S": 11,
    "Q3_K_M": 12,
    "Q3_K_L": 13,
    "Q4_K_S": 14,
    "Q4_K_M": 15,
    "Q5_K_S": 16,
    "Q5_K_M": 17,
    "Q6_K": 18,
    "Q2_K_S": 21,
}

# llama_ftype_get_default_type: the type of every tensor no rule changes
_DEFAULT_TYPE = {
    "Q4_0": "Q4_0",
    "Q4_1": "Q4_1",
    "Q5_0": "Q5_0",
    "Q5_1": "Q5_1",
    "Q8_0": "Q8_0",
    "Q2_K": "Q2_K",
    "Q2_K_S": "Q2_K",
    "Q3_K_S": "Q3_K",
    "Q3_K_M": "Q3_K",
    "Q3_K_L": "Q3_K",
    "Q4_K_S": "Q4_K",
    "Q4_K_M": "Q4_K",
    "Q5_K_S": "Q5_K",
    "Q5_K_M": "Q5_K",
    "Q6_K": "Q6_K",
}
FTYPES = tuple(f for f in _DEFAULT_TYPE if f != "Q2_K_S")  # the ones the lesson covers; Q2_K_S also works

# ggml_blck_size: weights per block (the row length ne0 must be a multiple of it)
BLOCK_SIZE = {
    "F32": 1,
    "F16": 1,
    "BF16": 1,
    "Q4_0": 32,
    "Q4_1": 32,
    "Q5_0": 32,
    "Q5_1": 32,
    "Q8_0": 32,
    "IQ4_NL": 32,
    "Q2_K": 256,
    "Q3_K": 256,
    "Q4_K": 256,
    "Q5_K": 256,
    "Q6_K": 256,
}


def default_type(ftype: str) -> str:
    """llama_ftype_get_default_type(ftype)."""
    return _DEFAULT_TYPE[ftype]


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """`i_layer < n_layers/8 || i_layer >= 7*n_layers/8 || (i_layer - n_layers/8)%3 == 2` (C int division).

    The first and last eighth of the layers, and every third layer in between. (C's % of a negative
    number never matters: a negative i_layer - n_layers/8 means i_layer < n_layers/8, already true.)
    """
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def tensor_category(name: str) -> str:
    """tensor_get_category: exact names first, then substring tests in the source's order."""
    if name == "output.weight":  # tensor_name_match_output_weight
        return "OUTPUT"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):  # tensor_name_match_token_embd
        return "TOKEN_EMBD"
    for key, cat in (
        ("attn_qkv.weight", "ATTENTION_QKV"),
        ("attn_kv_b.weight", "ATTENTION_KV_B"),
        ("attn_v.weight", "ATTENTION_V"),
        ("attn_k.weight", "ATTENTION_K"),
        ("attn_q.weight", "ATTENTION_Q"),
        ("attn_output.weight", "ATTENTION_OUTPUT"),
        ("ffn_up", "FFN_UP"),
        ("ffn_gate", "FFN_GATE"),
        ("ffn_down", "FFN_DOWN"),
    ):
        if key in name:
            return cat
    return "OTHER"


def _is_attn_v(cat: str) -> bool:
    # category_is_attn_v: ATTENTION_V || ATTENTION_QKV || ATTENTION_KV_B
    return cat in ("ATTENTION_V", "ATTENTION_QKV", "ATTENTION_KV_B")


_NOT_QUANTIZED = (  # tensor_allows_quantization: `quantize &= name.find(X) == npos` for each X
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)


def _n_dims(shape: tuple[int, ...]) -> int:
    # ggml_n_dims: trailing dimensions of size 1 do not count; at least 1
    n = len(shape)
    while n > 1 and shape[n - 1] == 1:
        n -= 1
    return max(n, 1)


def allows_quantization(name: str, shape: tuple[int, ...], quantize_output_tensor: bool = True) -> bool:
    """tensor_allows_quantization (the arch-specific GLM5_NEXT list is left out)."""
    if _n_dims(shape) < 2:  # `if (ggml_n_dims(tensor) < 2) return false;` - biases, norms, 1-D scales
        return False
    if not name.endswith("weight"):  # `name.rfind("weight") == name.size() - 6`
        return False
    # `params->quantize_output_tensor || name != "output.weight"`
    if name == "output.weight" and not quantize_output_tensor:
        return False
    if name in ("position_embd.weight", "token_types.weight"):  # LLM_TENSOR_POS_EMBD / TOKEN_TYPES
        return False
    return not any(s in name for s in _NOT_QUANTIZED)


def fallback_type(ncols: int, target: str) -> str:
    """tensor_type_fallback: a compatible type when `ncols % ggml_blck_size(target) != 0`."""
    if ncols % BLOCK_SIZE[target] == 0:
        return target
    if target in ("Q2_K", "Q3_K", "Q2_0", "TQ1_0", "TQ2_0"):  # `case Q2_0/Q2_K/Q3_K/TQ1_0/TQ2_0: return_type = Q4_0`
        new = "Q4_0"
    elif target == "Q4_K":  # `case GGML_TYPE_Q4_K: return_type = GGML_TYPE_Q5_0`
        new = "Q5_0"
    elif target == "Q5_K":  # `case GGML_TYPE_Q5_K: return_type = GGML_TYPE_Q5_1`
        new = "Q5_1"
    elif target == "Q6_K":  # `case GGML_TYPE_Q6_K: return_type = GGML_TYPE_Q8_0`
        new = "Q8_0"
    elif target.startswith("IQ") and target != "IQ4_NL":  # `case IQ1_S ... IQ4_XS: return_type = IQ4_NL`
        new = "IQ4_NL"
    elif BLOCK_SIZE.get(target, 256) <= 32:  # `default: if (qk_k <= 32) return_type = target_type`
        new = target
    else:  # `throw "no tensor type fallback is defined for type %s"`
        raise ValueError(f"no tensor type fallback is defined for type {target}")
    if ncols % BLOCK_SIZE[new] != 0:  # `if (ncols % ggml_blck_size(return_type) != 0) return_type = F16`
        new = "F16"
    return new


def requires_imatrix(name: str, dst_type: str, ftype: str) -> bool:
    """tensor_requires_imatrix: llama.cpp refuses (throws) without an imatrix when this is true.

    Checked on the final type (after the fallback). Of the ftypes here only Q2_K_S can need one:
    `case GGML_TYPE_Q2_K: return ftype == LLAMA_FTYPE_MOSTLY_Q2_K_S` (IQ1_*/IQ2_*/IQ3_XXS always do).
    """
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    if dst_type in ("IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"):
        return True
    return dst_type == "Q2_K" and ftype == "Q2_K_S"


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)  # weight_name_comparer: sscanf(a, "blk.%d.", &a_layer), else -1
    return int(m.group(1)) if m else -1


def visit_order(names) -> list[str]:
    """The order llama_model_quantize visits (and counts) tensors: ml.weights_map is a std::map with
    weight_name_comparer - by layer number (non-layer tensors have -1, so come first), then by name."""
    return sorted(names, key=lambda n: (_layer(n), n))


def llama_tensor_types(
    tensors: dict[str, tuple[int, ...]],
    ftype: str,
    n_layer: int,
    n_gqa: int = 1,
    imatrix: bool = False,
    *,
    input_types: dict[str, str] | None = None,
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    pure: bool = False,
) -> dict[str, str]:
    """The ggml type llama_model_quantize writes for each tensor.

    tensors: GGUF name -> GGUF shape (ne0 = row length first), every tensor of the file.
    ftype: one of FTYPES ("Q4_K_M", ...).
    n_layer: hparams.n_layer_all (block_count); the ffn_down/gate/up counters run to it.
    n_gqa: n_head / n_head_kv (hparams.n_gqa(), integer division); only the Q2_K/Q2_K_S attn_v rules read it.
    imatrix: whether an importance matrix is passed (qs.has_imatrix); only the Q4_0/Q5_0 ffn_down rule reads it here.
    input_types: the file's current types; a tensor that is not quantized keeps its own (default "F32").
    output_tensor_type / token_embedding_type / pure: llama_model_quantize_params fields of those names.

    Tied embeddings are not a parameter: as in init_quantize_state_counters, the model counts as tied
    (token_embd.weight also plays output.weight) unless a tensor named "output.weight" is present.
    """
    if ftype not in _DEFAULT_TYPE:
        raise ValueError(f"unsupported ftype {ftype!r}; one of {FTYPES}")
    input_types = input_types or {}
    names = visit_order(tensors)
    cats = {n: tensor_category(n) for n in names}
    # init_quantize_state_counters
    n_attention_wv = sum(_is_attn_v(c) for c in cats.values())  # `if (category_is_attn_v(cat)) ++qs.n_attention_wv`
    has_tied_embeddings = "OUTPUT" not in cats.values()  # `if (cat == OUTPUT) qs.has_tied_embeddings = false`
    n_ffn_down = n_layer  # `qs.n_ffn_down = qs.n_ffn_gate = qs.n_ffn_up = n_layer_all`
    i_attention_wv = i_ffn_down = 0

    out: dict[str, str] = {}
    for name in names:
        shape, cat = tuple(tensors[name]), cats[name]
        nx = shape[0]
        if not allows_quantization(name, shape):  # `if (!tensor_allows_quantization(...)) return tensor->type`
            out[name] = input_types.get(name, "F32")
            continue
        # `params->token_embedding_type < COUNT && TOKEN_EMBD`: as given, no fallback
        if token_embedding_type and cat == "TOKEN_EMBD":
            out[name] = token_embedding_type
            continue
        if output_tensor_type and cat == "OUTPUT":  # `params->output_tensor_type < COUNT && OUTPUT`: as is, no fallback
            out[name] = output_tensor_type
            continue

        new = default_type(ftype)  # `ggml_type new_type = default_type`
        if not pure:  # `if (!manual && !params->pure) new_type = llama_tensor_get_type_impl(...)`
            if cat == "OUTPUT" or (has_tied_embeddings and cat == "TOKEN_EMBD"):
                # `category == OUTPUT || (qs.has_tied_embeddings && category == TOKEN_EMBD)`:
                # a tied token_embd is quantized like the output tensor
                if output_tensor_type:  # `qs.params->output_tensor_type < GGML_TYPE_COUNT`
                    new = output_tensor_type
                elif nx % BLOCK_SIZE[new] != 0:  # `arch == FALCON || nx % qk_k != 0` (qk_k of the default type)
                    new = "Q8_0"
                elif new != "Q8_0":  # `else if (new_type != GGML_TYPE_Q8_0) new_type = GGML_TYPE_Q6_K`
                    new = "Q6_K"
            elif cat == "TOKEN_EMBD":
                pass  # untied token_embd: only IQ*/TQ*/Q2_0 ftypes change it
            elif _is_attn_v(cat):  # `category_is_attn_v(category)`: attn_v, and also a fused attn_qkv / attn_kv_b
                if ftype == "Q2_K":  # `ftype == Q2_K`: `n_gqa() >= 4 ? Q4_K : Q3_K`
                    new = "Q4_K" if n_gqa >= 4 else "Q3_K"
                elif ftype == "Q2_K_S" and n_gqa >= 4:  # `ftype == Q2_K_S && n_gqa() >= 4`
                    new = "Q4_K"
                elif ftype == "Q3_K_M":  # `ftype == Q3_K_M`: `i_attention_wv < 2 ? Q5_K : Q4_K`
                    new = "Q5_K" if i_attention_wv < 2 else "Q4_K"
                elif ftype == "Q3_K_L":  # `ftype == Q3_K_L`: Q5_K
                    new = "Q5_K"
                elif ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_attention_wv, n_attention_wv):
                    new = "Q6_K"  # `(Q4_K_M || Q5_K_M) && use_more_bits(i_attention_wv, n_attention_wv)`
                elif ftype == "Q4_K_S" and i_attention_wv < 4:  # `ftype == Q4_K_S && i_attention_wv < 4`
                    new = "Q5_K"
                i_attention_wv += 1  # `++qs.i_attention_wv`
            elif cat in ("ATTENTION_K", "ATTENTION_Q"):
                pass  # only n_expert == 8 and IQ3_XS/IQ3_XXS change these
            elif cat == "FFN_DOWN":
                i, n = i_ffn_down, n_ffn_down  # layer_info: the counter itself when n_expert <= 1
                if ftype == "Q2_K":  # `ftype == Q2_K`: Q3_K
                    new = "Q3_K"
                elif ftype == "Q2_K_S":  # `ftype == Q2_K_S`: `if (i_layer < n_layer/8) Q4_K`
                    if i < n // 8:
                        new = "Q4_K"
                elif ftype == "Q3_K_M":  # `i_layer < n_layer/16 ? Q5_K : arch != FALCON || use_more_bits ? Q4_K : Q3_K`
                    new = "Q5_K" if i < n // 16 else "Q4_K"
                elif ftype == "Q3_K_L":  # `ftype == Q3_K_L`: `arch == FALCON ? Q4_K : Q5_K`
                    new = "Q5_K"
                elif ftype == "Q4_K_M":  # `ftype == Q4_K_M` (non-Falcon): `if (use_more_bits(i_layer, n_layer)) Q6_K`
                    if use_more_bits(i, n):
                        new = "Q6_K"
                elif ftype == "Q5_K_M" and use_more_bits(i, n):  # `ftype == Q5_K_M && use_more_bits(...)`: Q6_K
                    new = "Q6_K"
                elif ftype == "Q4_K_S" and i < n // 8:  # `ftype == Q4_K_S && arch != FALCON && i_layer < n_layer/8`
                    new = "Q5_K"
                elif ftype in ("Q4_0", "Q5_0") and imatrix and i < n // 8:
                    # `(Q4_0 || Q5_0) && qs.has_imatrix && i_layer < n_layer/8`: Q4_1 / Q5_1
                    new = "Q4_1" if ftype == "Q4_0" else "Q5_1"
                i_ffn_down += 1  # `++qs.i_ffn_down`
            elif cat == "ATTENTION_OUTPUT":  # non-Falcon, n_expert != 8
                if ftype == "Q2_K":  # `ftype == Q2_K`: Q3_K
                    new = "Q3_K"
                elif ftype == "Q3_K_M":  # `ftype == Q3_K_M`: Q4_K
                    new = "Q4_K"
                elif ftype == "Q3_K_L":  # `ftype == Q3_K_L`: Q5_K
                    new = "Q5_K"
            # The source's later `category == ATTENTION_QKV` branch (Q3_K_M/L -> Q4_K, Q4_K_M -> Q5_K,
            # Q5_K_M -> Q6_K) cannot be reached: category_is_attn_v() already took ATTENTION_QKV above.
            # FFN_GATE / FFN_UP: only IQ3_XS changes them (the counters change nothing else).
        new = fallback_type(nx, new)  # `new_type = tensor_type_fallback(qs, tensor, new_type)`
        out[name] = new
    return {n: out[n] for n in tensors}  # in the caller's order
