"""Real VQA data (VQAv2 or TextVQA layout), from the Hugging Face hub or a local copy, as our records.

Sources are read with `datasets`: a hub dataset name, a directory written by `save_to_disk`, or a
directory of parquet / jsonl files. Every split becomes out_dir/<split>.jsonl plus one PNG per image
under out_dir/images/<split>/, the same layout the synthetic generator writes.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from PIL import Image

from vlm_factory.data.images import decode_image, load_image
from vlm_factory.data.records import VQARecord, aspect_class, write_jsonl
from vlm_factory.errors import UserError
from vlm_factory.io import atomic_dir
from vlm_factory.logs import progress_bar

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("question", "answers", "image")
DATA_FILE_FORMATS = {".parquet": "parquet", ".jsonl": "json"}


@dataclass(frozen=True)
class _Chunk:
    """Rows of one source split (a `datasets.Dataset`); relative image paths are relative to `base`."""

    rows: Any
    base: Path | None
    where: str


def load_vqa_dataset(out_dir: Path, split_map: dict[str, str], *, hub_dataset: str | None = None,
                     revision: str | None = None, local_path: str | None = None,
                     max_questions: dict[str, int] | None = None) -> dict[str, int]:
    """Convert VQAv2- or TextVQA-style data into out_dir/<split>.jsonl and out_dir/images/; return counts.

    `split_map` maps our split names to the source's (e.g. {"eval": "validation"}); `max_questions`
    keeps the first N questions of a split. Exactly one of `hub_dataset` and `local_path` is given.
    Every source split is opened and checked before anything is converted, and out_dir is replaced
    only when all splits succeeded.
    """
    if (hub_dataset is None) == (local_path is None):
        raise UserError("data: set exactly one of data.hub_dataset (data.source=hub) "
                        "or data.local_path (data.source=local)")
    wanted = list(dict.fromkeys(split_map.values()))
    if hub_dataset is not None:
        sources = _open_hub(hub_dataset, revision, wanted)
    else:
        sources = _open_local(Path(local_path), wanted)
    for chunk in (chunk for chunks in sources.values() for chunk in chunks):
        _check_columns(chunk)
    counts = {}
    with atomic_dir(out_dir) as tmp:
        for split, source_split in split_map.items():
            limit = (max_questions or {}).get(split)
            records = _SplitWriter(tmp, split).convert(sources[source_split], limit)
            write_jsonl(records, tmp / f"{split}.jsonl")
            counts[split] = len(records)
            log.info("%s: %d questions from split '%s'", split, len(records), source_split)
    return counts


def _open_hub(name: str, revision: str | None, splits: list[str]) -> dict[str, list[_Chunk]]:
    import datasets

    label = f"hub dataset {name}" + (f"@{revision}" if revision else "")
    sources = {}
    for split in splits:
        try:
            rows = datasets.load_dataset(name, revision=revision, split=split)
        except (datasets.exceptions.DatasetsError, ConnectionError, OSError, ValueError) as exc:
            if isinstance(exc, ValueError) and str(exc).startswith("Unknown split"):
                raise UserError(f"{label}: {exc} Map our splits to one of those") from None
            raise UserError(f"cannot load {label} ({_one_line(exc)}): no network? "
                            "use data.source=local with data.local_path") from None
        sources[split] = [_Chunk(_undecoded(rows), None, f"{label} split '{split}'")]
    return sources


def _open_local(root: Path, splits: list[str]) -> dict[str, list[_Chunk]]:
    if not root.is_dir():
        raise UserError(f"local_path {root}: not a directory; point data.local_path at a saved dataset "
                        "or a folder of parquet/jsonl files")
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        saved = _load_saved(root)
        _check_splits(f"local_path {root}", splits, saved)
        return {s: [_Chunk(_undecoded(saved[s]), root, f"local_path {root} split '{s}'")] for s in splits}
    files = _data_files(root)
    if not files:
        raise UserError(f"local_path {root}: no save_to_disk dataset, *.parquet or *.jsonl files found; "
                        "point data.local_path at one")
    _check_splits(f"local_path {root}", splits, files)
    return {s: [_Chunk(_undecoded(_load_file(f)), f.parent, str(f)) for f in files[s]] for s in splits}


def _load_saved(root: Path) -> dict[str, Any]:
    """The splits of a saved DatasetDict; a lone saved Dataset is the split it was made from, else 'train'."""
    import datasets

    try:
        saved = datasets.load_from_disk(str(root))
    except (datasets.exceptions.DatasetsError, OSError, ValueError) as exc:
        raise UserError(f"local_path {root}: cannot load saved dataset ({_one_line(exc)}); "
                        "save it again with save_to_disk") from None
    if isinstance(saved, datasets.DatasetDict):
        return dict(saved)
    return {str(saved.split or "train"): saved}


def _data_files(root: Path) -> dict[str, list[Path]]:
    files: dict[str, list[Path]] = {}
    for suffix in DATA_FILE_FORMATS:
        for path in sorted(root.rglob(f"*{suffix}")):
            if path.is_file() and not any(p.startswith(".") for p in path.relative_to(root).parts):
                files.setdefault(_split_of(path, root), []).append(path)
    return files


def _split_of(path: Path, root: Path) -> str:
    """`train.jsonl`, `validation-00000-of-00002.parquet`, `data/test_0.parquet` or `train/0.parquet`."""
    dirs = [d for d in path.relative_to(root).parts[:-1] if d != "data"]
    return dirs[0] if dirs else re.split(r"[-_.]", path.name, maxsplit=1)[0]


def _load_file(path: Path) -> Any:
    import datasets

    fmt = DATA_FILE_FORMATS[path.suffix]
    try:
        return datasets.load_dataset(fmt, data_files=[str(path)], split="train")
    except (datasets.exceptions.DatasetsError, OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read as {fmt} ({_one_line(exc)}); regenerate or remove it") from None


def _undecoded(rows: Any) -> Any:
    """Leave images encoded: `datasets` would decode them on row access, before we know which question failed."""
    import datasets

    feature = rows.features.get("image")
    if isinstance(feature, datasets.Image) and feature.decode:
        return rows.cast_column("image", datasets.Image(decode=False))
    return rows


def _check_splits(label: str, wanted: list[str], available: dict[str, Any]) -> None:
    for split in wanted:
        if split not in available:
            raise UserError(f"{label}: split '{split}' not found (available: {', '.join(sorted(available))}); "
                            "map our splits to one of those")


def _check_columns(chunk: _Chunk) -> None:
    for column in REQUIRED_COLUMNS:
        if column not in chunk.rows.column_names:
            raise UserError(f"{chunk.where}: column '{column}' is missing (has: {', '.join(chunk.rows.column_names)}); "
                            "rename the matching column in the source data")


@dataclass
class _SplitWriter:
    """Writes one split's images, each image_id once, and builds its records."""

    out_dir: Path
    split: str
    aspects: dict[int, str] = field(default_factory=dict)

    def convert(self, chunks: list[_Chunk], limit: int | None) -> list[VQARecord]:
        total = sum(len(chunk.rows) for chunk in chunks)
        total = total if limit is None else min(total, limit)
        (self.out_dir / "images" / self.split).mkdir(parents=True, exist_ok=True)
        rows = islice(((row, chunk) for chunk in chunks for row in chunk.rows), total)
        return [self.record(row, index, chunk)
                for index, (row, chunk) in enumerate(progress_bar(rows, total=total, desc=self.split, unit="q"))]

    def record(self, row: dict[str, Any], index: int, chunk: _Chunk) -> VQARecord:
        question_id = _stable_int(row["question_id"]) if row.get("question_id") is not None else index
        image_id = _stable_int(row["image_id"]) if row.get("image_id") is not None else question_id
        where = f"{chunk.where}, question_id {question_id}"
        image = f"images/{self.split}/{image_id}.png"
        if image_id not in self.aspects:
            self.aspects[image_id] = _save_image(row["image"], chunk.base, self.out_dir / image, where)
        answers = _answers(row["answers"], where)
        chosen = str(row.get("multiple_choice_answer") or Counter(answers).most_common(1)[0][0])
        return VQARecord(
            question_id=question_id, image_id=image_id, image=image, question=str(row["question"]),
            answers=answers, multiple_choice_answer=chosen,
            question_type=row.get("question_type") or "unknown",
            answer_type=row.get("answer_type") or _answer_type(chosen), aspect=self.aspects[image_id])


