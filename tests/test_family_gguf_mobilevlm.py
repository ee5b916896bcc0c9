"""The shrunk MobileVLM V2 (tests/shrunk_models.py) through the production GGUF exporter, in llama.cpp, vs transformers.

llama.cpp runs MobileVLM V2 as projector "ldpv2" in the same llava graph as LLaVA's "mlp": the tower's
hidden state `clip.vision.feature_layer`, then MLP, 2x2 pooling and a depthwise 3x3 convolution added
back. That graph reshapes the patches to a fixed 24x24 grid, so the checkpoint here has the published
tower's geometry (336 px, patch 14: 576 patches, 144 image tokens) with tiny widths.

The pinned llama.cpp appends a CLIP tower's CLS token after the patches where transformers puts it
first (ggml-org/llama.cpp#25814), and MobileVLM's tower is CLIP: measured here, the image embeddings
equal transformers' tower run that way (CLS last) to F32 precision, and are far from transformers' own
(cosine 0.90-0.92 on the three test images, below the gate's 0.99), so the parity gate fails the export
and names the family's known issue. The LLM is checked on its own terms: fed the embeddings llama.cpp
computes, transformers' LLM gives llama.cpp's first-token log-probs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from parity_inputs import UNINFORMATIVE_REFERENCE, configured_thresholds, reference_answers, write_reference
from shrunk_models import IMAGE_SIZES, cls_last_graph, gradient_image, mobilevlm_v2_1_7b

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed")
pytestmark = [pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python (the gguf extra) is not installed"),
              pytest.mark.family_format("mobilevlm", "gguf")]

QUESTION = "What color is the circle?"
# Texts whose tokenization must agree (a Llama-2 SentencePiece BPE with a BOS).
TOKENIZER_TEXTS = ["What color is the circle?", "  two  spaces\n\nand lines", "digits 1234567 and 3.14!",
                   "accents é ü ñ, a CJK 猫 and an emoji 🙂"]
IMAGE_TOKENS = 144  # 336 px / patch 14 = 24x24 patches, pooled 2x2 -> 12x12


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _log_softmax(logits) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    return logits - np.logaddexp.reduce(logits)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return mobilevlm_v2_1_7b(tmp_path_factory.mktemp("mobilevlm") / "checkpoint", image_size=336)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    from vlm_factory.model.checkpoint import load_model

    return load_model(checkpoint)


@pytest.fixture(scope="module")
def packages(checkpoint, tmp_path_factory) -> dict[str, tuple[Path, Path, dict | None]]:
    """llm + mmproj per setting: F32 from our writers; through export_gguf (llama.cpp quantizes) Q8_0 with
    the default F16 projector, and Q8_0 with an F32 projector (which must still leave the kernel in F16)."""
    from vlm_factory.export.gguf_export import export_gguf
    from vlm_factory.export.gguf_llm import write_llm_gguf
    from vlm_factory.export.gguf_mmproj import write_mmproj_gguf

    out = tmp_path_factory.mktemp("mobilevlm-gguf")
    write_llm_gguf(checkpoint, out / "llm-F32.gguf", "F32")
    written = write_mmproj_gguf(checkpoint, out / "mmproj-F32.gguf")
    result = {"F32": (out / "llm-F32.gguf", out / "mmproj-F32.gguf", written)}
    for name, settings in {"Q8_0": {"llm": "Q8_0", "vision": "Q8_0"},
                           "Q8_0+F32": {"llm": "Q8_0", "vision": "Q8_0", "projector": "F32"}}.items():
        report = export_gguf(checkpoint, out / name, "t", settings)
        result[name] = (*(out / name / report["files"][k]["file"] for k in ("llm", "mmproj")), report)
    return result


@pytest.fixture(scope="module")
def images(loaded):
    """The three test images as the reference processor's own pixels (letterboxed, resized to 336 px), so
    llama.cpp's resampling is not measured here: the parity gate's preprocessing check does that."""
    from vlm_factory.eval.artifact_parity import reference_pixels_as_image

    family, _, processor = loaded
    return {aspect: reference_pixels_as_image(processor.image_processor, gradient_image(*size, seed=i), family)
            for i, (aspect, size) in enumerate(IMAGE_SIZES.items())}


def _cls_last_graph(family, model, pixels: torch.Tensor) -> torch.Tensor:
    """The pinned llama.cpp's llava graph (CLS last) through LDPv2."""
    with torch.no_grad():
        return family.project(model, cls_last_graph(family, model.model.vision_tower.vision_tower.vision_model, pixels))


