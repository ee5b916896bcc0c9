"""The VQA metric on the cases the official VQAv2 evaluation script is known for."""

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
    ],
)
def test_normalisation_matches_official_rules(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_number_word_matches_digit():
    assert vqa_score("Two", ["2"] * 10) == 1.0
    assert vqa_score("2", ["two"] * 10) == 1.0


def test_soft_score_is_leave_one_out_min_matches_over_three():
    # 3 matching annotators: 7 subsets keep all 3 (score 1), 3 subsets keep 2 (score 2/3).
    assert vqa_score("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx((7 + 3 * 2 / 3) / 10)
    assert vqa_score("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    assert vqa_score("red", ["red"] * 1 + ["blue"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa_score("red", ["red"] * 4 + ["blue"] * 6) == 1.0
    assert vqa_score("green", ["red"] * 10) == 0.0


def test_articles_and_punctuation_do_not_cost_points():
    assert vqa_score("the Circle.", ["circle"] * 10) == 1.0
    assert vqa_score("circle", ["a circle"] * 5 + ["circle"] * 5) == 1.0


def test_empty_answers_are_refused():
    with pytest.raises(ValueError):
        vqa_score("x", [])
