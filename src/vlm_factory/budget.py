"""Device memory budget of one model per tier and export format, computed from its config alone.

Parameter counts and visual tokens per image come from the model family (families/), exact for
every part it supports. Weight sizes are estimates: every parameter is charged the
bits per weight of the type chosen for its part of the model (see the tables below).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from vlm_factory.params_schema import FORMATS, TierConfig
from vlm_factory.errors import UserError

if TYPE_CHECKING:
    from vlm_factory.families import ModelFamily

# Estimated bits per weight of llama.cpp GGUF types, block scales included. The K-quant "_M"
# mixes keep some tensors at a higher type, so their average is an estimate for a Llama-like
# LLM (Q5_K_M ~ 5.69, Q4_K_M ~ 4.85). Norms and biases (kept at F32 by llama.cpp) are charged
# the same rate as the matrices; they are well under 1% of any real model.
GGUF_BITS: dict[str, float] = {
    "F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_K_M": 5.69,
    "Q5_K": 5.5, "Q5_0": 5.5, "Q4_K_M": 4.85, "Q4_K": 4.5, "Q4_0": 4.5, "Q3_K_M": 3.91, "Q3_K": 3.4375,
    "Q2_K": 2.96,
}
# ONNX / TFLite: one storage type for all weights (int8 = dynamic-range quantised matrices).
PRECISION_BITS: dict[str, int] = {"fp32": 32, "fp16": 16, "int8": 8}
# Core ML palettisation: nbits indices per weight; the per-group fp16 look-up tables are ignored
# (< 0.1% for hidden sizes of 1024 and up). Token embeddings stay at 16 bits.
COREML_BITS: dict[str, int] = {**{str(n): n for n in (1, 2, 3, 4, 6, 8)}, "fp16": 16}
COREML_EMBEDDING_BITS = 16
# Bytes per KV-cache element; q8_0 and q4_0 store 32 values plus one fp16 scale per block.
KV_DTYPE_BYTES: dict[str, Fraction] = {
    "f32": Fraction(4), "f16": Fraction(2), "bf16": Fraction(2),
    "q8_0": Fraction(34, 32), "q4_0": Fraction(18, 32),
}


def _known(values) -> str:
    return ", ".join(str(v) for v in values)


def param_counts(family: "ModelFamily") -> dict[str, int]:
    """Exact parameter counts of the model, by part, from its config alone (the family counts)."""
    counts = dict(family.param_counts())
    counts["total"] = sum(counts.values())
    return counts


def kv_cache_bytes_per_token(family: "ModelFamily", kv_cache_dtype: str, tier_name: str = "?") -> Fraction:
    """K and V bytes one token adds to the cache across all decoder layers."""
    if kv_cache_dtype not in KV_DTYPE_BYTES:
        raise UserError(f"key 'tiers.{tier_name}.kv_cache_dtype' is {kv_cache_dtype!r}; "
                        f"known: {_known(KV_DTYPE_BYTES)}")
    text = family.text
    elements = 2 * text.num_layers * text.num_kv_heads * text.head_dim
    return elements * KV_DTYPE_BYTES[kv_cache_dtype]


def _setting(settings: dict, table, tier_name: str, fmt: str, key: str, normalise=str):
    value = settings.get(key)
    try:
        known = normalise(value) if value is not None else None
    except ValueError:
        known = None
    if known not in table:
        raise UserError(f"key 'targets.{fmt}.{tier_name}.{key}' is {value!r}; known: {_known(table)}")
    return known


def _component_settings(fmt: str, settings: dict) -> dict[str, tuple[str, object]]:
    """{component: (the settings key that holds its precision, the value)}: a component's own key, else the
    format's global one (ONNX/TFLite `precision`, Core ML `nbits`; GGUF names every component)."""
    default = {"onnx": "precision", "tflite": "precision", "coreml": "nbits"}.get(fmt)
    return {c: (c, settings.get(c)) if c in settings or default is None else (default, settings.get(default))
            for c in ("vision", "projector", "llm")}


