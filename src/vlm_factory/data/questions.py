"""Question templates over a Scene, and the ten simulated human answers VQAv2 records carry."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from vlm_factory.data.scenes import COLOURS, SHAPES, Scene, SceneObject

QUESTION_TYPES = ("colour", "shape", "count", "position", "text", "yesno")
ANSWER_TYPES = {"colour": "other", "shape": "other", "count": "number", "position": "other",
                "text": "other", "yesno": "yes/no"}

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class QA:
    """A question, its answer, and the objects the answer depends on (which cells to look at)."""

    question: str
    answer: str
    question_type: str
    subjects: tuple[SceneObject, ...] = ()

    @property
    def answer_type(self) -> str:
        return ANSWER_TYPES[self.question_type]


def _pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))]


def ask(scene: Scene, question_type: str, rng: np.random.Generator) -> QA | None:
    """A question of `question_type` about `scene`, or None when the scene cannot support one."""
    shapes = scene.shapes
    shape_counts = Counter(o.shape for o in shapes)
    colour_counts = Counter(o.colour for o in shapes)
    pair_counts = Counter((o.colour, o.shape) for o in shapes)

    if question_type == "colour":
        unique = [o for o in shapes if shape_counts[o.shape] == 1]
        if not unique:
            return None
        obj = _pick(rng, unique)
        return QA(f"What color is the {obj.shape}?", obj.colour, question_type, (obj,))

    if question_type == "shape":
        unique = [o for o in shapes if colour_counts[o.colour] == 1]
        if not unique:
            return None
        obj = _pick(rng, unique)
        return QA(f"What shape is the {obj.colour} object?", obj.shape, question_type, (obj,))

    if question_type == "count":
        variant = int(rng.integers(3))
        if variant == 0:
            return QA("How many shapes are there?", str(len(shapes)), question_type, tuple(shapes))
        if variant == 1:
            shape = _pick(rng, list(SHAPES))
            return QA(f"How many {shape}s are there?", str(shape_counts[shape]), question_type,
                      tuple(o for o in shapes if o.shape == shape))
        colour = _pick(rng, list(COLOURS))
        return QA(f"How many {colour} shapes are there?", str(colour_counts[colour]), question_type,
                  tuple(o for o in shapes if o.colour == colour))

    if question_type == "position":
        unique = [o for o in shapes if pair_counts[(o.colour, o.shape)] == 1]
        if not unique:
            return None
        obj = _pick(rng, unique)
        return QA(f"Where is the {obj.colour} {obj.shape}?", scene.position_of(obj), question_type, (obj,))

    if question_type == "text":
        digit = scene.digit
        if digit is None:
            return None
        return QA("What number is written in the image?", digit.digit, question_type, (digit,))

    if question_type == "yesno":
        if rng.random() < 0.5 and shapes:
            obj = _pick(rng, shapes)
            matches = tuple(o for o in shapes if (o.colour, o.shape) == (obj.colour, obj.shape))
            return QA(f"Is there a {obj.colour} {obj.shape}?", "yes", question_type, matches)
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in pair_counts]
        colour, shape = _pick(rng, absent)
        return QA(f"Is there a {colour} {shape}?", "no", question_type)

    raise ValueError(f"unknown question type {question_type!r}; expected one of {QUESTION_TYPES}")


def _variant(answer: str, rng: np.random.Generator) -> str:
    """How a careless annotator might write the same answer (the official normaliser undoes these)."""
    if answer.isdigit() and int(answer) < len(NUMBER_WORDS) and rng.random() < 0.5:
        return NUMBER_WORDS[int(answer)]
    choice = int(rng.integers(4))
    if choice == 0:
        return answer.capitalize()
    if choice == 1:
        return answer + "."
    if choice == 2 and not answer.isdigit() and answer not in ("yes", "no"):
        return "the " + answer
    return answer + " "


def human_answers(qa: QA, rng: np.random.Generator, confusions: list[str], n: int = 10) -> list[str]:
    """Ten annotator answers: mostly the true answer, some spelled differently, rarely a wrong one."""
    answers = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.04 and confusions:
            answers.append(_pick(rng, [c for c in confusions if c != qa.answer] or confusions))
        elif roll < 0.25:
            answers.append(_variant(qa.answer, rng))
        else:
            answers.append(qa.answer)
    return answers


def confusable_answers(question_type: str) -> list[str]:
    """Plausible wrong answers of the same kind, used for annotator noise."""
    return {
        "colour": list(COLOURS),
        "shape": list(SHAPES),
        "count": [str(i) for i in range(6)],
        "position": ["top left", "top right", "bottom left", "bottom right"],
        "text": list("123456789"),
        "yesno": ["yes", "no"],
    }[question_type]
