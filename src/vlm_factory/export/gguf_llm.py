"""The LLM half of the llama.cpp packaging: the checkpoint's decoder (Llama or Qwen2) as a GGUF file.

Which tensors are the LLM's, and their local HF names, comes from the model family
(`family.checkpoint_key`); the numbers from `family.text`. Tensors are read, converted and written
one at a time (see gguf_io) and renamed through gguf-py's own name map for llama.cpp's LLM arch of
the same name (`family.text.arch`). Two arch facts of llama.cpp decide the layout:

- rotary pairing: its `llama` arch rotates consecutive pairs of a head ("normal" RoPE), so HF's
  rotate-half q/k rows (and biases) are interleaved; its `qwen2` arch rotates pairs n_rot/2 apart
  (NEOX RoPE), which is HF's layout, so they are written as they are;
- tied embeddings: with no `output` tensor llama.cpp multiplies by `token_embd` (loaded twice), so
  a tied checkpoint writes no copy of it.

QKV biases (Qwen2) and grouped-query attention need nothing special beyond the head counts. The
tokenizer and chat template are written by gguf_tokenizer.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import numpy as np

from vlm_factory.errors import UserError
from vlm_factory.export.gguf_io import component_tensors, deferred, write_gguf
from vlm_factory.export.gguf_tokenizer import add_vocabulary, read_vocabulary

log = logging.getLogger(__name__)

FILE_TYPES = {"F32": 0, "F16": 1}  # llama_ftype: ALL_F32, MOSTLY_F16
# llama.cpp LLM arch -> whether HF's rotate-half q/k rows must be interleaved for its RoPE.
ROTARY_INTERLEAVED = {"llama": True, "qwen2": False}


def permute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half q/k rows -> llama.cpp's interleaved pairs (the inverse of HF's conversion)."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _convert(tensor, rotary_heads: int | None, dtype) -> np.ndarray:
    data = tensor.load()
    if rotary_heads is not None:
        data = permute_rotary(data, rotary_heads)
    return data.astype(dtype)


def _add_hparams(writer, name: str, text, file_type: str) -> None:
    writer.add_name(name)
    writer.add_context_length(text.max_positions)
    writer.add_embedding_length(text.hidden_size)
    writer.add_block_count(text.num_layers)
    writer.add_feed_forward_length(text.intermediate_size)
    writer.add_head_count(text.num_heads)
    writer.add_head_count_kv(text.num_kv_heads)
    if text.head_dim * text.num_heads != text.hidden_size:  # llama.cpp derives it from the width otherwise
        writer.add_key_length(text.head_dim)
        writer.add_value_length(text.head_dim)
    writer.add_rope_dimension_count(text.head_dim)
    writer.add_rope_freq_base(text.rope_theta)
    writer.add_layer_norm_rms_eps(text.rms_norm_eps)
    writer.add_vocab_size(text.vocab_size)
    writer.add_file_type(FILE_TYPES[file_type])


def write_llm_gguf(model_dir: Path, out_path: Path, file_type: str = "F16", family=None) -> dict:
    """Write the LLM of a checkpoint directory as GGUF (F32 or F16; K-quants come from llama.cpp's quantizer)."""
    import gguf

    from vlm_factory.families import family_of

    if file_type not in FILE_TYPES:
        raise UserError(f"GGUF file type {file_type!r}: write F32 or F16, then quantize with llama.cpp")
    model_dir = Path(model_dir)
    family = family or family_of(model_dir)
    family.require_format("gguf")
    text = family.text
    if text.arch not in ROTARY_INTERLEAVED:
        raise UserError(f"{model_dir}: LLM type {text.arch!r} is not supported by the GGUF exporter "
                        f"({', '.join(ROTARY_INTERLEAVED)})")
    vocabulary = read_vocabulary(model_dir, text.vocab_size)
    if vocabulary.padded:
        log.info("%s: %d embedding rows past the tokenizer written as [PAD<i>] tokens", model_dir, vocabulary.padded)
    rotary = ({"q_proj": text.num_heads, "k_proj": text.num_kv_heads} if ROTARY_INTERLEAVED[text.arch] else {})
    arch = gguf.MODEL_ARCH[text.arch.upper()]
    name_map = gguf.get_tensor_name_map(arch, text.num_layers)
    summary: dict[str, str] = {}

    def fill(writer) -> None:
        _add_hparams(writer, model_dir.name, text, file_type)
        add_vocabulary(writer, vocabulary)
        for tensor in component_tensors(model_dir, family, "llm"):
            name = name_map.get_name(tensor.local, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise UserError(f"{model_dir}: tensor {tensor.key} has no GGUF name for llama.cpp's {text.arch} arch; "
                                "unsupported checkpoint layout")
            if text.tied_embeddings and name == "output.weight":
                continue  # llama.cpp uses token_embd as the output projection when `output` is absent
            module = tensor.local.rsplit(".", 2)[-2] if tensor.local.count(".") >= 2 else ""
            heads = rotary.get(module)
            # Norms and biases stay F32 (as llama.cpp's converter keeps 1-D tensors); matrices take the file type.
            dtype = np.float16 if file_type == "F16" and len(tensor.shape) == 2 else np.float32
            writer.add_tensor(name, deferred(tensor.shape, dtype, partial(_convert, tensor, heads, dtype)))
            summary[name] = "F16" if dtype == np.float16 else "F32"

    write_gguf(out_path, gguf.MODEL_ARCH_NAMES[arch], fill)
    log.info("wrote %s: %d tensors (%s, %s)", out_path, len(summary), text.arch, file_type)
    return summary
