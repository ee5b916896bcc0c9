"""A shrunk SmolVLM-256M-Instruct (tests/shrunk_models.py) through the production ONNX, TFLite and Core ML exports.

What the Idefics3 family adds over LLaVA is the image tiling: one image becomes `rows x cols` tiles plus a
global view, each view gives the LLM its own block of image tokens between marker tokens, and the number
of views depends on the image's shape. Each adapter (OnnxRuntime, TFLiteRuntime, CoreMLRuntime) splits the
image from the exported spec alone, runs the vision model on every view (ONNX: one batch; TFLite and
Core ML: one view per call), concatenates the features view by view and expands the prompt for the grid;
the reference is transformers' Idefics3ForConditionalGeneration fed by the processor's own inputs
(`processor(text=..., images=[[image]])`): its pixels, its `get_image_features`, its logits, its `generate`.

The test images (shrunk_models.IMAGE_SIZES) are enlarged to the 512 px longest edge: the square one
becomes 4x4 tiles + the global view (17 views, the most any image makes), the tall one 4x2 + 1 and the
wide one 2x4 + 1, so the grid's orientation is checked in both directions.

Feature errors are stated relative to the features' magnitude. The LLM is narrowed (36 wide, still 9 query /
3 KV heads, tied embeddings): conversion time, not what the tiling does, depends on its width; and its
projections are scaled up (`_sharpen`) so that greedy answers depend on the image and on every decode step.
"""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from measures import rel_diff
from shrunk_models import IMAGE_SIZES, gradient_image, smolvlm_256m
from vlm_factory.errors import UserError
from vlm_factory.eval.artifact_parity import cosine
from vlm_factory.model.prompt import MAX_ANSWER_TOKENS

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

ONNX = pytest.mark.family_format("idefics3", "onnx")
TFLITE = pytest.mark.family_format("idefics3", "tflite")
COREML = pytest.mark.family_format("idefics3", "coreml")

SIZE = {"text_hidden": 36, "text_intermediate": 64}
QUESTION = "What color is the circle?"
VIEWS = {"square": (4, 4), "tall": (4, 2), "wide": (2, 4)}  # (rows, cols) the processor cuts each image into
TFLITE_TIER, COREML_TIER = "android_flagship", "iphone15pro"
CONTEXT = 512  # the tiers' context_tokens, shortened (the model has 2048 positions): one image needs ~130
COREML_SETTINGS = {"nbits": 8, "granularity": "per_tensor"}
# Measured (torch 2.13, onnxruntime 1.31, LiteRT 2.3 / litert-torch 0.10, coremltools 9.0, x86 CPU), on the
# sharpened checkpoint (`_sharpen`: image features up to ~10, first-token logits up to ~0.4). For scale, what
# a wrong graph or a wrong tiling makes: the square image's 4x4 tiles taken column by column change its
# features by 91 % of their magnitude (cosine 0.63) and its first-token logits by 0.17; the global view
# first, 123 % (cosine 0.0); another image moves the logits by 0.22-0.60.
PIXELS_ATOL = 0.0               # the adapters' tiles vs the processor's: bit-exact (runtime/tiling.py replays
#                                 the processor's PIL resizes and float32 arithmetic); a one-pixel shift or
#                                 another filter makes ~1e-1
FEATURES_RTOL = 1e-5            # fp32 image features, max abs diff / max |feature|: ONNX <= 6.0e-7 (one batch
#                                 of all views), LiteRT <= 1.0e-6 (one view per call)
LOGITS_ATOL = 1e-5              # fp32 first-token logits: ONNX <= 5.9e-7, LiteRT <= 5.6e-7
COREML_FEATURE_COSINE = 0.9995  # 8-bit palettized weights read back, cosine of all views' features: >= 0.99996
COREML_LOGITS_ATOL = 0.05       # first-token logits: <= 0.015 (the 8-bit LLM weights, scaled x16 here); also
#                                 checked below a quarter of what another image makes (measured <= 7 % of it)


