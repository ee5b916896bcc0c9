"""The VQA metric on the cases the official VQAv2 evaluation script is known for.

The expected values follow GT-Vision-Lab/VQA vqaEval.py (master) step by step: tabs/newlines to spaces and
strip on both sides; only when the ten human answers are not all identical, punctuation then lower case,
number words, articles and contractions on both sides; then leave-one-out min(1, matches / 3).
"""

import pytest

from vlm_factory.eval.vqa_metric import normalize_answer, vqa_score


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Two", "2"),
        ("two", "2"),
        ("none", "0"),
        ("the circle", "circle"),
        ("A red square", "red square"),
        ("an apple", "apple"),
        ("yes.", "yes"),
        ("Yes!", "yes"),
        ("dont", "don't"),
        ("isnt it", "isn't it"),
        ("3.5", "3.5"),  # a decimal point is not punctuation
        ("1,000", "1000"),  # nor a thousands separator between digits
        ("red-green", "red green"),  # a hyphen inside a word becomes a space
        ("top  left\n", "top left"),
        ("2.", "2"),  # a period not followed by a digit goes, even after one (the script's misspelt lookbehind)
        ("yes, sir", "yes sir"),  # "p " in the text: that punctuation is removed, not spaced
        ("t-shirt, 1,000", "tshirt 1000"),  # a digit,digit anywhere: every punctuation mark is removed
        ("yes" + "." * 40, "yes" + "." * 8),  # re.UNICODE (32) passed as sub's count: 32 periods at most
    ],
)
def test_normalisation_matches_official_rules(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_identical_human_answers_are_compared_verbatim_in_official_mode():
    # All ten annotators wrote the same string: the script normalises neither side.
    assert vqa_score("Two", ["2"] * 10) == 0.0
    assert vqa_score("Red", ["red"] * 10) == 0.0
    assert vqa_score("the circle", ["circle"] * 10) == 0.0
    assert vqa_score(" red\n", ["red"] * 10) == 1.0  # whitespace is always cleaned
    assert vqa_score("Two", ["2"] * 10, mode="normalized") == 1.0
    assert vqa_score("Red", ["red"] * 10, mode="normalized") == 1.0


def test_differing_human_answers_normalise_both_sides():
    # Case, number words, articles, punctuation inside answers: all equal once normalised.
    assert vqa_score("Two", ["2"] * 9 + ["two"]) == 1.0
    assert vqa_score("Yes!", ["yes"] * 9 + ["no"]) == pytest.approx(1.0)
    assert vqa_score("the circle", ["circle"] * 8 + ["a circle"] * 2) == 1.0
    assert vqa_score("t-shirt", ["t shirt"] * 5 + ["tshirt"] * 5) == 1.0  # "-" becomes a space
    # Normalised human answers are compared to each other too: "A Dog" and "dog" both count.
    assert vqa_score("dog", ["A Dog"] * 2 + ["dog"] + ["cat"] * 7) == pytest.approx((7 + 3 * 2 / 3) / 10)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown VQA metric mode 'exact'"):
        vqa_score("x", ["x"], mode="exact")


def test_soft_score_is_leave_one_out_min_matches_over_three():
    # 3 matching annotators: 7 subsets keep all 3 (score 1), 3 subsets keep 2 (score 2/3).
    assert vqa_score("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx((7 + 3 * 2 / 3) / 10)
    assert vqa_score("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    assert vqa_score("red", ["red"] * 1 + ["blue"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa_score("red", ["red"] * 4 + ["blue"] * 6) == 1.0
    assert vqa_score("green", ["red"] * 10) == 0.0


def test_articles_and_punctuation_do_not_cost_points_when_normalised():
    assert vqa_score("the Circle.", ["circle"] * 10, mode="normalized") == 1.0
    assert vqa_score("the Circle.", ["circle"] * 10) == 0.0
    assert vqa_score("circle", ["a circle"] * 5 + ["circle"] * 5) == 1.0


def test_empty_answers_are_refused():
    with pytest.raises(ValueError):
        vqa_score("x", [])
