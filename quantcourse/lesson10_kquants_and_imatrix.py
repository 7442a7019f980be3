"""Lesson 10 — from the notebook to the file people download: K-quants, the importance matrix, and
GGUF files the course writes and llama.cpp runs (notebooks/10_kquants_and_imatrix.ipynb).

The quantizers of llama.cpp's ggml-quants.c, ported to PyTorch bit for bit (Q2_K..Q6_K, and Q4_0/Q5_0/
Q4_1/Q5_1 with an importance matrix), live in quantcourse/ggml_quants/ (they are too long for one file);
this module re-exports them and adds what a file needs: which type each tensor gets in a `Q4_K_M` file
(llama-quant.cpp's rules, ported), the importance matrix from the course's hooks, GPTQ on Q4_0's grid,
and the GGUF writer. Checked against ggml's own quantizer, gguf-py and llama.cpp's `llama_model_quantize`
(tests/test_lesson10_kquants_and_imatrix.py, tests/test_course_reference_equivalence.py).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from quantcourse.core.llama_cpp import LLAMA_CPP_MISSING, llama_cpp_installed
from quantcourse.core.models import smollm2_gguf_path
from quantcourse.core.surgery import run_with_input_hooks
from quantcourse.ggml_quants.llama_quant import FTYPES, LLAMA_FTYPE, llama_tensor_types, use_more_bits
from quantcourse.ggml_quants.qkx import (
    quantize_q2_k,
    quantize_q4_1_imatrix,
    quantize_q4_k,
    quantize_q5_1_imatrix,
    quantize_q5_k,
)
from quantcourse.ggml_quants.qx import quantize_q3_k, quantize_q4_0_imatrix, quantize_q5_0_imatrix, quantize_q6_k
from quantcourse.lesson04_gguf import _GGUF_TO_HF, _fp16_bytes, _pack_nibbles, gguf_quantize, gguf_tensor_infos
from quantcourse.lesson09_gptq_awq_nf4 import gptq_quantize

__all__ = [
    "quantize_q2_k",
    "quantize_q3_k",
    "quantize_q4_k",
    "quantize_q5_k",
    "quantize_q6_k",
    "quantize_q4_0_imatrix",
    "quantize_q5_0_imatrix",
    "quantize_q4_1_imatrix",
    "quantize_q5_1_imatrix",
    "FTYPES",
    "llama_tensor_types",
    "use_more_bits",
    "bits_per_weight",
    "quantize_tensor",
    "ggml_installed",
    "ggml_quantize",
    "hf_to_gguf_name",
    "importance_matrix",
    "q4_0_grid",
    "gptq_q4_0_blocks",
    "write_gguf_with",
    "gguf_weights",
    "permute_rope_rows",
    "gguf_tensor_bytes",
    "file_tensor_types",
    "quantize_gguf",
    "llama_cpp_quantize",
    "check_gguf_file",
]

_K_QUANTS = {"Q2_K": quantize_q2_k, "Q3_K": quantize_q3_k, "Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k}
_K_QUANTS["Q6_K"] = quantize_q6_k
_WITH_IMATRIX = {
    "Q4_0": quantize_q4_0_imatrix,
    "Q5_0": quantize_q5_0_imatrix,
    "Q4_1": quantize_q4_1_imatrix,
    "Q5_1": quantize_q5_1_imatrix,
}


def bits_per_weight(type_name: str) -> float:
    """8 x bytes per block / weights per block of a ggml type ("Q4_K" -> 4.5), from gguf-py's table."""
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return 8 * type_size / block


