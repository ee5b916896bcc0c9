"""The synthetic VQA dataset: deterministic from a seed, balanced where it is evaluated.

Every image is drawn from its own generator seeded by (seed, split, index), so any image can be
re-created alone and two runs with the same settings produce byte-identical files.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vlm_factory.data.questions import QA, QUESTION_TYPES, ask, confusable_answers, human_answers
from vlm_factory.data.records import VQARecord, write_jsonl
from vlm_factory.data.scenes import ASPECTS, Scene, render_scene, sample_scene
from vlm_factory.io import atomic_dir
from vlm_factory.logs import progress_bar

log = logging.getLogger(__name__)

SPLIT_IDS = {"train": 1, "eval": 2, "pretrain": 3, "calibration": 4}


@dataclass(frozen=True)
class SyntheticImage:
    """One rendered scene with its questions; `scene` carries the ground truth for dense labels."""

    image_id: int
    image: Image.Image
    scene: Scene
    qas: list[QA]


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


def make_image(seed: int, split: str, index: int, aspect: str, question_types: list[str],
               cell_px: int) -> SyntheticImage:
    """Sample a scene that supports every requested question type, render it and ask them."""
    rng = _rng(seed, split, index)
    while True:
        scene = sample_scene(rng, aspect, with_digit="text" in question_types or rng.random() < 0.3)
        qas = [ask(scene, qt, rng) for qt in question_types]
        if all(qa is not None for qa in qas):
            break
    image = render_scene(scene, rng, cell_px)
    return SyntheticImage(image_id=SPLIT_IDS[split] * 10_000_000 + index, image=image, scene=scene, qas=qas)


def iter_split(seed: int, split: str, n_images: int, questions_per_image: int,
               cell_px: int, start: int = 0) -> Iterator[SyntheticImage]:
    """Images in a balanced round robin: aspect by index, question types rotating per image.

    With n_images a multiple of 3 * len(QUESTION_TYPES) / gcd, every (question type, aspect)
    pair gets the same number of questions.
    """
    n_types = len(QUESTION_TYPES)
    for index in range(start, start + n_images):
        aspect = ASPECTS[index % len(ASPECTS)]
        first = (index // len(ASPECTS)) * questions_per_image
        types = [QUESTION_TYPES[(first + k) % n_types] for k in range(questions_per_image)]
        yield make_image(seed, split, index, aspect, types, cell_px)


def _question_id(image_id: int, k: int) -> int:
    return image_id * 10 + k


def write_split(out_dir: Path, split: str, seed: int, n_images: int, questions_per_image: int,
                cell_px: int) -> list[VQARecord]:
    """Render a split into out_dir/images/<split>/ and its questions into out_dir/<split>.jsonl."""
    image_dir = out_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    records: list[VQARecord] = []
    started = time.perf_counter()
    images = iter_split(seed, split, n_images, questions_per_image, cell_px)
    for item in progress_bar(images, total=n_images, desc=f"render {split}", unit="img"):
        rel = f"images/{split}/{item.image_id}.png"
        item.image.save(out_dir / rel, optimize=False)
        answer_rng = np.random.default_rng([seed, SPLIT_IDS[split], item.image_id, zlib.crc32(b"answers")])
        for k, qa in enumerate(item.qas):
            answers = human_answers(qa, answer_rng, confusable_answers(qa.question_type))
            records.append(VQARecord(
                question_id=_question_id(item.image_id, k), image_id=item.image_id, image=rel,
                question=qa.question, answers=answers, multiple_choice_answer=qa.answer,
                question_type=qa.question_type, answer_type=qa.answer_type, aspect=item.scene.aspect,
            ))
    write_jsonl(records, out_dir / f"{split}.jsonl")
    log.info("%s: %d images, %d questions in %.1fs", split, n_images, len(records), time.perf_counter() - started)
    return records


def build_dataset(out_dir: Path, seed: int, splits: dict[str, tuple[int, int]], cell_px: int) -> dict[str, int]:
    """Write every split atomically; `splits` maps split name to (images, questions per image)."""
    counts = {}
    with atomic_dir(out_dir) as tmp:
        for split, (n_images, per_image) in splits.items():
            counts[split] = len(write_split(tmp, split, seed, n_images, per_image, cell_px))
    return counts
