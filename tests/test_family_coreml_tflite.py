"""Shrunk real checkpoints (tests/shrunk_models.py) through the production Core ML and TFLite exports.

litgpt style: each variant is a real model's config shrunk, with random weights, in the hub layout
(fp16 weights, preprocessor_config.json, chat_template.json), exported by `export_tflite` /
`export_coreml` (the family decides where every part lives; both decoders are
export/static_cache.py over `family.decoder_parts`) and compared with transformers:

- llava15_clip_llama: CLIP with CLS (dropped, feature layer -2), Llama with BOS, short-side resize + crop;
- llava_interleave_qwen2: SigLIP, Qwen2 with GQA 14/2, non-zero QKV bias, tied embeddings, ChatML.

TFLite runs fp32 in LiteRT (TFLiteRuntime, the parity gate's adapter). Core ML cannot predict on
Linux, so its adapter reads the packages' palettized weights back into the family's own model; the
test checks that read-back is exact and that answers stay within what 8-bit palettization explains.

The LLMs are narrowed through the builders' size arguments (Qwen2 224 wide, still 14/2 heads; Llama
128 wide): k-means palettization and two conversions per format dominate the run time, and what makes
each variant hard does not depend on the width. Random weights make small activations (image features
~0.1-0.3, logits ~1-2), so feature errors are stated relative to the features' magnitude.
"""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from measures import rel_diff
from shrunk_models import IMAGE_SIZES, VARIANTS, gradient_image
from vlm_factory.errors import UserError
from vlm_factory.eval.artifact_parity import cosine

pytestmark = [pytest.mark.family_format("llava", "coreml"), pytest.mark.family_format("llava", "tflite"),
              pytest.mark.slow]

pytest.importorskip("coremltools", reason="coremltools is not installed")
pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed")
pytest.importorskip("litert_torch", reason="litert-torch is not installed")

SIZES = {"llava15_clip_llama": {"text_hidden": 128, "text_intermediate": 256},
         "llava_interleave_qwen2": {"text_hidden": 224, "text_intermediate": 256}}
TFLITE_TIER, TFLITE_CONTEXT = "android_flagship", 4096   # the tiers' context_tokens: the models' own
COREML_TIER, COREML_CONTEXT = "iphone15pro", 2048         # max positions (512, 1024) bound them
COREML_SETTINGS = {"nbits": 8, "granularity": "per_tensor"}  # one 256-entry LUT per weight: kmeans1d-free
#                                                             per-tensor k-means is the cheapest 8-bit route
QUESTION = "What color is the circle?"
# Measured (torch 2.13, LiteRT 2.3 / litert-torch 0.10, coremltools 9.0, x86 CPU), stated per variant as
# (Llama, Qwen2). What a wrong graph or a swapped image makes, for scale: image features of two different
# images have cosine 0.2-0.8 (relative max diff > 0.6), first-token logits move 0.21-0.35 (Llama) and
# 0.036-0.054 (Qwen2, whose random LLM barely looks at the image).
DECODER_ATOL_FP16_CACHE = 5e-4  # StatefulDecoder (float16 KV cache, as Core ML holds it) vs transformers:
#                                 logits max abs diff 9.6e-6, 4.6e-5 (float16 rounding of the cached k/v)
DECODER_ATOL_FP32 = 1e-5        # FunctionalDecoder in torch: 2.4e-7, 3.6e-7 (summation order only)
PIXELS_ATOL = 1e-5              # spec preprocessing vs the HF processor: float rounding only (a one-pixel crop
#                                 shift or another resample filter makes ~1e-1)
TFLITE_FEATURES_RTOL = 1e-5     # fp32 LiteRT image features, max abs diff / max |feature|: 5.0e-7, 6.5e-7
TFLITE_LOGITS_ATOL = 1e-5       # fp32 LiteRT first-token logits: 4.1e-7, 4.8e-7
# Core ML, 8-bit per-tensor LUTs read back: weights ~N(0, 0.02) are fp16-rounded, then replaced by the nearest
# of 256 k-means centroids; the rms error is 0.6 % of each weight tensor's norm (measured, both variants).
COREML_WEIGHT_ATOL = 0.01       # max |package weight - checkpoint weight|: 0.0016 / 0.0042 (Llama LLM / CLIP),
#                                 0.0021 / 0.0038 (Qwen2 LLM / SigLIP); outliers sit between sparse centroids
COREML_FEATURE_COSINE = 0.999   # per-image cosine of image features vs transformers: 0.99994, 0.99993
COREML_LOGITS_ATOL = 0.025      # first-token logits vs transformers: <= 0.011, <= 0.0086 (~1 % of |logits| ~1,
#                                 as a 0.6 % weight error through a few layers makes); and below half of what an
#                                 image swap makes, checked per image against the other images' logits

