"""MobileVLM V2 (families/mobilevlm.py over model/mobilevlm.py) on a shrunk mtgv/MobileVLM_V2-1.7B.

The checkpoint (tests/shrunk_models.py `mobilevlm_v2_1_7b`) is written in the published layout, config.json
keys and tensor names as the hub has them, plus the two keys this project requires. It must load through
the family unchanged, compute what MobileVLM computes (checked against hand-written references, not
against our own classes), and go through the production exporters of the formats the registry says
MobileVLM supports, run in each format's runtime against transformers.

Random weights make small differences between images (the LLM barely attends to 16 of ~160 positions):
swapping one of the three test images for another moves the first-token logits by 0.034-0.049 and the
image features by 84-90 % of their magnitude (cosine 0.55-0.64; measured); every fp32 tolerance below
is hundreds of times smaller than that.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from measures import rel_diff
from shrunk_models import IMAGE_SIZES, gradient_image, mobilevlm_v2_1_7b
from vlm_factory.errors import UserError
from vlm_factory.families import FORMATS, family_for, family_of

# Every key of mtgv/MobileVLM_V2-1.7B's config.json (hub commit 302257f).
PUBLISHED_KEYS = {
    "_name_or_path", "architectures", "bos_token_id", "eos_token_id", "freeze_mm_mlp_adapter", "hidden_act",
    "hidden_size", "image_aspect_ratio", "image_grid_pinpoints", "initializer_range", "intermediate_size",
    "max_position_embeddings", "max_sequence_length", "mm_hidden_size", "mm_projector_lr", "mm_projector_type",
    "mm_use_im_patch_token", "mm_use_im_start_end", "mm_vision_select_feature", "mm_vision_select_layer",
    "mm_vision_tower", "model_type", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
    "pad_token_id", "pretraining_tp", "rms_norm_eps", "rope_scaling", "rope_theta", "tie_word_embeddings",
    "torch_dtype", "transformers_version", "tune_mm_mlp_adapter", "use_cache", "use_mm_proj",
    "vision_tower_type", "vocab_size",
}
OUR_KEYS = {"vision_config", "image_token_index"}
QUESTION = "What color is the circle?"
IMAGE_TOKENS = 16  # 112 px / patch 14 = 8x8 patches, pooled 2x2 -> 4x4
V1_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the user's questions. USER: <image>\n{question} ASSISTANT:")
# Measured (torch 2.13, onnxruntime 1.31.1, LiteRT 2.3, coremltools 9.0, x86 CPU, float32):
REFERENCE_ATOL = 1e-5    # our modules vs hand-written / transformers references: LDPv2 4.8e-7 (features up to
#                          ~4: float reassociation), tower hidden states 0.0 (the same CLIP layers, same order)
PIXELS_ATOL = 1e-5       # runtimes' PIL/numpy letterbox vs the HF processor: 2.4e-7, float rounding only (a
#                          one-pixel offset of the pasted image or another pad colour makes ~1e-1)
FEATURES_RTOL = 1e-4     # exported image features, max abs diff / max |feature|: ONNX <= 8.6e-7, TFLite <= 9.4e-7
LOGITS_ATOL = 1e-4       # exported first-token logits: ONNX <= 3.9e-7, TFLite <= 4.2e-7; an image swap: >= 0.034
COREML_WEIGHT_ATOL = 0.01     # 8-bit per-tensor LUTs read back: 0.0044 (tower + projector), 0.0015 (LLM),
#                               as for LLaVA's CLIP (0.0042): outliers sit between sparse centroids
COREML_FEATURE_COSINE = 0.999  # per-image cosine vs transformers: 0.99994-0.99996; two images' features: <= 0.64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return mobilevlm_v2_1_7b(tmp_path_factory.mktemp("mobilevlm") / "checkpoint")


@pytest.fixture(scope="module")
def loaded(checkpoint):
    family = family_of(checkpoint)
    model, processor = family.load(checkpoint)
    return SimpleNamespace(path=checkpoint, family=family, model=model, processor=processor)


@pytest.fixture(scope="module")
def images():
    return {aspect: gradient_image(*size, seed=i) for i, (aspect, size) in enumerate(IMAGE_SIZES.items())}


def _pixels(v, image) -> torch.Tensor:
    return v.processor.image_processor([image], return_tensors="pt").pixel_values


def _prompt_ids(v, question: str = QUESTION) -> torch.Tensor:
    spec = v.family.prompt(v.processor)
    return torch.tensor([v.processor.tokenizer(spec.expanded(question),
                                               add_special_tokens=spec.add_special_tokens).input_ids])


# -- the published layout ------------------------------------------------------------------------------

def test_the_published_layout_loads_unchanged(checkpoint, loaded):
    """Every tensor on disk is a parameter of the model under the same name, and every parameter is on disk."""
    from safetensors import safe_open

    from vlm_factory.model.mobilevlm import MobileVLMForCausalLM

    config = json.loads((checkpoint / "config.json").read_text())
    assert set(config) == PUBLISHED_KEYS | OUR_KEYS and config["architectures"] == ["MobileLlamaForCausalLM"]
    with safe_open(checkpoint / "model.safetensors", framework="pt") as f:
        on_disk = {name: f.get_tensor(name) for name in f.keys()}
    assert {t.dtype for t in on_disk.values()} == {torch.float16}
    assert {"model.mm_projector.mlp.mlp.0.weight", "model.mm_projector.mlp.mlp.2.bias", "model.mm_projector.peg.peg.0.weight",
            "model.vision_tower.vision_tower.vision_model.embeddings.class_embedding", "model.layers.1.mlp.down_proj.weight",
            "lm_head.weight"} <= set(on_disk)
    _, info = MobileVLMForCausalLM.from_pretrained(checkpoint, use_safetensors=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    state = loaded.model.state_dict()
    assert set(state) == set(on_disk)
    assert all(torch.equal(state[name], tensor.float()) for name, tensor in on_disk.items())


def test_checkpoint_keys_name_each_components_own_tensors(loaded):
    """The local names are the component modules' own state-dict names (what exporters map from)."""
    from safetensors import safe_open
    from transformers import CLIPVisionModel

    v = loaded
    with safe_open(v.path / "model.safetensors", framework="pt") as f:
        placed = {key: v.family.checkpoint_key(key) for key in f.keys()}
    by_component: dict[str, set[str]] = {}
    for key, where in placed.items():
        by_component.setdefault(where.component, set()).add(where.local)
    tower, projector = v.model.model.vision_tower.vision_tower.vision_model, v.model.model.mm_projector
    assert by_component["vision"] == set(tower.state_dict())
    # transformers 5's CLIPVisionModel has these names too, so the LLaVA tower name maps apply unchanged.
    assert by_component["vision"] == set(CLIPVisionModel(v.model.config.vision_config).state_dict())
    assert by_component["connector"] == set(projector.state_dict()) == {
        "mlp.mlp.0.weight", "mlp.mlp.0.bias", "mlp.mlp.2.weight", "mlp.mlp.2.bias", "peg.peg.0.weight", "peg.peg.0.bias"}
    assert by_component["llm"] == {k for k, p in placed.items() if p.component == "llm"}  # already *ForCausalLM names
    assert v.family.checkpoint_key("model.mm_projector.dwn.dwn.0.weight").component == "connector"
    assert v.family.checkpoint_key("optimizer.step") is None


