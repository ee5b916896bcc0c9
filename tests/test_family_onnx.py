"""Shrunk real checkpoints (tests/shrunk_models.py) through the production ONNX export, run in onnxruntime.

litgpt style: each variant is a real model's config shrunk, with random weights, written in the hub
layout (fp16 weights, preprocessor_config.json, chat_template.json); it is exported with
`export_onnx_fp32` (the family decides where every part lives) and run with `OnnxRuntime`, the
parity gate's adapter, against transformers as the reference:

- llava15_clip_llama: CLIP with CLS (dropped, feature layer -2), quick GELU, Llama with BOS,
  short-side resize + centre crop;
- llava_interleave_qwen2: SigLIP, Qwen2 with GQA 14/2, non-zero QKV bias, tied embeddings (the LM
  head is the embedding table), ChatML without BOS, plain resize.

Random weights make small activations (image features ~0.1-0.3, logits ~1-2), so feature errors
are stated relative to the features' magnitude. Every tolerance is far below what a wrong graph
makes: swapping the image changes first-token logits by 0.5-0.7 on both variants, leaving the
image-token embeddings unmerged by 0.9-1.3 (measured).
"""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from measures import rel_diff
from shrunk_models import IMAGE_SIZES, VARIANTS, gradient_image

pytestmark = pytest.mark.family_format("llava", "onnx")

ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed")

QUESTION = "What color is the circle?"
# (width, height): a downscale, an upscale and a non-integer ratio, so resize and crop are exercised.
# Measured (onnxruntime 1.31.1 vs torch 2.13, x86 CPU, fp32):
PIXELS_ATOL = 1e-5       # runtime's PIL/numpy preprocessing vs the HF processor: 2.4e-7 (CLIP), 5.9e-8 (SigLIP),
#                          float rounding only; a one-pixel crop shift or another resample filter makes ~1e-1
FEATURES_RTOL = 1e-4     # image features, max abs diff / max |feature|: 8e-7 on both variants
LOGITS_ATOL = 1e-4       # first-token logits: 7.7e-7 (Llama), 1.2e-6 (Qwen2); an image swap moves them 0.5
# INT8 (Qwen2 variant: tied LM head quantized in text.onnx while embedding.onnx stays float) vs transformers:
INT8_FEATURE_COSINE = 0.995  # per-image cosine of the flattened features, min over 3 images: measured 0.99877
#                             (noise images, while the vision graph is calibrated on the synthetic shapes)
INT8_LOGPROB_ATOL = 0.1      # |Δ log p| of transformers' first token, max over 3 images: measured 0.011


@pytest.fixture(scope="module")
def images():
    return {aspect: gradient_image(*size, seed=i) for i, (aspect, size) in enumerate(IMAGE_SIZES.items())}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    """One shrunk checkpoint (hub layout), its reference model and its fp32 ONNX export in OnnxRuntime."""
    from vlm_factory.export.onnx_graphs import export_onnx_fp32
    from vlm_factory.model.checkpoint import load_model
    from vlm_factory.runtime.onnx_runtime import OnnxRuntime

    root = tmp_path_factory.mktemp(request.param)
    checkpoint = VARIANTS[request.param](root / "checkpoint", layout="hub")
    report = export_onnx_fp32(checkpoint, root / "onnx-fp32")
    family, model, processor = load_model(checkpoint)
    with OnnxRuntime(root / "onnx-fp32") as runtime:
        yield SimpleNamespace(name=request.param, checkpoint=checkpoint, out=root / "onnx-fp32", report=report,
                              family=family, model=model, processor=processor, runtime=runtime)


def _pixels(v, image) -> torch.Tensor:
    return v.processor.image_processor([image], return_tensors="pt").pixel_values


def test_hub_checkpoint_exports_in_fp32_with_the_family_config(variant):
    """fp16 weights on disk, float32 graphs; onnx_config.json says what the family says."""
    import onnx

    from vlm_factory.runtime.prompting import prompt_from_config

    v = variant
    assert {p.name for p in v.checkpoint.iterdir()} >= {"preprocessor_config.json", "chat_template.json"}
    assert v.report["precision"] == "fp32" and v.report["family"] == v.family.name == "llava"
    for name in ("vision.onnx", "embedding.onnx", "text.onnx"):
        types = {onnx.TensorProto.DataType.Name(t.data_type) for t in onnx.load(str(v.out / name)).graph.initializer}
        assert "FLOAT16" not in types and "FLOAT" in types, name
    config = json.loads((v.out / "onnx_config.json").read_text())
    model, text = config["model"], v.family.text
    assert prompt_from_config(config["prompt"], "onnx_config.json") == v.family.prompt(v.processor)
    assert model["vision"]["preprocessing"] == v.family.preprocessing(v.processor)
    assert model["vision"]["num_image_tokens"] == v.family.image_tokens == 16
    assert model["image_token_id"] == v.family.image_token_id
    assert model["bos_token_id"] == v.processor.tokenizer.bos_token_id  # None for Qwen2
    assert model["eos_token_ids"] == [v.processor.tokenizer.eos_token_id] == [text.eos_token_id]
    decoder = model["decoder"]
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"], decoder["head_size"]) == \
        (text.num_heads, text.num_kv_heads, text.head_dim)
    if v.name == "llava_interleave_qwen2":  # what makes this variant hard, still there after loading
        assert text.qkv_bias and text.tied_embeddings and text.num_kv_heads < text.num_heads
        assert v.family.decoder_parts(v.model).lm_head.weight is v.family.input_embeddings(v.model).weight


