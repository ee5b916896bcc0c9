"""Parity statistics: how an artifact's answers compare with the reference model's, question by question.

Format-agnostic: every runtime adapter produces per-question VQA scores on the same eval
questions as `reference_eval`, and this module turns the two score lists into the drift, its
paired confidence interval, the flip rate and the gate verdict that publishing reads.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

from vlm_factory.data.records import VQARecord

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


def gate(drift: float, max_drop: float) -> dict:
    """The verdict: an artifact passes when it loses at most `max_drop` points against the reference."""
    if max_drop < 0:
        raise ValueError(f"max_drop must be a non-negative number of points, got {max_drop}")
    return {"passed": drift >= -max_drop, "max_drop": max_drop}


def gate_table(results: dict[str, dict]) -> str:
    """One line per target, failures first: drift against its max drop, embedding cosine against its floor."""
    rows = sorted(results.items(), key=lambda kv: (kv[1]["passed"], kv[0]))
    width = max((len(name) for name in results), default=6)
    lines = [f"{'target':<{width}}  verdict  drift (95% CI)            max drop  emb. cosine (floor)"]
    for name, v in rows:
        low, high = v["drift_ci95"]
        threshold = v["threshold"]
        cos = v["image_embedding_cosine"]["mean"]
        lines.append(f"{name:<{width}}  {'pass' if v['passed'] else 'FAIL':<7}  {v['drift']:+7.2f} "
                     f"({low:+.2f}, {high:+.2f})  {threshold['max_drop']:8.2f}  "
                     f"{cos:.4f} ({threshold['min_embedding_cosine']:.4f})")
    return "\n".join(lines)