def test_a_tensor_no_part_reads_is_refused(checkpoint, tmp_path):
    """A V1 projector block in a file whose config says ldpnetv2: one line, not a silently ignored tensor."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "stray"
    shutil.copytree(checkpoint, path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.mm_projector.mb_block.1.block.0.0.weight"] = torch.zeros(128, 1, 3, 3, dtype=torch.float16)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError) as info:
        family_of(path).load(path)
    message = str(info.value)
    assert "\n" not in message and "model.mm_projector.mb_block.1.block.0.0.weight" in message and "1 unexpected" in message


def test_a_resaved_checkpoint_loads_the_same(loaded, tmp_path):
    """save_checkpoint (what fine-tuning writes: transformers 5's processor_config.json) loads back identically."""
    from vlm_factory.model.checkpoint import load_model, save_checkpoint

    v = loaded
    save_checkpoint(v.model, v.processor, tmp_path / "resaved")
    family, model, processor = load_model(tmp_path / "resaved")
    assert family.prompt(processor) == v.family.prompt(v.processor)
    assert family.preprocessing(processor) == v.family.preprocessing(v.processor)
    ids = _prompt_ids(v)
    pixels = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits,
                           v.model(input_ids=ids, pixel_values=pixels).logits)


# -- what MobileVLM computes ------------------------------------------------------------------------------

