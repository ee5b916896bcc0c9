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


def bundled_reference(root: Path, data_dir: Path, out_dir: Path, blind_accuracy: float = 30.0) -> dict:
    """The bundled tiny base as the reference of `data_dir`'s eval split, written as reference_eval writes it:
    its own answers and scores (predictions.jsonl) and metrics (reference.json; `blind_accuracy` stands in
    for the blind baseline). Returns the model directory, loaded model and processor, records and paths."""
    from vlm_factory.data.records import read_jsonl
    from vlm_factory.eval.reference import score
    from vlm_factory.model.checkpoint import load_model

    model_dir = root / "models" / "tiny-llava-siglip"
    _, model, processor = load_model(model_dir)
    records = read_jsonl(data_dir / "eval.jsonl")
    answers = reference_answers(model, processor, records, data_dir)
    scores, accuracy = score(records, answers)
    predictions = write_reference(out_dir / "predictions.jsonl", records, answers, scores)
    metrics = out_dir / "reference.json"
    metrics.write_text(json.dumps({"vqa_accuracy": accuracy["vqa_accuracy"],
                                   "blind_baseline": {"vqa_accuracy": blind_accuracy}}))
    return {"model_dir": model_dir, "model": model, "processor": processor, "records": records,
            "predictions": predictions, "metrics": metrics}
