"""GGUF export of the LLM: names, layout and tokenizer as llama.cpp reads them; logits in llama.cpp itself."""

import importlib.util

import numpy as np
import pytest
import torch

from conftest import BUNDLED_BASE
from vlm_factory.errors import UserError
from vlm_factory.export.gguf_llm import permute_rotary, write_llm_gguf

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed")


def _field(reader, key):
    field = reader.fields[key]
    return field.parts[field.data[0]]


@pytest.fixture(scope="module")
def llm_f32(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "llm-f32.gguf"
    write_llm_gguf(BUNDLED_BASE, path, "F32")
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


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python (the gguf extra) is not installed")
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