def _weight_bits(fmt: str, settings: dict, counts: dict[str, int], tier_name: str) -> tuple[float, dict]:
    """Total bits of all weights stored in `fmt`, and the settings that decided it (per component)."""
    if fmt not in FORMATS:
        raise UserError(f"key 'targets' names unknown format {fmt!r}; known: {_known(FORMATS)}")
    parts = {"vision": counts["vision_tower"], "projector": counts["projector"],
             "llm": counts["llm_embeddings"] + counts["llm_lm_head"] + counts["llm_rest"]}
    bits, chosen = 0.0, {}
    for component, (key, value) in _component_settings(fmt, settings).items():
        if fmt == "gguf":
            chosen[component] = _setting({key: value}, GGUF_BITS, tier_name, fmt, key, lambda v: str(v).upper())
            rate = GGUF_BITS[chosen[component]]
        elif fmt in ("onnx", "tflite"):
            chosen[component] = _setting({key: value}, PRECISION_BITS, tier_name, fmt, key, lambda v: str(v).lower())
            rate = PRECISION_BITS[chosen[component]]
        else:  # coreml: nbits indices, or an unpalettized (fp16) component; token embeddings stay 16-bit
            chosen[component] = _setting({key: value}, COREML_BITS, tier_name, fmt, key, _coreml_bits)
            rate = COREML_BITS[chosen[component]]
        if fmt == "coreml" and component == "llm":
            bits += counts["llm_embeddings"] * COREML_EMBEDDING_BITS + (parts["llm"] - counts["llm_embeddings"]) * rate
        else:
            bits += parts[component] * rate
    return bits, chosen


def _coreml_bits(value) -> str:
    return str(value).lower()


def _format_budget(weights_bytes: int, kv_per_token: Fraction, budget_bytes: int, context: int,
                   image_tokens: int, max_positions: int, text_tokens: int) -> dict[str, Any]:
    kv_at_context = math.ceil(kv_per_token * context)
    total = weights_bytes + kv_at_context
    free = budget_bytes - weights_bytes
    tokens_in_memory = min(max_positions, math.floor(free / kv_per_token)) if free > 0 else 0
    images = (context - text_tokens) // image_tokens if image_tokens > 0 else 0
    return {
        "weights_bytes": weights_bytes,
        "weights_bytes_in_memory": weights_bytes,  # every format here is memory-mapped as stored
        "kv_cache_bytes_at_context": kv_at_context,
        "total_bytes": total,
        "fits": total <= budget_bytes,
        "max_images_in_context": max(0, images),
        "max_context_tokens_in_memory": max(0, tokens_in_memory),
    }


def _jsonable(value: Fraction) -> int | float:
    return int(value) if value.denominator == 1 else float(value)


def estimated_weight_bytes(family: "ModelFamily", fmt: str, settings: dict, tier_name: str = "?") -> int:
    """Bytes the weights of `settings` (one target, any per-component precisions) take in `fmt`, estimated
    from the parameter counts: what orders the precision search's candidates before any is built."""
    bits, _ = _weight_bits(fmt, dict(settings), param_counts(family), tier_name)
    return math.ceil(bits / 8)


def tier_budget(family: "ModelFamily", tier_name: str, tier: TierConfig, processor=None) -> dict:
    """Memory budget of the family's model on one tier: weights and KV cache per export format the tier lists.

    Visual tokens per image are the family's most (`family.visual_tokens`: every tile and the global
    view of a SmolVLM image; one view elsewhere), which needs the checkpoint's processor where images
    are cut into tiles.

    Raises UserError for an unknown quant type, precision or KV-cache dtype, naming the tier key.
    """
    counts = param_counts(family)
    image_tokens = family.visual_tokens(processor)
    kv_per_token = kv_cache_bytes_per_token(family, tier.kv_cache_dtype, tier_name)
    budget_bytes = tier.memory_budget_mb * 2**20
    max_positions = family.text.max_positions
    # A tier's context cannot exceed what the model was built for: budget the usable context.
    context = min(tier.context_tokens, max_positions)
    formats = {}
    for fmt, settings in tier.formats.items():
        bits, chosen = _weight_bits(fmt, dict(settings), counts, tier_name)
        formats[fmt] = {"settings": chosen, **_format_budget(
            math.ceil(bits / 8), kv_per_token, budget_bytes, context, image_tokens, max_positions,
            tier.min_text_tokens)}
    return {
        "tier": tier_name,
        "description": tier.description,
        "model_family": family.name,
        "model_variant": family.variant,
        "memory_budget_mb": tier.memory_budget_mb,
        "context_tokens": tier.context_tokens,
        "effective_context_tokens": context,
        "kv_cache_dtype": tier.kv_cache_dtype,
        "model_max_position_embeddings": max_positions,
        "visual_tokens_per_image": image_tokens,
        "views_per_image": family.max_views(processor),
        "kv_cache_bytes_per_token": _jsonable(kv_per_token),
        "params": counts,
        "formats": formats,
    }


