"""Loading real VQA data (VQAv2 / TextVQA layouts) from local copies, and its one-line errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
from PIL import Image

from vlm_factory.data.hub import load_vqa_dataset
from vlm_factory.data.images import load_image
from vlm_factory.data.records import read_jsonl
from vlm_factory.errors import UserError

VQAV2_FEATURES = datasets.Features({
    "question_id": datasets.Value("int64"),
    "image_id": datasets.Value("int64"),
    "question": datasets.Value("string"),
    "image": datasets.Image(),
    "answers": datasets.List({"answer": datasets.Value("string"), "answer_confidence": datasets.Value("string"),
                              "answer_id": datasets.Value("int64")}),
    "multiple_choice_answer": datasets.Value("string"),
    "question_type": datasets.Value("string"),
    "answer_type": datasets.Value("string"),
})


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    """Parquet and json sources are converted to arrow in the datasets cache; keep that out of ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def solid(width: int, height: int, color: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (width, height), color)


def vqav2_answers(words: list[str]) -> list[dict]:
    return [{"answer": w, "answer_confidence": "yes", "answer_id": i + 1} for i, w in enumerate(words)]


def vqav2_split(rows: list[tuple[int, int, str, Image.Image, list[str]]]) -> datasets.Dataset:
    """rows: (question_id, image_id, question, image, ten answers); the first answer is the chosen one."""
    return datasets.Dataset.from_dict({
        "question_id": [r[0] for r in rows],
        "image_id": [r[1] for r in rows],
        "question": [r[2] for r in rows],
        "image": [r[3] for r in rows],
        "answers": [vqav2_answers(r[4]) for r in rows],
        "multiple_choice_answer": [r[4][0] for r in rows],
        "question_type": ["what color is the"] * len(rows),
        "answer_type": ["other"] * len(rows),
    }, features=VQAV2_FEATURES)


def test_vqav2_saved_dataset_dict(tmp_path):
    tall, wide, square = solid(20, 40, (255, 0, 0)), solid(40, 20, (0, 255, 0)), solid(30, 30, (0, 0, 255))
    train_answers = [["red"] * 8 + ["pink", "orange"], ["green"] * 10, ["blue"] * 9 + ["navy"]]
    train = vqav2_split([
        (101, 1, "What color is the tall box?", tall, train_answers[0]),
        (102, 2, "What color is the wide box?", wide, train_answers[1]),
        (103, 2, "Is the wide box green?", wide, train_answers[2]),  # second question on image 2
    ])
    validation = vqav2_split([
        (201, 3, "What color is the square?", square, ["blue"] * 10),
        (202, 1, "What color is it?", tall, ["red"] * 10),
    ])
    src = tmp_path / "vqav2"
    datasets.DatasetDict({"train": train, "validation": validation}).save_to_disk(str(src))
    out = tmp_path / "out"

    counts = load_vqa_dataset(out, {"train": "train", "eval": "validation"}, local_path=str(src),
                              max_questions={"eval": 1})

    assert counts == {"train": 3, "eval": 1}
    records = read_jsonl(out / "train.jsonl")
    assert [r.question_id for r in records] == [101, 102, 103]
    assert [r.image_id for r in records] == [1, 2, 2]
    assert [r.answers for r in records] == train_answers
    assert all(len(r.answers) == 10 for r in records)
    assert [r.multiple_choice_answer for r in records] == ["red", "green", "blue"]
    assert [r.aspect for r in records] == ["tall", "wide", "wide"]
    assert records[0].question_type == "what color is the"
    assert records[0].image == "images/train/1.png"
    assert sorted(p.name for p in (out / "images" / "train").iterdir()) == ["1.png", "2.png"]
    with Image.open(out / records[0].image) as written:
        assert written.size == (20, 40)
        assert written.mode == "RGB"
        assert written.getpixel((0, 0)) == (255, 0, 0)
    with Image.open(out / records[1].image) as written:
        assert written.size == (40, 20)

    (evaluated,) = read_jsonl(out / "eval.jsonl")  # max_questions keeps the first row only
    assert (evaluated.question_id, evaluated.aspect, evaluated.image) == (201, "square", "images/eval/3.png")
    assert load_image(out / evaluated.image).size == (30, 30)


