"""The TFLite export (vision.tflite, decoder.tflite with prefill/decode over a KV cache, embedding.npy)
in LiteRT vs the PyTorch reference.

The trained bundled base is exported once per precision setting (module-scoped fixtures, ~20-25 s each on
2 cores): fp32, fp16, int8, and one mixed setting with each component at a different precision.
Tolerances are a few times what was measured (stated per constant), far below what a
wrong graph would produce.
"""

import json

import numpy as np
import pytest
import torch

from conftest import BUNDLED_BASE
from vlm_factory.errors import UserError
from vlm_factory.eval.artifact_parity import cosine

pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed")
pytest.importorskip("litert_torch", reason="litert-torch is not installed")

TIER = "android_flagship"
CONTEXT = 4096  # tiers.android_flagship.context_tokens; the bundled base's 256 positions bound it
# Measured on the bundled base (LiteRT 2.3 / litert-torch 0.10 vs torch 2.13, CPU, 2 threads):
VISION_ATOL_FP32 = 5e-4      # image features (|features| up to ~60): measured 3.1e-5 .. 6.1e-5
VISION_COSINE_FP16 = 0.999   # fp16 weights: measured cosine > 0.999999 on all three aspects (gate floor 0.99)
LOGITS_ATOL_FP32 = 1e-4      # first-token logits: measured 3.8e-6 .. 4.8e-6 (also a 2-chunk prefill)
LOGITS_ATOL_FP16 = 2e-2      # fp16 first-token logits: measured 2.4e-3 .. 2.7e-3
LOGPROB_ATOL_FP16 = 0.05     # fp16 log-prob of the reference's top token: measured ~1e-9 (the model is sure)
PIXELS_ATOL = 1e-5           # shared PIL/numpy letterbox vs the reference processor: float rounding only
AGREEMENT_FP16 = 0.95        # greedy answers equal the reference's: measured 100 % of 72 eval questions


# Vision full, projector fp16, llm int8: every component at its own precision in one export.
MIXED = {"precision": "fp32", "projector": "fp16", "llm": "int8"}


def _export(tmp_path_factory, precision, **components):
    from vlm_factory.export.tflite_export import export_tflite

    out = tmp_path_factory.mktemp("tflite") / f"tflite-{precision}"
    return out, export_tflite(BUNDLED_BASE, out, TIER, {"precision": precision, **components},
                              context_tokens=CONTEXT)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return _export(tmp_path_factory, "fp32")


@pytest.fixture(scope="module")
def fp16(tmp_path_factory):
    return _export(tmp_path_factory, "fp16")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return _export(tmp_path_factory, **MIXED)


@pytest.fixture(scope="module")
def int8(tmp_path_factory):
    return _export(tmp_path_factory, "int8")


@pytest.fixture(scope="module")
def rt32(fp32):
    from vlm_factory.runtime.tflite_runtime import TFLiteRuntime

    with TFLiteRuntime(fp32[0]) as rt:
        yield rt


@pytest.fixture(scope="module")
def rt16(fp16):
    from vlm_factory.runtime.tflite_runtime import TFLiteRuntime

    with TFLiteRuntime(fp16[0]) as rt:
        yield rt


@pytest.fixture(scope="module")
def reference():
    from vlm_factory.model.checkpoint import load_checkpoint

    return load_checkpoint(BUNDLED_BASE)


@pytest.fixture(scope="module")
def eval_records(synthetic_data):
    from vlm_factory.data.images import load_image
    from vlm_factory.data.records import read_jsonl

    records = read_jsonl(synthetic_data / "eval.jsonl")
    return [(load_image(synthetic_data / r.image), r.question, r.aspect) for r in records]


@pytest.fixture(scope="module")
def aspect_samples(eval_records):
    return {aspect: next((image, q) for image, q, a in eval_records if a == aspect) for aspect in ("square", "tall", "wide")}


def _max_diff(actual, expected) -> float:
    return float(np.abs(np.asarray(actual) - np.asarray(expected)).max())


def _log_softmax(logits) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


@torch.no_grad()
def _torch_features(reference, image):
    from vlm_factory.model.features import project, tower_features

    model, processor = reference
    pixels = processor.image_processor([image], return_tensors="pt").pixel_values
    return project(model, tower_features(model, pixels))[0].numpy()