def _save_image(value: Any, base: Path | None, path: Path, where: str) -> str:
    """Write the image as RGB PNG and return its aspect class."""
    image = _open_image(value, base, where)
    image.save(path)
    return aspect_class(image.width, image.height)


def _open_image(value: Any, base: Path | None, where: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):  # an undecoded Image feature: bytes, or only a path
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes):
        return decode_image(value, where)
    if isinstance(value, str) and value:
        path = Path(value)
        try:
            return load_image(path if path.is_absolute() or base is None else base / path)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    raise UserError(f"{where}: column 'image' holds {type(value).__name__}, not an image or a path; "
                    "fix or drop that row in the source data")


def _answers(value: Any, where: str) -> list[str]:
    """Ten annotator answers: strings (TextVQA), dicts with 'answer' (VQAv2), or a dict of lists."""
    if isinstance(value, dict):  # a Sequence of dicts comes back from `datasets` as a dict of lists
        value = value.get("answer")
    try:
        answers = [str(a["answer"] if isinstance(a, dict) else a) for a in value or []]
    except KeyError:
        raise UserError(f"{where}: 'answers' entries have no 'answer' key; "
                        "give answers as strings or as dicts with 'answer'") from None
    if not answers:
        raise UserError(f"{where}: no answers; use a split with answers (test splits have none)")
    return answers


def _answer_type(answer: str) -> str:
    """VQAv2's answer types, derived from the answer itself when the source has none."""
    if answer.strip().lower() in ("yes", "no"):
        return "yes/no"
    return "number" if answer.strip().isdigit() else "other"


def _stable_int(value: Any) -> int:
    """Integer ids stay as they are; others (TextVQA's hex image ids) become a stable 63-bit hash."""
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
