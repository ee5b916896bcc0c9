"""Parity statistics (drift, paired CI, flip rate, agreement) and the gate's verdict on known values."""

import math

import numpy as np
import pytest

from vlm_factory.data.records import VQARecord
from vlm_factory.eval.gates import GateThresholds, describe, gate_table, verdict
from vlm_factory.eval.parity import answer_agreement, drift_by, first_token_agreement, paired_drift


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


def test_breakdown_by_question_type_and_aspect():
    records = [VQARecord(i, i, "x.png", "q", ["a"] * 10, "a", t, "other", asp)
               for i, (t, asp) in enumerate([("colour", "tall"), ("colour", "wide"), ("count", "tall")])]
    by_type = drift_by(records, [1.0, 1.0, 1.0], [1.0, 0.0, 1.0], "question_type")
    assert by_type == {"colour": -50.0, "count": 0.0}
    assert drift_by(records, [1.0, 1.0, 1.0], [1.0, 0.0, 1.0], "aspect") == {"tall": 0.0, "wide": -100.0}


def test_answer_agreement_compares_normalised_answers():
    assert answer_agreement(["red", "Two", "a circle", "yes"], ["red", "2", "circle", "no"]) == 0.75
    with pytest.raises(ValueError):
        answer_agreement(["a"], [])


def test_first_token_agreement_and_kl_by_hand():
    reference = np.log(np.array([0.7, 0.2, 0.1]))
    same, kl = first_token_agreement(reference, reference + 5.0)  # logits shifted: the same distribution
    assert same and kl == pytest.approx(0.0, abs=1e-12)
    artifact = np.log(np.array([0.2, 0.7, 0.1]))
    same, kl = first_token_agreement(reference, artifact)
    assert not same and kl == pytest.approx(0.7 * math.log(0.7 / 0.2) + 0.2 * math.log(0.2 / 0.7))
    # A padded runtime vocabulary: compared over the shared rows, renormalised.
    same, kl = first_token_agreement(reference, np.append(reference, 3.0))
    assert same and kl == pytest.approx(0.0, abs=1e-12)


THRESHOLDS = GateThresholds(max_drop=2.0, max_aspect_drop=4.0, max_flip_rate=0.03, min_answer_agreement=0.95,
                            min_first_token_agreement=0.95, max_first_token_kl=0.05, min_embedding_cosine=0.99,
                            min_aspect_embedding_cosine=0.98, min_preprocessing_cosine=0.99,
                            min_informative_margin=10.0)


def _result(**changes) -> dict:
    """A parity result that passes every check of THRESHOLDS; `changes` overrides (dotted keys)."""
    result = {"drift": -0.4, "drift_ci95": [-0.8, 0.0], "flip_rate": 0.004,
              "by_aspect": {"drift": {"square": 0.0, "tall": -0.8, "wide": -0.3}},
              "agreement": {"answers": 0.995, "first_token_top1": 0.996, "first_token_kl": 0.001},
              "image_embedding_cosine": {"mean": 0.999, "by_aspect": {"square": 1.0, "tall": 0.999, "wide": 0.998}},
              "preprocessing": {"square": {"cosine": 1.0}, "tall": {"cosine": 0.999}, "wide": {"cosine": 0.999}}}
    for key, value in changes.items():
        *path, last = key.split("__")
        node = result
        for part in path:
            node = node[part]
        node[last] = value
    return result


