"""What families whose checkpoints nest an LLM config (`text_config`) and a tower config (`vision_config`)
in config.json share: where each normalised fact comes from, the LLM's facts, and config.json read safely.

LLaVA and Idefics3 both keep a Llama/Qwen2 `text_config` and a ViT `vision_config`; the keys below are
the ones an error names, i.e. the ones a user edits.
"""

from __future__ import annotations

from pathlib import Path

from vlm_factory.errors import UserError
from vlm_factory.families.base import TextFacts
from vlm_factory.families.facts_bounds import (MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, OBJECT, STRING, TEXT_BOUNDS,
                                               VISION_BOUNDS, Rule, json_depth, optional, shown)
from vlm_factory.io import read_json

TEXT_FACT_KEYS = {
    "hidden_size": "text_config.hidden_size", "intermediate_size": "text_config.intermediate_size",
    "num_layers": "text_config.num_hidden_layers", "num_heads": "text_config.num_attention_heads",
    "num_kv_heads": "text_config.num_key_value_heads", "head_dim": "text_config.head_dim",
    "vocab_size": "text_config.vocab_size", "max_positions": "text_config.max_position_embeddings",
    "rope_theta": "text_config.rope_parameters.rope_theta", "rms_norm_eps": "text_config.rms_norm_eps",
    "bos_token_id": "text_config.bos_token_id", "eos_token_id": "text_config.eos_token_id",
    "pad_token_id": "text_config.pad_token_id",
}
VISION_FACT_KEYS = {
    "image_size": "vision_config.image_size", "patch_size": "vision_config.patch_size",
    "num_channels": "vision_config.num_channels", "hidden_size": "vision_config.hidden_size",
    "intermediate_size": "vision_config.intermediate_size", "num_layers": "vision_config.num_hidden_layers",
    "num_heads": "vision_config.num_attention_heads", "layer_norm_eps": "vision_config.layer_norm_eps",
}
# Facts transformers derives when config.json says null: key/value heads (= the heads), head_dim (hidden / heads).
NULL_DERIVED = ("num_kv_heads", "head_dim")

_ABSENT = object()


def nested_config_rules() -> dict[str, Rule]:
    """The rules of every `text_config` / `vision_config` key the facts read (facts_bounds.py holds the bounds)."""
    rules = {"model_type": STRING, "text_config": OBJECT, "vision_config": OBJECT,
             "text_config.model_type": STRING, "vision_config.model_type": STRING,
             "text_config.rope_parameters": optional(OBJECT),
             # transformers 4 configs keep the rotary base beside the other keys
             "text_config.rope_theta": TEXT_BOUNDS["rope_theta"]}
    for fact, key in TEXT_FACT_KEYS.items():
        rules[key] = optional(TEXT_BOUNDS[fact]) if fact in NULL_DERIVED else TEXT_BOUNDS[fact]
    rules.update({key: VISION_BOUNDS[fact] for fact, key in VISION_FACT_KEYS.items()})
    return rules


def stated_facts(raw: dict, fact_keys: dict[str, str]) -> dict:
    """The facts config.json states itself (by fact name), before transformers adds its defaults; a null
    one is left to transformers like an absent one (the key's own rule has said whether null may be)."""
    stated = {}
    for fact, key in fact_keys.items():
        node = raw
        for part in key.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT and node is not None:
            stated[fact] = node
    return stated


def text_facts(config) -> TextFacts:
    """The LLM of a config with a Llama or Qwen2 `text_config`, normalised."""
    t = config.text_config
    heads = t.num_attention_heads
    rope = getattr(t, "rope_parameters", None) or {}
    tied = bool(getattr(t, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))
    return TextFacts(
        arch=t.model_type, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_layers=t.num_hidden_layers, num_heads=heads, num_kv_heads=t.num_key_value_heads or heads,
        head_dim=getattr(t, "head_dim", None) or t.hidden_size // heads, vocab_size=t.vocab_size,
        max_positions=t.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", getattr(t, "rope_theta", 10000.0))),
        rms_norm_eps=float(t.rms_norm_eps),
        qkv_bias=True if t.model_type == "qwen2" else bool(getattr(t, "attention_bias", False)),
        tied_embeddings=tied, bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id,
        pad_token_id=getattr(t, "pad_token_id", None))


def read_config_json(path: Path) -> dict:
    """config.json of a model directory as a JSON object of bounded size and depth whose `model_type` is a
    string, or a one-line error naming it. The family's own key rules run next (registry.family_of).

    Runs before transformers reads the file: a config it would hang or allocate on never reaches it."""
    where = Path(path) / "config.json"
    fix = "the model directory is damaged; download it again"
    if where.is_file() and where.stat().st_size > MAX_CONFIG_BYTES:
        raise UserError(f"{where}: {where.stat().st_size} bytes; a model config is a few KB ({fix})")
    raw = read_json(where, fix=fix,
                    missing=f"{path}: not a model directory (no config.json); run the stage that produces it")
    depth = json_depth(raw)
    if depth > MAX_CONFIG_DEPTH:
        raise UserError(f"{where}: nested {depth} levels deep; a model config nests a few ({fix})")
    if not isinstance(raw.get("model_type"), str):
        got = f"got {shown(raw['model_type'])}" if "model_type" in raw else "it has none"
        raise UserError(f"{where}: model_type must be a string naming the model family ({got}); "
                        "fix or re-download config.json")
    return raw
