"""The whole llama.cpp packaging: mmproj metadata, and answers in llama.cpp itself against the reference."""

import importlib.util

import numpy as np
import pytest

from conftest import BUNDLED_BASE
from vlm_factory.errors import UserError
from vlm_factory.export.gguf_mmproj import write_mmproj_gguf

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed")


def _field(reader, key):
    field = reader.fields[key]
    return field.parts[field.data[0]]


@pytest.fixture(scope="module")
def mmproj(tmp_path_factory):
    path = tmp_path_factory.mktemp("mmproj") / "mmproj-f32.gguf"
    write_mmproj_gguf(BUNDLED_BASE, path)
    return path


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


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python (the gguf extra) is not installed")
def test_llama_cpp_answers_like_the_reference(tmp_path, mmproj, synthetic_data):
    from vlm_factory.data.images import load_image
    from vlm_factory.data.records import read_jsonl
    from vlm_factory.eval.generate import answer_questions
    from vlm_factory.export.gguf_llm import write_llm_gguf
    from vlm_factory.model.checkpoint import load_checkpoint
    from vlm_factory.runtime.llama_cpp import LlamaCppRuntime

    llm = tmp_path / "llm-f32.gguf"
    write_llm_gguf(BUNDLED_BASE, llm, "F32")
    records = read_jsonl(synthetic_data / "eval.jsonl")[:36]
    images = [load_image(synthetic_data / r.image) for r in records]
    questions = [r.question for r in records]
    model, processor = load_checkpoint(BUNDLED_BASE)
    reference = answer_questions(model, processor, images, questions)
    ours = LlamaCppRuntime(llm, mmproj).answer(images, questions)
    agreement = np.mean([a == b for a, b in zip(ours, reference)])
    # F32 files and an F32 KV cache: only resampling in llama.cpp's letterbox may differ.
    print(f"llama.cpp agrees with transformers on {agreement:.1%} of {len(records)} answers")
    assert agreement >= 0.9, list(zip(questions, reference, ours))
