"""The Idefics3 / SmolVLM family on a shrunk SmolVLM-256M-Instruct (tests/shrunk_models.py): facts, views,
prompt layout, the reference's generation and the training batches, each against transformers' own
Idefics3 processor and model, plus the refusals of configs no real checkpoint has.

What the family must get exactly right is what every format then inherits: the tiles (pixels), the
prompt text around them (tokens) and which features land on which image token (order).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shrunk_models import IMAGE_SIZES, gradient_image, smolvlm_256m
from vlm_factory.errors import UserError
from vlm_factory.families import family_of
from vlm_factory.model.checkpoint import load_model

QUESTION = "What color is the circle?"


@pytest.fixture(scope="module")
def smolvlm(tmp_path_factory) -> Path:
    # 36 wide (9 heads of 4): the LLM's width does not matter to anything tested here.
    return smolvlm_256m(tmp_path_factory.mktemp("smolvlm") / "checkpoint", layout="hub", text_hidden=36,
                        text_intermediate=64)


@pytest.fixture(scope="module")
def loaded(smolvlm):
    return load_model(smolvlm)


@pytest.fixture(scope="module")
def images():
    return {aspect: gradient_image(*size, seed=i) for i, (aspect, size) in enumerate(IMAGE_SIZES.items())}


def _processor_inputs(processor, image, question=QUESTION):
    """What transformers' own processor gives the model for one image and one question."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=[text], images=[[image]], return_tensors="pt")


def test_facts_of_the_shrunk_smolvlm(loaded):
    family, model, processor = loaded
    assert family.name == "idefics3" and family.variant == "siglip + pixel shuffle x4 + llama"
    assert family.image_tokens == 4  # (128 / 16 / 4)^2
    assert family.text.num_heads == 9 and family.text.num_kv_heads == 3 and family.text.tied_embeddings
    assert (family.vision.tower, family.vision.has_cls_token) == ("siglip", False)
    # 512 px longest edge / 128 px tiles: at most 4x4 tiles + the global view, 4 tokens each.
    assert family.largest_grid(processor) == (4, 4) and family.max_views(processor) == 17
    assert family.visual_tokens(processor) == 68
    assert sum(family.param_counts().values()) == sum(p.numel() for p in model.parameters())
    assert family.connector_type == "idefics3"


@pytest.mark.parametrize("aspect", sorted(IMAGE_SIZES))
def test_views_and_prompt_are_the_processors(loaded, images, aspect):
    """Pixels bit for bit and prompt token for token, for square, tall and wide images."""
    family, _, processor = loaded
    expected = _processor_inputs(processor, images[aspect])
    views = family.image_views(processor.image_processor, [images[aspect]])[0]
    assert torch.equal(views.pixel_values, expected.pixel_values[0])
    assert views.count == views.rows * views.cols + 1 > 1
    prompt = family.prompt(processor)
    ids = processor.tokenizer(prompt.expanded(QUESTION, views.rows, views.cols),
                              add_special_tokens=prompt.add_special_tokens).input_ids
    assert ids == expected.input_ids[0].tolist()
    assert ids.count(family.image_token_id) == views.count * family.image_tokens


def test_image_features_are_the_models_in_prompt_order(loaded, images):
    """Each view through the tower and connector, concatenated: what the model itself merges into the prompt."""
    family, model, processor = loaded
    expected = _processor_inputs(processor, images["wide"])
    views = family.image_views(processor.image_processor, [images["wide"]])[0]
    with torch.no_grad():
        ours = family.image_features(model, views.pixel_values)
        theirs = model.model.get_image_features(expected.pixel_values, expected.pixel_attention_mask)
    theirs = torch.cat(list(getattr(theirs, "pooler_output", theirs)))
    # The same float32 ops on the same inputs: only the batch layout differs (measured 0.0).
    torch.testing.assert_close(ours.reshape(-1, ours.shape[-1]), theirs.reshape(-1, ours.shape[-1]), rtol=0, atol=1e-6)


def test_reference_generation_is_transformers_own(loaded, images):
    """eval/generate.py (family views + prompt layout, batched by shape) answers what `generate` answers
    with the processor's own inputs, token for token."""
    from vlm_factory.eval.generate import answer_questions
    from vlm_factory.model.prompt import MAX_ANSWER_TOKENS

    family, model, processor = loaded
    pictures = [images[a] for a in sorted(images)] * 2
    questions = [QUESTION] * 3 + ["How many shapes are there?"] * 3
    answers = answer_questions(model, processor, pictures, questions, batch_size=4)
    for image, question, answer in zip(pictures, questions, answers):
        inputs = _processor_inputs(processor, image, question)
        out = model.generate(**inputs, max_new_tokens=MAX_ANSWER_TOKENS, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id,
                             eos_token_id=processor.tokenizer.eos_token_id)
        expected = processor.tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True).strip()
        assert answer == expected