def test_mmproj_and_llm_files_hold_what_llama_cpp_reads(loaded, packages, checkpoint):
    from safetensors import safe_open

    from vlm_factory.export.gguf_llm import permute_rotary

    family, _, processor = loaded
    llm, mmproj, written = packages["F32"]
    reader = gguf.GGUFReader(str(mmproj))
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("clip.")}
    vision = family.vision
    assert fields == {
        "clip.has_vision_encoder": True, "clip.projector_type": "ldpv2",
        "clip.use_gelu": False,  # quick GELU, as CLIP ViT-L/14-336
        "clip.vision.projection_dim": family.text.hidden_size,
        "clip.vision.image_size": 336, "clip.vision.patch_size": 14,  # the 24x24 grid llama.cpp's graph needs
        # mm_vision_select_layer -2 of a 3-block tower: hidden_states[2], the graph stops one block early.
        "clip.vision.feature_layer": [2],
        "clip.vision.embedding_length": vision.hidden_size, "clip.vision.feed_forward_length": vision.intermediate_size,
        "clip.vision.block_count": vision.num_layers, "clip.vision.attention.head_count": vision.num_heads,
        "clip.vision.attention.layer_norm_epsilon": pytest.approx(vision.layer_norm_eps),
        "clip.vision.image_mean": pytest.approx([0.48145466, 0.4578275, 0.40821073]),
        "clip.vision.image_std": pytest.approx([0.26862954, 0.26130258, 0.27577711]),
    }
    tensors = {t.name: t for t in reader.tensors}
    H, P = vision.hidden_size, family.text.hidden_size
    connector = {name: ([int(d) for d in t.shape], t.tensor_type.name)
                 for name, t in tensors.items() if name.startswith("mm.")}
    assert connector == {
        "mm.model.mlp.0.weight": ([H, P], "F32"), "mm.model.mlp.0.bias": ([P], "F32"),
        "mm.model.mlp.2.weight": ([P, P], "F32"), "mm.model.mlp.2.bias": ([P], "F32"),
        # torch's [P, 1, 3, 3] depthwise kernel, in F16: ggml_conv_2d_dw multiplies it with F16 columns.
        "mm.model.peg.0.weight": ([3, 3, 1, P], "F16"), "mm.model.peg.0.bias": ([P], "F32"),
    }
    assert {n: k for n, k in written.items() if k != "F32"} == {"mm.model.peg.0.weight": "F16"}
    # The tower up to the feature layer, without the post-layernorm the connector never reads.
    assert {"v.class_embd", "v.pre_ln.weight", "v.patch_embd.weight"} <= set(tensors)
    assert not any(name.startswith("v.post_ln") for name in tensors)
    assert [int(d) for d in tensors["v.position_embd.weight"].shape] == [H, 24 * 24 + 1]
    with safe_open(checkpoint / "model.safetensors", framework="np") as f:
        kernel = f.get_tensor("model.mm_projector.peg.peg.0.weight")  # fp16 on disk: written exactly
        mlp0 = f.get_tensor("model.mm_projector.mlp.mlp.0.weight").astype(np.float32)
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight").astype(np.float32)
    np.testing.assert_array_equal(np.asarray(tensors["mm.model.peg.0.weight"].data).reshape(kernel.shape), kernel)
    np.testing.assert_array_equal(np.asarray(tensors["mm.model.mlp.0.weight"].data), mlp0)

    reader = gguf.GGUFReader(str(llm))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert reader.fields["tokenizer.chat_template"].contents() == processor.chat_template  # MobileVLM's v1
    llm_tensors = {t.name: np.asarray(t.data).reshape(tuple(reversed(t.shape))) for t in reader.tensors}
    assert "output.weight" in llm_tensors  # MobileLLaMA's lm_head is its own
    np.testing.assert_array_equal(llm_tensors["blk.0.attn_q.weight"], permute_rotary(q, family.text.num_heads))