@pytest.fixture(scope="module")
def images():
    return {aspect: gradient_image(*size, seed=i) for i, (aspect, size) in enumerate(IMAGE_SIZES.items())}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory):
    """One shrunk checkpoint (hub layout) and its reference model."""
    from vlm_factory.model.checkpoint import load_model

    root = tmp_path_factory.mktemp(request.param)
    path = VARIANTS[request.param](root / "checkpoint", layout="hub", **SIZES[request.param])
    family, model, processor = load_model(path)
    return SimpleNamespace(name=request.param, path=path, root=root, family=family, model=model, processor=processor)


@pytest.fixture(scope="module")
def tflite(checkpoint):
    from vlm_factory.export.tflite_export import export_tflite
    from vlm_factory.runtime.tflite_runtime import TFLiteRuntime

    out = checkpoint.root / "tflite"
    report = export_tflite(checkpoint.path, out, TFLITE_TIER, {"precision": "fp32"}, context_tokens=TFLITE_CONTEXT)
    with TFLiteRuntime(out) as runtime:
        yield SimpleNamespace(out=out, report=report, runtime=runtime)


@pytest.fixture(scope="module")
def coreml(checkpoint):
    from vlm_factory.export.coreml_export import export_coreml
    from vlm_factory.runtime.coreml_runtime import CoreMLRuntime

    out = checkpoint.root / "coreml"
    report = export_coreml(checkpoint.path, out, COREML_TIER, COREML_SETTINGS, check_images=2,
                           context_tokens=COREML_CONTEXT)
    with CoreMLRuntime(out) as runtime:
        yield SimpleNamespace(out=out, report=report, runtime=runtime)


def _pixels(v, image) -> torch.Tensor:
    return v.processor.image_processor([image], return_tensors="pt").pixel_values


def _prompt_ids(v) -> torch.Tensor:
    spec = v.family.prompt(v.processor)
    return torch.tensor([v.processor.tokenizer(spec.expanded(QUESTION), add_special_tokens=spec.add_special_tokens)
                         .input_ids])


@torch.no_grad()
def test_static_cache_decoders_match_transformers(checkpoint):
    """Both cache styles over the family's DecoderParts: a 5-position prefill, then two single steps."""
    from vlm_factory.export.static_cache import FunctionalDecoder, StatefulDecoder

    v = checkpoint
    parts, facts = v.family.decoder_parts(v.model), v.family.text
    embeds = torch.randn(1, 7, facts.hidden_size, generator=torch.Generator().manual_seed(0))
    want = parts.lm_head(parts.core(inputs_embeds=embeds).last_hidden_state)

    stateful = StatefulDecoder(parts, 32).eval()
    mask = torch.triu(torch.full((5, 5), float("-inf")), 1)[None, None]
    got = [stateful(embeds[:, :5], torch.arange(5, dtype=torch.int32)[None], mask)]
    got += [stateful(embeds[:, i:i + 1], torch.tensor([[i]], dtype=torch.int32), torch.zeros(1, 1, 1, i + 1))
            for i in (5, 6)]
    stateful_diff = float((torch.cat(got, 1) - want).abs().max())

    functional = FunctionalDecoder(parts, 32).eval()
    cache = torch.zeros(facts.num_layers, facts.num_kv_heads, 32, facts.head_dim)
    first = functional(embeds[:, :5], torch.arange(5, dtype=torch.int32), cache, cache)
    rest = functional(embeds[:, 5:], torch.tensor([5, 6], dtype=torch.int32), first["k_cache"], first["v_cache"])
    functional_diff = float((torch.cat([first["logits"], rest["logits"]], 1) - want).abs().max())
    print(f"{v.name}: stateful {stateful_diff:.1e}, functional {functional_diff:.1e}")
    assert stateful_diff <= DECODER_ATOL_FP16_CACHE and functional_diff <= DECODER_ATOL_FP32