@pytest.fixture(scope="module")
def images():
    return {aspect: gradient_image(*size, seed=i) for i, (aspect, size) in enumerate(IMAGE_SIZES.items())}


def _sharpen(path) -> None:
    """Scale the LLM layers' projections x16 and the connector x4 in the checkpoint file.

    At the builders' N(0, 0.02) the tied LLM's residual stream stays its input embedding: every greedy
    answer repeats the prompt's last token for every image, which would pass whatever the KV cache or the
    image features did. Scaled, the answers differ per image and per step (measured: 21 distinct tokens
    in the 3 x 8 answer tokens; checked in test_onnx_matches_transformers), so the decode loop after a chunked prefill is checked too."""
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(file)
    for name, tensor in tensors.items():
        if name.startswith("model.text_model.layers.") and name.endswith("_proj.weight"):
            tensors[name] = tensor * 16
        elif name.startswith("model.connector."):
            tensors[name] = tensor * 4
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def smolvlm(tmp_path_factory):
    """The shrunk checkpoint (hub layout), sharpened, and its reference model."""
    from vlm_factory.model.checkpoint import load_model

    root = tmp_path_factory.mktemp("smolvlm")
    path = smolvlm_256m(root / "checkpoint", layout="hub", **SIZE)
    _sharpen(path)
    family, model, processor = load_model(path)
    return SimpleNamespace(path=path, root=root, family=family, model=model, processor=processor)