def test_quantizing_keeps_the_convolution_kernel_f16(packages):
    """Whatever the tier asks for the projector, the kernel stays F16: with `projector: F32` llama.cpp's
    quantizer would convert it (and abort: llama-quant.cpp's size assertion), with Q8_0 fall back."""
    from vlm_factory.runtime.gguf_check import check_llamacpp_pair

    for name, projector in (("Q8_0", "Q8_0"), ("Q8_0+F32", "F32")):
        llm, mmproj, report = packages[name]
        assert report["settings"]["projector"] == ("F16" if name == "Q8_0" else "F32")
        types = {t["name"]: t["type"] for t in report["files"]["mmproj"]["tensors"]}
        assert types["mm.model.peg.0.weight"] == "F16"
        assert types["mm.model.mlp.0.weight"] == types["mm.model.mlp.2.weight"] == report["settings"]["projector"]
        assert types["v.blk.0.ffn_up.weight"] == "Q8_0"
        assert report["fallbacks"] == []  # rows of 64, 128 and 256: every one fits Q8_0's blocks of 32
        assert report["model"]["connector"] == "ldpv2"
        assert check_llamacpp_pair(llm, mmproj) == "ldpv2"


def test_llama_cpp_tokenizes_the_prompt_and_texts_as_the_checkpoint(loaded, packages, images):
    """MobileVLM's v1 conversation with `<image>` as libmtmd's marker: 144 image positions, the rest token
    for token the reference tokenizer's."""
    from vlm_factory.runtime.llama_cpp import LlamaCppRuntime

    family, _, processor = loaded
    prompt, tokenizer = family.prompt(processor), processor.tokenizer
    llm, mmproj, _ = packages["F32"]
    expected = tokenizer(prompt.expanded(QUESTION), add_special_tokens=prompt.add_special_tokens).input_ids
    expected = [None if t == family.image_token_id else t for t in expected]
    assert expected.count(None) == IMAGE_TOKENS == family.image_tokens
    before, after = prompt.render(QUESTION).split(prompt.image_token)
    with LlamaCppRuntime(llm, mmproj, n_ctx=512, prompt=prompt) as runtime:
        assert runtime.prompt_tokens(images["square"], QUESTION) == expected
        for text, add_special in [(before, prompt.add_special_tokens), (after, False)] + \
                                 [(text, True) for text in TOKENIZER_TEXTS]:
            assert runtime.text_token_ids(text, add_special) == \
                tokenizer(text, add_special_tokens=add_special).input_ids, text


