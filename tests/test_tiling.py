"""SmolVLM / Idefics3 tiling replayed from plain data (runtime/tiling.py) against transformers' own processor.

Device runtimes split images and expand the prompt themselves, with PIL + numpy; if their pixels or
their token layout drift from the processor's, every parity gate downstream compares the wrong
thing. So each image shape that exercises a different rounding branch (square, tall, wide, smaller
than a tile, larger than the longest edge, odd sizes, a thin strip) and each colour mode with its own
conversion (RGBA and palette transparency composited onto white, grayscale) is checked pixel for
pixel, with splitting on and off, and the expanded prompt token for token.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from shrunk_models import gradient_image, smolvlm_256m
from vlm_factory.runtime.tiling import expand_image_tokens, prompt_layout, split_image, tiling_spec

# Measured on transformers 5.23 with the PIL backend: every case is bit-identical (max |diff| = 0.0),
# because split_image resizes the same uint8 images with the same PIL filter and repeats the
# processor's float64-rescale-then-float32-normalise arithmetic. Any tolerance would hide a real
# rounding or filter bug, so the comparison is exact.
ATOL = 0.0

QUESTION = "What color is the circle?"


def _rgba(width: int, height: int) -> Image.Image:
    """Alpha running from transparent to opaque across the image: dropping alpha differs from compositing."""
    image = gradient_image(width, height, seed=3).convert("RGBA")
    image.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))))
    return image


def _palette_with_transparency(width: int, height: int) -> Image.Image:
    image = gradient_image(width, height, seed=4).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    image.info["transparency"] = 0  # palette entry 0 is see-through, as a GIF's can be
    return image


# (width, height) or an image factory; the sizes hit each rounding branch with a 128-px tile and a
# 512-px longest edge: odd short sides, short sides that round to a tile multiple exactly, enlargement.
IMAGES = {
    "square": lambda: gradient_image(300, 300, seed=0),
    "tall": lambda: gradient_image(120, 400, seed=1),
    "wide": lambda: gradient_image(500, 90, seed=2),
    "tiny": lambda: gradient_image(20, 13, seed=5),
    "huge": lambda: gradient_image(1500, 1100, seed=6),
    "odd": lambda: gradient_image(97, 203, seed=7),
    "strip": lambda: gradient_image(900, 7, seed=8),
    "rgba": lambda: _rgba(150, 100),
    "grayscale": lambda: gradient_image(130, 77, seed=9).convert("L"),
    "palette_transparency": lambda: _palette_with_transparency(77, 130),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return smolvlm_256m(tmp_path_factory.mktemp("smolvlm") / "checkpoint")


@pytest.fixture(scope="module")
def processor(checkpoint):
    """The PIL backend, pinned: it is AutoProcessor's default here (no torchvision >= 0.27), and the one
    runtimes can match exactly; torchvision's LANCZOS differs from PIL's by a few uint8 levels."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(checkpoint, backend="pil")


def _variant(image_processor, **changes):
    """A copy of the checkpoint's image processor with some settings changed (splitting off, ...)."""
    changed = copy.deepcopy(image_processor)
    for name, value in changes.items():
        setattr(changed, name, value)
    return changed


VARIANTS = {
    "split": {},
    "no_split": {"do_image_splitting": False},
    # The longest edge is one tile: splitting is on but never happens (rows = cols = 0).
    "one_tile": {"size": {"longest_edge": 128}},
    # No first resize: the raw image goes straight to the multiple-of-tile resize.
    "no_resize": {"do_resize": False},
}


def test_reference_is_the_pil_backend(checkpoint, processor):
    """The hub name loads the PIL class when asked for it, and the saved type stays the hub's."""
    assert type(processor.image_processor).__name__ == "Idefics3ImageProcessorPil"
    saved = json.loads((checkpoint / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "Idefics3ImageProcessor"


def test_spec_is_plain_json(processor):
    spec = tiling_spec(processor.image_processor)
    assert json.loads(json.dumps(spec)) == spec
    assert spec["tile_size"] == 128 and spec["resize_longest_edge"] == 512 and spec["resample"] == "lanczos"
    assert json.loads(json.dumps(prompt_layout(processor))) == prompt_layout(processor)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("case", sorted(IMAGES))
def test_split_image_equals_processor_pixels(processor, case, variant):
    image_processor = _variant(processor.image_processor, **VARIANTS[variant])
    image = IMAGES[case]()
    expected = image_processor(image, return_row_col_info=True, return_tensors="np")
    tiles, rows, cols = split_image(image, tiling_spec(image_processor))
    assert (rows, cols) == (expected["rows"][0][0], expected["cols"][0][0])
    assert tiles.dtype == np.float32 and tiles.shape == expected["pixel_values"][0].shape
    np.testing.assert_allclose(tiles, expected["pixel_values"][0], rtol=0, atol=ATOL)
    assert expected["pixel_attention_mask"].all()  # one image: nothing padded, the runtime passes ones


@pytest.mark.parametrize("case", ["square", "tall", "wide", "tiny", "strip"])
def test_expanded_prompt_equals_processor_text(processor, case):
    image = IMAGES[case]()
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True, tokenize=False)
    _, rows, cols = split_image(image, tiling_spec(processor.image_processor))
    layout = prompt_layout(processor)
    replacement = expand_image_tokens(rows, cols, layout["tokens_per_tile"], layout)
    encoded = processor(text=prompt, images=image, return_text_replacement_offsets=True)
    assert encoded["text_replacement_offsets"][0][0]["replacement"] == replacement  # character for character
    expanded = prompt.replace(layout["image_token"], replacement)
    assert encoded["input_ids"][0] == processor.tokenizer(expanded)["input_ids"]


def test_global_only_expansion_has_no_newlines(processor):
    layout = prompt_layout(processor)
    assert expand_image_tokens(0, 0, 2, layout) == (
        "<fake_token_around_image><global-img><image><image><fake_token_around_image>")
    assert expand_image_tokens(1, 2, 1, layout) == (
        "<fake_token_around_image><row_1_col_1><image><fake_token_around_image><row_1_col_2><image>\n"
        "\n<fake_token_around_image><global-img><image><fake_token_around_image>")


def test_checkpoint_loads_and_generates(checkpoint, processor):
    from transformers import Idefics3ForConditionalGeneration

    model = Idefics3ForConditionalGeneration.from_pretrained(checkpoint).eval()
    assert model.config.model_type == "idefics3" and model.config.scale_factor == 4
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True, tokenize=False)
    assert prompt == f"<|im_start|>User:<image>{QUESTION}<end_of_utterance>\nAssistant:"
    inputs = processor(text=prompt, images=IMAGES["wide"](), return_tensors="pt")
    tiles, rows, cols = split_image(IMAGES["wide"](), tiling_spec(processor.image_processor))
    assert inputs["pixel_values"].shape[1] == rows * cols + 1
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        # The runtime's own pixels give the same logits: nothing else in the input differs.
        ours = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                     pixel_values=torch.from_numpy(tiles)[None]).logits
        theirs = model(**inputs).logits
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 4
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