@torch.no_grad()
def test_the_tower_is_transformers_clip_at_the_feature_layer(loaded, images):
    """tower_features = CLIPVisionModel's hidden_states[-2] without the CLS position (MobileVLM's 'patch')."""
    from transformers import CLIPVisionModel

    v = loaded
    clip = CLIPVisionModel(v.model.config.vision_config).eval()
    clip.load_state_dict(v.model.model.vision_tower.vision_tower.vision_model.state_dict())
    for aspect, image in images.items():
        pixels = _pixels(v, image)
        expected = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        got = v.family.tower_features(v.model, pixels)
        diff = float((got - expected).abs().max())
        print(f"{aspect}: tower vs CLIPVisionModel max abs diff {diff:.1e}")
        assert got.shape == (1, 64, 64) and diff <= REFERENCE_ATOL, aspect


def _ldpv2_by_hand(projector, features: torch.Tensor) -> torch.Tensor:
    """MobileVLM's LDPv2 written out: Linear, exact GELU, Linear; mean of each 2x2 block of the row-major
    token grid; plus a 3x3 per-channel convolution of the pooled grid (zero padding) and its bias."""
    w0, b0 = projector.mlp.mlp[0].weight, projector.mlp.mlp[0].bias
    w2, b2 = projector.mlp.mlp[2].weight, projector.mlp.mlp[2].bias
    kernel, bias = projector.peg.peg[0].weight[:, 0], projector.peg.peg[0].bias  # [channels, 3, 3]
    hidden = features @ w0.T + b0
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    hidden = hidden @ w2.T + b2
    batch, tokens, channels = hidden.shape
    side = math.isqrt(tokens)
    grid = hidden.reshape(batch, side, side, channels)
    pooled = (grid[:, 0::2, 0::2] + grid[:, 0::2, 1::2] + grid[:, 1::2, 0::2] + grid[:, 1::2, 1::2]) / 4
    half = side // 2
    padded = torch.zeros(batch, half + 2, half + 2, channels)
    padded[:, 1:-1, 1:-1] = pooled
    conv = sum(padded[:, dy:dy + half, dx:dx + half] * kernel[:, dy, dx] for dy in range(3) for dx in range(3))
    return (pooled + conv + bias).reshape(batch, half * half, channels)


