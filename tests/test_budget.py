"""Memory budgets: exact parameter counts, KV-cache arithmetic, fit checks and the real tiers in conf/."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

from vlm_factory import budget as _budget
from vlm_factory.budget import format_budget_table
from vlm_factory.families import family_for
from vlm_factory.config import TierConfig
from vlm_factory.errors import UserError



# The budget asks the model family; these tests build configs, so wrap them in theirs.
def param_counts(config):
    return _budget.param_counts(family_for(config))


def kv_cache_bytes_per_token(config, dtype, tier_name="?"):
    return _budget.kv_cache_bytes_per_token(family_for(config), dtype, tier_name)


def tier_budget(config, name, tier_cfg):
    return _budget.tier_budget(family_for(config), name, tier_cfg)


TIER_DIR = Path(__file__).resolve().parents[1] / "conf" / "tier"


def siglip(**overrides) -> SiglipVisionConfig:
    kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  image_size=64, patch_size=16, vision_use_head=False)
    return SiglipVisionConfig(**{**kwargs, **overrides})


def llama(**overrides) -> LlamaConfig:
    kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=128, max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaConfig(**{**kwargs, **overrides})


def llava(vision=None, text=None, **overrides) -> LlavaConfig:
    kwargs = dict(vision_feature_select_strategy="full", vision_feature_layer=-1, image_seq_length=16,
                  image_token_id=127, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision or siglip(), text_config=text or llama(), **{**kwargs, **overrides})


def qwen2_tied() -> LlavaConfig:
    text = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, tie_word_embeddings=True)
    return llava(text=text, tie_word_embeddings=True)


def tier(**overrides) -> TierConfig:
    base = TierConfig(description="test tier", memory_budget_mb=64, context_tokens=256, kv_cache_dtype="f16",
                      formats={"gguf": {"llm": "Q4_K_M", "vision": "Q8_0", "projector": "F16"},
                               "onnx": {"precision": "int8"}})
    return dataclasses.replace(base, **overrides)


def real_counts(config: LlavaConfig) -> dict[str, int]:
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    parts = model.model
    lm = parts.language_model
    embeddings = lm.embed_tokens.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    lm_head = 0 if model.lm_head.weight is lm.embed_tokens.weight else model.lm_head.weight.numel()
    return {
        "vision_tower": sum(p.numel() for p in parts.vision_tower.parameters()),
        "projector": sum(p.numel() for p in parts.multi_modal_projector.parameters()),
        "llm_embeddings": embeddings,
        "llm_lm_head": lm_head,
        "llm_rest": sum(p.numel() for p in lm.parameters()) - embeddings,
        "total": total,
    }


@pytest.mark.parametrize("config", [
    pytest.param(llava(), id="siglip-llama"),
    pytest.param(qwen2_tied(), id="siglip-qwen2-tied"),
    pytest.param(llava(vision=siglip(vision_use_head=True), text=llama(attention_bias=True, mlp_bias=True,
                                                                       num_key_value_heads=2)),
                 id="siglip-head-llama-biases-gqa"),
    pytest.param(llava(vision=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=64, patch_size=16),
                       vision_feature_select_strategy="default", vision_feature_layer=-2),
                 id="clip-default-layer-minus-2"),
])
def test_param_counts_match_a_real_model(config):
    assert param_counts(config) == real_counts(config)


def test_tied_embeddings_have_no_lm_head():
    counts = param_counts(qwen2_tied())
    assert counts["llm_lm_head"] == 0
    assert counts["llm_embeddings"] == 128 * 64


def test_kv_cache_bytes_by_hand():
    # 2 layers x 4 kv heads x 64 head dim x 2 (K and V) x 2 bytes (f16)
    assert kv_cache_bytes_per_token(llava(text=llama(hidden_size=256)), "f16") == 2048
    assert kv_cache_bytes_per_token(llava(), "f16") == 2 * 2 * 4 * 16 * 2
    assert kv_cache_bytes_per_token(llava(), "q8_0") == 2 * 2 * 4 * 16 * 34 / 32
    budget = tier_budget(llava(text=llama(hidden_size=256)), "t", tier(context_tokens=100))
    assert budget["kv_cache_bytes_per_token"] == 2048
    assert budget["formats"]["onnx"]["kv_cache_bytes_at_context"] == 204800


def test_explicit_head_dim_wins():
    assert kv_cache_bytes_per_token(llava(text=llama(head_dim=32)), "f32") == 2 * 2 * 4 * 32 * 4


def test_budget_fields_for_tiny_model():
    config = llava()
    budget = tier_budget(config, "t", tier())
    total_params = param_counts(config)["total"]
    onnx = budget["formats"]["onnx"]
    assert budget["visual_tokens_per_image"] == 16
    assert onnx["settings"] == {"vision": "int8", "projector": "int8", "llm": "int8"}  # `precision` for each
    assert onnx["weights_bytes"] == total_params  # int8: one byte per weight
    assert onnx["weights_bytes_in_memory"] == onnx["weights_bytes"]
    assert onnx["total_bytes"] == onnx["weights_bytes"] + 256 * budget["kv_cache_bytes_per_token"]
    assert onnx["max_images_in_context"] == (256 - 64) // 16
    assert onnx["max_context_tokens_in_memory"] == 256  # capped at max_position_embeddings
    assert onnx["fits"] is True


def test_fits_flips_when_budget_is_tiny():
    config = llava(text=llama(vocab_size=32768))  # ~2M embedding parameters: a few MB of weights
    assert tier_budget(config, "t", tier(memory_budget_mb=64))["formats"]["gguf"]["fits"] is True
    small = tier_budget(config, "t", tier(memory_budget_mb=1))["formats"]["gguf"]
    assert small["fits"] is False
    assert small["max_context_tokens_in_memory"] == 0


def test_memory_limits_context_tokens():
    budget = tier_budget(llava(text=llama(max_position_embeddings=10**6)), "t", tier(memory_budget_mb=1))
    onnx = budget["formats"]["onnx"]
    free = 2**20 - onnx["weights_bytes"]
    assert onnx["max_context_tokens_in_memory"] == free // budget["kv_cache_bytes_per_token"]


def test_no_room_for_an_image():
    assert tier_budget(llava(), "t", tier(context_tokens=70))["formats"]["gguf"]["max_images_in_context"] == 0


@pytest.mark.parametrize("fmt, settings, key", [
    ("gguf", {"llm": "Q3_XYZ", "vision": "Q8_0", "projector": "F16"}, "targets.gguf.phone.llm"),
    ("gguf", {"llm": "Q4_K_M", "projector": "F16"}, "targets.gguf.phone.vision"),
    ("onnx", {"precision": "int3"}, "targets.onnx.phone.precision"),
    ("coreml", {"nbits": 5}, "targets.coreml.phone.nbits"),
    ("coreml", {"nbits": 4.5}, "targets.coreml.phone.nbits"),
    ("tensorrt", {"precision": "fp16"}, "targets"),
    ("tflite", {"precision": "float16"}, "targets.tflite.phone.precision"),
])
def test_unknown_setting_names_the_key(fmt, settings, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")) as info:
        tier_budget(llava(), "phone", tier(formats={fmt: settings}))
    assert "known:" in str(info.value)


def test_unknown_kv_dtype_names_the_key():
    with pytest.raises(UserError, match=r"tiers\.phone\.kv_cache_dtype.*q8_0"):
        tier_budget(llava(), "phone", tier(kv_cache_dtype="q3"))


def test_inconsistent_image_seq_length_is_a_user_error():
    with pytest.raises(UserError, match="image_seq_length is 15"):
        tier_budget(llava(image_seq_length=15), "t", tier())


def load_tier(path: Path) -> TierConfig:
    """A tier file's device facts with its targets as `formats`, as load_params assembles them."""
    raw = OmegaConf.load(path)
    tier = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TierConfig), raw.tiers[path.stem]))
    tier.formats = {fmt: dict(by_tier[path.stem]) for fmt, by_tier in raw.targets.items()}
    return tier