def test_pixel_values_match_the_hf_processor(variant, images):
    """CLIPImageProcessor's short-side resize + centre crop, SigLIP's plain resize, from the config alone."""
    for aspect, image in images.items():
        expected = _pixels(variant, image).numpy()
        actual = variant.runtime.pixel_values(image)
        diff = float(np.abs(actual - expected).max())
        print(f"{variant.name} {aspect} {image.size}: pixel max abs diff {diff:.1e}")
        assert actual.shape == expected.shape == (1, 3, 56, 56) and diff <= PIXELS_ATOL, aspect


def test_prompt_ids_match_the_hf_processor(variant):
    """The exported PromptSpec tokenizes as LlavaProcessor expands the chat template's image token."""
    v = variant
    spec = v.family.prompt(v.processor)
    expected = v.processor(text=spec.render(QUESTION), images=[gradient_image(56, 56, 0)]).input_ids
    assert v.runtime._prompt_ids(QUESTION).tolist() == expected


@torch.no_grad()
def test_image_embeddings_match_transformers(variant, images):
    v = variant
    for aspect, image in images.items():
        expected = v.family.image_features(v.model, _pixels(v, image))[0].numpy()
        actual = v.runtime.image_embeddings(image)
        print(f"{v.name} {aspect}: features relative max diff {rel_diff(actual, expected):.1e}")
        assert actual.shape == expected.shape == (16, v.family.text.hidden_size)
        assert rel_diff(actual, expected) <= FEATURES_RTOL, aspect


@torch.no_grad()
def test_first_token_logits_match_transformers(variant, images):
    v = variant
    ids = torch.from_numpy(v.runtime._prompt_ids(QUESTION))
    for aspect, image in images.items():
        expected = v.model(input_ids=ids, pixel_values=_pixels(v, image)).logits[0, -1].numpy()
        actual = v.runtime.first_token_logits(image, QUESTION)
        diff = float(np.abs(actual - expected).max())
        print(f"{v.name} {aspect}: first-token logits max abs diff {diff:.1e}")
        assert actual.shape == (v.family.text.vocab_size,) and diff <= LOGITS_ATOL, aspect


@torch.no_grad()
def test_greedy_answers_equal_transformers_generate(variant, images):
    """Token ids, not text: random weights answer gibberish and may never emit EOS, so both sides run
    MAX_ANSWER_TOKENS steps at most and stop at the same EOS ids."""
    from vlm_factory.model.prompt import MAX_ANSWER_TOKENS

    v = variant
    ids = torch.from_numpy(v.runtime._prompt_ids(QUESTION))
    eos = sorted(v.runtime._eos)
    for aspect, image in images.items():
        out = v.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=_pixels(v, image),
                               max_new_tokens=MAX_ANSWER_TOKENS, do_sample=False, eos_token_id=eos,
                               pad_token_id=v.processor.tokenizer.pad_token_id)
        expected = out[0, ids.shape[1]:].tolist()
        expected = expected[:next((i for i, t in enumerate(expected) if t in eos), len(expected))]
        assert v.runtime.answer_tokens(image, QUESTION) == expected, aspect
    assert v.runtime.answer([image], [QUESTION]) == [v.processor.tokenizer.decode(expected, skip_special_tokens=True)
                                                     .strip()]


def test_eos_ids_from_tokenizer_and_config():
    """Generation stops at the tokenizer's EOS and at the LLM config's (one id or a list)."""
    from vlm_factory.export.onnx_graphs import eos_token_ids

    def family(eos):
        return SimpleNamespace(text=SimpleNamespace(eos_token_id=eos))

    tokenizer = SimpleNamespace(eos_token_id=7)
    assert eos_token_ids(tokenizer, family(7)) == [7]
    assert eos_token_ids(tokenizer, family(9)) == [7, 9]
    assert eos_token_ids(tokenizer, family([9, 7, 11])) == [7, 9, 11]
    assert eos_token_ids(SimpleNamespace(eos_token_id=None), family(None)) == []


