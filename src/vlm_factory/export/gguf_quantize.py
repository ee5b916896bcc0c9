"""Quantize GGUF files with llama.cpp's own quantizer (`llama_model_quantize` in llama-cpp-python).

It works for both halves of the packaging: the LLM (an `llama_ftype` such as Q4_K_M, whose mix
llama.cpp chooses per tensor) and the mmproj (tensor-type overrides by regex, e.g. the vision
blocks in Q8_0 and the projector `^mm\\.` in F16). Position and patch embeddings, norms and biases
are never quantized by llama.cpp.

llama.cpp only *logs* a tensor whose row length does not fit the requested block size (K-quants
need multiples of 256, Q8_0 of 32) before it falls back to another type; the log is captured
here so every fallback is reported with llama.cpp's own reason.
"""

from __future__ import annotations

import ctypes
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vlm_factory.errors import UserError
from vlm_factory.io import atomic_path

# Tier names -> llama_ftype (the file's label and, for the LLM, llama.cpp's per-tensor mix).
FTYPES = {"F32": "LLAMA_FTYPE_ALL_F32", "F16": "LLAMA_FTYPE_MOSTLY_F16", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
          "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K", "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q5_K": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
          "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_K": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
          "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M", "Q3_K": "LLAMA_FTYPE_MOSTLY_Q3_K_M", "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K"}
# Tensor types a tensor-type override may name (vision and projector settings).
TENSOR_TYPES = {"F32": "GGML_TYPE_F32", "F16": "GGML_TYPE_F16", "Q8_0": "GGML_TYPE_Q8_0", "Q6_K": "GGML_TYPE_Q6_K",
                "Q5_K": "GGML_TYPE_Q5_K", "Q4_K": "GGML_TYPE_Q4_K", "Q4_0": "GGML_TYPE_Q4_0", "Q3_K": "GGML_TYPE_Q3_K",
                "Q2_K": "GGML_TYPE_Q2_K"}
_FALLBACK = re.compile(r"warning: (?P<tensor>\S+)\s+- ncols\s+(?P<ncols>\d+) not divisible by\s+(?P<block>\d+) "
                       r"\(required for type\s+(?P<wanted>\S+)\).*?-> falling back to\s+(?P<used>\S+)", re.S)


@dataclass(frozen=True)
class Fallback:
    tensor: str
    wanted: str
    used: str
    reason: str


@contextmanager
def _captured_llama_log():
    """Collect llama.cpp's log text while quantizing, then give logging back to llama-cpp-python."""
    import llama_cpp
    from llama_cpp import _logger

    chunks: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        chunks.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield chunks
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def _lookup(table: dict[str, str], name: str, what: str, key: str) -> int:
    import llama_cpp

    if str(name).upper() not in table:
        raise UserError(f"key '{key}' is {name!r}: not a {what} llama.cpp quantizes to here; "
                        f"known: {', '.join(table)}")
    return getattr(llama_cpp, table[str(name).upper()])


def quantize(source: Path, out_path: Path, ftype: str, overrides: dict[str, str] | None = None,
             key: str = "llm", n_threads: int = 0) -> list[Fallback]:
    """Quantize `source` into `out_path` (atomically); return the tensors llama.cpp had to fall back on.

    `overrides` maps a regex on tensor names to a tensor type (e.g. {"^mm\\.": "F16"});
    `key` names the params key the types came from, for error messages.
    """
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _lookup(FTYPES, ftype, "file type", key)
    params.nthread = n_threads
    keep_alive = []
    if overrides:
        entries = [(pattern.encode(), _lookup(TENSOR_TYPES, t, "tensor type", key)) for pattern, t in overrides.items()]
        array = (llama_cpp.llama_model_tensor_override * (len(entries) + 1))(
            *[llama_cpp.llama_model_tensor_override(pattern=p, type=t) for p, t in entries],
            llama_cpp.llama_model_tensor_override(pattern=None, type=0))  # NULL-terminated
        keep_alive.append(array)
        params.tt_overrides = ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    with atomic_path(out_path) as tmp, _captured_llama_log() as log:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0:
            last = "".join(log).strip().splitlines()[-1:] or ["no message"]
            raise RuntimeError(f"llama.cpp could not quantize {source} to {ftype}: {last[0]}")
    text = "".join(log)
    return [Fallback(m["tensor"], m["wanted"].upper(), m["used"].upper(),
                     f"row length {m['ncols']} is not a multiple of {m['wanted']}'s block size {m['block']}")
            for m in _FALLBACK.finditer(text)]
