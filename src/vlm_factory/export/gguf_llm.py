"""The LLM half of the llama.cpp packaging: a LLaVA checkpoint's Llama decoder as a GGUF file.

Tensors are read, converted and written one at a time (see gguf_io), renamed through gguf-py's
own name map, and q/k projections are permuted from HF's
rotate-half layout to the interleaved layout llama.cpp's RoPE expects. The tokenizer (byte-level
BPE) is written with its merges, special tokens and chat template.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import numpy as np

from vlm_factory.errors import UserError
from vlm_factory.export.gguf_io import checkpoint_tensors, deferred, write_gguf

log = logging.getLogger(__name__)

LLM_PREFIX = "language_model."
FILE_TYPES = {"F32": 0, "F16": 1}  # llama_ftype: ALL_F32, MOSTLY_F16


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


def _token_types(tokenizer_json: dict, vocab_size: int, tokens: list[str]) -> list[int]:
    import gguf

    special = {t["id"] for t in tokenizer_json.get("added_tokens", []) if t.get("special")}
    added = {t["id"] for t in tokenizer_json.get("added_tokens", [])}
    types = []
    for i in range(vocab_size):
        if i in special:
            types.append(gguf.TokenType.CONTROL)
        elif i in added:
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return types


def _write_tokenizer(writer, model_dir: Path, config) -> None:
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if tokenizer_json.get("pre_tokenizer", {}).get("type") != "ByteLevel":
        raise UserError(f"{model_dir / 'tokenizer.json'}: only byte-level BPE tokenizers are exported to GGUF")
    id_to_token = {i: t for t, i in tokenizer_json["model"]["vocab"].items()}
    id_to_token.update({t["id"]: t["content"] for t in tokenizer_json.get("added_tokens", [])})
    vocab_size = config.text_config.vocab_size
    missing = [i for i in range(vocab_size) if i not in id_to_token]
    if missing:
        raise UserError(f"{model_dir / 'tokenizer.json'}: token ids {missing[:5]} missing; "
                        f"the token list must be exactly vocab_size={vocab_size} long")
    tokens = [id_to_token[i] for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(_token_types(tokenizer_json, vocab_size, tokens))
    writer.add_token_merges(merges)
    text = config.text_config
    writer.add_bos_token_id(text.bos_token_id)
    writer.add_eos_token_id(text.eos_token_id)
    if text.pad_token_id is not None:
        writer.add_pad_token_id(text.pad_token_id)
    writer.add_add_bos_token(True)
    template = model_dir / "chat_template.jinja"
    if template.is_file():
        writer.add_chat_template(template.read_text(encoding="utf-8"))


def _add_hparams(writer, name: str, text, file_type: str) -> None:
    writer.add_name(name)
    writer.add_context_length(text.max_position_embeddings)
    writer.add_embedding_length(text.hidden_size)
    writer.add_block_count(text.num_hidden_layers)
    writer.add_feed_forward_length(text.intermediate_size)
    writer.add_head_count(text.num_attention_heads)
    writer.add_head_count_kv(text.num_key_value_heads)
    writer.add_rope_dimension_count(text.head_dim)
    writer.add_rope_freq_base(float(text.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(text.rms_norm_eps)
    writer.add_vocab_size(text.vocab_size)
    writer.add_file_type(FILE_TYPES[file_type])


def write_llm_gguf(model_dir: Path, out_path: Path, file_type: str = "F16") -> dict:
    """Write the LLM of an HF LLaVA directory as GGUF (F32 or F16; K-quants come from llama.cpp's quantizer)."""
    import gguf
    from transformers import LlavaConfig

    if file_type not in FILE_TYPES:
        raise UserError(f"GGUF file type {file_type!r}: write F32 or F16, then quantize with llama.cpp")
    config = LlavaConfig.from_pretrained(model_dir)
    text = config.text_config
    if text.model_type != "llama":
        raise UserError(f"{model_dir}: LLM type {text.model_type!r} is not supported by the GGUF exporter (llama)")
    rotary_heads = {"q_proj.weight": text.num_attention_heads, "k_proj.weight": text.num_key_value_heads}
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, text.num_hidden_layers)
    summary: dict[str, str] = {}

    def fill(writer) -> None:
        _add_hparams(writer, model_dir.name, text, file_type)
        _write_tokenizer(writer, model_dir, config)
        for tensor in checkpoint_tensors(model_dir, (LLM_PREFIX,)):
            hf_name = tensor.key[len(LLM_PREFIX):]
            name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise UserError(f"{model_dir}: tensor {tensor.key} has no GGUF name; unsupported checkpoint layout")
            heads = next((n for suffix, n in rotary_heads.items() if hf_name.endswith(suffix)), None)
            # Norms stay F32 (as llama.cpp's converter keeps 1-D tensors); matrices take the file type.
            dtype = np.float16 if file_type == "F16" and len(tensor.shape) == 2 else np.float32
            writer.add_tensor(name, deferred(tensor.shape, dtype, partial(_convert, tensor, heads, dtype)))
            summary[name] = "F16" if dtype == np.float16 else "F32"

    write_gguf(out_path, "llama", fill)
    log.info("wrote %s: %d tensors (%s)", out_path, len(summary), file_type)
    return summary
