"""Reference evaluation: metrics shape, baselines, and agreement with the model's own forward."""

import pytest
import torch

from vlm_factory.data.images import load_image
from vlm_factory.data.records import read_jsonl
from vlm_factory.eval.generate import answer_questions
from vlm_factory.eval.reference import blind_answers, evaluate_reference
from vlm_factory.families.llava import centre_crop_processor
from vlm_factory.model.prompt import user_prompt


def test_metrics_have_breakdowns_and_baselines(random_llava, synthetic_data):
    model, processor = random_llava
    records = read_jsonl(synthetic_data / "eval.jsonl")
    metrics, rows = evaluate_reference(model, processor, records, synthetic_data,
                                       read_jsonl(synthetic_data / "train.jsonl"), batch_size=16)
    assert metrics["n_questions"] == len(records) == len(rows)
    assert set(metrics["by_aspect"]) == {"square", "tall", "wide"}
    assert len(metrics["by_question_type"]) == 6
    assert 0 <= metrics["vqa_accuracy"] <= 100
    assert set(metrics["letterbox_gain_points"]) == {"square", "tall", "wide"}
    assert metrics["blind_baseline"]["vqa_accuracy"] > 0  # yes/no and counts have informative priors
    mean = 100 * sum(r["score"] for r in rows) / len(rows)
    assert metrics["vqa_accuracy"] == pytest.approx(mean, abs=0.01)


def test_blind_baseline_is_the_majority_training_answer():
    from vlm_factory.data.records import VQARecord

    def rec(q, a, t="count"):
        return VQARecord(0, 0, "x.png", q, [a] * 10, a, t, "number", "square")

    train = [rec("How many?", "2"), rec("How many?", "2"), rec("How many?", "3"), rec("Other?", "no", "yesno")]
    assert blind_answers(train, [rec("How many?", "9"), rec("Unseen?", "1"), rec("New?", "x", "yesno")]) == [
        "2", "2", "no"]


def test_greedy_answer_matches_a_manual_argmax(random_llava, synthetic_data):
    model, processor = random_llava
    record = read_jsonl(synthetic_data / "eval.jsonl")[0]
    image = load_image(synthetic_data / record.image)
    answer = answer_questions(model, processor, [image], [record.question])[0]
    inputs = processor(images=[image], text=[user_prompt(record.question)], return_tensors="pt")
    with torch.no_grad():
        ids = inputs.input_ids
        for _ in range(8):
            logits = model(input_ids=ids, pixel_values=inputs.pixel_values, attention_mask=torch.ones_like(ids)).logits
            token = logits[0, -1].argmax()
            if token == processor.tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
    expected = processor.tokenizer.decode(ids[0, inputs.input_ids.shape[1]:], skip_special_tokens=True).strip()
    assert answer == expected


def test_centre_crop_variant_crops_and_letterbox_pads(random_llava, synthetic_data):
    _, processor = random_llava
    tall = next(r for r in read_jsonl(synthetic_data / "eval.jsonl") if r.aspect == "tall")
    image = load_image(synthetic_data / tall.image)
    padded = processor.image_processor([image], return_tensors="pt").pixel_values[0]
    cropped = centre_crop_processor(processor.image_processor)([image], return_tensors="pt").pixel_values[0]
    assert padded.shape == cropped.shape == (3, 64, 64)
    # Letterbox: the left and right quarters are the mean colour, i.e. ~0 after normalisation.
    assert padded[:, :, :8].abs().max() < 0.05
    assert cropped[:, :, :8].abs().max() > 0.5