@pytest.mark.slow
@pytest.mark.parametrize("setting, kv_cache, max_graph_rel, max_log_prob_diff", [
    # F32 weights and cache: measured relative error 3.4e-4 vs the CLS-last graph (im2col rounds the
    # convolution's input to F16; clip.cpp's tanh GELU) and top-5 log-prob difference 4.0e-5.
    ("F32", "f32", 2e-3, 5e-4),
    # Q8_0 tower and LLM, projector F16, F16 KV cache: measured 5.0e-4 and 6.0e-3.
    ("Q8_0", "f16", 5e-3, 5e-2),
])
def test_llama_cpp_runs_the_cls_last_graph(loaded, packages, images, setting, kv_cache, max_graph_rel,
                                            max_log_prob_diff):
    """The mmproj is faithful: llama.cpp's embeddings are transformers' tower run as the pinned llama.cpp runs
    it (CLS last); and the CLS defect is what separates them from transformers' own (cosine < 0.99)."""
    from vlm_factory.eval.artifact_parity import cosine
    from vlm_factory.runtime.llama_cpp import LlamaCppRuntime

    family, model, processor = loaded
    prompt = family.prompt(processor)
    llm, mmproj, _ = packages[setting]
    ids = torch.tensor([processor.tokenizer(prompt.expanded(QUESTION),
                                            add_special_tokens=prompt.add_special_tokens).input_ids])
    worst_rel, worst_diff, defect_cosines = 0.0, 0.0, []
    with LlamaCppRuntime(llm, mmproj, n_ctx=512, kv_cache=kv_cache, prompt=prompt) as runtime:
        for aspect, image in images.items():
            pixels = processor.image_processor([image], return_tensors="pt").pixel_values
            graph = _cls_last_graph(family, model, pixels)
            with torch.no_grad():
                reference = family.image_features(model, pixels)
                # The LLM alone: transformers' decoder fed llama.cpp's own graph.
                embeds = family.merge_image_features(model, ids, graph)
                expected = _log_softmax(model(inputs_embeds=embeds).logits[0, -1].numpy())
            actual = runtime.image_embeddings(image)
            assert actual.shape == (IMAGE_TOKENS, family.text.hidden_size)
            worst_rel = max(worst_rel, _rel(actual, graph[0].numpy()))
            defect_cosines.append(cosine(actual, reference[0].numpy()))
            logits = _log_softmax(runtime.first_token_logits(image, QUESTION))
            top = np.argsort(expected)[-5:]
            worst_diff = max(worst_diff, float(np.abs(logits[top] - expected[top]).max()))
    print(f"{setting}: relative error vs the CLS-last graph <= {worst_rel:.2e}, top-5 log-prob difference "
          f"<= {worst_diff:.2e}; cosine with transformers' embeddings {np.round(defect_cosines, 4).tolist()}")
    assert worst_rel <= max_graph_rel
    assert worst_diff <= max_log_prob_diff
    # The CLS defect alone: measured 0.924 square, 0.896 tall, 0.924 wide (F32 and Q8_0 alike).
    assert all(0.8 < c < 0.99 for c in defect_cosines)


@pytest.mark.slow
def test_parity_gate_fails_mobilevlm_with_the_known_issue(loaded, packages, synthetic_data, root, tmp_path):
    """The whole gate on the synthetic eval split, its configured floor: the export runs, answers, and fails on
    the embeddings, naming the family's known issue."""
    from vlm_factory.data.records import read_jsonl
    from vlm_factory.eval.artifact_parity import ReferenceSide, evaluate_artifact
    from vlm_factory.runtime.open import open_runtime

    family, model, processor = loaded
    note = family.known_issue("gguf")
    assert note and "25814" in note
    records = read_jsonl(synthetic_data / "eval.jsonl")
    reference = write_reference(tmp_path / "predictions.jsonl", records, reference_answers(model, processor, records,
                                                                                           synthetic_data))
    thresholds = configured_thresholds(root, "gguf", {"llm": "Q8_0"})
    floor = thresholds.min_embedding_cosine
    llm, _, report = packages["Q8_0"]
    # Opened as the parity stage opens it: the export report's prompt and files. The shrunk 320-token vocabulary
    # spells the v1 system prompt nearly letter by letter: 309 prompt tokens, 144 of them the image's.
    with open_runtime("gguf", llm.parent, context_tokens=512, kv_cache="f16", isolated=False) as runtime:
        result = evaluate_artifact(runtime, fmt="gguf", tier="t",
                                   reference=ReferenceSide.load(records, synthetic_data, reference, model, processor,
                                                                embedding_images=8),
                                   reference_metrics=UNINFORMATIVE_REFERENCE, thresholds=thresholds,
                                   artifact_bytes=report["total_bytes"], known_issue=note)
    cosines = result["image_embedding_cosine"]
    print(f"gate: embedding cosine {cosines}, preprocessing "
          f"{ {k: v['cosine'] for k, v in result['preprocessing'].items()} }")
    assert not result["passed"] and result["known_issue"] == note
    failing = {c["check"]: c for c in result["checks"] if c["status"] == "fail"}
    assert failing["embedding_cosine"]["known_issue"] == note
    assert f"embedding_cosine {cosines['mean']:g} below {floor:g} (known issue: {note})" in result["failure_reason"]
    assert cosines["mean"] < floor  # measured 0.950 (min 0.920)
    # llama.cpp's preprocessing, gated too (it fails here as well): a square image is resized alike (1.0); a tall or
    # wide one is resized then padded, where MobileVLM pads to a square then resizes, which blends the image's
    # edges with the padding differently (measured 0.970 tall, 0.980 wide; the reference model given PIL's
    # resize-then-pad instead of its processor's pixels: 0.974 and 0.978, so the order, not the resampling).
    check = {aspect: v["cosine"] for aspect, v in result["preprocessing"].items()}
    assert check["square"] >= 0.9999 and 0.95 <= min(check["tall"], check["wide"]) < 0.99