@pytest.mark.slow
@torch.no_grad()
def test_int8_tied_qwen2_against_transformers(tmp_path_factory, synthetic_data, images):
    """The production INT8 tier (static QDQ vision, dynamic decoder) on the tied-embedding Qwen2 variant."""
    from vlm_factory.export.onnx_export import export_onnx
    from vlm_factory.model.checkpoint import load_model
    from vlm_factory.runtime.onnx_runtime import OnnxRuntime

    root = tmp_path_factory.mktemp("qwen2-int8")
    checkpoint = VARIANTS["llava_interleave_qwen2"](root / "checkpoint", layout="hub")
    report = export_onnx(checkpoint, root / "onnx-int8", "test_tier", {"precision": "int8", "ort_format": False},
                         synthetic_data, calibration_images=16)
    text = report["files"]["text"]["quantization"]["quantized_nodes"]
    assert text["MatMul"] == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + the tied LM head
    assert report["files"]["embedding"]["precision"] == "fp32"
    family, model, processor = load_model(checkpoint)
    with OnnxRuntime(root / "onnx-int8") as runtime:
        ids = torch.from_numpy(runtime._prompt_ids(QUESTION))
        for aspect, image in images.items():
            pixels = processor.image_processor([image], return_tensors="pt").pixel_values
            expected = family.image_features(model, pixels)[0].numpy().ravel()
            actual = runtime.image_embeddings(image).ravel()
            cosine = float(actual @ expected / (np.linalg.norm(actual) * np.linalg.norm(expected)))
            reference = torch.log_softmax(model(input_ids=ids, pixel_values=pixels).logits[0, -1].double(), -1)
            got = torch.log_softmax(torch.from_numpy(runtime.first_token_logits(image, QUESTION)).double(), -1)
            top = int(reference.argmax())
            logprob_diff = abs(float(got[top] - reference[top]))
            print(f"int8 {aspect}: feature cosine {cosine:.5f}, |Δ log p| of the top token {logprob_diff:.4f}")
            assert cosine >= INT8_FEATURE_COSINE and logprob_diff <= INT8_LOGPROB_ATOL, aspect


def _one_weight_negated(src, dst) -> str:
    """A copy of the fp32 export whose decoder has one weight matrix negated: the first MLP down projection,
    found by its shape (MatMul's [intermediate, hidden]; the optimised graph's initializer names are opaque)."""
    import shutil

    import onnx
    from onnx import numpy_helper

    shutil.copytree(src, dst)
    graph = onnx.load(str(dst / "text.onnx"))
    target = next(t for t in graph.graph.initializer if len(t.dims) == 2 and t.dims[0] > t.dims[1])
    target.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(target), target.name))
    onnx.save(graph, str(dst / "text.onnx"))
    return target.name


def test_gate_fails_a_decoder_with_one_wrong_weight_though_the_random_model_scores_nothing(
        variant, synthetic_data, root, tmp_path):
    """A random-weight model scores 0 % in every runtime: drift and flips cannot tell a broken decoder, and the
    verdict says so. Agreement with the reference model still can: the faithful export passes every check
    (first-token KL ~1e-12), the one with a single negated weight matrix fails on it."""
    from parity_inputs import UNINFORMATIVE_REFERENCE, configured_thresholds, reference_answers, write_reference

    from vlm_factory.data.records import read_jsonl
    from vlm_factory.eval.artifact_parity import ReferenceSide, evaluate_artifact
    from vlm_factory.runtime.onnx_runtime import OnnxRuntime

    v = variant
    records = read_jsonl(synthetic_data / "eval.jsonl")[:24]
    answers = reference_answers(v.model, v.processor, records, synthetic_data)
    reference = write_reference(tmp_path / "predictions.jsonl", records, answers)
    gate = dict(fmt="onnx", tier="t",
                reference=ReferenceSide.load(records, synthetic_data, reference, v.model, v.processor,
                                             embedding_images=4),
                reference_metrics=UNINFORMATIVE_REFERENCE,
                thresholds=configured_thresholds(root, "onnx", {"precision": "fp32"}), artifact_bytes=0)
    faithful = evaluate_artifact(v.runtime, **gate)
    negated = _one_weight_negated(v.out, tmp_path / "broken")
    with OnnxRuntime(tmp_path / "broken") as runtime:
        broken = evaluate_artifact(runtime, **gate)
    print(f"{v.name}: faithful {faithful['agreement']}, {negated} negated {broken['agreement']}")
    for result in (faithful, broken):
        assert result["vqa_accuracy"] == 0.0 and not result["accuracy_informative"]
    assert faithful["passed"], faithful.get("failure_reason")
    assert faithful["agreement"]["answers"] == 1.0 and faithful["agreement"]["first_token_kl"] < 1e-6
    failing = {c["check"] for c in broken["checks"] if c["status"] == "fail"}
    assert not broken["passed"] and "first_token_kl" in failing, broken["checks"]
    assert broken["drift"] == 0.0 and broken["flip_rate"] == 0.0  # what the old, accuracy-only gate passed on
