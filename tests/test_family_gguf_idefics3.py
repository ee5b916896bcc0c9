"""The shrunk SmolVLM-256M-Instruct (Idefics3) through the production GGUF exporter, in llama.cpp, vs transformers.

llama.cpp runs SmolVLM as projector "idefics3": libmtmd cuts the image into tiles + a global view
itself (clip.vision.image_size = the tile, clip.vision.preproc_image_size = the processor's longest
edge) and writes the layout tokens around them itself, so the runtime hands it the raw image and the
PromptSpec with `<image>` swapped for its media marker. Measured here, per aspect (square 4x4 tiles,
tall 4x2, wide 2x4, + the global view):

- the graph alone: llama.cpp is given `reference_pixels_as_image` (the processor's own tiles stitched
  back), which the processor itself turns into bit-identical pixels, so the tower + pixel shuffle +
  projector and the LLM are measured without resampling: per-view embeddings and first-token log-probs;
- the preprocessing: embeddings of the raw image vs those of the stitched one, both in llama.cpp
  (what the parity gate reports), and the raw image's embeddings vs the reference's.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from shrunk_models import IMAGE_SIZES, gradient_image, smolvlm_256m

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed")
pytestmark = [pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python (the gguf extra) is not installed"),
              pytest.mark.family_format("idefics3", "gguf")]

QUESTIONS = {"square": "What color is the circle?", "tall": "How many shapes are there?",
             "wide": "Is there a square 7 or 12?"}
# Texts whose tokenization must agree (SmolLM2 splits digits one by one: llama.cpp's `smollm` pre-tokenizer).
TOKENIZER_TEXTS = ["What color is the circle?", "digits 1234567 and 3.14!", "  two  spaces\n\nand lines\n",
                   "accents é ü ñ, a CJK 猫 and an emoji 🙂"]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _log_softmax(logits) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    return logits - np.logaddexp.reduce(logits)


@pytest.fixture(scope="module")
def smolvlm(tmp_path_factory) -> Path:
    # 288 wide (9 heads of 32), 256 intermediate: every LLM row is a multiple of 32, so Q8_0 needs no fallback.
    return smolvlm_256m(tmp_path_factory.mktemp("smolvlm") / "checkpoint", text_hidden=288, text_intermediate=256)


@pytest.fixture(scope="module")
def loaded(smolvlm):
    from vlm_factory.model.checkpoint import load_model

    return load_model(smolvlm)


@pytest.fixture(scope="module")
def packages(smolvlm, tmp_path_factory) -> dict[str, tuple[Path, Path, dict | None]]:
    """llm + mmproj per setting: F32 from our writers, F16 and Q8_0 through export_gguf (llama.cpp quantizes)."""
    from vlm_factory.export.gguf_export import export_gguf
    from vlm_factory.export.gguf_llm import write_llm_gguf
    from vlm_factory.export.gguf_mmproj import write_mmproj_gguf

    out = tmp_path_factory.mktemp("smolvlm-gguf")
    write_llm_gguf(smolvlm, out / "llm-F32.gguf", "F32")
    write_mmproj_gguf(smolvlm, out / "mmproj-F32.gguf")
    result = {"F32": (out / "llm-F32.gguf", out / "mmproj-F32.gguf", None)}
    for setting in ("F16", "Q8_0"):
        report = export_gguf(smolvlm, out / setting, "t", {"llm": setting, "vision": setting})
        result[setting] = (*(out / setting / report["files"][k]["file"] for k in ("llm", "mmproj")), report)
    return result


@pytest.fixture(scope="module")
def images():
    return {aspect: gradient_image(*size, seed=i) for i, (aspect, size) in enumerate(IMAGE_SIZES.items())}


def test_mmproj_and_llm_files_hold_what_llama_cpp_reads(loaded, packages, smolvlm):
    from safetensors import safe_open

    from vlm_factory.export.gguf_llm import permute_rotary

    family, _, processor = loaded
    llm, mmproj, _ = packages["F32"]
    reader = gguf.GGUFReader(str(mmproj))
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("clip.")}
    vision = family.vision
    assert fields == {
        "clip.has_vision_encoder": True, "clip.projector_type": "idefics3", "clip.use_gelu": True,
        "clip.vision.projection_dim": family.text.hidden_size,
        "clip.vision.image_size": 128, "clip.vision.patch_size": 16,  # the tile, not the longest edge
        "clip.vision.preproc_image_size": 512,  # size.longest_edge: llama.cpp resizes to it, then cuts tiles
        "clip.vision.projector.scale_factor": 4,
        "clip.vision.embedding_length": vision.hidden_size, "clip.vision.feed_forward_length": vision.intermediate_size,
        "clip.vision.block_count": vision.num_layers, "clip.vision.attention.head_count": vision.num_heads,
        "clip.vision.attention.layer_norm_epsilon": pytest.approx(vision.layer_norm_eps),
        "clip.vision.image_mean": [0.5, 0.5, 0.5], "clip.vision.image_std": [0.5, 0.5, 0.5],
    }  # no clip.vision.feature_layer: the siglip graph takes the last layer, as Idefics3 does
    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    H, F, P = vision.hidden_size, vision.intermediate_size, family.text.hidden_size
    expected = {"v.patch_embd.weight": [16, 16, 3, H], "v.patch_embd.bias": [H], "v.position_embd.weight": [H, 64],
                # The connector reads the tower after its post-layernorm (LLaVA's mmproj leaves it out).
                "v.post_ln.weight": [H], "v.post_ln.bias": [H],
                # pixel shuffle: 4x4 neighbouring patches side by side into one bias-free Linear.
                "mm.model.fc.weight": [H * 16, P]}
    for i in range(vision.num_layers):
        for part in ("attn_q", "attn_k", "attn_v", "attn_out"):
            expected |= {f"v.blk.{i}.{part}.weight": [H, H], f"v.blk.{i}.{part}.bias": [H]}
        expected |= {f"v.blk.{i}.{n}.{w}": [H] for n in ("ln1", "ln2") for w in ("weight", "bias")}
        expected |= {f"v.blk.{i}.ffn_up.weight": [H, F], f"v.blk.{i}.ffn_up.bias": [F],
                     f"v.blk.{i}.ffn_down.weight": [F, H], f"v.blk.{i}.ffn_down.bias": [H]}
    assert shapes == expected
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    with safe_open(next(smolvlm.glob("*.safetensors")), framework="np") as f:
        fc = f.get_tensor("model.connector.modality_projection.proj.weight").astype(np.float32)
        q = f.get_tensor("model.text_model.layers.0.self_attn.q_proj.weight").astype(np.float32)
        post_ln = f.get_tensor("model.vision_model.post_layernorm.weight").astype(np.float32)
    np.testing.assert_array_equal(tensors["mm.model.fc.weight"], fc)
    np.testing.assert_array_equal(tensors["v.post_ln.weight"], post_ln)

    reader = gguf.GGUFReader(str(llm))
    text = family.text
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"  # digits one by one, then GPT-2's split
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == processor.tokenizer.convert_tokens_to_ids(
        "<end_of_utterance>")
    assert reader.fields["tokenizer.chat_template"].contents() == processor.chat_template
    llm_tensors = {t.name: np.asarray(t.data).reshape(tuple(reversed(t.shape))) for t in reader.tensors}
    assert "output.weight" not in llm_tensors  # tied: llama.cpp multiplies by token_embd (the logits below prove it)
    np.testing.assert_array_equal(llm_tensors["blk.0.attn_q.weight"], permute_rotary(q, text.num_heads))


def test_quantized_packages_report_their_types(packages):
    for setting in ("F16", "Q8_0"):
        report = packages[setting][2]
        assert report["fallbacks"] == []  # every row is a multiple of 32 (LLM 288/256, tower 64/160, fc 1024)
        llm_types = {t["name"]: t["type"] for t in report["files"]["llm"]["tensors"]}
        mmproj_types = {t["name"]: t["type"] for t in report["files"]["mmproj"]["tensors"]}
        assert llm_types["blk.0.attn_q.weight"] == setting and llm_types["token_embd.weight"] == setting
        assert mmproj_types["v.blk.0.ffn_up.weight"] == setting
        assert mmproj_types["mm.model.fc.weight"] == "F16"  # the projector's default type
        assert report["model"]["connector"] == "idefics3" and report["prompt"]["image_layout"]["kind"] == "idefics3_prompt"


def test_llama_cpp_tokenizes_the_prompt_and_texts_as_the_checkpoint(loaded, packages, images):
    """libmtmd writes the tile layout itself: its whole prompt is the processor's, token for token."""
    from vlm_factory.runtime.llama_cpp import LlamaCppRuntime

    family, _, processor = loaded
    prompt, tokenizer = family.prompt(processor), processor.tokenizer
    llm, mmproj, _ = packages["F32"]
    before, after = prompt.render(QUESTIONS["wide"]).split(prompt.image_token)
    with LlamaCppRuntime(llm, mmproj, prompt=prompt) as runtime:
        for aspect, image in images.items():
            views = family.image_views(processor.image_processor, [image])[0]
            expected = tokenizer(prompt.expanded(QUESTIONS[aspect], views.rows, views.cols),
                                 add_special_tokens=prompt.add_special_tokens).input_ids
            expected = [None if t == family.image_token_id else t for t in expected]
            assert runtime.prompt_tokens(image, QUESTIONS[aspect]) == expected, aspect
        for text, add_special in [(before, prompt.add_special_tokens), (after, False)] + \
                                 [(text, False) for text in TOKENIZER_TEXTS]:
            assert runtime.text_token_ids(text, add_special) == \
                tokenizer(text, add_special_tokens=add_special).input_ids, text