def test_tflite_config_is_the_familys(checkpoint, tflite):
    from vlm_factory.runtime.prompting import prompt_from_config

    v, facts = checkpoint, checkpoint.family.text
    config = json.loads((tflite.out / "tflite_config.json").read_text())
    model = config["model"]
    assert prompt_from_config(config["prompt"], "tflite_config.json") == v.family.prompt(v.processor)
    assert model["vision"]["preprocessing"] == v.family.preprocessing(v.processor)
    assert model["vision"]["num_image_tokens"] == v.family.image_tokens == 16
    context = min(TFLITE_CONTEXT, facts.max_positions)
    assert model["decoder"]["kv_cache_shape"] == [facts.num_layers, facts.num_kv_heads, context, facts.head_dim]
    assert model["eos_token_id"] == v.processor.tokenizer.eos_token_id
    assert tflite.report["family"] == "llava"


@torch.no_grad()
def test_tflite_fp32_against_transformers(checkpoint, tflite, images):
    """Pixels, image features, first-token logits and greedy token ids, in LiteRT."""
    from vlm_factory.model.prompt import MAX_ANSWER_TOKENS

    v, runtime = checkpoint, tflite.runtime
    ids = _prompt_ids(v)
    assert runtime._prompt_ids(QUESTION).tolist() == ids[0].tolist()
    eos = v.processor.tokenizer.eos_token_id
    for aspect, image in images.items():
        pixels = _pixels(v, image)
        assert float(np.abs(runtime.pixel_values(image) - pixels.numpy()).max()) <= PIXELS_ATOL, aspect
        features = v.family.image_features(v.model, pixels)[0].numpy()
        feature_diff = rel_diff(runtime.image_embeddings(image), features)
        logits = v.model(input_ids=ids, pixel_values=pixels).logits[0, -1].numpy()
        logit_diff = float(np.abs(runtime.first_token_logits(image, QUESTION) - logits).max())
        out = v.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                               max_new_tokens=MAX_ANSWER_TOKENS, do_sample=False, eos_token_id=eos,
                               pad_token_id=v.processor.tokenizer.pad_token_id)
        expected = out[0, ids.shape[1]:].tolist()
        expected = expected[:expected.index(eos)] if eos in expected else expected
        print(f"{v.name} {aspect}: tflite features rel {feature_diff:.1e}, logits {logit_diff:.1e}")
        assert feature_diff <= TFLITE_FEATURES_RTOL and logit_diff <= TFLITE_LOGITS_ATOL, aspect
        assert runtime.answer_tokens(image, QUESTION) == expected, aspect


def test_coreml_weights_read_back_into_the_familys_model(checkpoint, coreml):
    """Every parameter of the family's model comes from the artifact: package LUT values (exactly), the
    float embedding table, converter-removed identities, or NaN for what no graph reads."""
    from vlm_factory.runtime.coreml_weights import read_package_weights

    v, runtime = checkpoint, coreml.runtime
    config = runtime.config
    params = dict(runtime.model.named_parameters())
    for role, entry in config["packages"].items():
        found = read_package_weights(coreml.out / entry["file"])
        for mil_name, torch_name in entry["weights"].items():
            value, kind = found[mil_name]
            assert np.array_equal(params[torch_name].detach().numpy(), value.reshape(params[torch_name].shape))
            if kind == "constexpr_lut_to_dense":
                assert len(np.unique(value)) <= 2 ** COREML_SETTINGS["nbits"], torch_name
        assert coreml.report["files"][role]["palettized_weights"] > 0
    errors = runtime.weight_errors(v.model)
    print(f"{v.name}: weight max abs diff {errors}")
    assert errors["embedding"] == 0.0 and max(errors.values()) <= COREML_WEIGHT_ATOL
    reference = dict(v.model.named_parameters())
    for name, fill in config["constant_parameters"].items():
        assert torch.equal(reference[name], torch.full_like(reference[name], fill)), name
    assert config["unused_parameters"] and all(torch.isnan(params[n]).all() for n in config["unused_parameters"])
    parts = v.family.decoder_parts(runtime.model)
    table = v.family.input_embeddings(runtime.model).weight
    if v.family.text.tied_embeddings:  # the device: lookups in the float table, logits from the package's LUT
        assert config["output_projection"]["tied_to"] == config["embedding"]["parameter"]
        assert parts.lm_head.weight is not table
        assert 0 < float((parts.lm_head.weight.detach() - table).abs().max()) <= COREML_WEIGHT_ATOL
    else:
        assert config["output_projection"] is None