def test_textvqa_parquet_derives_types(tmp_path):
    answers = [["yes"] * 7 + ["no"] * 3, ["12"] * 6 + ["twelve"] * 4, ["coca cola"] * 5 + ["coke"] * 5]
    features = datasets.Features({
        "image_id": datasets.Value("string"), "question_id": datasets.Value("int64"),
        "question": datasets.Value("string"), "image": datasets.Image(),
        "answers": datasets.List(datasets.Value("string")),
    })
    images = [solid(64, 16, (9, 9, 9)), solid(64, 16, (9, 9, 9)), solid(16, 16, (200, 200, 200))]
    rows = datasets.Dataset.from_dict({
        "image_id": ["003a8ae2ef43b901", "003a8ae2ef43b901", "00c359f294f7dcd9"],
        "question_id": [34602, 34603, 34604],
        "question": ["is it open?", "what number is shown?", "what brand is this?"],
        "image": images, "answers": answers,
    }, features=features)
    src = tmp_path / "textvqa"
    rows.select([0, 1]).to_parquet(str(src / "data" / "train-00000-of-00002.parquet"))
    rows.select([2]).to_parquet(str(src / "data" / "train-00001-of-00002.parquet"))
    rows.to_parquet(str(src / "data" / "test-00000-of-00001.parquet"))

    counts = load_vqa_dataset(tmp_path / "out", {"train": "train"}, local_path=str(src))

    assert counts == {"train": 3}
    records = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert [r.question_id for r in records] == [34602, 34603, 34604]
    assert [r.answer_type for r in records] == ["yes/no", "number", "other"]
    assert [r.multiple_choice_answer for r in records] == ["yes", "12", "coca cola"]
    assert [r.question_type for r in records] == ["unknown"] * 3
    assert [r.answers for r in records] == answers
    assert [r.aspect for r in records] == ["wide", "wide", "square"]
    # hex image ids become one stable int per image, so the shared image is written once
    assert records[0].image_id == records[1].image_id != records[2].image_id
    assert len(list((tmp_path / "out" / "images" / "train").iterdir())) == 2
    assert not (tmp_path / "out" / "test.jsonl").exists()


