"""Reference evaluation: the PyTorch model's VQA accuracy, and the two baselines that make it mean something.

- blind baseline: the most common training answer to the same question text (or question type),
  i.e. what a model that never looks at the image can score on this data;
- the family's alternative preprocessing (`family.alternative_preprocessing`): LLaVA's centre crop
  instead of letterbox shows what a wrong resize costs on tall and wide images, SmolVLM's global view
  without tiles what skipping the split costs (the failures parity checks must catch).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from pathlib import Path

from vlm_factory.data.images import load_image
from vlm_factory.data.records import VQARecord
from vlm_factory.eval.generate import answer_questions, generate_answers
from vlm_factory.eval.report import accuracy_report
from vlm_factory.eval.vqa_metric import normalize_answer, vqa_score
from vlm_factory.families import family_for
from vlm_factory.model.prompt import MAX_ANSWER_TOKENS

log = logging.getLogger(__name__)


def blind_answers(train: list[VQARecord], questions: list[VQARecord]) -> list[str]:
    """Answer from the question alone: majority training answer per question, else per question type."""
    by_question: dict[str, Counter] = defaultdict(Counter)
    by_type: dict[str, Counter] = defaultdict(Counter)
    for r in train:
        answer = normalize_answer(r.multiple_choice_answer)
        by_question[r.question][answer] += 1
        by_type[r.question_type][answer] += 1
    overall = sum(by_type.values(), Counter())
    answers = []
    for r in questions:
        counts = by_question.get(r.question) or by_type.get(r.question_type) or overall
        answers.append(counts.most_common(1)[0][0] if counts else "")
    return answers


def score(records: list[VQARecord], predictions: list[str], mode: str = "official") -> tuple[list[float], dict]:
    """Per-question VQA scores (eval/vqa_metric.py, `mode` official or normalized) and their report."""
    scores = [vqa_score(p, r.answers, mode) for p, r in zip(predictions, records)]
    return scores, accuracy_report(scores, [r.question_type for r in records], [r.aspect for r in records])


def evaluate_reference(model, processor, records: list[VQARecord],
                       data_dir: Path, train_records: list[VQARecord], batch_size: int = 64,
                       vqa_metric: str = "official", max_new_tokens: int = MAX_ANSWER_TOKENS) -> tuple[dict, list[dict]]:
    """Metrics (reference, blind, centre crop) and per-question predictions for later parity checks."""
    started = time.perf_counter()
    image_cache: dict[str, object] = {}
    for r in records:
        if r.image not in image_cache:
            image_cache[r.image] = load_image(data_dir / r.image)
    images = [image_cache[r.image] for r in records]
    questions = [r.question for r in records]

    answers = generate_answers(model, processor, images, questions, batch_size, progress="reference answers",
                               max_new_tokens=max_new_tokens)
    predictions = [a.text for a in answers]
    scores, metrics = score(records, predictions, vqa_metric)
    metrics["vqa_metric"] = vqa_metric
    metrics["truncated_answers"] = sum(a.truncated for a in answers)
    metrics["max_answer_tokens"] = max_new_tokens
    _, blind = score(records, blind_answers(train_records, records), vqa_metric)
    metrics["blind_baseline"] = {k: blind[k] for k in ("vqa_accuracy", "by_question_type")}
    alternative = family_for(model.config).alternative_preprocessing(processor.image_processor)
    if alternative is not None:  # what the model's own preprocessing buys over the plausible mistake
        name, gain_key, image_processor = alternative
        other_predictions = answer_questions(model, processor, images, questions, batch_size,
                                             image_processor=image_processor, progress=f"{name} answers")
        _, other = score(records, other_predictions, vqa_metric)
        metrics[name] = {k: other[k] for k in ("vqa_accuracy", "by_aspect")}
        metrics[gain_key] = {aspect: round(metrics["by_aspect"][aspect] - other["by_aspect"][aspect], 2)
                             for aspect in metrics["by_aspect"]}
    rows = [{"question_id": r.question_id, "prediction": p, "score": s} for r, p, s in zip(records, predictions, scores)]
    log.info("reference: %.2f%% on %d questions (blind %.2f%%%s) in %.1fs", metrics["vqa_accuracy"],
             metrics["n_questions"], blind["vqa_accuracy"],
             f", {alternative[0].replace('_', ' ')} {metrics[alternative[0]]['vqa_accuracy']:.2f}%" if alternative else "",
             time.perf_counter() - started)
    return metrics, rows