# -- refusals ----------------------------------------------------------------------------------------------

def test_a_grid_other_than_24x24_is_refused_in_one_line(tmp_path):
    """llama.cpp's ldpv2 graph is built for 24x24 patches: an 8x8 tower (112 px) is refused before any file
    is written, by the family and by every GGUF entry point."""
    from vlm_factory.errors import UserError
    from vlm_factory.export.gguf_export import export_gguf
    from vlm_factory.export.gguf_llm import write_llm_gguf
    from vlm_factory.export.gguf_mmproj import write_mmproj_gguf
    from vlm_factory.families import family_of

    checkpoint = mobilevlm_v2_1_7b(tmp_path / "checkpoint", image_size=112)
    family = family_of(checkpoint)
    assert family.format_refusal("gguf") == "llama.cpp's ldpv2 graph reshapes a 24x24 patch grid, this tower makes 8x8"
    assert family.format_refusal("onnx") is None
    for write in (lambda: write_mmproj_gguf(checkpoint, tmp_path / "mmproj.gguf"),
                  lambda: write_llm_gguf(checkpoint, tmp_path / "llm.gguf"),
                  lambda: export_gguf(checkpoint, tmp_path / "out", "t", {"llm": "Q8_0"})):
        with pytest.raises(UserError) as info:
            write()
        message = str(info.value)
        assert "\n" not in message and "cannot be exported to gguf" in message and "this tower makes 8x8" in message
        assert message.endswith("supported here: onnx, coreml, tflite")
    assert not list(tmp_path.glob("*.gguf")) and not (tmp_path / "out").exists()


def _rewrite(reader, path: Path, key_values: dict | None = None, kernel_f32: bool = False) -> Path:
    writer = gguf.GGUFWriter(str(path), arch="clip")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = (key_values or {}).get(key, field.contents())
        writer.add_key_value(key, value, field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None)
    for tensor in reader.tensors:
        data = np.asarray(tensor.data)
        if kernel_f32 and tensor.name == "mm.model.peg.0.weight":
            data = data.astype(np.float32)
        writer.add_tensor(tensor.name, data, raw_shape=tuple(reversed(tensor.shape)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_checks_refuse_an_ldpv2_mmproj_libmtmd_would_abort_on(packages, tmp_path):
    """Measured on the pinned llama.cpp: an F32 kernel aborts libmtmd (GGML_ASSERT in ggml-backend.cpp: no
    backend multiplies F32 by F16), and so would a grid other than 24x24 (ggml_cont_4d's size assertion).
    Both are one-line errors before libmtmd is given the file, as is a missing or misshapen tensor."""
    from vlm_factory.errors import UserError
    from vlm_factory.runtime.gguf_check import check_llamacpp_pair

    llm, mmproj, _ = packages["F32"]
    reader = gguf.GGUFReader(str(mmproj))
    cases = [
        (_rewrite(reader, tmp_path / "f32-kernel.gguf", kernel_f32=True),
         r"tensor 'mm.model.peg.0.weight' is F32; ggml's depthwise convolution needs its kernel in F16"),
        (_rewrite(reader, tmp_path / "grid-8.gguf", {"clip.vision.image_size": 112}),
         r"8x8 patch grid; llama.cpp's ldpv2 graph runs 24x24 only"),
    ]
    for path, needle in cases:
        with pytest.raises(UserError, match=needle) as info:
            check_llamacpp_pair(llm, path)
        assert "\n" not in str(info.value)