@torch.no_grad()
def _torch_first_logits(reference, image, question):
    from vlm_factory.model.prompt import expand_image_tokens, user_prompt

    model, processor = reference
    ids = processor.tokenizer(expand_image_tokens(user_prompt(question), model.config.image_seq_length),
                              return_tensors="pt").input_ids
    pixels = processor.image_processor([image], return_tensors="pt").pixel_values
    return model(input_ids=ids, pixel_values=pixels).logits[0, -1].numpy()


def test_report_files_and_config(fp32, fp16):
    from vlm_factory.artifacts import EXPORT_REPORT
    from vlm_factory.export.tflite_export import report_summary

    for out, report in (fp32, fp16):
        precision = report["settings"]["precision"]
        assert report["format"] == "tflite" and report["tier"] == TIER
        for name in ("vision.tflite", "decoder.tflite", "embedding.npy", "tflite_config.json", "tokenizer.json",
                     EXPORT_REPORT):
            assert (out / name).is_file(), name
        assert report["total_bytes"] == sum(f["file_bytes"] for f in report["files"].values())
        assert report["files"]["decoder"]["signatures"] == ["prefill", "decode"]
        assert {c: v["precision"] for c, v in report["components"].items()} == dict.fromkeys(
            ("vision", "projector", "llm"), precision)
        config = json.loads((out / "tflite_config.json").read_text())
        assert config["model"]["decoder"]["kv_cache_shape"] == [2, 4, 256, 64]
        assert config["model"]["embedding"]["dtype"] == ("float16" if precision == "fp16" else "float32")
        json.dumps(report_summary(report))
    # fp16 weights roughly halve the two graphs
    assert fp16[1]["files"]["decoder"]["file_bytes"] < 0.6 * fp32[1]["files"]["decoder"]["file_bytes"]
    assert fp16[1]["files"]["vision"]["file_bytes"] < 0.6 * fp32[1]["files"]["vision"]["file_bytes"]


def test_vision_features_match_torch(rt32, rt16, reference, aspect_samples):
    for aspect, (image, _) in aspect_samples.items():
        expected = _torch_features(reference, image)
        diff32 = _max_diff(rt32.image_embeddings(image), expected)
        cos16 = cosine(rt16.image_embeddings(image), expected)
        print(f"{aspect}: fp32 max abs diff {diff32:.1e}, fp16 cosine {cos16:.6f}")
        assert diff32 <= VISION_ATOL_FP32, aspect
        assert cos16 >= VISION_COSINE_FP16, aspect


def test_pixel_values_match_the_reference_processor(rt32, reference, aspect_samples):
    _, processor = reference
    for aspect, (image, _) in aspect_samples.items():
        expected = processor.image_processor([image], return_tensors="np").pixel_values
        actual = rt32.pixel_values(image)
        assert actual.shape == expected.shape == (1, 3, 64, 64), aspect
        assert _max_diff(actual, expected) <= PIXELS_ATOL, aspect


def test_first_token_logits_match_torch(rt32, rt16, reference, aspect_samples):
    for aspect, (image, question) in aspect_samples.items():
        expected = _torch_first_logits(reference, image, question)
        diff32 = _max_diff(rt32.first_token_logits(image, question), expected)
        ref_lp, lp16 = _log_softmax(expected), _log_softmax(rt16.first_token_logits(image, question))
        top = int(ref_lp.argmax())
        diff16 = abs(float(lp16[top] - ref_lp[top]))
        logit16 = _max_diff(rt16.first_token_logits(image, question), expected)
        print(f"{aspect}: fp32 logits max abs diff {diff32:.1e}, fp16 top log-prob diff {diff16:.1e}, "
              f"fp16 logits max abs diff {logit16:.1e}")
        assert diff32 <= LOGITS_ATOL_FP32, aspect
        assert diff16 <= LOGPROB_ATOL_FP16 and int(lp16.argmax()) == top, aspect
        assert logit16 <= LOGITS_ATOL_FP16, aspect


def test_a_prompt_longer_than_one_prefill_chunk(rt32, reference, aspect_samples):
    """A prompt longer than the static prefill length is prefilled in chunks over the same cache."""
    image, question = aspect_samples["square"]
    long_question = question + " Look at the picture carefully and answer in one word." * 6
    assert len(rt32._prompt_ids(long_question)) > rt32.config["model"]["decoder"]["prefill_length"]
    expected = _torch_first_logits(reference, image, long_question)
    assert _max_diff(rt32.first_token_logits(image, long_question), expected) <= LOGITS_ATOL_FP32


