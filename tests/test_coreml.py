"""Core ML export: palettized vision + stateful decoder packages, weights read back on Linux into PyTorch.

Measured on the bundled base (coremltools 9.0, per_grouped_channel, group_size 16):
- 8 bits: read-back weights within 0.02 (max abs) of the checkpoint's (fp16 rounding + 256-entry LUTs);
- 4 bits: vision-embedding cosine vs torch on 36 synthetic eval images: mean 0.9974, min 0.9965 (floor asserted 0.98, the
  conf/eval/vqa.yaml gate); greedy answers agree with the reference on 32/36 (88.9 %) eval questions (floor 85 %).
"""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch

from conftest import BUNDLED_BASE

ct = pytest.importorskip("coremltools")

SETTINGS = {"granularity": "per_grouped_channel", "group_size": 16}
CONTEXT = 2048  # tiers.iphone15pro.context_tokens; the bundled base's 256 positions bound it
WEIGHT_ATOL_8BIT = 0.02
COSINE_FLOOR_4BIT = 0.98
AGREEMENT_FLOOR_4BIT = 0.85


@pytest.fixture(scope="module")
def reference():
    from vlm_factory.model.checkpoint import load_checkpoint

    return load_checkpoint(BUNDLED_BASE)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from vlm_factory.export.coreml_export import export_coreml

    def run(nbits: int):
        out = tmp_path_factory.mktemp(f"coreml{nbits}") / "artifact"
        report = export_coreml(BUNDLED_BASE, out, "iphone15pro", {"nbits": nbits, **SETTINGS}, check_images=2,
                               context_tokens=CONTEXT)
        return out, report

    cache = {}
    def get(nbits: int):
        if nbits not in cache:
            cache[nbits] = run(nbits)
        return cache[nbits]

    return get


def _eval_items(data_dir, count=36):
    from vlm_factory.data.images import load_image
    from vlm_factory.data.records import read_jsonl

    records = read_jsonl(data_dir / "eval.jsonl")[:count]
    return [load_image(data_dir / r.image) for r in records], [r.question for r in records]


def test_decoder_module_matches_hf(reference):
    """The traced decoder (KV cache in buffers) computes what LlavaForConditionalGeneration's LLM computes."""
    from vlm_factory.export.static_cache import StatefulDecoder
    from vlm_factory.families import family_for

    model, _ = reference
    parts = family_for(model.config).decoder_parts(model)
    decoder = StatefulDecoder(parts, 32).eval()
    embeds = torch.randn(1, 7, model.config.text_config.hidden_size) * 0.1
    with torch.no_grad():
        want = parts.lm_head(parts.core(inputs_embeds=embeds).last_hidden_state)
        mask = torch.triu(torch.full((5, 5), float("-inf")), 1)[None, None]
        first = decoder(embeds[:, :5], torch.arange(5, dtype=torch.int32)[None], mask)
        steps = [decoder(embeds[:, i:i + 1], torch.tensor([[i]], dtype=torch.int32), torch.zeros(1, 1, 1, i + 1))
                 for i in (5, 6)]
    got = torch.cat([first, *steps], dim=1)
    assert torch.allclose(got, want, atol=2e-2), float((got - want).abs().max())  # float16 KV cache


def test_8bit_weights_read_back(export, reference):
    from vlm_factory.runtime.coreml_weights import read_package_weights
    from vlm_factory.runtime.coreml_runtime import CoreMLRuntime

    out, report = export(8)
    assert report["decoder"]["stateful"] and report["files"]["text"]["palettized_weights"] > 0
    model, _ = reference
    with CoreMLRuntime(out) as runtime:
        errors = runtime.weight_errors(model)
        assert max(errors.values()) < WEIGHT_ATOL_8BIT, errors
        assert errors["embedding"] == 0.0  # kept outside the packages, float32
        params = dict(runtime.model.named_parameters())
        for role, entry in runtime.config["packages"].items():
            found = read_package_weights(out / entry["file"])
            assert any(kind == "constexpr_lut_to_dense" for _, kind in found.values())
            for mil_name, torch_name in entry["weights"].items():
                lut = found[mil_name][0].reshape(params[torch_name].shape)
                assert np.array_equal(params[torch_name].detach().numpy(), lut), torch_name
        for name in runtime.config["unused_parameters"]:
            assert torch.isnan(params[name]).all()


def test_4bit_parity(export, reference, synthetic_data):
    from vlm_factory.eval.generate import answer_questions
    from vlm_factory.model.features import project, tower_features
    from vlm_factory.runtime.coreml_runtime import CoreMLRuntime

    out, report = export(4)
    model, processor = reference
    images, questions = _eval_items(synthetic_data)
    with CoreMLRuntime(out) as runtime, torch.no_grad():
        pixels = torch.cat([runtime.pixel_values(image) for image in images])
        want = project(model, tower_features(model, pixels)).reshape(len(images), -1)
        got = torch.stack([torch.from_numpy(runtime.image_embeddings(image)) for image in images[:4]]).reshape(4, -1)
        assert np.allclose(got.numpy(), project(runtime.model, tower_features(runtime.model, pixels[:4])).reshape(4, -1))
        got_all = project(runtime.model, tower_features(runtime.model, pixels)).reshape(len(images), -1)
        cosine = torch.nn.functional.cosine_similarity(got_all, want, dim=1)
        answers = runtime.answer(images, questions)
        logits = runtime.first_token_logits(images[0], questions[0])
    expected = answer_questions(model, processor, images, questions)
    agreement = np.mean([a == b for a, b in zip(answers, expected)])
    print(f"4-bit: cosine mean {cosine.mean():.4f} min {cosine.min():.4f}; agreement {agreement:.3f} on {len(questions)}")
    assert float(cosine.mean()) >= COSINE_FLOOR_4BIT
    assert agreement >= AGREEMENT_FLOOR_4BIT
    assert logits.shape == (model.config.text_config.vocab_size,) and np.isfinite(logits).all()


def test_bad_nbits_is_one_line_and_leaves_nothing(tmp_path):
    from vlm_factory.errors import UserError
    from vlm_factory.export.coreml_export import export_coreml

    out = tmp_path / "artifact"
    with pytest.raises(UserError) as info:
        export_coreml(BUNDLED_BASE, out, "iphone15pro", {"nbits": 3, **SETTINGS}, context_tokens=CONTEXT)
    message = str(info.value)
    assert "targets.coreml.iphone15pro.nbits" in message and "\n" not in message
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(UserError, match="targets.coreml.iphone15pro.group_size"):
        export_coreml(BUNDLED_BASE, out, "iphone15pro", {"nbits": 4, "granularity": "per_grouped_channel",
                                                         "group_size": 0}, context_tokens=CONTEXT)
    with pytest.raises(UserError, match="targets.coreml.iphone15pro.granularity"):
        export_coreml(BUNDLED_BASE, out, "iphone15pro", {"nbits": 4, "granularity": "per_block"},
                      context_tokens=CONTEXT)


@pytest.mark.skipif(platform.system() != "Darwin",
                    reason="Core ML predict() needs macOS; on Linux coremltools can convert and save but not run models")
def test_predict_on_macos(export, reference):
    from vlm_factory.runtime.coreml_runtime import CoreMLRuntime
    from PIL import Image

    out, _ = export(4)
    image = Image.new("RGB", (64, 48), (120, 30, 200))
    with CoreMLRuntime(out) as runtime:
        device = runtime.predict_vision(image)
        linux = runtime.image_embeddings(image)
    cosine = float((device * linux).sum() / (np.linalg.norm(device) * np.linalg.norm(linux)))
    assert cosine > 0.99