def write_jsonl_source(src: Path, rows: list[dict]) -> None:
    src.mkdir(parents=True, exist_ok=True)
    (src / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_jsonl_corrupt_image_names_question(tmp_path):
    src = tmp_path / "jsonl"
    (src / "imgs").mkdir(parents=True)
    solid(10, 10, (1, 2, 3)).save(src / "imgs" / "good.png")
    (src / "imgs" / "bad.png").write_bytes(np.random.default_rng(0).bytes(256))
    write_jsonl_source(src, [
        {"question_id": 1, "image_id": 5, "question": "q?", "image": "imgs/good.png", "answers": ["a"] * 10},
        {"question_id": 777, "image_id": 6, "question": "q?", "image": "imgs/bad.png", "answers": ["b"] * 10},
    ])
    out = tmp_path / "out"

    with pytest.raises(UserError) as info:
        load_vqa_dataset(out, {"train": "train"}, local_path=str(src))

    message = str(info.value)
    assert "question_id 777" in message
    assert str(src / "imgs" / "bad.png") in message
    assert "\n" not in message
    assert not out.exists()  # nothing half-written


def test_jsonl_relative_images_load(tmp_path):
    src = tmp_path / "jsonl"
    (src / "imgs").mkdir(parents=True)
    solid(30, 10, (1, 2, 3)).save(src / "imgs" / "a.png")
    write_jsonl_source(src, [{"question_id": 9, "question": "how many?", "image": "imgs/a.png",
                              "answers": ["3"] * 10}])

    assert load_vqa_dataset(tmp_path / "out", {"train": "train"}, local_path=str(src)) == {"train": 1}
    (record,) = read_jsonl(tmp_path / "out" / "train.jsonl")
    # no image_id column: the question_id stands in for it
    assert (record.image_id, record.aspect, record.answer_type) == (9, "wide", "number")


def test_embedded_corrupt_image_names_question(tmp_path):
    features = datasets.Features({"question_id": datasets.Value("int64"), "question": datasets.Value("string"),
                                  "image": datasets.Image(), "answers": datasets.List(datasets.Value("string"))})
    rows = datasets.Dataset.from_dict({
        "question_id": [1, 42], "question": ["q?", "q?"], "answers": [["a"] * 10, ["b"] * 10],
        "image": [solid(8, 8, (0, 0, 0)), {"bytes": b"not an image at all", "path": None}],
    }, features=features)
    src = tmp_path / "saved"
    rows.save_to_disk(str(src))  # a lone Dataset without a split name counts as 'train'

    with pytest.raises(UserError, match=r"split 'train', question_id 42: not a readable image"):
        load_vqa_dataset(tmp_path / "out", {"train": "train"}, local_path=str(src))


def test_parquet_split_directories(tmp_path):
    src = tmp_path / "pq"
    rows = datasets.Dataset.from_dict({"question": ["q?"], "answers": [["2"] * 10], "image": [solid(8, 30, (5, 5, 5))]},
                                      features=datasets.Features({"question": datasets.Value("string"),
                                                                  "answers": datasets.List(datasets.Value("string")),
                                                                  "image": datasets.Image()}))
    rows.to_parquet(str(src / "val" / "0.parquet"))

    with pytest.raises(UserError, match=r"split 'validation' not found \(available: val\)"):
        load_vqa_dataset(tmp_path / "out", {"eval": "validation"}, local_path=str(src))
    assert load_vqa_dataset(tmp_path / "out", {"eval": "val"}, local_path=str(src)) == {"eval": 1}
    (record,) = read_jsonl(tmp_path / "out" / "eval.jsonl")
    # no question_id or image_id columns: both come from the row index
    assert (record.question_id, record.image_id, record.aspect) == (0, 0, "tall")


def test_missing_answers_column(tmp_path):
    rows = datasets.Dataset.from_dict({"question_id": [1], "question": ["q?"], "image": [solid(8, 8, (0, 0, 0))]},
                                      features=datasets.Features({"question_id": datasets.Value("int64"),
                                                                  "question": datasets.Value("string"),
                                                                  "image": datasets.Image()}))
    src = tmp_path / "no_answers"
    datasets.DatasetDict({"train": rows}).save_to_disk(str(src))

    with pytest.raises(UserError, match="column 'answers' is missing") as info:
        load_vqa_dataset(tmp_path / "out", {"train": "train"}, local_path=str(src))
    assert str(src) in str(info.value)


def test_offline_hub_dataset_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # both libraries read the variables once at import, which has already happened in this process
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    start = time.monotonic()

    with pytest.raises(UserError) as info:
        load_vqa_dataset(tmp_path / "out", {"eval": "validation"}, hub_dataset="nobody/no-such-vqa")

    assert time.monotonic() - start < 10
    assert "nobody/no-such-vqa" in str(info.value)
    assert "data.local_path" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_missing_split_lists_available(tmp_path):
    src = tmp_path / "vqav2"
    split = vqav2_split([(1, 1, "q?", solid(8, 8, (0, 0, 0)), ["x"] * 10)])
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(src))

    with pytest.raises(UserError) as info:
        load_vqa_dataset(tmp_path / "out", {"train": "train", "eval": "validation"}, local_path=str(src))

    assert "split 'validation' not found (available: test, train)" in str(info.value)


def test_exactly_one_source(tmp_path):
    with pytest.raises(UserError, match="exactly one"):
        load_vqa_dataset(tmp_path / "out", {"train": "train"})
    with pytest.raises(UserError, match="exactly one"):
        load_vqa_dataset(tmp_path / "out", {"train": "train"}, hub_dataset="a/b", local_path=str(tmp_path))