def test_training_batches_hold_every_views_features(loaded, images, tmp_path):
    """Finetuning's cached tower features and encoded prompts line up: each example's image tokens are
    exactly its image's views, so the merged embeddings are the model's own."""
    from vlm_factory.train.batches import encode_qa
    from vlm_factory.train.projector import cache_tower_features

    family, model, processor = loaded
    paths = []
    for aspect, image in sorted(images.items()):
        image.save(tmp_path / f"{aspect}.png")
        paths.append(f"{aspect}.png")
    cached = cache_tower_features(family, model, processor, tmp_path, paths, batch_size=2)
    prompt = family.prompt(processor)
    picked = torch.tensor([2, 0])  # wide, then square
    encoded = [encode_qa(processor.tokenizer, prompt, QUESTION, "red", *cached.grids[i]) for i in picked.tolist()]
    length = max(len(e.input_ids) for e in encoded)
    input_ids = torch.tensor([e.input_ids + [processor.tokenizer.pad_token_id] * (length - len(e.input_ids))
                              for e in encoded])
    with torch.no_grad():
        merged = family.merge_image_features(model, input_ids, family.project(model, cached.of(picked)))
        for row, index in enumerate(picked.tolist()):
            inputs = _processor_inputs(processor, images[sorted(images)[index]])
            n = inputs.input_ids.shape[1]
            assert input_ids[row, :n].tolist() == inputs.input_ids[0].tolist()
            theirs = model.model.inputs_merger(inputs.input_ids, model.get_input_embeddings()(inputs.input_ids),
                                               torch.cat(list(getattr(f := model.model.get_image_features(
                                                   inputs.pixel_values, inputs.pixel_attention_mask),
                                                   "pooler_output", f))))
            torch.testing.assert_close(merged[row, :n], theirs[0], rtol=0, atol=1e-6)


def test_budget_counts_every_tile(loaded):
    from vlm_factory.budget import tier_budget
    from vlm_factory.config import TierConfig

    family, _, processor = loaded
    tier = TierConfig(description="t", memory_budget_mb=64, context_tokens=1024, kv_cache_dtype="f16",
                      formats={"gguf": {"llm": "Q8_0", "vision": "F16", "projector": "F16"}})
    budget = tier_budget(family, "t", tier, processor)
    assert budget["visual_tokens_per_image"] == 68 and budget["views_per_image"] == 17


def _edited(smolvlm: Path, tmp_path: Path, change) -> Path:
    import shutil

    out = tmp_path / "edited"
    shutil.copytree(smolvlm, out)
    config = json.loads((out / "config.json").read_text())
    change(config)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(scale_factor=3), "scale_factor 3 must divide the tile's 8 patches per side"),
    (lambda c: c.update(scale_factor=0), "scale_factor"),
    (lambda c: c.update(image_token_id=10**6), "image_token_id must be below text_config.vocab_size"),
    (lambda c: c["vision_config"].update(patch_size=0), "vision_config.patch_size"),
])
def test_configs_no_checkpoint_has_are_refused_in_one_line(smolvlm, tmp_path, change, message):
    edited = _edited(smolvlm, tmp_path, change)
    with pytest.raises(UserError) as caught:
        family_of(edited)
    text = str(caught.value)
    assert message in text and "config.json" in text and "\n" not in text


def test_an_llm_other_than_llama_is_refused_per_format(smolvlm, tmp_path):
    def to_qwen2(config):
        config["text_config"]["model_type"] = "qwen2"

    family = family_of(_edited(smolvlm, tmp_path, to_qwen2))
    for fmt in ("gguf", "onnx", "coreml", "tflite"):
        with pytest.raises(UserError, match=r"cannot be exported to \w+: LLM 'qwen2' \(supported: llama\)"):
            family.require_format(fmt)


def test_gguf_is_refused_without_pixel_shuffle(smolvlm, tmp_path):
    """llama.cpp's idefics3 graph asserts scale_factor > 1 (an abort, not an error): refused up front."""
    family = family_of(_edited(smolvlm, tmp_path, lambda config: config.update(scale_factor=1)))
    with pytest.raises(UserError, match=r"cannot be exported to gguf: llama.cpp's idefics3 graph needs a pixel "
                                        r"shuffle scale_factor above 1 \(this model: 1\)"):
        family.require_format("gguf")
    for fmt in ("onnx", "coreml", "tflite"):
        family.require_format(fmt)
