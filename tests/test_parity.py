"""Parity statistics: drift, paired CI, flip rate and the gate verdict on known score lists."""

import math

import pytest

from vlm_factory.data.records import VQARecord
from vlm_factory.eval.parity import drift_by, gate, gate_table, paired_drift


def test_identical_answers_have_zero_drift_and_no_flips():
    scores = [1.0, 0.0, 0.9, 1.0]
    result = paired_drift(scores, scores)
    assert result == {"drift": 0.0, "drift_ci95": [0.0, 0.0], "flip_rate": 0.0, "n_questions": 4}


def test_drift_ci_and_flips_by_hand():
    reference = [1.0] * 8 + [0.0] * 2
    artifact = [1.0] * 7 + [0.0] * 2 + [1.0]  # one lost, one gained, one more lost
    result = paired_drift(reference, artifact)
    diffs = [0.0] * 7 + [-100.0, 0.0, 100.0]
    mean = sum(diffs) / 10
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 9)
    assert result["drift"] == pytest.approx(mean)
    assert result["drift_ci95"][0] == pytest.approx(mean - 1.959964 * sd / math.sqrt(10), abs=1e-3)
    assert result["flip_rate"] == pytest.approx(0.2)


def test_systematic_loss_has_an_interval_below_zero():
    reference = [1.0] * 1000
    artifact = [1.0] * 950 + [0.0] * 50
    result = paired_drift(reference, artifact)
    assert result["drift"] == pytest.approx(-5.0)
    assert result["drift_ci95"][1] < 0


def test_breakdown_and_gate():
    records = [VQARecord(i, i, "x.png", "q", ["a"] * 10, "a", t, "other", asp)
               for i, (t, asp) in enumerate([("colour", "tall"), ("colour", "wide"), ("count", "tall")])]
    by_type = drift_by(records, [1.0, 1.0, 1.0], [1.0, 0.0, 1.0], "question_type")
    assert by_type == {"colour": -50.0, "count": 0.0}
    assert drift_by(records, [1.0, 1.0, 1.0], [1.0, 0.0, 1.0], "aspect") == {"tall": 0.0, "wide": -100.0}
    assert gate(-1.9, 2.0) == {"passed": True, "max_drop": 2.0}
    assert gate(-2.1, 2.0)["passed"] is False
    with pytest.raises(ValueError):
        gate(0.0, -1.0)


def test_gate_table_lists_failures_first():
    verdicts = {
        "phone-gguf": {"passed": True, "drift": -0.5, "drift_ci95": [-1.0, 0.0],
                       "threshold": {"max_drop": 2.0, "min_embedding_cosine": 0.99},
                       "image_embedding_cosine": {"mean": 0.9995}},
        "edge-onnx": {"passed": False, "drift": -3.2, "drift_ci95": [-4.0, -2.4],
                      "threshold": {"max_drop": 1.0, "min_embedding_cosine": 0.99},
                      "image_embedding_cosine": {"mean": 0.93}},
    }
    lines = gate_table(verdicts).splitlines()
    assert lines[1].startswith("edge-onnx") and "FAIL" in lines[1] and "-3.20" in lines[1] and "0.9300" in lines[1]
    assert lines[2].startswith("phone-gguf") and "pass" in lines[2]


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError):
        paired_drift([1.0], [1.0, 0.0])


def test_thresholds_come_from_params_per_format_and_tier_setting(root):
    from vlm_factory.config import load_params, target_settings
    from vlm_factory.errors import UserError
    from vlm_factory.eval.artifact_parity import gate_thresholds

    params = load_params(root / "params.yaml")
    budget = target_settings(params, "gguf", "android_budget")
    assert gate_thresholds(params.eval, "gguf", "android_budget", budget) == (2.0, 0.99)
    jetson = target_settings(params, "gguf", "jetson_orin")
    assert gate_thresholds(params.eval, "gguf", "jetson_orin", jetson) == (1.0, 0.99)
    with pytest.raises(UserError, match=r"eval\.max_drop\.gguf.*'IQ2_XS'.*targets\.gguf\.x\.llm"):
        gate_thresholds(params.eval, "gguf", "x", {"llm": "IQ2_XS"})
    with pytest.raises(UserError, match=r"targets\.coreml\.android_budget.*iphone15pro"):
        target_settings(params, "coreml", "android_budget")
