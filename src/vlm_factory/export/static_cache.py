"""The traceable modules Core ML and TFLite convert: a family's image features, and its LLM as a decoder
over a fixed-size KV cache.

transformers' DynamicCache grows with every token, which neither tracer can turn into a static graph,
so the decoder is written out here once, over the family's `DecoderParts` (the layout Llama, Mistral
and Qwen2 share): each layer's own norms, q/k/v/o projections (QKV bias comes with the Linear
modules) and MLP are called as they are; only rotary embedding, grouped-query attention and the cache
are spelled out. The output projection is `parts.lm_head`, which is the embedding table itself when
the model ties them.

The two formats hold the cache differently, so two small subclasses:

- `StatefulDecoder` (Core ML): the cache lives in registered float16 buffers written in place, which
  coremltools turns into iOS18 `ct.StateType` states; the caller passes an additive causal mask whose
  width sets the window written.
- `FunctionalDecoder` (TFLite): the caches go in and come out as tensors; positions are written with
  one-hot matmuls and the mask is computed from the positions, so nothing depends on data-dependent shapes.
"""

from __future__ import annotations

import torch
from torch import nn

from vlm_factory.errors import UserError


class ImageFeatures(nn.Module):
    """pixel_values -> what replaces the image tokens: exactly `family.image_features(model, pixels)`, for
    one view of an image or a batch of them (a family that cuts images into tiles: each tile, the global view).

    The whole model is a submodule so tracers name each weight by its path in the model; the tracers
    keep only what the computation reads."""

    def __init__(self, family, model, output_name: str | None = None):
        super().__init__()
        self.model = model
        self._family = family
        self._output_name = output_name  # litert-torch names signature outputs after dict keys

    def forward(self, pixel_values):
        features = self._family.image_features(self.model, pixel_values)
        return {self._output_name: features} if self._output_name else features