@pytest.mark.parametrize("path", sorted(TIER_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_real_tiers_give_positive_numbers(path):
    tier_config = load_tier(path)
    budget = tier_budget(llava(), path.stem, tier_config)
    assert budget["memory_budget_mb"] == tier_config.memory_budget_mb > 0
    assert set(budget["formats"]) == set(tier_config.formats)
    for entry in budget["formats"].values():
        for key in ("weights_bytes", "kv_cache_bytes_at_context", "total_bytes", "max_images_in_context",
                    "max_context_tokens_in_memory"):
            assert entry[key] > 0, key
        assert entry["fits"] is True  # a tiny model fits every device
    table = format_budget_table(budget)
    assert path.stem in table
    assert all(fmt in table for fmt in tier_config.formats)


def test_real_tiers_exist():
    assert {p.stem for p in TIER_DIR.glob("*.yaml")} >= {"android_budget", "iphone15pro", "jetson_orin"}


def test_quant_types_order_weights():
    config = llava()
    base = load_tier(TIER_DIR / "jetson_orin.yaml")

    def gguf_weights(quant: str) -> int:
        formats = {"gguf": {"llm": quant, "vision": quant, "projector": quant}}
        return tier_budget(config, "t", dataclasses.replace(base, formats=formats))["formats"]["gguf"]["weights_bytes"]

    q4, q8, f16 = gguf_weights("Q4_K_M"), gguf_weights("Q8_0"), gguf_weights("F16")
    assert q4 < q8 < f16
    assert f16 == param_counts(config)["total"] * 2


def test_real_tier_quant_choices_order_weights():
    config = llava(text=llama(vocab_size=4096))

    def gguf_weights(name: str) -> int:
        return tier_budget(config, name, load_tier(TIER_DIR / f"{name}.yaml"))["formats"]["gguf"]["weights_bytes"]

    # android_budget: LLM Q4_K_M, vision Q8_0; jetson_orin: LLM Q8_0, vision F16
    assert gguf_weights("android_budget") < gguf_weights("jetson_orin") < param_counts(config)["total"] * 2


def test_table_falls_back_without_tabulate(monkeypatch):
    import sys

    budget = tier_budget(llava(), "phone", tier())
    monkeypatch.setitem(sys.modules, "tabulate", None)  # makes `from tabulate import ...` raise ImportError
    lines = format_budget_table(budget).splitlines()
    assert lines[2].startswith("format") and set(lines[3]) == {"-", " "}
    rows = [line for line in lines if line.startswith(("gguf", "onnx"))]
    assert len(rows) == 2 and len({len(row) for row in rows}) == 1


def test_coreml_keeps_embeddings_at_16_bits():
    config = llava()
    counts = param_counts(config)
    budget = tier_budget(config, "t", tier(formats={"coreml": {"nbits": 4, "group_size": 16}}))
    expected = (counts["llm_embeddings"] * 16 + (counts["total"] - counts["llm_embeddings"]) * 4) // 8
    assert budget["formats"]["coreml"]["weights_bytes"] == expected


def test_table_is_aligned_text():
    table = format_budget_table(tier_budget(llava(), "phone", tier()))
    lines = table.splitlines()
    assert lines[0] == "tier phone: test tier"
    assert any(line.startswith("gguf") and "llm=Q4_K_M" in line and "yes" in line for line in lines)
    rows = [line for line in lines if line.startswith(("gguf", "onnx"))]
    assert len(rows) == 2 and len({len(row) for row in rows}) == 1


# -- the budget of a real artifact, as the parity gate checks it -----------------------------------------------

def test_artifact_budget_counts_bytes_kv_cache_and_one_images_activations():
    family = family_for(llava())
    tier = TierConfig(description="t", memory_budget_mb=1, context_tokens=512, kv_cache_dtype="f16")
    budget = _budget.artifact_budget(family, "t", tier, artifact_bytes=500_000)
    # KV: 2 (K, V) x 2 layers x 4 heads x 16 dims x 2 bytes = 512 B a token, at the model's 256 positions.
    assert budget["kv_cache_bytes_at_context"] == 512 * 256 and budget["context_tokens"] == 256
    # One 64-px view, 16 patches: 4 bytes x 16 x (3 x 64 + 128 + 4 heads x 16) = 24,576.
    assert budget["vision_activation_bytes"] == 4 * 16 * (3 * 64 + 128 + 4 * 16)
    assert budget["total_bytes"] == 500_000 + 512 * 256 + 24_576 and budget["fits_memory"]
    assert budget["context_tokens_needed"] == 16 + 64 and budget["fits_context"]


def test_a_tier_too_small_for_the_artifact_fails_the_gate_on_budget():
    from vlm_factory.eval.gates import budget_checks, describe

    family = family_for(llava())
    small = TierConfig(description="t", memory_budget_mb=1, context_tokens=512, images_per_prompt=13)
    budget = _budget.artifact_budget(family, "t", small, artifact_bytes=2**20)
    assert not budget["fits_memory"] and not budget["fits_context"]
    failing = [describe(c) for c in budget_checks(budget) if c["status"] == "fail"]
    assert len(failing) == 2
    assert failing[0].startswith("memory_mib (weights 1.0 + KV cache 0.1 + vision activations 0.0 MiB) 1.1")
    assert failing[0].endswith("above 1")
    assert failing[1] == "context_tokens_needed (13 x 16 image + 64 text tokens) 272 above 256"
