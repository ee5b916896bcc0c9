"""The question record every loader produces and every stage consumes (VQAv2-compatible jsonl)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from vlm_factory.errors import UserError
from vlm_factory.io import write_jsonl_rows

ASPECT_CLASSES = ("square", "tall", "wide")


@dataclass(frozen=True)
class VQARecord:
    """One question about one image, with the ten human answers the official metric needs.

    `image` is relative to the directory holding the jsonl file, so a dataset directory can move.
    """

    question_id: int
    image_id: int
    image: str
    question: str
    answers: list[str]
    multiple_choice_answer: str
    question_type: str
    answer_type: str
    aspect: str


def aspect_class(width: int, height: int) -> str:
    """square / tall / wide, with anything within 4:3 of square counted as square."""
    ratio = width / height
    if ratio > 4 / 3:
        return "wide"
    if ratio < 3 / 4:
        return "tall"
    return "square"


def write_jsonl(records: Iterable[VQARecord], path: Path) -> None:
    write_jsonl_rows((asdict(r) for r in records), path)


def read_jsonl(path: Path) -> list[VQARecord]:
    """Read records, naming the file and line of anything malformed."""
    if not path.is_file():
        raise UserError(f"{path}: question file not found; run the 'download' stage first")
    names = {f.name for f in fields(VQARecord)}
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                records.append(VQARecord(**{k: raw[k] for k in names}))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise UserError(f"{path}:{line_no}: not a VQA record ({exc}); regenerate the file") from None
    return records