def test_greedy_answers_agree_with_the_reference_at_fp16(rt16, reference, eval_records):
    from vlm_factory.eval.generate import answer_questions

    model, processor = reference
    images, questions = [r[0] for r in eval_records], [r[1] for r in eval_records]
    expected = answer_questions(model, processor, images, questions)
    actual = rt16.answer(images, questions)
    agree = sum(a == e for a, e in zip(actual, expected)) / len(expected)
    print(f"TFLite fp16 answers equal the reference's on {agree:.1%} of {len(expected)} questions")
    assert len(expected) >= 36 and agree >= AGREEMENT_FP16
    assert sum(bool(a) for a in actual) > len(actual) // 2  # real words, not empty strings


@pytest.mark.parametrize("settings, key", [
    ({"precision": "int4"}, "targets.tflite.android_flagship.precision"),
    ({}, "targets.tflite.android_flagship.precision"),
    ({"precision": "fp16", "ort_format": True}, "targets.tflite.android_flagship.ort_format"),
    ({"precision": "fp16", "vision": "int4"}, "targets.tflite.android_flagship.vision"),
    ({"precision": "fp16", "llm": None}, "targets.tflite.android_flagship.llm"),
    ("fp16", "targets.tflite.android_flagship"),
])
def test_bad_settings_are_one_line_errors_and_write_nothing(tmp_path, settings, key):
    from vlm_factory.export.tflite_export import export_tflite

    out = tmp_path / "tflite"
    with pytest.raises(UserError) as info:
        export_tflite(BUNDLED_BASE, out, TIER, settings, context_tokens=CONTEXT)
    message = str(info.value)
    assert key in message and "\n" not in message
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_runtime_refuses_a_directory_without_an_export(tmp_path):
    from vlm_factory.runtime.tflite_runtime import TFLiteRuntime

    with pytest.raises(UserError, match="tflite_config.json: not found"):
        TFLiteRuntime(tmp_path)


# -- per-component precision -------------------------------------------------------------------------

def test_settings_fill_each_component_from_precision():
    from vlm_factory.export.tflite_export import tflite_settings

    assert tflite_settings({"precision": "FP16"}, TIER) == {"precision": "fp16", "vision": "fp16",
                                                            "projector": "fp16", "llm": "fp16"}
    assert tflite_settings(MIXED, TIER) == {"precision": "fp32", "vision": "fp32", "projector": "fp16", "llm": "int8"}
    with pytest.raises(UserError) as info:
        tflite_settings({"precision": "fp16", "projector": "q4"}, TIER)
    message = str(info.value)
    assert "targets.tflite.android_flagship.projector" in message and "fp32, fp16, int8" in message
    assert "\n" not in message


def _graph_bytes(report, component, file):
    return report["components"][component]["weight_bytes"][file]


def test_mixed_export_stores_each_component_at_its_precision(fp32, mixed):
    _, report = mixed
    assert report["settings"] == {"precision": "fp32", "vision": "fp32", "projector": "fp16", "llm": "int8"}
    assert {c: report["components"][c]["precision"] for c in ("vision", "projector", "llm")} == \
        {"vision": "fp32", "projector": "fp16", "llm": "int8"}
    assert report["files"]["vision"]["precision"] == "mixed"
    assert report["files"]["vision"]["components"] == {"vision": "fp32", "projector": "fp16"}
    assert report["files"]["decoder"]["precision"] == "int8"
    # The vision tower is untouched: its weights are byte for byte the fp32 export's.
    assert _graph_bytes(report, "vision", "vision.tflite") == _graph_bytes(fp32[1], "vision", "vision.tflite")
    # A reduced component's matrices move from float32 to the narrow type and nothing else changes:
    # float32 bytes of the fp32 export = float32 left + 2 x float16 (projector) or 4 x int8 (llm) bytes.
    for component, file, narrow, width in (("projector", "vision.tflite", "float16", 2),
                                           ("llm", "decoder.tflite", "int8", 4)):
        full, reduced = _graph_bytes(fp32[1], component, file), _graph_bytes(report, component, file)
        assert set(full) - {"int32"} == {"float32"}, component
        assert set(reduced) - {"int32"} == {"float32", narrow}, component
        assert reduced[narrow] > 0.9 * full["float32"] / width, component  # the matrices: nearly all of it
        assert reduced["float32"] + width * reduced[narrow] == full["float32"], component
    assert _graph_bytes(report, "llm", "embedding.npy") == {"float16": 512 * 256 * 2}  # int8 llm: fp16 table
    config = json.loads((mixed[0] / "tflite_config.json").read_text())
    assert config["model"]["components"] == {"vision": "fp32", "projector": "fp16", "llm": "int8"}
    assert config["model"]["embedding"]["dtype"] == "float16"


