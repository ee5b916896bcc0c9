"""The ONNX export (vision / embedding / text graphs) in onnxruntime vs the PyTorch reference.

The trained bundled base is exported once per module with the production exporter; each test
runs the written graphs in onnxruntime and compares with transformers at fp32. Tolerances are a
few times what was measured (stated per test), far below what a wrong graph would produce.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import BUNDLED_BASE
from vlm_factory.errors import UserError

ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed")

# Measured on the bundled base (max abs diff, onnxruntime 1.31 vs torch 2.13, CPU):
VISION_ATOL = 5e-4   # image features: 3.8e-5 (features reach ~120: relative 3e-7)
LOGITS_ATOL = 1e-4   # decoder logits, prefill and two cached steps: 1.8e-5
PIXELS_ATOL = 1e-5   # own PIL/numpy letterbox vs the reference processor: 2.4e-7 (float rounding only)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from vlm_factory.export.onnx_graphs import export_onnx_fp32

    out = tmp_path_factory.mktemp("onnx") / "onnx-fp32"
    return out, export_onnx_fp32(BUNDLED_BASE, out)


@pytest.fixture(scope="module")
def reference():
    from vlm_factory.model.checkpoint import load_checkpoint

    return load_checkpoint(BUNDLED_BASE)


@pytest.fixture(scope="module")
def runtime(exported):
    from vlm_factory.runtime.onnx_runtime import OnnxRuntime

    with OnnxRuntime(exported[0]) as rt:
        yield rt


@pytest.fixture(scope="module")
def eval_records(synthetic_data):
    from vlm_factory.data.images import load_image
    from vlm_factory.data.records import read_jsonl

    records = read_jsonl(synthetic_data / "eval.jsonl")
    return [(load_image(synthetic_data / r.image), r.question, r.aspect) for r in records]


@pytest.fixture(scope="module")
def aspect_samples(eval_records):
    return {aspect: next((image, q) for image, q, a in eval_records if a == aspect) for aspect in ("square", "tall", "wide")}


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _max_diff(actual, expected) -> float:
    return float(np.abs(np.asarray(actual) - np.asarray(expected)).max())


def test_report_files_and_config(exported, reference):
    from vlm_factory.artifacts import EXPORT_REPORT, read_export_report
    from vlm_factory.model.prompt import user_prompt

    out, report = exported
    assert read_export_report(out) == json.loads(json.dumps(report))
    assert report["format"] == "onnx" and report["opset"] == 20
    assert {"torch", "onnx", "onnxruntime"} <= {k for k, v in report["tools"].items() if v}
    for role, info in report["files"].items():
        assert (out / info["file"]).stat().st_size == info["file_bytes"], role
    assert report["total_bytes"] == sum(f["file_bytes"] for f in report["files"].values())
    names = {p.name for p in out.iterdir()}
    assert {"vision.onnx", "embedding.onnx", "text.onnx", "onnx_config.json", "answer.py", "processor_config.json",
            "tokenizer.json", EXPORT_REPORT} <= names
    assert not [n for n in names if n.endswith(".data") or n.startswith(".")]  # weights inside, no leftovers
    config = json.loads((out / "onnx_config.json").read_text())
    model, processor = reference
    assert config["prompt"]["template"].replace("{question}", "Q?") == user_prompt("Q?")
    assert config["model"]["vision"]["num_image_tokens"] == model.config.image_seq_length
    assert config["model"]["eos_token_ids"] == [processor.tokenizer.eos_token_id]
    assert config["model"]["vision"]["preprocessing"]["pad_color"] == [122, 116, 104]


@torch.no_grad()
def test_vision_features_match_torch(exported, reference, eval_records):
    from vlm_factory.model.features import project, tower_features

    model, processor = reference
    images = [image for image, _, _ in eval_records[:4]]
    pixels = processor.image_processor(images, return_tensors="pt").pixel_values
    expected = project(model, tower_features(model, pixels)).numpy()
    actual = _session(exported[0] / "vision.onnx").run(None, {"pixel_values": pixels.numpy()})[0]
    assert actual.shape == expected.shape
    diff = _max_diff(actual, expected)
    print(f"vision features max abs diff {diff:.2e} (atol {VISION_ATOL}, magnitude {np.abs(expected).max():.1f})")
    assert diff <= VISION_ATOL


def _graph_inputs(runtime, images, question):
    """One row per image, same question: token ids and embeddings with the vision graph's features merged."""
    ids = np.repeat(runtime._prompt_ids(question), len(images), axis=0)
    embeds = runtime._embed(ids)
    embeds[ids == runtime._image_token_id] = np.concatenate([runtime.image_embeddings(image) for image in images])
    return ids, embeds


