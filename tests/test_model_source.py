"""Model sources: the bundled/local directory (checksummed) and the hub path (snapshot_download)."""

import json
import time

import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

from vlm_factory.errors import UserError
from vlm_factory.model.checkpoint import load_checkpoint
from vlm_factory.model.snapshot import CHECKSUM_FILE, fetch_hub, fetch_local, verify_checksums

REPO = "llava-hf/llava-interleave-qwen-0.5b-hf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _shrunk_interleave(random_llava, directory):
    """The real model's class and tower (LLaVA + SigLIP + Qwen2), shrunk, with random weights."""
    _, processor = random_llava
    tok = processor.tokenizer
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=64, patch_size=16, vision_use_head=False),
        text_config=Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=1, vocab_size=len(tok), tie_word_embeddings=True),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_seq_length=16,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)


def test_hub_path_reads_a_pinned_snapshot_from_the_cache(tmp_path, random_llava):
    cache = tmp_path / "hf-cache"
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    _shrunk_interleave(random_llava, snapshot)
    (snapshot / "pytorch_model.bin").write_bytes(b"a pickle that must never be fetched")

    out = tmp_path / "base"
    started = time.perf_counter()
    sums = fetch_hub(REPO, COMMIT, out, cache_dir=cache, endpoint="http://127.0.0.1:9")
    assert time.perf_counter() - started < 10  # a pinned cached commit needs no network round trips
    assert "model.safetensors" in sums and "pytorch_model.bin" not in sums
    assert not (out / "pytorch_model.bin").exists()
    verify_checksums(out)
    model, _ = load_checkpoint(out)
    assert model.config.text_config.model_type == "qwen2"
    assert model.config.vision_config.model_type == "siglip_vision_model"


def test_hub_without_network_or_cache_is_a_clear_error(tmp_path):
    started = time.perf_counter()
    with pytest.raises(UserError) as err:
        fetch_hub(REPO, COMMIT, tmp_path / "base", cache_dir=tmp_path / "empty-cache",
                  endpoint="http://127.0.0.1:9", etag_timeout=1)
    assert time.perf_counter() - started < 120  # bounded retries, not a hang
    message = str(err.value)
    assert REPO in message and "model.source=local" in message and "\n" not in message
    assert not (tmp_path / "base").exists()


def test_local_source_is_verified_and_copied(tmp_path, random_checkpoint):
    out = tmp_path / "base"
    sums = fetch_local(random_checkpoint, out)
    assert (out / CHECKSUM_FILE).is_file()
    assert set(sums) == {p.name for p in out.iterdir()} - {CHECKSUM_FILE}
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava"


def test_corrupted_local_file_is_caught_by_name(tmp_path, random_checkpoint):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(random_checkpoint, copy)
    with open(copy / "config.json", "a") as f:
        f.write(" ")
    with pytest.raises(UserError, match=r"config\.json: sha256 .* does not match"):
        fetch_local(copy, tmp_path / "base")
    assert not (tmp_path / "base").exists()


def test_missing_local_directory_is_named(tmp_path):
    with pytest.raises(UserError, match=r"nowhere: model directory not found"):
        fetch_local(tmp_path / "nowhere", tmp_path / "base")


def test_unreadable_checkpoint_is_one_line(tmp_path, random_checkpoint):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(random_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    (broken / "SHA256SUMS").unlink()  # without checksums, the loader itself must fail cleanly
    with pytest.raises(UserError) as err:
        load_checkpoint(broken)
    assert "unreadable checkpoint" in str(err.value) and "\n" not in str(err.value)


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llava"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UserError, match="pickled weights are never loaded"):
        load_checkpoint(tmp_path)


def test_checkpoint_with_checksums_names_the_corrupt_file(tmp_path, random_checkpoint):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(random_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match=r"model\.safetensors: sha256"):
        load_checkpoint(broken)


def test_unlisted_file_in_local_source_is_refused(tmp_path, random_checkpoint):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(random_checkpoint, copy)
    (copy / "extra.json").write_text("{}")
    with pytest.raises(UserError, match=r"extra\.json not listed in SHA256SUMS"):
        fetch_local(copy, tmp_path / "base")
