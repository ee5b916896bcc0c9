"""Synthetic data: deterministic, balanced, and built so that a centre crop loses information."""

import hashlib
from collections import Counter

import numpy as np
import pytest

from vlm_factory.data.images import load_image
from vlm_factory.data.questions import QUESTION_TYPES
from vlm_factory.data.records import read_jsonl
from vlm_factory.data.scenes import GRIDS, sample_scene
from vlm_factory.data.synthetic import build_dataset, iter_split
from vlm_factory.errors import UserError


def _tree_digest(root):
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    splits = {"train": (12, 4), "eval": (9, 2)}
    build_dataset(tmp_path / "a", seed=3, splits=splits, cell_px=32)
    build_dataset(tmp_path / "b", seed=3, splits=splits, cell_px=32)
    build_dataset(tmp_path / "c", seed=4, splits=splits, cell_px=32)
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    assert _tree_digest(tmp_path / "a") != _tree_digest(tmp_path / "c")


def test_eval_split_is_balanced_over_types_and_aspects(synthetic_data):
    records = read_jsonl(synthetic_data / "eval.jsonl")
    cells = Counter((r.question_type, r.aspect) for r in records)
    assert len(records) == 72
    assert set(cells) == {(t, a) for t in QUESTION_TYPES for a in ("square", "tall", "wide")}
    assert set(cells.values()) == {4}


def test_records_are_vqav2_shaped(synthetic_data):
    records = read_jsonl(synthetic_data / "train.jsonl")
    assert len(records) == 360
    assert len({r.question_id for r in records}) == len(records)
    for r in records[:50]:
        assert len(r.answers) == 10
        assert r.answer_type in ("yes/no", "number", "other")
        image = load_image(synthetic_data / r.image)
        width, height = image.size
        expected = {"square": (128, 128), "tall": (64, 128), "wide": (128, 64)}[r.aspect]
        assert (width, height) == expected


def test_default_eval_size_has_at_least_1000_questions_over_all_aspects():
    # The committed default: 540 images x 2 questions; only count here, rendering is tested above.
    from vlm_factory.config import DataConfig

    cfg = DataConfig()
    assert cfg.eval_images * cfg.eval_questions_per_image >= 1000
    assert cfg.eval_images % (3 * len(QUESTION_TYPES)) == 0


def test_tall_and_wide_scenes_put_objects_where_a_centre_crop_cannot_see():
    rng = np.random.default_rng(0)
    outside = 0
    for _ in range(200):
        scene = sample_scene(rng, "tall", with_digit=True)
        cols, rows = GRIDS["tall"]
        # A centre crop of a 1:2 image keeps the middle half of the rows.
        outside += sum(1 for o in scene.objects if o.row < rows // 4 or o.row >= rows - rows // 4)
    assert outside > 200  # about half of all objects


def test_every_question_type_is_answerable_from_its_scene():
    for item in iter_split(seed=1, split="eval", n_images=18, questions_per_image=2, cell_px=32):
        for qa in item.qas:
            assert qa.answer
            if qa.question_type == "count":
                assert qa.answer.isdigit()


def test_corrupt_image_is_a_one_line_error_naming_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(UserError) as err:
        load_image(bad)
    assert "broken.png" in str(err.value)
    assert "\n" not in str(err.value)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"question_id": 1}\n')
    with pytest.raises(UserError, match=r"eval\.jsonl:1"):
        read_jsonl(path)
