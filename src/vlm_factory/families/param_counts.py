"""Exact parameter counts of the parts families are built from, from normalised facts alone.

Used by the budget planner (no weights are read). Towers: SigLIP and CLIP vision transformers;
decoders: Llama-style stacks (Llama, Mistral, Qwen2: attention, gated MLP, two RMS norms per layer).
"""

from __future__ import annotations

from vlm_factory.families.base import TextFacts, VisionFacts


def vision_tower_params(vision: VisionFacts, with_head: bool = False) -> int:
    """Parameters of a SigLIP or CLIP vision transformer (post-layernorm included; it is in the checkpoint)."""
    h, inter, layers = vision.hidden_size, vision.intermediate_size, vision.num_layers
    attention = 4 * (h * h + h)
    mlp = h * inter + inter + inter * h + h
    layer = attention + 2 * 2 * h + mlp
    conv = vision.num_channels * vision.patch_size ** 2 * h
    if vision.tower == "clip":
        # class embedding, one extra position, bias-free patch conv, pre and post layernorm
        return h + conv + (vision.patches + 1) * h + 2 * h + layers * layer + 2 * h
    total = conv + h + vision.patches * h + layers * layer + 2 * h
    if with_head:
        total += h + attention + 2 * h + mlp  # SigLIP's attention-pooling head: probe, MHA, layernorm, mlp
    return total


def decoder_params(text: TextFacts, o_bias: bool = False, mlp_bias: bool = False) -> dict[str, int]:
    """{"embeddings", "lm_head" (0 when tied), "rest"} of a Llama-style decoder."""
    h, inter, hd = text.hidden_size, text.intermediate_size, text.head_dim
    q, kv = text.num_heads * hd, text.num_kv_heads * hd
    attention = h * q + 2 * h * kv + q * h + (q + 2 * kv if text.qkv_bias else 0) + (h if o_bias else 0)
    mlp = 3 * h * inter + ((2 * inter + h) if mlp_bias else 0)
    layer = attention + mlp + 2 * h
    embeddings = text.vocab_size * h
    return {"embeddings": embeddings, "lm_head": 0 if text.tied_embeddings else embeddings,
            "rest": text.num_layers * layer + h}
