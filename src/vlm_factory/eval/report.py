"""Accuracy summaries in the shape every metrics file uses: overall, by question type, by aspect."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence


def _percent(values: Sequence[float]) -> float:
    return round(100.0 * sum(values) / len(values), 2) if values else 0.0


def accuracy_report(scores: Sequence[float], question_types: Sequence[str], aspects: Sequence[str]) -> dict:
    """VQA accuracy in percent with its breakdowns; `scores` are per-question soft scores in [0, 1]."""
    if not (len(scores) == len(question_types) == len(aspects)):
        raise ValueError("scores, question types and aspects must have one entry per question")
    by_type: dict[str, list[float]] = defaultdict(list)
    by_aspect: dict[str, list[float]] = defaultdict(list)
    for score, qtype, aspect in zip(scores, question_types, aspects):
        by_type[qtype].append(score)
        by_aspect[aspect].append(score)
    return {
        "vqa_accuracy": _percent(scores),
        "n_questions": len(scores),
        "by_question_type": {k: _percent(v) for k, v in sorted(by_type.items())},
        "by_aspect": {k: _percent(v) for k, v in sorted(by_aspect.items())},
    }
