"""Derive the bundled Qwen2 base from the trained Llama one, without pretraining again.

A Llama decoder is a Qwen2 decoder whose q/k/v projections have zero bias: same RMS norms, rotary
embedding, gated SiLU MLP and attention. Moving the trained tower, projector and LLM weights of the
bundled Llama LLaVA into `Qwen2` classes gives a Qwen2 LLaVA that computes the same function (a test
checks the logits), so the pipeline's Qwen2 paths are gated on a model that truly answers; the
fine-tune stage then aligns a new projector as for the default (the LLaVA recipe).
"""

from __future__ import annotations

import logging

import torch

from vlm_factory.errors import UserError

log = logging.getLogger(__name__)
QKV_BIASES = ("q_proj.bias", "k_proj.bias", "v_proj.bias")


def qwen2_text_config(llama):
    """The Qwen2 config computing what `llama` (a LlamaConfig without attention or MLP bias) computes."""
    from transformers import Qwen2Config

    if getattr(llama, "attention_bias", False) or getattr(llama, "mlp_bias", False):
        raise UserError("the source LLM has attention or MLP biases; only bias-free Llama decoders map onto Qwen2")
    return Qwen2Config(
        hidden_size=llama.hidden_size, intermediate_size=llama.intermediate_size,
        num_hidden_layers=llama.num_hidden_layers, num_attention_heads=llama.num_attention_heads,
        num_key_value_heads=llama.num_key_value_heads, vocab_size=llama.vocab_size,
        max_position_embeddings=llama.max_position_embeddings, rms_norm_eps=llama.rms_norm_eps,
        rope_parameters=dict(llama.rope_parameters), hidden_act=llama.hidden_act, use_sliding_window=False,
        tie_word_embeddings=bool(llama.tie_word_embeddings), bos_token_id=llama.bos_token_id,
        eos_token_id=llama.eos_token_id, pad_token_id=llama.pad_token_id)


def llava_with_qwen2(model):
    """The same LLaVA with its Llama LLM as a Qwen2 LLM (zero QKV biases); weights copied, not shared."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = model.config
    if config.text_config.model_type != "llama":
        raise UserError(f"the source LLM is {config.text_config.model_type!r}; the transplant starts from llama")
    fields = config.to_dict()
    fields.pop("text_config"), fields.pop("vision_config")
    new_config = LlavaConfig(**{**fields, "text_config": qwen2_text_config(config.text_config),
                                "vision_config": config.vision_config})
    qwen = LlavaForConditionalGeneration(new_config).eval()
    missing, unexpected = qwen.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not name.endswith(QKV_BIASES) for name in missing):
        raise RuntimeError(f"weights do not map onto Qwen2: missing {missing[:3]}, unexpected {unexpected[:3]}")
    added = set(missing)  # the LLM's new biases only: the vision tower has q/k/v biases of its own
    with torch.no_grad():
        for name, param in qwen.named_parameters():
            if name in added:
                param.zero_()
    qwen.generation_config = model.generation_config
    log.info("transplanted %d tensors into the Qwen2 LLaVA; %d zero QKV biases added",
             len(model.state_dict()), len(missing))
    return qwen