def rope_tables(rotary, facts, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, head dim] for positions 0..length-1, as the model's rotary module computes them.

    The module's own `inv_freq` carries any rope scaling of its rope type; without it, the plain
    formula with the facts' theta. Tables (not angles computed in the graph) because Core ML runs in
    float16, where position * frequency loses the angle at a few hundred positions."""
    inv_freq = getattr(rotary, "inv_freq", None)
    if inv_freq is None:
        dim = facts.head_dim
        inv_freq = 1.0 / (facts.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq.detach().float().cpu())
    angles = torch.cat((freqs, freqs), dim=-1)
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    return angles.cos() * scaling, angles.sin() * scaling


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class StaticCacheDecoder(nn.Module):
    """The shared math, batch 1: hidden [1, T, hidden] -> logits [1, T, vocab]; subclasses own the cache."""

    def __init__(self, parts, max_context: int):
        super().__init__()
        facts = parts.facts
        self.layers, self.norm, self.lm_head = parts.layers, parts.norm, parts.lm_head
        self.n_heads, self.n_kv, self.head_dim = facts.num_heads, facts.num_kv_heads, facts.head_dim
        self.groups = self.n_heads // self.n_kv
        self.scale = self.head_dim ** -0.5
        self.max_context = int(max_context)
        for layer in parts.layers:
            window = getattr(layer.self_attn, "sliding_window", None)
            if window is not None and window < self.max_context:
                raise UserError(f"sliding-window attention ({window} tokens) is not implemented by the static-cache "
                                f"decoder; lower the tier's context_tokens to at most {window}")
        cos, sin = rope_tables(parts.rotary, facts, self.max_context)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _qkv(self, layer, hidden, cos, sin):
        """q [heads, T, D], k and v [kv heads, T, D] of one layer, rotary applied to q and k."""
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)[0]  # [T, hidden]
        length = x.shape[0]
        q = attn.q_proj(x).view(length, self.n_heads, self.head_dim).transpose(0, 1)
        k = attn.k_proj(x).view(length, self.n_kv, self.head_dim).transpose(0, 1)
        v = attn.v_proj(x).view(length, self.n_kv, self.head_dim).transpose(0, 1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def _attend(self, layer, q, keys, values, mask):
        """Grouped-query attention: each kv head serves `groups` consecutive query heads, by reshaping the
        queries rather than repeating the cache. mask: additive, broadcastable to [T, cache positions]."""
        length = q.shape[1]
        grouped = q.reshape(self.n_kv, self.groups * length, self.head_dim)
        scores = torch.matmul(grouped, keys.transpose(1, 2)) * self.scale  # [kv, groups*T, S]
        scores = scores.view(self.n_kv, self.groups, length, -1) + mask
        probs = torch.softmax(scores, dim=-1).view(self.n_kv, self.groups * length, -1)
        out = torch.matmul(probs, values).view(self.n_heads, length, self.head_dim)
        return layer.self_attn.o_proj(out.transpose(0, 1).reshape(1, length, self.n_heads * self.head_dim))

    def run(self, hidden, cos, sin, mask, cache):
        """All layers; `cache(index, k, v)` stores the new positions and returns the keys/values to attend."""
        for index, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, hidden, cos, sin)
            keys, values = cache(index, k, v)
            hidden = hidden + self._attend(layer, q, keys, values, mask)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.lm_head(self.norm(hidden))


class StatefulDecoder(StaticCacheDecoder):
    """Core ML: the cache in float16 buffers `k_cache`, `v_cache` [layers, 1, kv heads, max context, D].

    forward(inputs_embeds [1, S, hidden], position_ids [1, S] int32, causal_mask [1, 1, S, past+S] additive)
    -> logits [1, S, vocab]; positions past..past+S-1 are written, past = mask width - S."""

    def __init__(self, parts, max_context: int):
        super().__init__(parts, max_context)
        shape = (len(self.layers), 1, self.n_kv, self.max_context, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=torch.float16))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=torch.float16))

    def forward(self, inputs_embeds, position_ids, causal_mask):
        seq, end = inputs_embeds.shape[1], causal_mask.shape[-1]
        past = end - seq
        positions = position_ids[0].long()
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [S, D]

        def cache(index, k, v):
            self.k_cache[index:index + 1, :, :, past:end, :] = k.to(torch.float16)[None, None]
            self.v_cache[index:index + 1, :, :, past:end, :] = v.to(torch.float16)[None, None]
            return (self.k_cache[index, 0, :, :end, :].to(torch.float32),
                    self.v_cache[index, 0, :, :end, :].to(torch.float32))

        return self.run(inputs_embeds, cos, sin, causal_mask[0, 0], cache)


class FunctionalDecoder(StaticCacheDecoder):
    """TFLite: forward(inputs_embeds [1, T, hidden], input_pos [T] int32, k_cache, v_cache [layers, kv heads,
    max context, D]) -> {"logits": [1, T, vocab], "k_cache", "v_cache"} with positions `input_pos` written.

    Cache slot s is visible to a query at position p iff s <= p, so slots not written yet (or written by a
    padded prefill position after the prompt) are masked. Positions >= max context write nothing."""

    def __init__(self, parts, max_context: int):
        super().__init__(parts, max_context)
        self.register_buffer("slots", torch.arange(self.max_context, dtype=torch.int32), persistent=False)

    def forward(self, inputs_embeds, input_pos, k_cache, v_cache):
        # Padded prefill positions may run past the table; their outputs are never read.
        positions = torch.clamp(input_pos, max=self.max_context - 1).long()
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [T, D]
        write = (self.slots[None, :] == input_pos[:, None]).float()  # [T, S]
        keep = (1.0 - write.sum(0))[None, :, None]  # [1, S, 1]
        scatter = write.transpose(0, 1)[None]  # [1, S, T]
        mask = torch.where(self.slots[None, :] <= input_pos[:, None], 0.0, -1e9)  # [T, S]
        new_k, new_v = [], []

        def cache(index, k, v):
            new_k.append(k_cache[index] * keep + torch.matmul(scatter, k))  # [kv heads, S, D]
            new_v.append(v_cache[index] * keep + torch.matmul(scatter, v))
            return new_k[-1], new_v[-1]

        logits = self.run(inputs_embeds, cos, sin, mask, cache)
        return {"logits": logits, "k_cache": torch.stack(new_k), "v_cache": torch.stack(new_v)}