@torch.no_grad()
def test_decoder_with_kv_cache_matches_torch(exported, reference, runtime, aspect_samples):
    """Prefill then two cached steps at batch 2: logits of every position vs LlavaForConditionalGeneration."""
    model, processor = reference
    images = [aspect_samples["wide"][0], aspect_samples["tall"][0]]
    ids, embeds = _graph_inputs(runtime, images, aspect_samples["wide"][1])
    text_config = model.config.text_config
    kv_shape = (2, text_config.num_key_value_heads, 0, text_config.head_dim)
    past = {f"past_key_values.{i}.{kv}": np.zeros(kv_shape, np.float32)
            for i in range(text_config.num_hidden_layers) for kv in ("key", "value")}
    text = _session(exported[0] / "text.onnx")

    pixels = processor.image_processor(images, return_tensors="pt").pixel_values
    out = model(input_ids=torch.from_numpy(ids), pixel_values=pixels, use_cache=True)
    worst, past_length, step_embeds = 0.0, 0, embeds
    for step in range(3):  # prefill, then two tokens through the cache
        seq = step_embeds.shape[1]
        logits, *present = text.run(None, {
            "inputs_embeds": step_embeds, **past, "attention_mask": np.ones((2, past_length + seq), np.int64),
            "position_ids": np.tile(np.arange(past_length, past_length + seq), (2, 1))})
        assert logits.shape == tuple(out.logits.shape)
        worst = max(worst, _max_diff(logits, out.logits.numpy()))
        past_length += seq
        past = dict(zip(past, present))
        assert present[0].shape == (2, text_config.num_key_value_heads, past_length, text_config.head_dim)
        token = logits[:, -1].argmax(-1)[:, None]
        assert token.ravel().tolist() == out.logits[:, -1].argmax(-1).tolist()
        if step < 2:
            out = model(input_ids=torch.from_numpy(token), past_key_values=out.past_key_values, use_cache=True)
            step_embeds = runtime._embed(token)
    print(f"decoder logits max abs diff over prefill + 2 cached steps: {worst:.2e} (atol {LOGITS_ATOL})")
    assert worst <= LOGITS_ATOL


def test_graphs_accept_batch_1_and_past_0(exported, reference):
    """Dynamo specialises size-1 sample dims; the trace used batch 2 / past 4, so check 1 and 0 really run."""
    import onnx

    from vlm_factory.export.onnx_graphs import self_check

    out = exported[0]
    text = onnx.load(str(out / "text.onnx"), load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in text.graph.input}
    assert dims["inputs_embeds"][:2] == ["batch", "sequence"]
    assert dims["attention_mask"] == ["batch", "total_sequence"]
    assert dims["past_key_values.0.key"][0] == "batch" and dims["past_key_values.0.key"][2] == "past_sequence"
    vision = onnx.load(str(out / "vision.onnx"), load_external_data=False)
    assert vision.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    # Vision at batch 1, embedding at batch 1 x 5 tokens, text at batch 1, sequence 1, past 0: vs PyTorch.
    diffs = self_check(reference[0], out)
    print(f"batch 1 / past 0 max abs diffs: {diffs}")
    assert diffs["vision.onnx"] <= VISION_ATOL and diffs["text.onnx"] <= LOGITS_ATOL
    assert diffs["embedding.onnx"] == 0.0  # a gather: bit-exact


def test_pixel_values_match_the_reference_processor(runtime, reference, aspect_samples):
    _, processor = reference
    for aspect, (image, _) in aspect_samples.items():
        expected = processor.image_processor([image], return_tensors="np").pixel_values
        actual = runtime.pixel_values(image)
        assert actual.shape == expected.shape == (1, 3, 64, 64), aspect
        diff = _max_diff(actual, expected)
        print(f"{aspect} {image.size}: pixel max abs diff {diff:.1e}")
        assert diff <= PIXELS_ATOL, aspect