def quantize_tensor(w: torch.Tensor, type_name: str, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """The ggml blocks (rows, bytes per row) of a float32 weight (rows, n_per_row) in `type_name`,
    computed by the course: the same bytes as ggml's ggml_quantize_chunk(type, w, imatrix).

    K-quants, and Q4_0/Q5_0/Q4_1/Q5_1 given an importance matrix, run the ports of ggml's searches;
    without one, Q4_0/Q5_0/Q4_1/Q5_1 run the ports of ggml's reference rounding (Lesson 4's
    gguf_quantize differs from it in the sign of a zero scale, tests/test_course_reference_equivalence.py)
    and Q8_0 Lesson 4's gguf_quantize. Q8_0 ignores the importance matrix, as ggml does.
    """
    if w.dim() != 2 or w.dtype != torch.float32:
        raise ValueError(f"quantize_tensor needs a 2-D float32 weight, got {tuple(w.shape)} {w.dtype}")
    w = w.detach().contiguous()
    if type_name in _K_QUANTS:
        return _K_QUANTS[type_name](w, imatrix)
    if type_name in _WITH_IMATRIX:
        return _WITH_IMATRIX[type_name](w, imatrix)  # imatrix None: ggml's _ref rounding
    if type_name == "Q8_0":
        return gguf_quantize(w, type_name)
    raise ValueError(f"quantize_tensor does not write {type_name!r}")


# ---------------------------------------------------------------------------------------------
# ggml's own quantizer, through ctypes (where llama.cpp is installed): the reference
# ---------------------------------------------------------------------------------------------


def _ggml_library():
    spec = importlib.util.find_spec("llama_cpp")
    path = spec and spec.origin and Path(spec.origin).parent / "lib" / "libggml-base.so"
    if not path or not path.exists():
        return None
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3
    lib.ggml_quantize_chunk.argtypes += [ctypes.c_void_p]
    return lib


def ggml_installed() -> bool:
    """True where llama-cpp-python's libggml-base.so (ggml's own quantizers) can be loaded."""
    return _ggml_library() is not None


def ggml_quantize(w: torch.Tensor, type_name: str, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """ggml's ggml_quantize_chunk on a float32 weight (rows, n_per_row): uint8 (rows, bytes per row).

    The C reference quantize_tensor is checked against. With `imatrix` (n_per_row,) ggml runs the
    importance-weighted search; without one its `_ref` quantizer."""
    import gguf
    import numpy as np

    lib = _ggml_library()
    if lib is None:
        raise ModuleNotFoundError("ggml_quantize needs llama.cpp's libggml-base.so: `make setup-llama`")
    kind = gguf.GGMLQuantizationType[type_name]
    block, type_size = gguf.GGML_QUANT_SIZES[kind]
    if w.dtype != torch.float32:
        raise ValueError(f"ggml_quantize needs a float32 weight, got {w.dtype}")
    if w.dim() != 2 or w.shape[1] % block:
        raise ValueError(f"{type_name} needs 2-D rows whose length is a multiple of {block}, got {tuple(w.shape)}")
    src = np.ascontiguousarray(w.detach().numpy(), dtype=np.float32)
    out = np.zeros((src.shape[0], src.shape[1] // block * type_size), dtype=np.uint8)
    weights = None if imatrix is None else np.ascontiguousarray(imatrix.numpy(), dtype=np.float32)
    if weights is not None and weights.shape != (src.shape[1],):
        raise ValueError(f"imatrix must have shape ({src.shape[1]},), got {weights.shape}")
    pointer = None if weights is None else weights.ctypes.data
    rows, n = src.shape
    parts = torch.get_num_threads() if rows * n >= 1 << 20 else 1  # ctypes lets go of the GIL: one thread each
    bounds = [rows * k // parts for k in range(parts + 1)]

    def chunk(k: int) -> None:  # rows bounds[k]..bounds[k+1]: ggml_quantize_chunk's `start` is in elements
        count = bounds[k + 1] - bounds[k]
        lib.ggml_quantize_chunk(int(kind), src.ctypes.data, out.ctypes.data, bounds[k] * n, count, n, pointer)

    with ThreadPoolExecutor(parts) as pool:
        list(pool.map(chunk, range(parts)))
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------
# The importance matrix (llama.cpp's llama-imatrix), from the course's hooks
# ---------------------------------------------------------------------------------------------

_HF_TO_GGUF = {hf: gguf_name for gguf_name, hf in _GGUF_TO_HF.items()}


def hf_to_gguf_name(name: str) -> str:
    """'model.layers.3.mlp.down_proj' (a module, or its '.weight') -> 'blk.3.ffn_down.weight'."""
    parts = name.removesuffix(".weight").split(".")
    if parts[:2] == ["model", "layers"] and len(parts) == 5 and ".".join(parts[3:]) in _HF_TO_GGUF:
        return f"blk.{parts[2]}.{_HF_TO_GGUF['.'.join(parts[3:])]}.weight"
    if ".".join(parts) in _HF_TO_GGUF:
        return f"{_HF_TO_GGUF['.'.join(parts)]}.weight"
    raise ValueError(f"not a Llama module name this course maps to GGUF: {name!r}")


def importance_matrix(model: nn.Module, ids: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """{GGUF tensor name: mean of x**2 per input column (in_features,) float32} of each named
    nn.Linear over the tokens of `ids` (batch, tokens): what `llama-imatrix` collects.

    llama-imatrix sums x**2 per column of each matrix product's input over the calibration text and
    divides by the number of tokens; llama.cpp's quantizers then weight each weight's squared error
    by it, times a term of the weight's own size (sqrt(sigma2 + w**2), but for Q6_K). It is half the
    diagonal of GPTQ's H = 2/n X^T X (Lesson 9), which also keeps the products of different columns;
    AWQ (Lesson 9) ranks input channels by mean |x|, a statistic alike but not equal.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def consume(name, x):
        squares = x.float().square().sum(0).double()  # (in_features,): fp32 per row of ids, then fp64
        sums[name] = sums[name] + squares if name in sums else squares
        counts[name] = counts.get(name, 0) + x.shape[0]

    run_with_input_hooks(model, ids, names, consume)
    return {hf_to_gguf_name(n): (sums[n] / counts[n]).float() for n in names}


# ---------------------------------------------------------------------------------------------
# GPTQ on Q4_0's own grid, written as Q4_0 blocks
# ---------------------------------------------------------------------------------------------


def q4_0_grid(group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0's grid, for gptq_quantize's `grid=`: scale d = (the group's weight of largest magnitude,
    with its sign) / -8, rounded to fp16 as the file stores it (1 where that is 0), and zero 8, so
    weight = (code - 8) * d with codes 0..15, as ggml's quantize_row_q4_0_ref defines them."""
    signed_max = group.gather(1, group.abs().argmax(1, keepdim=True))  # (out, 1)
    d = (signed_max / -8).half().to(group.dtype)
    return torch.where(d == 0, torch.ones_like(d), d), torch.full_like(d, 8.0)


def gptq_q4_0_blocks(w: torch.Tensor, hessian: torch.Tensor, act_order: bool = True) -> torch.Tensor:
    """GPTQ (Lesson 9's gptq_quantize) on Q4_0's grid, groups of 32 along the input: Q4_0 block
    bytes (out, in / 32 * 18) llama.cpp reads. GPTQ picks each code; the file stores it unchanged."""
    gq = gptq_quantize(w, hessian, 4, 32, act_order=act_order, grid=q4_0_grid)
    codes = gq.codes.reshape(-1, 32)  # (out * in / 32, 32)
    d = gq.scale.reshape(-1, 1).float()  # (out * in / 32, 1): fp16 numbers already
    return torch.cat([_fp16_bytes(d), _pack_nibbles(codes)], 1).reshape(w.shape[0], -1)


# ---------------------------------------------------------------------------------------------
# GGUF files: the course writes them, gguf-py reads them back, llama.cpp runs them
# ---------------------------------------------------------------------------------------------


def write_gguf_with(
    source: str | Path,
    target: str | Path,
    convert,
    weights: dict | None = None,
    fields: dict[str, int] | None = None,
    cache: bool = False,
) -> dict[str, str]:
    """Write a copy of the GGUF file `source` (every metadata key, the tokenizer included) in which
    convert(name, float32 weight (out, in)) may return (ggml type, uint8 block rows) for a tensor;
    the others are copied byte for byte. Returns {tensor name: type name} of the written file.

    The weights convert sees are the source file's dequantized by gguf-py, in the file's own row
    order (llama.cpp's q and k rows are permuted, which leaves each row's blocks unchanged);
    `weights` may hold them already ({name: float32 weight}, gguf_weights), to skip that step;
    `fields` sets uint32 metadata keys ({"general.file_type": 15}); `cache` keeps the parsed source for
    the next file written from it (its memory map stays open). Used by Lesson 11 too (its MXFP4 file).
    """
    import gguf
    import numpy as np

    reader = _reader(source) if cache else gguf.GGUFReader(source)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(target, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        if fields and field.name in fields:
            continue
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    for key, value in (fields or {}).items():
        writer.add_key_value(key, value, gguf.GGUFValueType.UINT32)
    types = {}
    for t in reader.tensors:
        data, qtype = np.asarray(t.data), t.tensor_type
        if len(t.shape) == 2:
            w = weights[t.name] if weights and t.name in weights else _dequantized(data, qtype)
            new = convert(t.name, w)
            if new is not None:
                qtype, blocks = new
                data = blocks.numpy()
                if tuple(gguf.quants.quant_shape_from_byte_shape(data.shape, qtype)) != tuple(w.shape):
                    raise ValueError(
                        f"{t.name}: {qtype.name} blocks of shape {data.shape} do not hold {tuple(w.shape)}"
                    )
        writer.add_tensor(t.name, data, raw_dtype=qtype)
        types[t.name] = qtype.name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def _reader(source):
    """gguf.GGUFReader(source), kept while the file is unchanged: parsing the tokenizer's 100,000
    strings takes a second or two, and several files are written from one source."""
    stat = Path(source).stat()
    return _cached_reader(str(source), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _cached_reader(source: str, mtime_ns: int, size: int):
    import gguf

    return gguf.GGUFReader(source)


def _dequantized(data, qtype) -> torch.Tensor:
    import gguf
    import numpy as np

    return torch.from_numpy(gguf.quants.dequantize(data, qtype).astype(np.float32))


def gguf_weights(source: str | Path | None = None, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """{GGUF tensor name: float32 weight (rows, n_per_row)} of every 2-D tensor of `source` (the
    shipped file by default), dequantized by gguf-py, in the file's own row order.

    Given the transformers `model` loaded from that file, its own weights are used instead (no copy
    but of q and k, whose rows go back to the file's order): the same numbers, without a second
    540 MB in memory (tests/test_lesson10_kquants_and_imatrix.py checks they are equal)."""
    import numpy as np

    if model is None:
        reader = _reader(source or smollm2_gguf_path())
        return {t.name: _dequantized(np.asarray(t.data), t.tensor_type) for t in reader.tensors if len(t.shape) == 2}
    heads = {"attn_q": model.config.num_attention_heads, "attn_k": model.config.num_key_value_heads}
    out = {}
    for name, p in model.named_parameters():
        if p.dim() != 2 or name == "lm_head.weight":
            continue
        gguf_name = hf_to_gguf_name(name)
        kind = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else ""
        w = p.detach()
        out[gguf_name] = permute_rope_rows(w, heads[kind]) if kind in heads else w
    return out


def permute_rope_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """The row order llama.cpp's converter gives q and k: the inverse of Lesson 4's unpermute_rope_rows."""
    if rows.shape[0] % (2 * n_head):
        raise ValueError(f"{rows.shape[0]} rows cannot be split into {n_head} heads of two halves")
    dim = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, 2, dim, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def gguf_tensor_bytes(path: str | Path) -> dict[str, tuple[str, bytes]]:
    """{GGUF tensor name: (type name, its raw bytes)} of a file, read at the offsets of its header
    (check_gguf_file), without parsing the metadata: to compare two files tensor by tensor."""
    infos = check_gguf_file(path)
    with open(path, "rb") as handle:
        out = {}
        for name, info in infos.items():
            handle.seek(info["offset"])
            out[name] = (info["type"], handle.read(info["n_bytes"]))
    return out


def file_tensor_types(ftype: str, source: str | Path | None = None, imatrix: bool = False) -> dict[str, str]:
    """{GGUF tensor name: ggml type} that llama.cpp's quantizer gives each tensor of `source` (the
    shipped file by default) for a file type such as "Q4_K_M" (llama_tensor_types on its header).

    The layer count is read from the tensor names, n_head / n_head_kv from the shapes of attn_q and
    attn_k (equal heads: q has n_head of them, k n_head_kv), so the metadata need not be parsed."""
    infos = gguf_tensor_infos(source)
    layers = {int(name.split(".")[1]) for name in infos if name.startswith("blk.")}
    q, k = infos["blk.0.attn_q.weight"]["shape"], infos["blk.0.attn_k.weight"]["shape"]
    shapes = {name: info["shape"] for name, info in infos.items()}
    inputs = {name: info["type"] for name, info in infos.items()}
    return llama_tensor_types(shapes, ftype, len(layers), q[1] // k[1], imatrix, input_types=inputs)


def quantize_gguf(
    target: str | Path,
    types: dict[str, str],
    imatrix: dict[str, torch.Tensor] | None = None,
    source: str | Path | None = None,
    blocks: dict[str, torch.Tensor] | None = None,
    quantize=None,
    weights: dict[str, torch.Tensor] | None = None,
    ftype: str | None = None,
) -> dict[str, str]:
    """Write `source` (the shipped file by default) to `target` with every tensor in types[name]
    (file_tensor_types), as llama_model_quantize does: a tensor already of its type is copied, the
    others dequantized and quantized by `quantize` (quantize_tensor, or ggml_quantize: the same bytes,
    faster), with imatrix[name] where given. `blocks` supplies finished tensors (GPTQ's, say);
    `weights` the dequantized source (gguf_weights), when several files are written from it.
    `ftype` ("Q4_K_M") goes into the header's general.file_type, as llama-quantize writes it
    (otherwise the source's stays). Returns the written file's {name: type}.
    """
    import gguf

    quantize = quantize or quantize_tensor
    imatrix, blocks = imatrix or {}, blocks or {}
    current = {name: info["type"] for name, info in gguf_tensor_infos(source).items()}
    for what, names in (("types", set(types)), ("imatrix", set(imatrix)), ("blocks", set(blocks))):
        unknown = sorted(names - set(current))
        if unknown:
            raise ValueError(f"{what} names {len(unknown)} tensors the file does not have, e.g. {unknown[0]!r}")
    missing = sorted(set(current) - set(types))
    if missing:
        raise ValueError(f"types has no entry for {len(missing)} tensors of the file, e.g. {missing[0]}")
    for name, kind in types.items():
        if kind in ("F32", "F16") and kind != current[name]:
            raise ValueError(f"{name} is {current[name]} in the file; this writer does not convert it to {kind}")

    def convert(name, w):
        kind = gguf.GGMLQuantizationType[types[name]]
        if name in blocks:
            return kind, blocks[name]
        if kind.name == current[name]:
            return None
        return kind, quantize(w, kind.name, imatrix.get(name))

    fields = None if ftype is None else {"general.file_type": LLAMA_FTYPE[ftype], "general.quantization_version": 2}
    return write_gguf_with(source or smollm2_gguf_path(), target, convert, weights, fields, cache=True)


def llama_cpp_quantize(
    target: str | Path,
    ftype: str,
    imatrix: dict[str, torch.Tensor] | None = None,
    source: str | Path | None = None,
    dry_run: bool = False,
) -> str:
    """llama.cpp's own quantizer (`llama-quantize`, llama_model_quantize) on `source`: the reference
    the course's files are checked against. imatrix: {GGUF tensor name: mean x**2 per column}.
    Returns llama.cpp's log (a line per tensor: its type and the type it gets); `dry_run` writes no file."""
    import numpy as np

    if not llama_cpp_installed():
        raise ModuleNotFoundError(LLAMA_CPP_MISSING)
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = LLAMA_FTYPE[ftype], True, torch.get_num_threads()
    params.dry_run = dry_run
    buffers = []  # the imatrix arrays: alive until llama.cpp has read them
    if imatrix:  # {name, data, size} entries, ended by one whose name is NULL
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for k, (name, values) in enumerate(imatrix.items()):
            buffers.append(np.ascontiguousarray(values.numpy(), dtype=np.float32))
            entries[k].name = name.encode()
            entries[k].data = buffers[-1].ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[k].size = buffers[-1].size
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    source = str(source or smollm2_gguf_path()).encode()
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def keep(level, text, user_data):  # llama.cpp logs a line per tensor: kept, and shown on failure
        lines.append(text.decode("utf-8", errors="replace") if text else "")

    from llama_cpp import _logger

    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        failed = llama_cpp.llama_model_quantize(source, str(target).encode(), ctypes.byref(params)) != 0
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))  # llama-cpp-python's own again
    text = "".join(lines)
    if failed:
        raise RuntimeError(f"llama_model_quantize failed for {ftype}; llama.cpp's log ends: {text[-600:]}")
    return text


def check_gguf_file(path: str | Path) -> dict[str, dict]:
    """gguf_tensor_infos(path) after checking that the file holds every tensor it declares: a
    truncated or corrupted file raises ValueError naming the problem, before anything loads it."""
    import gguf

    path = Path(path)
    infos = gguf_tensor_infos(path)  # ValueError for a bad magic number or a header that ends early
    size = path.stat().st_size
    for name, info in infos.items():
        kind = gguf.GGMLQuantizationType[info["type"]]
        block = gguf.GGML_QUANT_SIZES[kind][0]
        if not info["shape"] or info["shape"][0] % block:
            raise ValueError(f"{path.name}: {name} has the shape {info['shape']}: rows not a multiple of {block}")
        if info["offset"] + info["n_bytes"] > size:
            raise ValueError(
                f"{path.name} is truncated: {name} ends at byte {info['offset'] + info['n_bytes']:,}, "
                f"the file has {size:,}"
            )
    return infos
