"""The llama.cpp packaging: LLM + mmproj GGUF files as llama.cpp reads them, and answers in llama.cpp itself."""

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BUNDLED_BASE
from vlm_factory.errors import UserError
from vlm_factory.export.gguf_llm import permute_rotary, write_llm_gguf
from vlm_factory.export.gguf_mmproj import write_mmproj_gguf
from vlm_factory.runtime.gguf_check import open_gguf

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed")
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python (the gguf extra) is not installed")


def _field(reader, key):
    field = reader.fields[key]
    return field.parts[field.data[0]]


@pytest.fixture(scope="module")
def llm_f32(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "llm-f32.gguf"
    write_llm_gguf(BUNDLED_BASE, path, "F32")
    return path


@pytest.fixture(scope="module")
def mmproj(tmp_path_factory):
    path = tmp_path_factory.mktemp("mmproj") / "mmproj-f32.gguf"
    write_mmproj_gguf(BUNDLED_BASE, path)
    return path


def test_rotary_permutation_matches_llama_cpp_pairing():
    # Two heads of head_dim 4: HF keeps halves [x0 x1 | y0 y1], llama.cpp pairs them (x0 y0 x1 y1).
    weight = np.arange(8, dtype=np.float32).reshape(8, 1)
    assert permute_rotary(weight, n_head=2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_metadata_tensors_and_tokenizer(llm_f32):
    from safetensors import safe_open
    from transformers import LlavaConfig

    config = LlavaConfig.from_pretrained(BUNDLED_BASE).text_config
    reader = gguf.GGUFReader(str(llm_f32))
    assert bytes(_field(reader, "general.architecture")).decode() == "llama"
    assert int(_field(reader, "llama.block_count")[0]) == config.num_hidden_layers
    assert int(_field(reader, "llama.embedding_length")[0]) == config.hidden_size
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == config.vocab_size
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 9 * config.num_hidden_layers  # token_embd, output_norm, output + 9 per block
    with safe_open(BUNDLED_BASE / "model.safetensors", framework="np") as f:
        q = f.get_tensor("language_model.model.layers.0.self_attn.q_proj.weight")
        down = f.get_tensor("language_model.model.layers.1.mlp.down_proj.weight")
    stored_q = np.asarray(tensors["blk.0.attn_q.weight"].data).reshape(q.shape)
    assert np.array_equal(stored_q, permute_rotary(q, config.num_attention_heads))
    assert np.array_equal(np.asarray(tensors["blk.1.ffn_down.weight"].data).reshape(down.shape), down)


def test_bundled_base_prompt_is_unchanged():
    """The prompt llama.cpp answers comes from the export (the family's, from the chat template):
    for the bundled base it is, bit for bit, the template it was trained with."""
    from vlm_factory.families import family_of
    from vlm_factory.model.prompt import IMAGE_TOKEN, user_prompt

    family = family_of(BUNDLED_BASE)
    spec = family.prompt(family.load_processor(BUNDLED_BASE))
    question = " What color is the circle? "
    assert spec.render(question) == user_prompt(question)
    assert spec.image_token == IMAGE_TOKEN and spec.add_special_tokens


def test_unsupported_file_type_is_refused(tmp_path):
    with pytest.raises(UserError, match="F32 or F16"):
        write_llm_gguf(BUNDLED_BASE, tmp_path / "x.gguf", "Q4_K_M")
    assert not (tmp_path / "x.gguf").exists()


@needs_llama_cpp
def test_llama_cpp_logits_match_transformers(llm_f32):
    from llama_cpp import Llama

    from vlm_factory.model.checkpoint import load_checkpoint

    model, processor = load_checkpoint(BUNDLED_BASE)
    ids = processor.tokenizer("USER: What color is the circle? ASSISTANT:").input_ids
    with torch.no_grad():
        expected = model.model.language_model(input_ids=torch.tensor([ids])).last_hidden_state
        expected = model.lm_head(expected)[0, -1].numpy()
    # An F32 KV cache: llama.cpp's default F16 cache alone moves log-probs by ~5e-3.
    llm = Llama(model_path=str(llm_f32), n_ctx=128, logits_all=True, verbose=False, type_k=0, type_v=0)
    assert llm.tokenize(b"USER: What color is the circle? ASSISTANT:", add_bos=True, special=True) == ids
    llm.eval(ids)
    actual = np.asarray(llm.scores[len(ids) - 1], dtype=np.float64)
    # Compare log-probabilities: a constant shift of the logits is invisible to sampling.
    log_probs = actual - np.logaddexp.reduce(actual)
    expected_log_probs = expected - np.logaddexp.reduce(expected.astype(np.float64))
    np.testing.assert_allclose(log_probs, expected_log_probs, atol=1e-4, rtol=0)
    assert actual.argmax() == expected.argmax()


def test_mmproj_keys_and_tensors(mmproj):
    from transformers import LlavaConfig

    config = LlavaConfig.from_pretrained(BUNDLED_BASE)
    reader = gguf.GGUFReader(str(mmproj))
    assert bytes(_field(reader, "general.type")).decode() == "mmproj"
    assert bytes(_field(reader, "clip.projector_type")).decode() == "mlp"
    assert int(_field(reader, "clip.vision.image_size")[0]) == config.vision_config.image_size
    assert int(_field(reader, "clip.vision.projection_dim")[0]) == config.text_config.hidden_size
    mean = [float(reader.fields["clip.vision.image_mean"].parts[i][0]) for i in reader.fields["clip.vision.image_mean"].data]
    assert mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    names = {t.name for t in reader.tensors}
    assert {"mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias", "v.patch_embd.weight"} <= names
    assert not any("post_ln" in n for n in names)  # LLaVA reads the tower before its post-layernorm
    # ...at its last block (vision_feature_layer=-1), which clip.cpp only runs when told so.
    assert [int(v) for v in _field(reader, "clip.vision.feature_layer")] == [config.vision_config.num_hidden_layers]


def test_unsupported_checkpoints_are_refused(tmp_path, random_checkpoint):
    import json
    import shutil

    def variant(name, edit):
        copy = tmp_path / name
        shutil.copytree(random_checkpoint, copy)
        config = json.loads((copy / "config.json").read_text())
        edit(config)
        (copy / "config.json").write_text(json.dumps(config))
        return copy

    mistral = variant("mistral", lambda c: c["text_config"].update(model_type="mistral"))
    with pytest.raises(UserError, match="cannot be exported to gguf: LLM 'mistral'"):
        write_llm_gguf(mistral, tmp_path / "llm.gguf")
    two_layers = variant("layers", lambda c: c.update(vision_feature_layer=[-2, -1]))
    with pytest.raises(UserError, match="one layer index is supported, not a list"):
        write_mmproj_gguf(two_layers, tmp_path / "mmproj.gguf")
    # llama.cpp drops the first position exactly when the tower has a class token: SigLIP has none.
    drop_first = variant("strategy", lambda c: c.update(vision_feature_select_strategy="default",
                                                        image_seq_length=c["image_seq_length"] - 1))
    with pytest.raises(UserError, match="drops the first position of a siglip tower without a class token"):
        write_mmproj_gguf(drop_first, tmp_path / "mmproj.gguf")
    silu = variant("silu", lambda c: c["vision_config"].update(hidden_act="silu"))
    with pytest.raises(UserError, match="activation 'silu'"):
        write_mmproj_gguf(silu, tmp_path / "mmproj.gguf")
    assert not list(tmp_path.glob("*.gguf"))


def test_truncated_or_swapped_gguf_is_a_clear_error(tmp_path, llm_f32, mmproj):
    truncated = tmp_path / "llm.gguf"
    truncated.write_bytes(llm_f32.read_bytes()[: llm_f32.stat().st_size // 2])
    with pytest.raises(UserError, match=r"llm\.gguf: not a readable GGUF file \(truncated or corrupt"):
        open_gguf(truncated)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file" * 10)
    with pytest.raises(UserError, match="truncated or corrupt"):
        open_gguf(garbage)
    with pytest.raises(UserError, match="expected 'mmproj'"):
        open_gguf(llm_f32, "mmproj")
    assert open_gguf(mmproj, "mmproj").tensors


@needs_llama_cpp
def test_runtime_refuses_a_truncated_mmproj(tmp_path, llm_f32, mmproj):
    from vlm_factory.runtime.llama_cpp import LlamaCppRuntime

    truncated = tmp_path / "mmproj.gguf"
    truncated.write_bytes(mmproj.read_bytes()[:-1000])
    with pytest.raises(UserError, match="truncated or corrupt"):
        LlamaCppRuntime(llm_f32, truncated)


@needs_llama_cpp
def test_export_reports_types_sizes_versions_and_fallbacks(tmp_path, random_checkpoint):
    import json

    from vlm_factory.artifacts import EXPORT_REPORT
    from vlm_factory.export.gguf_export import export_gguf
    from vlm_factory.model.checkpoint import load_model
    from vlm_factory.runtime.open import open_runtime

    # The small test model has 64- and 128-wide rows: K-quants need multiples of 256, so llama.cpp must fall back.
    report = export_gguf(random_checkpoint, tmp_path / "gguf", "phone", {"llm": "Q4_K_M", "vision": "Q5_K"})
    files = report["files"]
    assert report["settings"] == {"llm": "Q4_K_M", "vision": "Q5_K", "projector": "F16"}
    assert (tmp_path / "gguf" / files["llm"]["file"]).stat().st_size == files["llm"]["file_bytes"]
    assert report["total_bytes"] == files["llm"]["file_bytes"] + files["mmproj"]["file_bytes"]
    assert report["tools"]["llama_cpp_commit"] and report["tools"]["gguf"]
    types = {t["name"]: t["type"] for f in files.values() for t in f["tensors"]}
    assert types["mm.0.weight"] == "F16" and types["v.patch_embd.weight"] == "F32"
    assert report["fallbacks"], "64-wide rows cannot be Q4_K or Q5_K"
    for fallback in report["fallbacks"]:
        assert re.search(r"row length (64|128) is not a multiple of \S+ block size 256", fallback["reason"])
        assert types[fallback["tensor"]] == fallback["used"] != fallback["wanted"]
    assert {f["tensor"] for f in report["fallbacks"]} >= {"blk.0.attn_q.weight", "v.blk.0.attn_q.weight"}
    # The runtime answers the prompt the export recorded; an export without one is refused in one line.
    family, _, processor = load_model(random_checkpoint)
    assert report["prompt"] == family.prompt(processor).as_dict()
    with open_runtime("gguf", tmp_path / "gguf", context_tokens=64, kv_cache="f32") as runtime:
        assert runtime._prompt == family.prompt(processor)
    del report["prompt"]
    (tmp_path / "gguf" / EXPORT_REPORT).write_text(json.dumps(report))
    with pytest.raises(UserError, match=r"export_report\.json: 'prompt' must hold"):
        open_runtime("gguf", tmp_path / "gguf", context_tokens=64, kv_cache="f32")


@needs_llama_cpp
def test_unknown_quant_type_names_the_key(tmp_path, random_checkpoint):
    from vlm_factory.export.gguf_export import export_gguf

    with pytest.raises(UserError, match=r"targets\.gguf\.phone\.llm.*Q3_XYZ"):
        export_gguf(random_checkpoint, tmp_path / "gguf", "phone", {"llm": "Q3_XYZ"})
    assert not (tmp_path / "gguf").exists()


def _first_token_log_probs(model, processor, image, question):
    from vlm_factory.model.prompt import expand_image_tokens, user_prompt

    ids = processor.tokenizer(expand_image_tokens(user_prompt(question), model.config.image_seq_length),
                              return_tensors="pt").input_ids
    pixels = processor.image_processor([image], return_tensors="pt").pixel_values
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits[0, -1].double().numpy()
    return logits - np.logaddexp.reduce(logits)


@pytest.fixture(scope="module")
def eval_samples(synthetic_data):
    from vlm_factory.data.images import load_image
    from vlm_factory.data.records import read_jsonl

    records = read_jsonl(synthetic_data / "eval.jsonl")
    picked = [next(r for r in records if r.aspect == aspect) for aspect in ("square", "tall", "wide")]
    return [(load_image(synthetic_data / r.image), r.question) for r in picked]


@needs_llama_cpp
@pytest.mark.parametrize("llm_type, vision_type, kv_cache, tolerance", [
    ("F32", "F32", "f32", 2e-3),     # the same arithmetic up to summation order
    ("F16", "F16", "f16", 1e-2),     # half-precision weights and KV cache
    ("Q8_0", "Q8_0", "f16", 0.15),
    ("Q4_K_M", "Q8_0", "f16", 0.4),  # 4.5 bits per weight: close, not equal
])
def test_first_token_log_probs_match_transformers(tmp_path, eval_samples, llm_type, vision_type, kv_cache, tolerance):
    """The bundled (trained) base through the production exporter, in llama.cpp, vs transformers.

    Compared on the reference's 5 most likely first tokens (log-probabilities, so a constant
    logit shift does not count); at F32/F16 the most likely token must be the same. llama.cpp gets
    the reference processor's own 64x64 pixels, so this measures the graphs and weights alone
    (its own letterbox resampling is measured by test_llama_cpp_letterbox_matches_the_processor).
    """
    from vlm_factory.eval.artifact_parity import reference_pixels_as_image
    from vlm_factory.export.gguf_export import export_gguf
    from vlm_factory.model.checkpoint import load_model
    from vlm_factory.runtime.llama_cpp import LlamaCppRuntime

    if llm_type == "F32":
        llm, mm = tmp_path / "llm.gguf", tmp_path / "mmproj.gguf"
        write_llm_gguf(BUNDLED_BASE, llm, "F32")
        write_mmproj_gguf(BUNDLED_BASE, mm)
    else:
        report = export_gguf(BUNDLED_BASE, tmp_path / "gguf", "t", {"llm": llm_type, "vision": vision_type})
        llm, mm = (tmp_path / "gguf" / report["files"][k]["file"] for k in ("llm", "mmproj"))
    family, model, processor = load_model(BUNDLED_BASE)
    worst = 0.0
    with LlamaCppRuntime(llm, mm, kv_cache=kv_cache, prompt=family.prompt(processor)) as runtime:
        for image, question in eval_samples:
            expected = _first_token_log_probs(model, processor, image, question)
            pixels = reference_pixels_as_image(processor.image_processor, image, family)
            logits = runtime.first_token_logits(pixels, question).astype(np.float64)
            actual = logits - np.logaddexp.reduce(logits)
            top = np.argsort(expected)[-5:]
            worst = max(worst, float(np.abs(actual[top] - expected[top]).max()))
            if llm_type in ("F32", "F16"):
                assert actual.argmax() == expected.argmax(), question
    print(f"{llm_type}/{vision_type}: worst top-5 log-prob difference {worst:.4f} (tolerance {tolerance})")
    assert worst <= tolerance


@needs_llama_cpp
def test_llama_cpp_letterbox_matches_the_processor(llm_f32, mmproj, eval_samples):
    """The preprocessing check: llama.cpp letterboxes raw square, tall and wide images itself."""
    from vlm_factory.eval.artifact_parity import preprocessing_check
    from vlm_factory.model.checkpoint import load_checkpoint
    from vlm_factory.runtime.llama_cpp import LlamaCppRuntime

    model, processor = load_checkpoint(BUNDLED_BASE)
    samples = dict(zip(("square", "tall", "wide"), (image for image, _ in eval_samples)))
    with LlamaCppRuntime(llm_f32, mmproj) as runtime:
        check = preprocessing_check(runtime, model, processor.image_processor, samples)
    print({aspect: v["cosine"] for aspect, v in check.items()})
    assert check["square"]["cosine"] > 0.99999  # no resize at all: identical pixels
    # Padding colour and placement agree; only bicubic resampling differs a little (clip.cpp vs PIL).
    assert min(v["cosine"] for v in check.values()) > 0.995
    # A centre crop (what CLIP's processor does) would lose half of a tall image: far below that.


def _clip_llava(path: Path, small_arch) -> Path:
    """A LLaVA-1.5-shaped model: CLIP tower (CLS token, quick GELU), layer -2, CLS dropped."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from vlm_factory.model.checkpoint import save_checkpoint
    from vlm_factory.model.tiny import build_config, build_processor

    processor = build_processor(small_arch)
    processor.vision_feature_select_strategy = "default"
    processor.num_additional_image_tokens = 1
    siglip_config = build_config(small_arch, processor)
    vision = CLIPVisionConfig(hidden_size=small_arch.vision_hidden, intermediate_size=small_arch.vision_intermediate,
                              num_hidden_layers=2, num_attention_heads=small_arch.vision_heads,
                              image_size=small_arch.image_size, patch_size=small_arch.patch_size, hidden_act="quick_gelu")
    config = LlavaConfig(vision_config=vision, text_config=siglip_config.text_config,
                         image_token_id=siglip_config.image_token_id, projector_hidden_act="gelu",
                         vision_feature_select_strategy="default", vision_feature_layer=-2,
                         image_seq_length=siglip_config.image_seq_length, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # a trained CLIP's position embeddings carry real information; random init barely does
        model.model.vision_tower.embeddings.position_embedding.weight.normal_(0.0, 1.0)
    save_checkpoint(model, processor, path)
    return path


@needs_llama_cpp
def test_clip_tower_is_caught_by_the_parity_embedding_check(tmp_path, small_arch, random_checkpoint, eval_samples,
                                                           root):
    """llama.cpp puts CLIP's CLS token after the patches: the export loads and runs, the gate must say no."""
    from vlm_factory.config import load_params
    from vlm_factory.eval.artifact_parity import embedding_agreement, reference_embeddings
    from vlm_factory.model.checkpoint import load_checkpoint
    from vlm_factory.runtime.llama_cpp import LlamaCppRuntime

    floor = load_params(root / "params.yaml").eval.min_embedding_cosine["gguf"]
    images = [image for image, _ in eval_samples]
    agreement = {}
    for name, checkpoint in (("siglip", random_checkpoint), ("clip", _clip_llava(tmp_path / "clip", small_arch))):
        llm, mm = tmp_path / f"{name}-llm.gguf", tmp_path / f"{name}-mmproj.gguf"
        write_llm_gguf(checkpoint, llm, "F32")
        write_mmproj_gguf(checkpoint, mm)
        model, processor = load_checkpoint(checkpoint)
        with LlamaCppRuntime(llm, mm) as runtime:
            expected = reference_embeddings(model, processor.image_processor, images)
            agreement[name] = embedding_agreement(runtime, images, expected, ["square", "tall", "wide"])["mean"]
    print(f"image embedding cosine vs transformers: {agreement} (gate floor {floor})")
    assert agreement["siglip"] >= floor  # the same check passes a tower llama.cpp runs faithfully
    assert agreement["clip"] < floor