@pytest.mark.slow
@pytest.mark.parametrize("setting, kv_cache, max_tile_rel, max_log_prob_diff", [
    # F32 weights and cache: measured per-tile relative error <= 2.1e-4 (summation order, clip.cpp's GELU)
    # and top-5 log-prob difference 4.8e-4; about 10x margin on both.
    ("F32", "f32", 2e-3, 5e-3),
    # F16 weights and KV cache: measured 3.0e-4 and 4.5e-4.
    ("F16", "f16", 3e-3, 5e-3),
    # Q8_0 tower and LLM (projector F16): measured 1.7e-3 and 9.0e-3.
    ("Q8_0", "f16", 1e-2, 5e-2),
])
def test_views_and_first_token_match_transformers(loaded, packages, images, setting, kv_cache, max_tile_rel,
                                                  max_log_prob_diff):
    """The graph alone: llama.cpp gets the processor's own tiles stitched back into one image.

    A wrong graph is far outside these bounds: without the post-layernorm the embeddings are 0.69 off
    (cosine 0.972), with the global view first instead of last 1.06 (cosine -0.03).
    """
    from vlm_factory.eval.artifact_parity import cosine, reference_pixels_as_image
    from vlm_factory.eval.generate import answer_questions
    from vlm_factory.runtime.llama_cpp import LlamaCppRuntime

    family, model, processor = loaded
    prompt, image_processor = family.prompt(processor), processor.image_processor
    llm, mmproj, _ = packages[setting]
    worst_tile, worst_global, worst_diff, worst_cosine = 0.0, 0.0, 0.0, 1.0
    with LlamaCppRuntime(llm, mmproj, kv_cache=kv_cache, prompt=prompt) as runtime:
        for aspect, image in images.items():
            views = family.image_views(image_processor, [image])[0]
            stitched = reference_pixels_as_image(image_processor, image, family)
            # The processor turns the stitched image into the very same tiles and global view.
            again = family.image_views(image_processor, [stitched])[0]
            assert (again.rows, again.cols) == (views.rows, views.cols) == {"square": (4, 4), "tall": (4, 2),
                                                                            "wide": (2, 4)}[aspect]
            torch.testing.assert_close(again.pixel_values, views.pixel_values, rtol=0, atol=0)
            with torch.no_grad():
                expected = family.image_features(model, views.pixel_values).numpy()
                ids = processor.tokenizer(prompt.expanded(QUESTIONS[aspect], views.rows, views.cols),
                                          add_special_tokens=prompt.add_special_tokens, return_tensors="pt").input_ids
                reference = _log_softmax(model(input_ids=ids, **family.generation_pixels([views])).logits[0, -1])
            actual = runtime.image_views(stitched)
            # llama.cpp cut the same grid and hands the LLM the views in the reference's order.
            assert len(actual) == views.count and all(a.shape == e.shape for a, e in zip(actual, expected))
            rel = [_rel(a, e) for a, e in zip(actual, expected)]
            worst_tile, worst_global = max(worst_tile, *rel[:-1]), max(worst_global, rel[-1])
            worst_cosine = min(worst_cosine, cosine(np.concatenate(actual), expected))
            logits = _log_softmax(runtime.first_token_logits(stitched, QUESTIONS[aspect]))
            top = np.argsort(reference)[-5:]
            worst_diff = max(worst_diff, float(np.abs(logits[top] - reference[top]).max()))
            if setting != "Q8_0":
                assert logits.argmax() == reference.argmax(), aspect
            print(f"{setting} {aspect}: per-view relative error {np.round(rel, 5).tolist()}")
        if setting != "Q8_0":  # greedy answers token for token (measured: all agree at F32 and F16)
            stitched = [reference_pixels_as_image(image_processor, image, family) for image in images.values()]
            questions = [QUESTIONS[aspect] for aspect in images]
            assert runtime.answer(stitched, questions) == answer_questions(model, processor, stitched, questions)
    print(f"{setting}: embedding cosine >= {worst_cosine:.7f}, relative error per tile <= {worst_tile:.2e}, "
          f"global view <= {worst_global:.2e}, top-5 log-prob difference <= {worst_diff:.2e}")
    assert worst_tile <= max_tile_rel
    # The global view: measured 1.8e-4 (square, wide) but 6.4e-3 for the tall image at every setting: llama.cpp
    # downscales the 256x512 image to the 128 px view slightly unlike PIL's LANCZOS (512x256 matches).
    assert worst_global <= 1.3e-2
    assert worst_diff <= max_log_prob_diff
    assert worst_cosine >= 0.9999  # measured 0.999997 at Q8_0, 0.999998 at F32/F16; the gate's floor is 0.99


