"""The llama.cpp packaging: LLM + mmproj GGUF files as llama.cpp reads them, and answers in llama.cpp itself."""

import importlib.util

import numpy as np
import pytest
import torch

from conftest import BUNDLED_BASE
from vlm_factory.errors import UserError
from vlm_factory.export.gguf_llm import permute_rotary, write_llm_gguf
from vlm_factory.export.gguf_mmproj import write_mmproj_gguf

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


def test_clip_tower_is_refused(tmp_path, random_checkpoint):
    import json
    import shutil

    copy = tmp_path / "clip"
    shutil.copytree(random_checkpoint, copy)
    config = json.loads((copy / "config.json").read_text())
    config["vision_config"]["model_type"] = "clip_vision_model"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="CLS"):
        write_mmproj_gguf(copy, tmp_path / "mmproj.gguf")


@needs_llama_cpp
def test_llama_cpp_answers_like_the_reference(llm_f32, mmproj, synthetic_data):
    from vlm_factory.data.images import load_image
    from vlm_factory.data.records import read_jsonl
    from vlm_factory.eval.generate import answer_questions
    from vlm_factory.model.checkpoint import load_checkpoint
    from vlm_factory.runtime.llama_cpp import LlamaCppRuntime

    records = read_jsonl(synthetic_data / "eval.jsonl")[:36]
    images = [load_image(synthetic_data / r.image) for r in records]
    questions = [r.question for r in records]
    model, processor = load_checkpoint(BUNDLED_BASE)
    reference = answer_questions(model, processor, images, questions)
    ours = LlamaCppRuntime(llm_f32, mmproj).answer(images, questions)
    agreement = np.mean([a == b for a, b in zip(ours, reference)])
    # F32 files and an F32 KV cache: only resampling in llama.cpp's letterbox may differ.
    print(f"llama.cpp agrees with transformers on {agreement:.1%} of {len(records)} answers")
    assert agreement >= 0.9, list(zip(questions, reference, ours))
