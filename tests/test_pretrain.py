"""Pretraining scaffolding: dense labels land on the right patches of each view (letterboxed image, tiles)."""

import numpy as np
import pytest

from vlm_factory.data.questions import ask
from vlm_factory.data.scenes import Scene, SceneObject
from vlm_factory.families import family_for
from vlm_factory.train.pretrain import (
    COLOUR_CLASSES,
    SHAPE_CLASSES,
    answer_targets,
    grid_cells,
    patch_labels,
    token_relevance,
)
from vlm_factory.model.prompt import tiny_prompt_spec
from vlm_factory.train.batches import IGNORE_INDEX, encode_qa


def _tall_scene():
    return Scene("tall", [SceneObject("circle", "red", row=0, col=0), SceneObject("square", "blue", row=3, col=1),
                          SceneObject("digit", None, row=2, col=0, digit="7")])


# A tall scene (2 x 4 cells, 64 x 128 px) letterboxed to a square: the view spans x from -0.5 to 1.5.
LETTERBOX_TALL = (-0.5, 0.0, 1.5, 1.0)


def test_tall_scene_cells_and_padding():
    cells = grid_cells(_tall_scene(), LETTERBOX_TALL, per_side=4)
    grid = np.array([c is None for c in cells]).reshape(4, 4)
    # 2 columns of content letterboxed into 4: the outer patch columns are padding.
    assert grid[:, 0].all() and grid[:, 3].all() and not grid[:, 1:3].any()
    assert cells[1] == (0, 0) and cells[2] == (0, 1) and cells[14] == (3, 1)


def test_patch_labels_name_shape_colour_digit_and_half():
    labels = patch_labels(_tall_scene(), grid_cells(_tall_scene(), LETTERBOX_TALL, per_side=4))
    assert labels[0, 1] == SHAPE_CLASSES.index("circle") and labels[1, 1] == COLOUR_CLASSES.index("red")
    assert labels[0, 14] == SHAPE_CLASSES.index("square") and labels[1, 14] == COLOUR_CLASSES.index("blue")
    assert labels[0, 9] == SHAPE_CLASSES.index("digit") and labels[2, 9] == 7
    assert labels[0, 0] == SHAPE_CLASSES.index("padding") and labels[3, 0] == IGNORE_INDEX
    assert (labels[3, 1], labels[4, 1]) == (0, 0)  # top, left
    assert (labels[3, 14], labels[4, 14]) == (1, 1)  # bottom, right


def test_relevance_and_answer_targets_mark_the_subject(random_llava):
    _, processor = random_llava
    scene = _tall_scene()
    rng = np.random.default_rng(0)
    qa = ask(scene, "colour", rng)
    cells = grid_cells(scene, LETTERBOX_TALL, 4)
    rel = token_relevance(cells, 4, 1, qa)
    subject = qa.subjects[0]
    assert [i for i, r in enumerate(rel) if r] == [cells.index((subject.row, subject.col))]
    encoded = encode_qa(processor.tokenizer, tiny_prompt_spec(16), qa.question, qa.answer)
    targets = answer_targets(rel, qa, encoded)
    first_answer_token = encoded.labels[len(encoded.labels) - len([t for t in encoded.labels if t != IGNORE_INDEX])]
    assert [t for t in targets if t != IGNORE_INDEX] == [first_answer_token]
    count = ask(scene, "count", rng)
    assert set(answer_targets(token_relevance(cells, 4, 1, count), count, encoded)) == {IGNORE_INDEX}


@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_make_base_trains_saves_and_reports(tmp_path, small_arch, family):
    """The frozen stages' code path end to end, at toy size: a loadable HF base with recipe and metrics (for
    idefics3, every tile and the global view carry their dense labels)."""
    import json
    from dataclasses import replace

    from vlm_factory.config import PretrainConfig
    from vlm_factory.model.checkpoint import load_checkpoint
    from vlm_factory.train.base import make_base

    recipe = PretrainConfig(n_images=48, steps=6, batch_images=4, warmup_steps=2, eval_images=18, eval_every=3)
    final = make_base(tmp_path / "base", replace(small_arch, family=family), recipe)
    metrics = json.loads((tmp_path / "base" / "pretrain_metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [3, 6]
    assert final["n_questions"] == 36 and set(final["by_question_type"]) >= {"colour", "text"}
    assert all(h["lm_loss"] > 0 and h["relevance_loss"] > 0 for h in metrics["history"])
    recipe_json = json.loads((tmp_path / "base" / "recipe.json").read_text())
    assert recipe_json["recipe"]["steps"] == 6 and recipe_json["architecture"]["text_hidden"] == 64
    model, _ = load_checkpoint(tmp_path / "base")  # checksums verified on load
    assert not any("aux" in name or "relevance" in name for name in model.state_dict())
    assert family_for(model.config).name == family and recipe_json["architecture"]["family"] == family


def test_letterbox_rectangle_is_the_one_the_cells_above_assume(random_llava):
    from vlm_factory.families import family_for

    model, processor = random_llava
    family = family_for(model.config)
    assert family.view_rectangles(processor.image_processor, 64, 128) == [LETTERBOX_TALL]


def test_tiles_map_to_their_quarter_of_the_scene_and_tokens_pool_their_patches():
    """Idefics3's views of a square 4 x 4-cell image: 2 x 2 tiles of 2 x 2 cells each, then the global view; a
    x2 pixel shuffle token is relevant when any of its 2 x 2 patches shows the subject."""
    from transformers import Idefics3Config

    from vlm_factory.families import family_for

    scene = Scene("square", [SceneObject("circle", "red", row=0, col=3)])
    config = Idefics3Config(vision_config={"image_size": 64, "patch_size": 16}, text_config={"vocab_size": 128260})
    family = family_for(config)
    rects = family.view_rectangles(None, 128, 128, rows=2, cols=2)
    assert rects == [(0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5), (0.0, 0.5, 0.5, 1.0), (0.5, 0.5, 1.0, 1.0),
                     (0.0, 0.0, 1.0, 1.0)]
    top_right = grid_cells(scene, rects[1], per_side=4)
    assert top_right[:4] == [(0, 2), (0, 2), (0, 3), (0, 3)] and top_right[-1] == (1, 3)
    qa = ask(scene, "colour", np.random.default_rng(0))
    assert token_relevance(top_right, 4, 2, qa) == [0.0, 1.0, 0.0, 0.0]
    assert token_relevance(grid_cells(scene, rects[4], 4), 4, 2, qa) == [0.0, 1.0, 0.0, 0.0]
    assert token_relevance(grid_cells(scene, rects[0], 4), 4, 2, qa) == [0.0] * 4
