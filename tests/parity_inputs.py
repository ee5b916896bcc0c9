"""What the parity gate reads besides the runtime, written for a test: the reference's predictions file, its
metrics and the configured thresholds."""

import json
from pathlib import Path

from vlm_factory.config import load_params
from vlm_factory.eval.gates import gate_thresholds

# A random-weight model scores nothing, like the questions' blind answers: accuracy says nothing, agreement decides.
UNINFORMATIVE_REFERENCE = {"vqa_accuracy": 0.0, "blind_baseline": {"vqa_accuracy": 0.0}}


def write_reference(path: Path, records, answers: list[str], scores: list[float] | None = None) -> Path:
    """reference_eval's predictions.jsonl for `records`: the reference model's answers and their scores."""
    scores = scores if scores is not None else [0.0] * len(records)
    path.write_text("".join(json.dumps({"question_id": r.question_id, "prediction": a, "score": s}) + "\n"
                            for r, a, s in zip(records, answers, scores, strict=True)))
    return path


def configured_thresholds(root: Path, fmt: str, settings: dict):
    """The thresholds params.yaml gives a target of `fmt` with `settings` (e.g. {"llm": "Q8_0"})."""
    return gate_thresholds(load_params(root / "params.yaml").eval, fmt, "t", settings)


def reference_answers(model, processor, records, data_dir: Path) -> list[str]:
    """The PyTorch model's own greedy answers to `records` (what reference_eval writes)."""
    from vlm_factory.data.images import load_image
    from vlm_factory.eval.generate import answer_questions

    return answer_questions(model, processor, [load_image(data_dir / r.image) for r in records],
                            [r.question for r in records])