@torch.no_grad()
def test_ldpv2_is_the_hand_written_projector(loaded, images):
    v = loaded
    projector = v.family.connector(v.model)
    assert v.family.connector_output_layer(v.model) is projector.mlp.mlp[2]
    for aspect, image in images.items():
        features = v.family.tower_features(v.model, _pixels(v, image))
        expected = _ldpv2_by_hand(projector, features)
        got = v.family.project(v.model, features)
        diff = float((got - expected).abs().max())
        print(f"{aspect}: LDPv2 vs hand-written max abs diff {diff:.1e} (|features| max {float(expected.abs().max()):.2f})")
        assert got.shape == (1, IMAGE_TOKENS, v.family.text.hidden_size) and diff <= REFERENCE_ATOL, aspect
    assert v.family.image_tokens == IMAGE_TOKENS == (112 // 14 // 2) ** 2


def test_param_counts_are_exact(loaded):
    v = loaded
    counts = v.family.param_counts()
    numel = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    core = v.model.model
    assert counts["vision_tower"] == numel(core.vision_tower)
    assert counts["projector"] == numel(core.mm_projector)
    assert counts["llm_embeddings"] == numel(core.embed_tokens) and counts["llm_lm_head"] == numel(v.model.lm_head)
    assert sum(counts.values()) == numel(v.model)


def test_param_counts_of_the_published_1_7b(loaded):
    """The real config (on the meta device: no memory): 144 image tokens and the count of every part."""
    from vlm_factory.model.mobilevlm import MobileVLMConfig

    published = {key: value for key, value in json.loads((loaded.path / "config.json").read_text()).items()
                 if key in PUBLISHED_KEYS}
    published.update(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                     num_key_value_heads=16, mm_hidden_size=1024, vocab_size=32001, image_token_index=32000,
                     vision_config={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                                    "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                                    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768})
    family = family_for(MobileVLMConfig(**published))
    with torch.device("meta"):
        model = family.empty_model()
    counts = family.param_counts()
    print(counts)
    assert family.image_tokens == 144 and sum(counts.values()) == sum(p.numel() for p in model.parameters())
    assert counts["projector"] == 6_316_032 and counts["vision_tower"] == 303_507_456


@torch.no_grad()
def test_generate_is_a_greedy_loop_over_the_merged_prompt(loaded, images):
    """transformers' generate (KV cache, image merged on the first step) = argmax, append, recompute everything."""
    v = loaded
    ids = _prompt_ids(v)
    assert int((ids == v.family.image_token_id).sum()) == IMAGE_TOKENS
    parts, eos = v.family.decoder_parts(v.model), v.processor.tokenizer.eos_token_id
    first_logits = {}
    for aspect, image in images.items():
        pixels = _pixels(v, image)
        generated = v.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                     max_new_tokens=8, do_sample=False, eos_token_id=eos,
                                     pad_token_id=v.processor.tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        embeds = v.family.merge_image_features(v.model, ids, v.family.image_features(v.model, pixels))
        manual: list[int] = []
        while len(manual) < 8 and eos not in manual:
            logits = parts.lm_head(parts.core(inputs_embeds=embeds).last_hidden_state)[0, -1]
            first_logits.setdefault(aspect, logits)
            manual.append(int(logits.argmax()))
            embeds = torch.cat([embeds, v.family.input_embeddings(v.model)(torch.tensor([[manual[-1]]]))], dim=1)
        print(f"{aspect}: {generated}")
        assert generated == manual, aspect
    swap = float((first_logits["tall"] - first_logits["square"]).abs().max())
    print(f"first-token logits move {swap:.3f} when the image changes")
    assert swap > 100 * LOGITS_ATOL  # the image reaches the logits


# -- processor and prompt -----------------------------------------------------------------------------------

def _expand2square(image: Image.Image, colour: tuple[int, ...]) -> Image.Image:
    """MobileVLM's pad to square: the image centred on a square of `colour` (mobilevlm/utils.py's rule)."""
    side = max(image.size)
    square = Image.new(image.mode, (side, side), colour)
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return square


def test_images_are_padded_with_the_mean_colour_as_mobilevlm_does(loaded, images):
    from transformers import CLIPImageProcessorPil

    v = loaded
    clip = CLIPImageProcessorPil.from_pretrained(v.path)
    colour = tuple(int(m * 255) for m in clip.image_mean)
    for aspect, image in images.items():
        expected = clip(_expand2square(image, colour), return_tensors="pt").pixel_values
        assert torch.equal(_pixels(v, image), expected), aspect  # measured: bit-identical
    spec = v.family.preprocessing(v.processor)
    assert spec["pad_to_square"] and spec["pad_color"] == [122, 116, 104] and spec["center_crop"] == {"height": 112,
                                                                                                     "width": 112}


def test_the_prompt_is_mobilevlms_v1_conversation(loaded, images, tmp_path):
    v = loaded
    prompt = v.family.prompt(v.processor)
    assert prompt.template == V1_PROMPT and prompt.answer == " {answer}</s>" and prompt.add_special_tokens
    assert prompt.image_token_repeat == IMAGE_TOKENS
    expanded = v.processor(text=prompt.render(QUESTION), images=[images["square"]]).input_ids[0]
    assert expanded == _prompt_ids(v)[0].tolist() and expanded[0] == v.processor.tokenizer.bos_token_id
    # The hub repositories ship no chat template: the processor then gets MobileVLM's own.
    bare = tmp_path / "no-template"
    shutil.copytree(v.path, bare)
    (bare / "chat_template.json").unlink()
    family = family_of(bare)
    assert family.prompt(family.load_processor(bare)) == prompt


def test_the_lora_pattern_targets_the_llm_only(loaded):
    names = [name for name, _ in loaded.model.named_modules() if re.fullmatch(loaded.family.llm_module_pattern, name)]
    assert len(names) == 2 * 4 and all(name.startswith("model.layers.") for name in names)


# -- refusals ----------------------------------------------------------------------------------------------

DELETE = object()


def _rewrite_config(src: Path, dst: Path, changes: dict) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("changes, needles", [
    ({"mm_projector_type": "mlp2x_gelu"}, ["mm_projector_type must be 'ldpnetv2'", "'mlp2x_gelu'"]),
    ({"mm_projector_type": "ldpnet"}, ["mm_projector_type", "V1's 'ldpnet'"]),
    ({"vision_config.image_size": 98}, ["vision_config.image_size 98", "7x7 patch grid", "even side"]),
    ({"vision_config": DELETE}, ["no vision_config", "openai/clip-vit-large-patch14-336"]),
    ({"image_token_index": DELETE}, ["no image_token_index", "-200"]),
    ({"image_token_index": 320}, ["image_token_index must be below vocab_size", "320 with 320"]),
    ({"mm_hidden_size": 1024}, ["mm_hidden_size must equal vision_config.hidden_size", "1024 and 64"]),
    ({"mm_vision_select_layer": 7}, ["mm_vision_select_layer must index", "-4..3"]),
    ({"mm_vision_select_feature": "cls_patch"}, ["mm_vision_select_feature must be 'patch'"]),
    ({"mm_use_im_start_end": True}, ["mm_use_im_start_end must be false"]),
    ({"vision_config.model_type": "siglip_vision_model"}, ["vision_config.model_type", "clip_vision_model"]),
    ({"image_aspect_ratio": "anyres"}, ["image_aspect_ratio", "'pad'"]),
    ({"num_attention_heads": 3}, ["hidden_size must be a multiple of num_attention_heads"]),
    ({"vision_config.patch_size": 0}, ["vision_config.patch_size must be"]),
])
def test_bad_configs_are_refused_in_one_line(checkpoint, tmp_path, changes, needles):
    path = _rewrite_config(checkpoint, tmp_path / "m", changes)
    with pytest.raises(UserError) as info:
        family_of(path)
    message = str(info.value)
    assert "\n" not in message and str(path / "config.json") in message, message
    for needle in needles:
        assert needle in message, message


def test_a_config_made_in_code_without_a_tower_is_refused(loaded):
    from vlm_factory.model.mobilevlm import MobileVLMConfig

    with pytest.raises(UserError, match=r"^config.json: no vision_config: "):
        family_for(MobileVLMConfig(image_token_index=5))


@pytest.mark.parametrize("case, needles", [
    ("image token id", ["'<image>' token is not id 3", "image_token_index"]),
    ("no image processor", ["preprocessor_config.json", "copy in the vision tower's"]),
])
def test_processor_files_that_do_not_fit_are_refused(checkpoint, tmp_path, case, needles):
    if case == "image token id":  # a real token, but not <image>: the features would replace </s>-like ids
        path = _rewrite_config(checkpoint, tmp_path / "m", {"image_token_index": 3})
    else:
        path = tmp_path / "m"
        shutil.copytree(checkpoint, path)
        (path / "preprocessor_config.json").unlink()
    with pytest.raises(UserError) as info:
        family_of(path).load_processor(path)
    message = str(info.value)
    assert "\n" not in message and all(needle in message for needle in needles), message


def test_gguf_is_refused_for_a_grid_llama_cpp_cannot_run_before_work(loaded, tmp_path):
    """GGUF is supported for the published 24x24 grid only (test_family_gguf_mobilevlm.py): this 8x8 tower
    is refused in one line, before any file is written."""
    from vlm_factory.export.targets import export_target

    family = loaded.family
    for fmt in FORMATS:
        if fmt != "gguf":
            family.require_format(fmt)
    with pytest.raises(UserError) as info:
        family.require_format("gguf")
    message = str(info.value)
    assert "\n" not in message and "model family 'mobilevlm' (clip + ldpv2 + llama) cannot be exported to gguf" in message
    assert "ldpv2 graph reshapes a 24x24 patch grid, this tower makes 8x8" in message
    assert message.endswith("supported here: onnx, coreml, tflite")
    assert family.known_issue("gguf") and family.known_issue("onnx") is None
    with pytest.raises(UserError, match="cannot be exported to gguf"):
        export_target("gguf", model_dir=loaded.path, out_dir=tmp_path / "out", tier="t", settings={},
                      data_dir=tmp_path, export_cfg=None, context_tokens=256)
    assert not (tmp_path / "out").exists()


# -- exports, run in each format's runtime ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_export(loaded):
    from vlm_factory.export.onnx_graphs import export_onnx_fp32
    from vlm_factory.runtime.onnx_runtime import OnnxRuntime

    out = loaded.path.parent / "onnx-fp32"
    report = export_onnx_fp32(loaded.path, out)
    with OnnxRuntime(out) as runtime:
        yield SimpleNamespace(out=out, report=report, runtime=runtime)


@pytest.fixture(scope="module")
def tflite_export(loaded):
    from vlm_factory.export.tflite_export import export_tflite
    from vlm_factory.runtime.tflite_runtime import TFLiteRuntime

    out = loaded.path.parent / "tflite"
    report = export_tflite(loaded.path, out, "android_flagship", {"precision": "fp32"}, context_tokens=512)
    with TFLiteRuntime(out) as runtime:
        yield SimpleNamespace(out=out, report=report, runtime=runtime)


@torch.no_grad()
def _runtime_matches_transformers(v, runtime, images) -> None:
    """Pixels (letterboxed by the runtime from the exported spec), image features, first-token logits and
    greedy token ids of an fp32 export against transformers."""
    from vlm_factory.model.prompt import MAX_ANSWER_TOKENS

    ids = _prompt_ids(v)
    assert np.asarray(runtime._prompt_ids(QUESTION)).reshape(-1).tolist() == ids[0].tolist()
    eos = v.processor.tokenizer.eos_token_id
    for aspect, image in images.items():
        pixels = _pixels(v, image)
        pixel_diff = float(np.abs(np.asarray(runtime.pixel_values(image)) - pixels.numpy()).max())
        feature_diff = rel_diff(runtime.image_embeddings(image), v.family.image_features(v.model, pixels)[0])
        logits = v.model(input_ids=ids, pixel_values=pixels).logits[0, -1].numpy()
        logit_diff = float(np.abs(runtime.first_token_logits(image, QUESTION) - logits).max())
        print(f"{aspect}: pixels {pixel_diff:.1e}, features rel {feature_diff:.1e}, logits {logit_diff:.1e}")
        assert pixel_diff <= PIXELS_ATOL and feature_diff <= FEATURES_RTOL and logit_diff <= LOGITS_ATOL, aspect
        out = v.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                               max_new_tokens=MAX_ANSWER_TOKENS, do_sample=False, eos_token_id=eos,
                               pad_token_id=v.processor.tokenizer.pad_token_id)
        expected = out[0, ids.shape[1]:].tolist()
        assert runtime.answer_tokens(image, QUESTION) == (expected[:expected.index(eos)] if eos in expected
                                                          else expected), aspect


@pytest.mark.family_format("mobilevlm", "onnx")
def test_onnx_export_runs_like_transformers(loaded, onnx_export, images):
    v = loaded
    config = json.loads((onnx_export.out / "onnx_config.json").read_text())["model"]
    assert onnx_export.report["family"] == "mobilevlm" and config["image_token_id"] == v.family.image_token_id
    assert config["vision"]["num_image_tokens"] == IMAGE_TOKENS
    assert config["vision"]["preprocessing"] == v.family.preprocessing(v.processor)
    _runtime_matches_transformers(v, onnx_export.runtime, images)


@pytest.mark.slow
@pytest.mark.family_format("mobilevlm", "tflite")
def test_tflite_export_runs_like_transformers(loaded, tflite_export, images):
    v = loaded
    config = json.loads((tflite_export.out / "tflite_config.json").read_text())["model"]
    assert config["vision"]["num_image_tokens"] == IMAGE_TOKENS
    assert config["vision"]["preprocessing"] == v.family.preprocessing(v.processor)
    _runtime_matches_transformers(v, tflite_export.runtime, images)


@pytest.mark.slow
@pytest.mark.family_format("mobilevlm", "coreml")
@torch.no_grad()
def test_coreml_export_reads_back_and_answers_like_transformers(loaded, images):
    """Core ML cannot predict on Linux: the runtime reads the packages' palettized weights back into the
    family's model. 8-bit per-tensor LUTs: weights within what k-means explains, features nearly exact."""
    from vlm_factory.eval.generate import answer_questions
    from vlm_factory.export.coreml_export import export_coreml
    from vlm_factory.runtime.coreml_runtime import CoreMLRuntime

    v = loaded
    out = v.path.parent / "coreml"
    report = export_coreml(v.path, out, "iphone15pro", {"nbits": 8, "granularity": "per_tensor"}, check_images=2,
                           context_tokens=512)
    assert report["family"] == "mobilevlm"
    with CoreMLRuntime(out) as runtime:
        errors = runtime.weight_errors(v.model)
        print(f"weight max abs diff {errors}")
        assert errors["embedding"] == 0.0 and max(errors.values()) <= COREML_WEIGHT_ATOL
        assert runtime.prompt == v.family.prompt(v.processor)
        for aspect, image in images.items():
            pixels = _pixels(v, image)
            got = np.asarray(runtime.image_embeddings(image), np.float64).ravel()
            want = v.family.image_features(v.model, pixels)[0].numpy().astype(np.float64).ravel()
            cosine = float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want)))
            print(f"{aspect}: coreml feature cosine {cosine:.7f}")
            assert cosine >= COREML_FEATURE_COSINE, aspect
        questions = [QUESTION] * len(images)
        assert runtime.answer(list(images.values()), questions) == \
            answer_questions(v.model, v.processor, list(images.values()), questions)