def vision_activation_bytes(family: "ModelFamily", views: int) -> int:
    """Peak float32 activations of the vision tower for one image: its `views` (tiles are encoded as one batch)
    through one encoder layer, where the residual stream, the attention scores and the MLP's hidden layer
    are alive together. An estimate of the runtime's working memory, not of any one runtime's allocator."""
    vision = family.vision
    tokens = vision.patches + int(vision.has_cls_token)
    per_view = tokens * (3 * vision.hidden_size + vision.intermediate_size + vision.num_heads * tokens)
    return 4 * views * per_view


def artifact_budget(family: "ModelFamily", tier_name: str, tier: TierConfig, artifact_bytes: int,
                    processor=None) -> dict[str, Any]:
    """The tier's budget for a real artifact: its bytes on disk as the weights in runtime memory (every runtime
    here maps or loads its files as stored), the KV cache at the tier's context and KV type, and the vision
    activations of one image; and whether the context holds `images_per_prompt` images plus `min_text_tokens`."""
    kv_per_token = kv_cache_bytes_per_token(family, tier.kv_cache_dtype, tier_name)
    context = min(tier.context_tokens, family.text.max_positions)
    image_tokens = family.visual_tokens(processor)
    kv_bytes = math.ceil(kv_per_token * context)
    activations = vision_activation_bytes(family, family.max_views(processor))
    total = artifact_bytes + kv_bytes + activations
    budget_bytes = tier.memory_budget_mb * 2**20
    needed = tier.images_per_prompt * image_tokens + tier.min_text_tokens
    return {
        "memory_budget_bytes": budget_bytes, "weights_bytes_in_memory": artifact_bytes,
        "kv_cache_bytes_at_context": kv_bytes, "vision_activation_bytes": activations, "total_bytes": total,
        "fits_memory": total <= budget_bytes,
        "context_tokens": context, "visual_tokens_per_image": image_tokens,
        "images_per_prompt": tier.images_per_prompt, "min_text_tokens": tier.min_text_tokens,
        "context_tokens_needed": needed, "fits_context": needed <= context,
    }


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f}"


def _table(rows: list[list[str]], headers: list[str], align: list[str]) -> str:
    try:
        from tabulate import tabulate
    except ImportError:
        widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
        lines = [headers, ["-" * w for w in widths], *rows]
        return "\n".join("  ".join(str(c).rjust(w) if a == "right" else str(c).ljust(w)
                                   for c, w, a in zip(line, widths, align)).rstrip() for line in lines)
    return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True, colalign=align)


def format_budget_table(budget: dict) -> str:
    """A plain-text summary of `tier_budget`'s result: a header, then one aligned row per format."""
    params = budget["params"]
    header = (f"tier {budget['tier']}: {budget['description']}\n"
              f"budget {budget['memory_budget_mb']} MB, context {budget['effective_context_tokens']} tokens "
              f"({budget['visual_tokens_per_image']} per image), KV cache {budget['kv_cache_dtype']} "
              f"{budget['kv_cache_bytes_per_token']} B/token, {params['total']:,} parameters")
    headers = ["format", "settings", "weights MB", "KV MB", "total MB", "fits", "images", "max tokens"]
    align = ["left", "left", "right", "right", "right", "left", "right", "right"]
    rows = [[fmt, " ".join(f"{k}={v}" for k, v in entry["settings"].items()),
             _mb(entry["weights_bytes"]), _mb(entry["kv_cache_bytes_at_context"]), _mb(entry["total_bytes"]),
             "yes" if entry["fits"] else "NO", str(entry["max_images_in_context"]),
             str(entry["max_context_tokens_in_memory"])]
            for fmt, entry in budget["formats"].items()]
    return header + "\n" + _table(rows, headers, align)