@pytest.mark.slow
def test_llama_cpp_tiles_raw_images_as_the_processor(loaded, packages, images):
    """The preprocessing: llama.cpp given the raw image cuts the processor's grid with the processor's resampling.

    Measured on the pinned llama.cpp: the raw image's views equal those of the stitched processor pixels to
    the last digit (the gate's cosine is 1.0 on every aspect), and differ from the reference by the F32
    graph's own 2e-4 per tile (the tall image's global view by 6.4e-3, as with the processor's pixels). For
    scale, in the reference model: resizing the original straight to the tile multiple (not chained
    through the longest edge as the processor does) moves the embeddings by 3.5e-3..1e-2 relative,
    bicubic instead of LANCZOS by 4.5e-2, bilinear by 9.5e-2, another image by 0.43. Cosine hardly sees
    any of it: bilinear still has 0.995, above the gate's 0.99.
    """
    from vlm_factory.eval.artifact_parity import (cosine, preprocessing_check, reference_embeddings,
                                                  reference_pixels_as_image)
    from vlm_factory.runtime.llama_cpp import LlamaCppRuntime

    family, model, processor = loaded
    llm, mmproj, _ = packages["F32"]
    expected = dict(zip(images, reference_embeddings(model, processor.image_processor, list(images.values()))))
    with LlamaCppRuntime(llm, mmproj, prompt=family.prompt(processor)) as runtime:
        check = preprocessing_check(runtime, model, processor.image_processor, images)
        for aspect, image in images.items():
            views = runtime.image_views(image)
            rel = [_rel(a, e) for a, e in zip(views, expected[aspect])]
            print(f"raw {aspect}: {len(views)} views, cosine {cosine(np.concatenate(views), expected[aspect]):.7f}, "
                  f"per-view relative error {np.round(rel, 5).tolist()}; gate's check {check[aspect]}")
            assert len(views) == expected[aspect].shape[0]
            # Same grid, same pixels as from the processor's own tiles: measured identical embeddings.
            given = runtime.image_views(reference_pixels_as_image(processor.image_processor, image, family))
            assert max(_rel(a, b) for a, b in zip(views, given)) <= 1e-6, aspect
            # Tiles within 10x the graph's noise (2.1e-4), below a non-chained resize (3.5e-3).
            assert max(rel[:-1]) <= 2e-3, aspect
            # The global view within 2x its measured 6.4e-3, below bicubic resampling (4.5e-2).
            assert rel[-1] <= 1.3e-2, aspect
            # Raw vs the processor's pixels, both in llama.cpp: measured 1.0 (identical views).
            assert check[aspect]["cosine"] >= 0.99999