def test_centre_crop_preprocessing_matches_too(aspect_samples):
    """The config also describes CLIP's short-side resize + centre crop; the device code must follow it."""
    from vlm_factory.families.llava import image_preprocessing
    from vlm_factory.model.tiny import build_image_processor
    from vlm_factory.runtime.preprocess import preprocess

    processor = build_image_processor(64, letterbox=False)
    spec = image_preprocessing(processor)
    assert spec["pad_to_square"] is False and spec["center_crop"] == {"height": 64, "width": 64}
    for aspect, (image, _) in aspect_samples.items():
        resized = image.resize((image.width * 3 // 2, image.height * 3 // 2))  # a real resize, not only a crop
        expected = processor([resized], return_tensors="np").pixel_values[0]
        assert _max_diff(preprocess(resized, spec), expected) <= PIXELS_ATOL, aspect


@torch.no_grad()
def test_first_token_logits_match_torch(runtime, reference, aspect_samples):
    from vlm_factory.model.prompt import expand_image_tokens, user_prompt

    model, processor = reference
    for aspect, (image, question) in aspect_samples.items():
        ids = processor.tokenizer(expand_image_tokens(user_prompt(question), model.config.image_seq_length),
                                  return_tensors="pt").input_ids
        pixels = processor.image_processor([image], return_tensors="pt").pixel_values
        expected = model(input_ids=ids, pixel_values=pixels).logits[0, -1].numpy()
        assert _max_diff(runtime.first_token_logits(image, question), expected) <= LOGITS_ATOL, aspect


def test_greedy_answers_agree_with_the_reference(runtime, reference, eval_records):
    from vlm_factory.eval.generate import answer_questions

    model, processor = reference
    images, questions = [r[0] for r in eval_records], [r[1] for r in eval_records]
    expected = answer_questions(model, processor, images, questions)
    actual = runtime.answer(images, questions)
    agree = sum(a == e for a, e in zip(actual, expected)) / len(expected)
    print(f"onnxruntime answers equal the reference's on {agree:.1%} of {len(expected)} questions")
    assert len(expected) >= 36 and agree >= 0.95
    assert sum(bool(a) for a in actual) > len(actual) // 2  # real words, not empty strings


def test_runtime_refuses_a_directory_without_an_export(tmp_path):
    from vlm_factory.runtime.onnx_runtime import OnnxRuntime

    with pytest.raises(UserError, match="onnx_config.json: not found"):
        OnnxRuntime(tmp_path)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P-transparent", "L", "CMYK"])
def test_transparent_and_other_modes_preprocess_like_the_processor(mode):
    """transformers composites transparency onto white; PIL's plain convert("RGB") would keep the colour
    under a transparent pixel (3.8 apart on the normalised scale)."""
    from vlm_factory.families import family_of
    from vlm_factory.runtime.preprocess import preprocess

    family = family_of(BUNDLED_BASE)
    processor = family.load_processor(BUNDLED_BASE)
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (30, 40, 4), dtype=np.uint8), "RGBA")  # alpha varies per pixel
    image = {"RGBA": rgba, "LA": rgba.convert("LA"), "L": rgba.convert("L"), "CMYK": rgba.convert("RGB").convert("CMYK"),
             "P-transparent": rgba.convert("RGB").convert("P")}[mode]
    if mode == "P-transparent":
        image.info["transparency"] = 0
    expected = processor.image_processor([image], return_tensors="np").pixel_values[0]
    assert _max_diff(preprocess(image, family.preprocessing(processor)), expected) <= PIXELS_ATOL, mode


def test_gate_fails_a_centre_crop_package_on_aspect_and_preprocessing(exported, reference, synthetic_data, root,
                                                                     tmp_path):
    """The package's config told to centre-crop (what CLIP's processor does) where the model letterboxes: on
    square images nothing changes, on tall and wide ones the objects near the ends are cut away. The verdict
    fails on the worst aspect's drift and on the preprocessing check, naming the aspect; the unchanged
    package passes every check."""
    import shutil

    from parity_inputs import configured_thresholds, write_reference

    from vlm_factory.data.images import load_image
    from vlm_factory.data.records import read_jsonl
    from vlm_factory.eval.artifact_parity import ReferenceSide, evaluate_artifact
    from vlm_factory.eval.generate import answer_questions
    from vlm_factory.eval.reference import blind_answers, score
    from vlm_factory.families.llava import image_preprocessing
    from vlm_factory.model.tiny import build_image_processor
    from vlm_factory.runtime.onnx_runtime import OnnxRuntime

    model, processor = reference
    records = read_jsonl(synthetic_data / "eval.jsonl")
    answers = answer_questions(model, processor, [load_image(synthetic_data / r.image) for r in records],
                               [r.question for r in records])
    scores, accuracy = score(records, answers)
    _, blind = score(records, blind_answers(read_jsonl(synthetic_data / "train.jsonl"), records))
    predictions = write_reference(tmp_path / "predictions.jsonl", records, answers, scores)
    gate = dict(fmt="onnx", tier="t",
                reference=ReferenceSide.load(records, synthetic_data, predictions, model, processor,
                                             embedding_images=12),
                reference_metrics={"vqa_accuracy": accuracy["vqa_accuracy"], "blind_baseline": blind},
                thresholds=configured_thresholds(root, "onnx", {"precision": "fp32"}), artifact_bytes=0)
    cropping = tmp_path / "centre-crop"
    shutil.copytree(exported[0], cropping)
    config = json.loads((cropping / "onnx_config.json").read_text())
    config["model"]["vision"]["preprocessing"] = image_preprocessing(build_image_processor(64, letterbox=False))
    (cropping / "onnx_config.json").write_text(json.dumps(config))
    with OnnxRuntime(exported[0]) as faithful_runtime:
        faithful = evaluate_artifact(faithful_runtime, **gate)
    with OnnxRuntime(cropping) as runtime:
        cropped = evaluate_artifact(runtime, **gate)
    print(f"reference {accuracy['vqa_accuracy']} % (blind {blind['vqa_accuracy']} %); centre crop: "
          f"{cropped['by_aspect']['drift']}, {cropped.get('failure_reason')}")
    assert faithful["accuracy_informative"] and faithful["passed"], faithful.get("failure_reason")
    failing = {c["check"]: c for c in cropped["checks"] if c["status"] == "fail"}
    assert not cropped["passed"]
    assert failing["worst_aspect_drift"]["detail"] in ("tall", "wide")
    assert failing["preprocessing_cosine"]["detail"] in ("tall", "wide")
    assert cropped["by_aspect"]["drift"]["square"] == 0.0  # a square image is cropped to itself