# Mixed / int8 vs the fp32 export, measured on the three aspect samples (LiteRT 2.3, ai-edge-quantizer 0.10):
MIXED_VISION_COSINE = 0.9999  # only the projector's two 256x256 matrices in fp16: measured > 0.999999
INT8_VISION_COSINE = 0.999    # int8 weights, activations quantized on the fly: measured 0.99994 .. 0.99997
# Log-prob of the fp32 export's first token: the tiny model is sure of it, so int8's logit drift (max abs
# ~0.1-0.6) moves it by measured <= 5e-7; 0.05 is the fp16 test's bound (a 5 % change of a sure answer's
# probability is real drift), the argmax must not move at all.
LOGPROB_ATOL_INT8 = 0.05
AGREEMENT_MIXED = 0.95        # greedy answers equal the fp32 export's: measured 100 % of 36 eval questions


@pytest.fixture(scope="module")
def rt_mixed(mixed):
    from vlm_factory.runtime.tflite_runtime import TFLiteRuntime

    with TFLiteRuntime(mixed[0]) as rt:
        yield rt


def _same_first_token(rt, rt32, image, question):
    expected = _log_softmax(rt32.first_token_logits(image, question))
    actual = _log_softmax(rt.first_token_logits(image, question))
    top = int(expected.argmax())
    return int(actual.argmax()) == top, abs(float(actual[top] - expected[top]))


def test_mixed_export_answers_like_fp32(rt_mixed, rt32, aspect_samples, eval_records):
    for aspect, (image, question) in aspect_samples.items():
        cos = cosine(rt_mixed.image_embeddings(image), rt32.image_embeddings(image))
        same, lp_diff = _same_first_token(rt_mixed, rt32, image, question)
        print(f"{aspect}: mixed vision cosine vs fp32 {cos:.6f}, top log-prob diff {lp_diff:.1e}")
        assert cos >= MIXED_VISION_COSINE and same and lp_diff <= LOGPROB_ATOL_INT8, aspect
    records = eval_records[::2]  # 36 questions: every aspect and question type, half the time
    images, questions = [r[0] for r in records], [r[1] for r in records]
    expected, actual = rt32.answer(images, questions), rt_mixed.answer(images, questions)
    agree = sum(a == e for a, e in zip(actual, expected)) / len(expected)
    print(f"mixed answers equal the fp32 export's on {agree:.1%} of {len(expected)} questions")
    assert agree >= AGREEMENT_MIXED


def test_int8_export_is_smaller_and_answers(int8, fp16, rt32, aspect_samples):
    from vlm_factory.runtime.tflite_runtime import TFLiteRuntime

    out, report = int8
    assert report["precision"] == "int8" and report["files"]["decoder"]["precision"] == "int8"
    for component, file in (("vision", "vision.tflite"), ("projector", "vision.tflite"), ("llm", "decoder.tflite")):
        stored = _graph_bytes(report, component, file)
        assert "int8" in stored and "float16" not in stored, component
    # int8 matrices are half fp16's; norms, biases and rope tables stay float32
    for role in ("vision", "decoder"):
        assert report["files"][role]["file_bytes"] < 0.6 * fp16[1]["files"][role]["file_bytes"], role
    with TFLiteRuntime(out) as rt:
        for aspect, (image, question) in aspect_samples.items():
            cos = cosine(rt.image_embeddings(image), rt32.image_embeddings(image))
            same, lp_diff = _same_first_token(rt, rt32, image, question)
            print(f"{aspect}: int8 vision cosine vs fp32 {cos:.6f}, top log-prob diff {lp_diff:.1e}")
            assert cos >= INT8_VISION_COSINE and same and lp_diff <= LOGPROB_ATOL_INT8, aspect