def test_gguf_checks_refuse_a_broken_idefics3_mmproj(packages, tmp_path):
    from vlm_factory.errors import UserError
    from vlm_factory.runtime.gguf_check import check_llamacpp_pair

    llm, mmproj, _ = packages["F32"]
    assert check_llamacpp_pair(llm, mmproj) == "idefics3"
    reader = gguf.GGUFReader(str(mmproj))

    def rewrite(path: Path, drop_tensor=None, scale=None):
        writer = gguf.GGUFWriter(str(path), arch="clip")
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            value = field.contents()
            if key == "clip.vision.projector.scale_factor" and scale is not None:
                value = scale
            writer.add_key_value(key, value, field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None)
        for tensor in reader.tensors:
            if tensor.name != drop_tensor:
                writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_shape=tuple(reversed(tensor.shape)))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    with pytest.raises(UserError, match=r"tensor 'mm.model.fc.weight' is missing"):
        check_llamacpp_pair(llm, rewrite(tmp_path / "no-fc.gguf", drop_tensor="mm.model.fc.weight"))
    with pytest.raises(UserError, match=r"mm.model.fc.weight.*scale_factor 2"):
        check_llamacpp_pair(llm, rewrite(tmp_path / "scale-2.gguf", scale=2))
    with pytest.raises(UserError, match=r"scale_factor 3 does not divide"):
        check_llamacpp_pair(llm, rewrite(tmp_path / "scale-3.gguf", scale=3))


