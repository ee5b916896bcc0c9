"""Pretraining scaffolding: dense labels land on the right patches of the letterboxed image."""

import numpy as np

from vlm_factory.data.questions import ask
from vlm_factory.data.scenes import Scene, SceneObject
from vlm_factory.train.pretrain import (
    COLOUR_CLASSES,
    SHAPE_CLASSES,
    answer_targets,
    patch_cells,
    patch_labels,
    relevance,
)
from vlm_factory.model.prompt import tiny_prompt_spec
from vlm_factory.train.batches import IGNORE_INDEX, encode_qa


def _tall_scene():
    return Scene("tall", [SceneObject("circle", "red", row=0, col=0), SceneObject("square", "blue", row=3, col=1),
                          SceneObject("digit", None, row=2, col=0, digit="7")])


def test_tall_scene_cells_and_padding():
    cells = patch_cells(_tall_scene(), cell_px=32, image_size=64, patch_size=16)
    grid = np.array([c is None for c in cells]).reshape(4, 4)
    # 2 columns of content letterboxed into 4: the outer patch columns are padding.
    assert grid[:, 0].all() and grid[:, 3].all() and not grid[:, 1:3].any()
    assert cells[1] == (0, 0) and cells[2] == (0, 1) and cells[14] == (3, 1)


def test_patch_labels_name_shape_colour_digit_and_half():
    labels = patch_labels(_tall_scene(), cell_px=32, image_size=64, patch_size=16)
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
    cells = patch_cells(scene, 32, 64, 16)
    rel = relevance(cells, qa)
    subject = qa.subjects[0]
    assert [i for i, r in enumerate(rel) if r] == [cells.index((subject.row, subject.col))]
    encoded = encode_qa(processor.tokenizer, tiny_prompt_spec(16), qa.question, qa.answer)
    targets = answer_targets(rel, qa, encoded)
    first_answer_token = encoded.labels[len(encoded.labels) - len([t for t in encoded.labels if t != IGNORE_INDEX])]
    assert [t for t in targets if t != IGNORE_INDEX] == [first_answer_token]
    count = ask(scene, "count", rng)
    assert set(answer_targets(relevance(cells, count), count, encoded)) == {IGNORE_INDEX}


def test_make_base_trains_saves_and_reports(tmp_path, small_arch):
    """The frozen stage's code path end to end, at toy size: a loadable HF base with recipe and metrics."""
    import json

    from vlm_factory.config import PretrainConfig
    from vlm_factory.model.checkpoint import load_checkpoint
    from vlm_factory.train.base import make_base

    recipe = PretrainConfig(n_images=48, steps=6, batch_images=4, warmup_steps=2, eval_images=18, eval_every=3)
    final = make_base(tmp_path / "base", small_arch, recipe)
    metrics = json.loads((tmp_path / "base" / "pretrain_metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [3, 6]
    assert final["n_questions"] == 36 and set(final["by_question_type"]) >= {"colour", "text"}
    assert all(h["lm_loss"] > 0 and h["relevance_loss"] > 0 for h in metrics["history"])
    recipe_json = json.loads((tmp_path / "base" / "recipe.json").read_text())
    assert recipe_json["recipe"]["steps"] == 6 and recipe_json["architecture"]["text_hidden"] == 64
    model, _ = load_checkpoint(tmp_path / "base")  # checksums verified on load
    assert not any("aux" in name or "relevance" in name for name in model.state_dict())