@pytest.mark.parametrize(("changes", "failing"), [
    ({"drift": -2.5}, ["drift -2.5 below -2"]),
    ({"by_aspect__drift__wide": -4.5}, ["worst_aspect_drift (wide) -4.5 below -4"]),
    ({"flip_rate": 0.082}, ["flip_rate 0.082 above 0.03"]),
    ({"agreement__answers": 0.9}, ["answer_agreement 0.9 below 0.95"]),
    ({"agreement__first_token_top1": 0.5, "agreement__first_token_kl": 0.3},
     ["first_token_agreement 0.5 below 0.95", "first_token_kl 0.3 above 0.05"]),
    ({"image_embedding_cosine__mean": 0.95}, ["embedding_cosine 0.95 below 0.99"]),
    ({"image_embedding_cosine__by_aspect__tall": 0.9},
     ["worst_aspect_embedding_cosine (tall) 0.9 below 0.98"]),
    ({"preprocessing__wide": {"cosine": 0.7}}, ["preprocessing_cosine (wide) 0.7 below 0.99"]),
])
def test_each_failing_check_fails_the_gate_and_is_named(changes, failing):
    assert verdict(_result(), THRESHOLDS, 87.0, 30.0)["passed"]
    fields = verdict(_result(**changes), THRESHOLDS, 87.0, 30.0)
    assert not fields["passed"]
    assert [describe(c) for c in fields["checks"] if c["status"] == "fail"] == failing
    assert fields["failure_reason"] == "; ".join(failing)


def test_accuracy_near_the_blind_baseline_is_uninformative_and_agreement_decides():
    # A random model: 0 % everywhere, drift 0, no flips; accuracy cannot tell a broken decoder.
    lost = _result(drift=-30.0, flip_rate=0.5)
    fields = verdict(lost, THRESHOLDS, 0.0, 0.0)
    assert fields["passed"] and not fields["accuracy_informative"]
    assert {c["check"] for c in fields["checks"] if c["status"] == "uninformative"} == \
        {"drift", "worst_aspect_drift", "flip_rate"}
    assert "uninformative" in fields["note"]
    broken = verdict(_result(agreement__first_token_kl=0.4), THRESHOLDS, 0.0, 0.0)
    assert not broken["passed"] and broken["failure_reason"] == "first_token_kl 0.4 above 0.05"
    assert verdict(lost, THRESHOLDS, 39.9, 30.0)["accuracy_informative"] is False
    assert verdict(lost, THRESHOLDS, 40.0, 30.0)["accuracy_informative"] is True


def test_gate_table_lists_failures_first_with_their_reasons():
    passing = {**_result(), "passed": True}
    failing = {**_result(drift=-3.2, drift_ci95=[-4.0, -2.4]), "passed": False,
               "failure_reason": "drift -3.2 below -1"}
    lines = gate_table({"phone-gguf": passing, "edge-onnx": failing}).splitlines()
    assert lines[1].startswith("edge-onnx") and "FAIL" in lines[1] and "-3.20" in lines[1]
    assert lines[1].endswith("drift -3.2 below -1")
    assert lines[2].startswith("phone-gguf") and "pass" in lines[2]


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError):
        paired_drift([1.0], [1.0, 0.0])


def test_thresholds_come_from_params_per_format_and_tier_setting(root):
    from vlm_factory.config import load_params, target_settings
    from vlm_factory.errors import UserError
    from vlm_factory.eval.gates import gate_thresholds

    params = load_params(root / "params.yaml")
    budget = gate_thresholds(params.eval, "gguf", "android_budget", target_settings(params, "gguf", "android_budget"))
    assert (budget.max_drop, budget.max_flip_rate, budget.min_embedding_cosine) == (2.0, 0.03, 0.99)
    jetson = gate_thresholds(params.eval, "gguf", "jetson_orin", target_settings(params, "gguf", "jetson_orin"))
    assert (jetson.max_drop, jetson.max_first_token_kl) == (1.0, 0.02)
    with pytest.raises(UserError, match=r"eval\.max_drop\.gguf.*'IQ2_XS'.*targets\.gguf\.x\.llm"):
        gate_thresholds(params.eval, "gguf", "x", {"llm": "IQ2_XS"})
    with pytest.raises(UserError, match=r"targets\.coreml\.android_budget.*iphone15pro"):
        target_settings(params, "coreml", "android_budget")
