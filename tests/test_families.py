"""The family layer: registry, refusals, prompts from chat templates, facts, the README's matrix, house rules."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from shrunk_models import VARIANTS, llava15_clip_llama, llava_interleave_qwen2
from vlm_factory.errors import UserError
from vlm_factory.families import FAMILIES, FORMATS, family_of, support_matrix
from vlm_factory.families.registry import support_matrix_markdown
from vlm_factory.model.checkpoint import load_model

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = {"tiny-llava-siglip": ROOT / "models" / "tiny-llava-siglip", "tiny-llava-qwen2": ROOT / "models" / "tiny-llava-qwen2"}


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("shrunk")
    return {name: build(out / name, "hub") for name, build in VARIANTS.items()}


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_template_renders_the_trained_prompt(name):
    """The saved chat template (rendered by transformers, trim_blocks on) gives the prompt the base was trained on."""
    from vlm_factory.model.prompt import tiny_prompt_spec, user_prompt

    family, _, processor = load_model(BUNDLED[name])
    prompt = family.prompt(processor)
    assert prompt == tiny_prompt_spec(16)
    assert prompt.render("What color is the circle? ") == user_prompt("What color is the circle?")


def test_hub_chat_templates_give_each_models_own_layout(shrunk):
    family, _, processor = load_model(shrunk["llava15_clip_llama"])
    prompt = family.prompt(processor)
    assert prompt.template == "USER: <image>\n{question} ASSISTANT:"
    assert prompt.add_special_tokens and prompt.answer.endswith("</s>")
    ids = processor.tokenizer(prompt.expanded("Is it red?"), add_special_tokens=prompt.add_special_tokens).input_ids
    assert ids[0] == processor.tokenizer.bos_token_id and ids.count(family.image_token_id) == 16

    family, _, processor = load_model(shrunk["llava_interleave_qwen2"])
    prompt = family.prompt(processor)
    assert prompt.template.startswith("<|im_start|>user\n<image>\n{question}<|im_end|>")
    assert prompt.answer == "{answer}<|im_end|>"  # trained up to the end of the turn, not the newline after it
    ids = processor.tokenizer(prompt.expanded("Is it red?"), add_special_tokens=prompt.add_special_tokens).input_ids
    assert ids[0] == processor.tokenizer.convert_tokens_to_ids("<|im_start|>")  # Qwen2 adds no BOS


def test_facts_of_the_shrunk_real_configs(shrunk):
    clip = family_of(shrunk["llava15_clip_llama"])
    assert (clip.vision.tower, clip.vision.has_cls_token, clip.vision.drop_cls) == ("clip", True, True)
    assert clip.vision.feature_layer == 2  # -2 of a 3-layer tower, as a hidden_states index
    assert clip.image_tokens == 16 and clip.text.arch == "llama" and not clip.text.tied_embeddings
    qwen = family_of(shrunk["llava_interleave_qwen2"])
    assert (qwen.text.arch, qwen.text.num_heads, qwen.text.num_kv_heads, qwen.text.head_dim) == ("qwen2", 14, 2, 64)
    assert qwen.text.qkv_bias and qwen.text.tied_embeddings and qwen.text.rope_theta == 1e6
    assert qwen.image_tokens == 16 and not qwen.vision.drop_cls


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_param_counts_are_exact(shrunk, variant):
    from vlm_factory.budget import param_counts

    family, model, _ = load_model(shrunk[variant])
    assert param_counts(family)["total"] == sum(p.numel() for p in model.parameters())


def test_checkpoint_keys_place_every_tensor(shrunk):
    from safetensors import safe_open

    for path in shrunk.values():
        family = family_of(path)
        with safe_open(path / "model.safetensors", framework="pt") as f:
            placed = {key: family.checkpoint_key(key) for key in f.keys()}
        assert all(placed.values()), [k for k, v in placed.items() if v is None]
        assert {p.component for p in placed.values()} == {"llm", "vision", "connector"}


def _rewrite_config(src: Path, dst: Path, **changes) -> Path:
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_unknown_model_type_is_one_line(tmp_path):
    path = _rewrite_config(BUNDLED["tiny-llava-siglip"], tmp_path / "m", model_type="fuyu")
    with pytest.raises(UserError) as info:
        family_of(path)
    message = str(info.value)
    assert "\n" not in message and "'fuyu'" in message and "llava" in message


@pytest.mark.parametrize("changes, fmt, reason", [
    ({"vision_feature_layer": [-2, -1]}, "onnx", "one layer index is supported"),
    ({"projector_hidden_act": "relu"}, "gguf", "projector activation 'relu'"),
])
def test_unsupported_variant_is_refused_before_work(tmp_path, changes, fmt, reason):
    from vlm_factory.export.targets import export_target

    path = _rewrite_config(BUNDLED["tiny-llava-siglip"], tmp_path / "m", **changes)
    with pytest.raises(UserError) as info:
        export_target(fmt, model_dir=path, out_dir=tmp_path / "out", tier="t", settings={}, data_dir=tmp_path,
                      export_cfg=None, context_tokens=256)
    message = str(info.value)
    assert "\n" not in message and reason in message and f"cannot be exported to {fmt}" in message
    assert "llava" in message and not (tmp_path / "out").exists()


def test_readme_matrix_is_the_registrys():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- support-matrix:start -->\n", 1)[1].split("<!-- support-matrix:end -->", 1)[0]
    assert section == support_matrix_markdown(), "run `vlm-factory families --update README.md`"


def test_every_registered_pair_has_a_test():
    """Like optimum's completeness test: a supported (family, format) pair in the registry needs a test marked
    for it (a refused pair is tested by its refusal)."""
    marked = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        marked |= set(re.findall(r"family_format\(\s*[\"'](\w+)[\"']\s*,\s*[\"'](\w+)[\"']", path.read_text()))
    missing = [(row["family"], row["format"]) for row in support_matrix()
               if row["supported"] and (row["family"], row["format"]) not in marked]
    assert not missing, f"registered (family, format) pairs without a test marked family_format(...): {missing}"
    assert {f.name for f in FAMILIES} and set(FORMATS) == {"gguf", "onnx", "coreml", "tflite"}


# Names of one family's classes and module paths: only the family layer may spell them.
FAMILY_SPECIFIC = re.compile(r"\bLlava\w*|\bLlama(Config|Model|ForCausalLM|DecoderLayer)\b|\.language_model\b|"
                             r"multi_modal_projector|\.vision_tower\b|model\.model\.|\bSiglip[A-Z]\w*|\bCLIP[A-Z]\w*|\bQwen2[A-Z]\w*")


def test_exporters_and_runtimes_never_name_a_family():
    offenders = []
    for folder in ("export", "runtime", "eval", "publish"):
        for path in (ROOT / "src" / "vlm_factory" / folder).glob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if FAMILY_SPECIFIC.search(line.split("#")[0]):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_qwen2_base_computes_what_the_llama_base_computes():
    """The transplant keeps the function: same logits (zero QKV biases), and the committed copy verifies."""
    _, llama, processor = load_model(BUNDLED["tiny-llava-siglip"])
    family, qwen, _ = load_model(BUNDLED["tiny-llava-qwen2"])  # SHA256SUMS verified on load
    assert family.text.arch == "qwen2" and family.text.qkv_bias
    prompt = family.prompt(processor)
    ids = torch.tensor([processor.tokenizer(prompt.expanded("How many shapes are there?")).input_ids])
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))[:1]
    with torch.no_grad():
        expected = llama(input_ids=ids, pixel_values=pixels).logits
        got = qwen(input_ids=ids, pixel_values=pixels).logits
    # Same weights, same ops: equal up to float reassociation (measured 0.0).
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_transplant_from_a_random_base_is_exact(random_llava):
    from vlm_factory.model.transplant import llava_with_qwen2

    model, processor = random_llava
    qwen = llava_with_qwen2(model)
    ids = torch.tensor([[1, 5, 9, 3, 3, 7]])
    with torch.no_grad():
        torch.testing.assert_close(qwen(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)