@pytest.fixture(scope="module")
@torch.no_grad()
def reference(smolvlm, images):
    """Per image, what transformers makes of the processor's own inputs: pixels [views, 3, H, W], image
    features [views * tokens, hidden], prompt ids, first-token logits and the greedy answer's token ids."""
    v = smolvlm
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = v.processor.apply_chat_template(messages, add_generation_prompt=True)
    tokenizer = v.processor.tokenizer
    result = {}
    for aspect, image in images.items():
        inputs = v.processor(text=[text], images=[[image]], return_tensors="pt")
        features = v.model.model.get_image_features(pixel_values=inputs.pixel_values).pooler_output[0]
        ids = inputs.input_ids
        out = v.model.generate(**inputs, max_new_tokens=MAX_ANSWER_TOKENS, do_sample=False,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        answer = out[0, ids.shape[1]:].tolist()
        answer = answer[:answer.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in answer else answer
        result[aspect] = SimpleNamespace(text=text, pixels=inputs.pixel_values[0].numpy(), features=features.numpy(),
                                         ids=ids[0].tolist(), logits=v.model(**inputs).logits[0, -1].numpy(),
                                         answer=answer)
    return result


@pytest.fixture(scope="module")
def onnx(smolvlm):
    pytest.importorskip("onnxscript", reason="the onnx extra is not installed")
    from vlm_factory.export.onnx_graphs import export_onnx_fp32
    from vlm_factory.runtime.onnx_runtime import OnnxRuntime

    out = smolvlm.root / "onnx-fp32"
    report = export_onnx_fp32(smolvlm.path, out)
    with OnnxRuntime(out) as runtime:
        yield SimpleNamespace(out=out, report=report, runtime=runtime,
                              config=json.loads((out / "onnx_config.json").read_text()))


@pytest.fixture(scope="module")
def tflite(smolvlm):
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed")
    pytest.importorskip("litert_torch", reason="litert-torch is not installed")
    from vlm_factory.export.tflite_export import export_tflite
    from vlm_factory.runtime.tflite_runtime import TFLiteRuntime

    out = smolvlm.root / "tflite"
    report = export_tflite(smolvlm.path, out, TFLITE_TIER, {"precision": "fp32"}, context_tokens=CONTEXT)
    with TFLiteRuntime(out) as runtime:
        yield SimpleNamespace(out=out, report=report, runtime=runtime,
                              config=json.loads((out / "tflite_config.json").read_text()))


@pytest.fixture(scope="module")
def coreml(smolvlm):
    pytest.importorskip("coremltools", reason="coremltools is not installed")
    from vlm_factory.export.coreml_export import export_coreml
    from vlm_factory.runtime.coreml_runtime import CoreMLRuntime

    out = smolvlm.root / "coreml"
    report = export_coreml(smolvlm.path, out, COREML_TIER, COREML_SETTINGS, check_images=2, context_tokens=CONTEXT)
    with CoreMLRuntime(out) as runtime:
        yield SimpleNamespace(out=out, report=report, runtime=runtime,
                              config=json.loads((out / "coreml_config.json").read_text()))


def _largest_prompt(v) -> int:
    """Tokens of the processor's prompt for the largest image (4x4 tiles + the global view), empty question."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ""}]}]
    text = v.processor.apply_chat_template(messages, add_generation_prompt=True)
    return len(v.processor(text=[text], images=[[gradient_image(512, 512, 0)]]).input_ids[0])


def _check_config(v, prompt: dict, vision: dict, tokens: int) -> None:
    """The runtime config carries the family's tiling spec and tiled prompt, and counts tokens per view."""
    from vlm_factory.runtime.prompting import prompt_from_config

    assert vision["preprocessing"] == v.family.preprocessing(v.processor)
    assert vision["preprocessing"]["kind"] == "idefics3_tiling" and vision["image_size"] == [128, 128]
    spec = prompt_from_config(prompt, "runtime config")
    assert spec == v.family.prompt(v.processor) and spec.image_layout["kind"] == "idefics3_prompt"
    assert tokens == v.family.image_tokens == spec.image_token_repeat == 4


def _check_adapter(runtime, reference, images, hidden: int, *, features_ok, logits_ok) -> None:
    """Tiles, image features (all views, in order) and first-token logits of every image, as the reference
    makes them."""
    for aspect, image in images.items():
        want = reference[aspect]
        rows, cols = VIEWS[aspect]
        pixels = np.asarray(runtime.pixel_values(image))
        assert pixels.shape == want.pixels.shape == (rows * cols + 1, 3, 128, 128), aspect
        assert float(np.abs(pixels - want.pixels).max()) <= PIXELS_ATOL, aspect
        features = runtime.image_embeddings(image)
        assert features.shape == want.features.shape == ((rows * cols + 1) * 4, hidden), aspect
        assert features_ok(aspect, features, want.features), aspect
        logits = runtime.first_token_logits(image, QUESTION)
        assert logits_ok(aspect, logits, want.logits), aspect


def _fp32_features(name):
    def ok(aspect, actual, expected):
        diff = rel_diff(actual, expected)
        print(f"{name} {aspect}: features rel max diff {diff:.1e}")
        return diff <= FEATURES_RTOL
    return ok


def _fp32_logits(name):
    def ok(aspect, actual, expected):
        diff = float(np.abs(actual - expected).max())
        print(f"{name} {aspect}: first-token logits max abs diff {diff:.1e}")
        return diff <= LOGITS_ATOL
    return ok


# -- the tower as exporters trace it ------------------------------------------------------------------------

@TFLITE
@COREML
@torch.no_grad()
def test_tower_features_are_transformers_own(smolvlm):
    """The family's tower (patch positions computed once, so LiteRT and Core ML need no bucketize) is
    transformers' forward: the same position ids for every tile size, the same features bit for bit."""
    from transformers import Idefics3VisionConfig
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionEmbeddings

    from vlm_factory.families.idefics3 import tile_position_ids

    for side in range(1, 65):  # transformers' float bucketing is not 0..N-1 for 19, 25, 29, 31, ... per side
        embeddings = Idefics3VisionEmbeddings(Idefics3VisionConfig(hidden_size=1, image_size=2 * side, patch_size=2))
        embeddings.patch_embedding.weight.zero_()
        embeddings.patch_embedding.bias.zero_()
        embeddings.position_embedding.weight.copy_(torch.arange(side * side, dtype=torch.float32)[:, None])
        placed = embeddings(torch.zeros(1, 3, 2 * side, 2 * side), torch.ones(1, side, side, dtype=torch.bool))
        assert torch.equal(placed[0, :, 0].long(), tile_position_ids(side)), side
    v = smolvlm
    pixels = torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    assert torch.equal(v.family.tower_features(v.model, pixels),
                       v.model.model.vision_model(pixel_values=pixels).last_hidden_state)


# -- ONNX ------------------------------------------------------------------------------------------------

@ONNX
def test_onnx_config_holds_the_tiling(smolvlm, onnx):
    model = onnx.config["model"]
    _check_config(smolvlm, onnx.config["prompt"], model["vision"], model["vision"]["num_image_tokens"])
    assert "one block per view" in onnx.config["prompt"]["note"] and onnx.report["family"] == "idefics3"


@ONNX
@torch.no_grad()
def test_onnx_matches_transformers(smolvlm, onnx, reference, images):
    """Tiles, features (all views in one vision.onnx batch), first-token logits, greedy token ids."""
    runtime = onnx.runtime
    answers = [ref.answer for ref in reference.values()]  # not one token repeated: see _sharpen
    assert len({tuple(a) for a in answers}) == 3 and len({t for a in answers for t in a}) > MAX_ANSWER_TOKENS
    for aspect, image in images.items():
        rows, cols = VIEWS[aspect]
        assert runtime._prompt_ids(QUESTION, rows, cols)[0].tolist() == reference[aspect].ids, aspect
    _check_adapter(runtime, reference, images, smolvlm.family.text.hidden_size, features_ok=_fp32_features("onnx"),
                   logits_ok=_fp32_logits("onnx"))
    for aspect, image in images.items():
        assert runtime.answer_tokens(image, QUESTION) == reference[aspect].answer, aspect


@ONNX
def test_onnx_int8_calibrates_on_every_view(tmp_path, images):
    """INT8 calibration preprocesses as the adapter does: every tile and the global view of each image."""
    from vlm_factory.export.onnx_quantize import calibration_pixels
    from vlm_factory.runtime.tiling import split_image

    spec = {"kind": "idefics3_tiling", "convert_rgb": True, "resize_longest_edge": 512, "max_resolution": 4096,
            "resample": "lanczos", "split": True, "tile_size": 128, "rescale_factor": 1 / 255,
            "mean": [0.5] * 3, "std": [0.5] * 3, "pad_batch": True, "layout": "NCHW", "dtype": "float32"}
    records = []
    for aspect, image in images.items():
        image.save(tmp_path / f"{aspect}.png")
        records += [SimpleNamespace(image=f"{aspect}.png")] * 2  # two questions per image: each image once
    pixels, counts = calibration_pixels(records, tmp_path, spec, 8)
    assert counts == [rows * cols + 1 for rows, cols in VIEWS.values()] and len(pixels) == sum(counts) == 35
    from PIL import Image

    expected = np.concatenate([split_image(Image.open(tmp_path / f"{aspect}.png"), spec)[0] for aspect in VIEWS])
    assert np.array_equal(pixels, expected)


# -- TFLite ----------------------------------------------------------------------------------------------

@pytest.mark.slow  # a conversion in the module's fixture
@TFLITE
def test_tflite_config_holds_the_tiling_and_the_largest_image(smolvlm, tflite):
    model = tflite.config["model"]
    _check_config(smolvlm, tflite.config["prompt"], model["vision"], model["vision"]["num_image_tokens"])
    facts = smolvlm.family.text
    assert model["decoder"]["kv_cache_shape"] == [facts.num_layers, facts.num_kv_heads, CONTEXT, facts.head_dim]
    assert CONTEXT >= _largest_prompt(smolvlm) + MAX_ANSWER_TOKENS > model["decoder"]["prefill_length"]


@pytest.mark.slow  # a conversion in the module's fixture
@TFLITE
@torch.no_grad()
def test_tflite_matches_transformers(smolvlm, tflite, reference, images):
    """Tiles, features (vision.tflite once per view), logits, greedy ids; the prompt is prefilled in chunks."""
    runtime = tflite.runtime
    for aspect, image in images.items():
        rows, cols = VIEWS[aspect]
        assert runtime._prompt_ids(QUESTION, rows, cols).tolist() == reference[aspect].ids, aspect
    _check_adapter(runtime, reference, images, smolvlm.family.text.hidden_size,
                   features_ok=_fp32_features("tflite"), logits_ok=_fp32_logits("tflite"))
    for aspect, image in images.items():
        assert runtime.answer_tokens(image, QUESTION) == reference[aspect].answer, aspect


@pytest.mark.parametrize("fmt", [pytest.param("tflite", marks=TFLITE), pytest.param("coreml", marks=COREML)])
def test_a_context_too_small_for_the_largest_image_is_refused(smolvlm, fmt, tmp_path):
    """The static cache must hold the most views any image makes (4x4 tiles + global), not one view."""
    needed = _largest_prompt(smolvlm) + MAX_ANSWER_TOKENS
    out = tmp_path / fmt
    with pytest.raises(UserError) as info:
        if fmt == "tflite":
            from vlm_factory.export.tflite_export import export_tflite

            export_tflite(smolvlm.path, out, TFLITE_TIER, {"precision": "fp32"}, context_tokens=needed - 1)
        else:
            pytest.importorskip("coremltools", reason="coremltools is not installed")
            from vlm_factory.export.coreml_export import export_coreml

            export_coreml(smolvlm.path, out, COREML_TIER, COREML_SETTINGS, context_tokens=needed - 1)
    message = str(info.value)
    assert f"{needed} tokens needed ({17 * 4} visual + " in message and f"is {needed - 1}," in message
    assert not out.exists()


# -- Core ML ---------------------------------------------------------------------------------------------

@pytest.mark.slow  # a conversion in the module's fixture
@COREML
def test_coreml_config_holds_the_tiling(smolvlm, coreml):
    config = coreml.config
    _check_config(smolvlm, config["prompt"], config["vision"], config["image_tokens"])
    assert config["max_context"] == CONTEXT and "one view per call" in config["preprocessing_text"]
    assert "128x128 tiles" in config["preprocessing_text"]


@pytest.mark.slow  # a conversion in the module's fixture
@COREML
@torch.no_grad()
def test_coreml_matches_transformers(smolvlm, coreml, reference, images):
    """The family's model with the packages' palettized weights: tiles, features (one view per call),
    logits within what 8-bit weights explain, and greedy answers."""

    def features_ok(aspect, actual, expected):
        feature_cosine = cosine(actual, expected)
        print(f"coreml {aspect}: features cosine {feature_cosine:.6f}")
        return feature_cosine >= COREML_FEATURE_COSINE

    def logits_ok(aspect, actual, expected):
        diffs = {other: float(np.abs(actual - ref.logits).max()) for other, ref in reference.items()}
        print(f"coreml {aspect}: logits {diffs[aspect]:.1e} (vs other images' "
              f"{min(d for o, d in diffs.items() if o != aspect):.1e})")
        return diffs[aspect] <= COREML_LOGITS_ATOL and all(diffs[aspect] < 0.25 * d for o, d in diffs.items()
                                                           if o != aspect)

    runtime = coreml.runtime
    _check_adapter(runtime, reference, images, smolvlm.family.text.hidden_size, features_ok=features_ok,
                   logits_ok=logits_ok)
    # Answers: the runtime's own pipeline (eval/generate.py with the export's processor) on the artifact's
    # weights equals transformers' generate fed by the processor on those weights. (Not the checkpoint's
    # answers: 8-bit weights scaled x16 move the logits by up to 0.015, more than some greedy margins.)
    tokenizer, questions = runtime.processor.tokenizer, [QUESTION] * len(images)
    expected = []
    for aspect, image in images.items():
        inputs = smolvlm.processor(text=[reference[aspect].text], images=[[image]], return_tensors="pt")
        assert inputs.input_ids[0].tolist() == reference[aspect].ids
        out = runtime.model.generate(**inputs, max_new_tokens=MAX_ANSWER_TOKENS, do_sample=False,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        expected.append(tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True).strip())
    assert runtime.answer(list(images.values()), questions) == expected