def test_runtime_refuses_a_vocabulary_without_the_layout_tokens(loaded, packages, monkeypatch):
    """libmtmd looks "\\n\\n", "<fake_token_around_image>", ... up as single tokens and feeds -1 for a missing one
    (GGML_ASSERT(idx >= 0) in mtmd-helper.cpp aborts the process): refused as a one-line error instead."""
    import vlm_factory.runtime.llama_cpp as llama_cpp_runtime
    from vlm_factory.errors import UserError

    family, _, processor = loaded
    llm, mmproj, _ = packages["F32"]
    monkeypatch.setattr(llama_cpp_runtime, "IDEFICS3_LAYOUT_TOKENS", ("\n\n", "\n\n\n\n"))
    with pytest.raises(UserError, match=r"no single token for '\\n\\n\\n\\n'"):
        llama_cpp_runtime.LlamaCppRuntime(llm, mmproj, prompt=family.prompt(processor))


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["F16"])
def test_parity_gate_passes_smolvlm(loaded, packages, synthetic_data, root, tmp_path, setting):
    """The whole gate (answers and first-token distributions paired with the reference's, embeddings, raw-image
    preprocessing) on a sample of the synthetic eval split, with the configured thresholds: a faithful SmolVLM
    GGUF passes it. F16: a random model's first-token margins are tiny, so Q8_0 noise already changes some
    greedy answers (measured 4/6 identical), which the agreement checks rightly count."""
    from parity_inputs import UNINFORMATIVE_REFERENCE, configured_thresholds, write_reference

    from vlm_factory.data.images import load_image
    from vlm_factory.data.records import read_jsonl
    from vlm_factory.eval.artifact_parity import ReferenceSide, evaluate_artifact
    from vlm_factory.eval.generate import answer_questions
    from vlm_factory.eval.reference import score
    from vlm_factory.runtime.open import open_runtime

    family, model, processor = loaded
    records = read_jsonl(synthetic_data / "eval.jsonl")
    records = [r for aspect in ("square", "tall", "wide") for r in [r for r in records if r.aspect == aspect][:2]]
    images = [load_image(synthetic_data / r.image) for r in records]
    answers = answer_questions(model, processor, images, [r.question for r in records])
    reference = write_reference(tmp_path / "predictions.jsonl", records, answers, score(records, answers)[0])
    thresholds = configured_thresholds(root, "gguf", {"llm": setting})
    llm, _, report = packages[setting]
    assert family.known_issue("gguf") is None
    # Opened as the parity stage opens it: the export report's prompt (with its image layout) and files.
    with open_runtime("gguf", llm.parent, context_tokens=family.visual_tokens(processor) + 64, kv_cache="f16",
                      isolated=False) as runtime:
        result = evaluate_artifact(runtime, fmt="gguf", tier="t",
                                   reference=ReferenceSide.load(records, synthetic_data, reference, model, processor,
                                                                embedding_images=8),
                                   reference_metrics=UNINFORMATIVE_REFERENCE, thresholds=thresholds,
                                   artifact_bytes=report["total_bytes"])
        ours = runtime.answer(images, [r.question for r in records])
    agree = sum(a == b for a, b in zip(ours, answers))
    print(f"{setting}: embedding cosine {result['image_embedding_cosine']}, preprocessing "
          f"{ {k: v['cosine'] for k, v in result['preprocessing'].items()} }, drift {result['drift']:+.2f}, "
          f"answers identical to the reference's {agree}/{len(records)}")
    assert result["passed"], result.get("failure_reason")
    assert agree == len(records) and result["agreement"]["answers"] == 1.0
    assert result["agreement"]["first_token_kl"] < 1e-3  # the floor for F16 is 0.005
    assert result["image_embedding_cosine"]["min"] >= 0.9999  # measured 0.999996; the floor (0.99) is far below
    assert all(v["cosine"] >= 0.99999 for v in result["preprocessing"].values())  # measured 1.0


@pytest.mark.parametrize("change, needle", [
    ({"do_image_splitting": False}, "do_image_splitting"),
    ({"size": {"longest_edge": 128}}, "longest edge beyond the 128 px tile"),
    ({"max_image_size": {"longest_edge": 64}}, "cuts 64 px tiles"),
])
def test_processors_llama_cpp_cannot_follow_are_refused(smolvlm, tmp_path, change, needle):
    """llama.cpp's idefics3 preprocessing always resizes to the longest edge and cuts tower-sized tiles."""
    import json
    import shutil

    from vlm_factory.errors import UserError
    from vlm_factory.export.gguf_mmproj import write_mmproj_gguf

    checkpoint = Path(shutil.copytree(smolvlm, tmp_path / "checkpoint"))
    config = checkpoint / "preprocessor_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    with pytest.raises(UserError, match=needle):
        write_mmproj_gguf(checkpoint, tmp_path / "mmproj.gguf")
    assert not (tmp_path / "mmproj.gguf").exists()
