"""Parity statistics: how an artifact's answers compare with the reference model's, question by question.

Format-agnostic: every runtime adapter produces per-question answers on the same eval questions as
`reference_eval`, and this module turns the two into the drift, its paired confidence interval, the flip
rate and the agreement measures that the gate (eval/gates.py) judges.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from vlm_factory.data.records import VQARecord
from vlm_factory.eval.vqa_metric import normalize_answer

# A question counts as answered correctly when its soft score is at least this (3 of 10 annotators
# agreeing gives 0.9; a wrong answer usually scores 0 or 0.3).
CORRECT_AT = 0.5
Z_95 = 1.959964


def paired_drift(reference: Sequence[float], artifact: Sequence[float]) -> dict:
    """Drift in points (artifact minus reference), its paired 95% CI (normal approximation), flip rate."""
    if len(reference) != len(artifact) or not reference:
        raise ValueError(f"need the same, non-zero number of scores ({len(reference)} vs {len(artifact)})")
    n = len(reference)
    diffs = [100.0 * (a - r) for r, a in zip(reference, artifact)]
    mean = sum(diffs) / n
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    half_width = Z_95 * math.sqrt(variance / n)
    flips = sum((r >= CORRECT_AT) != (a >= CORRECT_AT) for r, a in zip(reference, artifact))
    return {
        "drift": round(mean, 3),
        "drift_ci95": [round(mean - half_width, 3), round(mean + half_width, 3)],
        "flip_rate": round(flips / n, 4),
        "n_questions": n,
    }


def drift_by(records: Sequence[VQARecord], reference: Sequence[float], artifact: Sequence[float],
             key: str) -> dict[str, float]:
    """Drift in points per value of a record field (question_type, aspect)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for record, r, a in zip(records, reference, artifact):
        groups[getattr(record, key)].append(100.0 * (a - r))
    return {k: round(sum(v) / len(v), 3) for k, v in sorted(groups.items())}


def answer_agreement(reference: Sequence[str], artifact: Sequence[str]) -> float:
    """Share of questions whose normalised answer equals the reference model's own: agreement with the model,
    meaningful whatever its accuracy (a wrong weight changes a random model's answers too)."""
    if len(reference) != len(artifact) or not reference:
        raise ValueError(f"need the same, non-zero number of answers ({len(reference)} vs {len(artifact)})")
    return sum(normalize_answer(r) == normalize_answer(a) for r, a in zip(reference, artifact)) / len(reference)


def first_token_agreement(reference_log_probs: np.ndarray, artifact_logits: np.ndarray) -> tuple[bool, float]:
    """(same top-1 token, KL(reference || artifact) in nats) of one question's first-token distributions.

    A runtime may carry more output rows than the reference (a padded vocabulary): both are compared
    over the rows they share, each renormalised there.
    """
    n = min(len(reference_log_probs), len(artifact_logits))
    ref = log_softmax(reference_log_probs[:n])
    art = log_softmax(artifact_logits[:n])
    kl = float(np.sum(np.exp(ref) * (ref - art)))
    return bool(np.argmax(ref) == np.argmax(art)), max(kl, 0.0)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities of one vector of logits, in float64 (stable: the maximum is subtracted first)."""
    shifted = np.asarray(logits, dtype=np.float64) - np.max(logits)
    return shifted - np.log(np.exp(shifted).sum())