@torch.no_grad()
def test_coreml_answers_like_transformers(checkpoint, coreml, images):
    """The family's model with the artifact's weights (the runtime) vs transformers with the checkpoint's."""
    from vlm_factory.eval.generate import answer_questions

    v, runtime = checkpoint, coreml.runtime
    assert runtime.prompt == v.family.prompt(v.processor) and coreml.report["decoder"]["max_context"] == \
        min(COREML_CONTEXT, v.family.text.max_positions)
    ids = _prompt_ids(v)
    reference = {aspect: v.model(input_ids=ids, pixel_values=_pixels(v, image)).logits[0, -1].numpy()
                 for aspect, image in images.items()}
    for aspect, image in images.items():
        pixels = _pixels(v, image)
        assert float(np.abs(runtime.pixel_values(image).numpy() - pixels.numpy()).max()) <= PIXELS_ATOL, aspect
        feature_cosine = cosine(runtime.image_embeddings(image), v.family.image_features(v.model, pixels)[0])
        logits = runtime.first_token_logits(image, QUESTION)
        diffs = {other: float(np.abs(logits - want).max()) for other, want in reference.items()}
        print(f"{v.name} {aspect}: coreml feature cosine {feature_cosine:.6f}, logits {diffs[aspect]:.1e} "
              f"(vs other images' {min(d for o, d in diffs.items() if o != aspect):.1e})")
        assert feature_cosine >= COREML_FEATURE_COSINE and diffs[aspect] <= COREML_LOGITS_ATOL, aspect
        assert all(diffs[aspect] < 0.5 * d for other, d in diffs.items() if other != aspect), aspect
    questions = [QUESTION] * len(images)
    assert runtime.answer(list(images.values()), questions) == \
        answer_questions(v.model, v.processor, list(images.values()), questions)


@pytest.mark.parametrize("fmt", ["tflite", "coreml"])
def test_a_context_too_small_for_one_image_is_refused(checkpoint, fmt, tmp_path):
    """One line naming the tier's key, its value and what one image + prompt + answer need; nothing written."""
    from vlm_factory.model.prompt import MAX_ANSWER_TOKENS

    v = checkpoint
    spec = v.family.prompt(v.processor)
    needed = len(v.processor(text=spec.render(""), images=[gradient_image(56, 56, 0)]).input_ids[0]) + MAX_ANSWER_TOKENS
    out = tmp_path / fmt
    with pytest.raises(UserError) as info:
        if fmt == "tflite":
            from vlm_factory.export.tflite_export import export_tflite

            export_tflite(v.path, out, TFLITE_TIER, {"precision": "fp32"}, context_tokens=needed - 1)
        else:
            from vlm_factory.export.coreml_export import export_coreml

            export_coreml(v.path, out, COREML_TIER, COREML_SETTINGS, context_tokens=needed - 1)
    message, tier = str(info.value), TFLITE_TIER if fmt == "tflite" else COREML_TIER
    assert "\n" not in message and f"tiers.{tier}.context_tokens" in message
    assert f"is {needed - 1}," in message and f"{needed} tokens needed" in message
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_model_shorter_than_one_image_is_refused(checkpoint, tmp_path):
    """The tier may be generous while the model's own max positions are not: the message names the model."""
    import shutil

    from vlm_factory.export.tflite_export import export_tflite

    model_dir = tmp_path / "short"
    shutil.copytree(checkpoint.path, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 20
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as info:
        export_tflite(model_dir, tmp_path / "out", TFLITE_TIER, {"precision": "fp32"}, context_tokens=TFLITE_CONTEXT)
    message = str(info.value)
    assert "\n" not in message and "max_position_embeddings 20 is too small" in message and str(model_dir) in message
    assert not (tmp_path / "out").exists()
