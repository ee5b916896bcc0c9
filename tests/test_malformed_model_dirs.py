"""Generated malformed model directories: each is a one-line UserError naming the file (and the key),
never a traceback, a hang or an absurd allocation.

Bases: the bundled tiny base (copied, never modified) and two shrunk real checkpoints
(tests/shrunk_models.py: LLaVA-1.5 CLIP + Llama-2 and llava-interleave SigLIP + Qwen2, hub layout),
built once per module. Each case links a fresh copy of one base and breaks one thing in it:

- config.json: every numeric key the facts read (text_config, vision_config, top level) set to 0, -1,
  1e9, 1.5, "x", null, [], {}, NaN or a 400-digit integer, or deleted; keys of the wrong JSON type;
  relations between keys (heads that do not divide, a patch larger than the image, token ids past the
  vocabulary); the file itself (garbage, not UTF-8, truncated, a list, 100000 levels deep, empty, huge);
- processor files (tokenizer.json, tokenizer_config.json, chat templates, preprocessor/processor
  config): garbage, not UTF-8, truncated, a list, deep nesting, empty; chat templates that do not parse,
  do not render, or render the image or the question other than once; preprocessing values no image
  survives; token ids past the embedding table;
- safetensors: truncated, an absurd header length, a header that is not JSON, an unknown dtype, offsets
  past the end, a tensor missing or shaped otherwise than config.json says.

Entry points: `family_of` (config.json only, no weights), `load_model` (weights: only for the weight
and model-file cases), the family's processor, prompt and preprocessing, and the GGUF vocabulary reader;
a few cases run `vlm-factory ask` in a subprocess (exit status 2, one `error:` line, no traceback).
Every call runs under an alarm, so a hang fails instead of stalling the suite.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import BUNDLED_BASE, deadline, ROOT
from shrunk_models import llava15_clip_llama, llava_interleave_qwen2
from vlm_factory.errors import UserError
from vlm_factory.families import family_of
from vlm_factory.model.checkpoint import load_model

BASES = ("bundled", "clip_llama", "qwen2")
# Legitimate calls here take well under a second (a full load of the bundled base ~0.1 s); on a busy
# 2-core machine 30 s is still a hang, not slowness.
DEADLINE_S = 30
DELETE = object()  # a mutation value: remove the key



def expect_user_error(call: Callable[[], object], *needles: str) -> str:
    """`call` raises a one-line UserError containing every needle; any other exception fails the test."""
    with deadline(DEADLINE_S), pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in: {message}"
    return message


# -- bases and copies --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("bases")
    bundled = out / "bundled"
    shutil.copytree(BUNDLED_BASE, bundled)
    # SHA256SUMS names any changed byte first (as it should); without it the parsers behind it are what is tested.
    (bundled / "SHA256SUMS").unlink()
    # The Qwen2 LLM shrunk to width 56 (14 heads of 4): the case is the config, not the size.
    return {"bundled": bundled, "clip_llama": llava15_clip_llama(out / "clip_llama"),
            "qwen2": llava_interleave_qwen2(out / "qwen2", text_hidden=56, text_intermediate=64)}


def fresh_copy(bases: dict[str, Path], base: str, tmp_path: Path) -> Path:
    """A copy of a base whose files are hard links (cheap): change files with `write` only."""
    out = tmp_path / base
    shutil.copytree(bases[base], out, copy_function=os.link)
    return out


def write(path: Path, data: bytes | str) -> None:
    """Replace a file: unlink first, so nothing is written through a hard link into the shared base."""
    path.unlink(missing_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    write(path, json.dumps(data))


def set_key(config: dict, dotted: str, value) -> None:
    """Set (or, with DELETE, remove) a dotted key such as `text_config.rope_parameters.rope_theta`."""
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    if value is DELETE:
        node.pop(leaf, None)
    else:
        node[leaf] = value


def get_key(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def with_config(bases, base: str, tmp_path: Path, **changes) -> Path:
    """A copy of `base` with config.json keys changed (`__` for `.` in the keyword names)."""
    directory = fresh_copy(bases, base, tmp_path)

    def change(config: dict) -> None:
        for key, value in changes.items():
            set_key(config, key.replace("__", "."), value)
    edit_json(directory / "config.json", change)
    return directory


def base_config(bases, base: str) -> dict:
    return json.loads((bases[base] / "config.json").read_text())


def garbage(size: int = 512, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


# -- config.json: every numeric key the facts read ---------------------------------------------------------

NUMERIC_KEYS = [f"text_config.{k}" for k in (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_parameters.rope_theta",
    "bos_token_id", "eos_token_id", "pad_token_id")] + [f"vision_config.{k}" for k in (
    "image_size", "patch_size", "num_channels", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "layer_norm_eps")] + ["vision_feature_layer", "image_seq_length", "image_token_index"]
BAD_VALUES = {"zero": 0, "minus_one": -1, "1e9": 10 ** 9, "fraction": 1.5, "string": "x", "null": None,
              "list": [], "object": {}, "nan": math.nan, "400_digits": 10 ** 400}
TOKEN_KEYS = ("text_config.bos_token_id", "text_config.eos_token_id", "text_config.pad_token_id")
# (key, value) pairs that are legitimate, so family_of must accept them; every other pair is refused.
VALID_VALUES = {
    # transformers derives these when null: key/value heads = the heads, head_dim = hidden / heads
    ("text_config.num_key_value_heads", "null"), ("text_config.head_dim", "null"),
    # token 0 is a token like any other, and a checkpoint may have no BOS, EOS or pad token
    *((key, value) for key in TOKEN_KEYS for value in ("zero", "null")),
    ("image_token_index", "zero"),
    # hidden state 0 (the embeddings) and -1 (the last layer) are both indices a connector may read
    ("vision_feature_layer", "zero"), ("vision_feature_layer", "minus_one"),
    # any finite positive rotary base is one (published ones range 1e4 .. 1e8)
    ("text_config.rope_parameters.rope_theta", "1e9"), ("text_config.rope_parameters.rope_theta", "fraction"),
}


def test_the_allow_list_names_real_keys_and_values():
    assert {key for key, _ in VALID_VALUES} <= set(NUMERIC_KEYS)
    assert {value for _, value in VALID_VALUES} <= set(BAD_VALUES)


@pytest.mark.parametrize("value_name", sorted(BAD_VALUES))
@pytest.mark.parametrize("key", NUMERIC_KEYS)
@pytest.mark.parametrize("base", BASES)
def test_numeric_key_values(bases, tmp_path, base, key, value_name):
    directory = with_config(bases, base, tmp_path, **{key.replace(".", "__"): BAD_VALUES[value_name]})
    if (key, value_name) in VALID_VALUES:
        with deadline(DEADLINE_S):
            family = family_of(directory)
            family.summary(), family.param_counts()  # every fact computes
        return
    expect_user_error(lambda: family_of(directory), "config.json", key)


# Keys whose deletion transformers fills with its default (LlamaConfig / Qwen2Config / CLIPVisionConfig /
# SiglipVisionConfig / LlavaConfig's own), a value family_of may accept: what then decides is whether the
# weights hold what the default describes (they load) or not (one line naming the weights).
DELETABLE = {
    # LLM sizes: the defaults (hidden 4096, 32 layers and heads, vocabulary 32000, ...) are a real LLM's
    "text_config.hidden_size", "text_config.intermediate_size", "text_config.num_hidden_layers",
    "text_config.num_attention_heads", "text_config.vocab_size", "text_config.max_position_embeddings",
    # Llama derives them from the heads / hidden size (Qwen2's default of 32 KV heads may not divide: refused)
    "text_config.num_key_value_heads", "text_config.head_dim",
    # norm epsilon, rotary base, special tokens: defaults every decoder config has
    "text_config.rms_norm_eps", "text_config.rope_parameters.rope_theta", *TOKEN_KEYS,
    # tower sizes: CLIP's / SigLIP's defaults are real towers' (SigLIP's 16 px patch is the bundled base's own)
    # (their default heads, 12, divide none of the bases' tower widths: that deletion is refused)
    "vision_config.patch_size", "vision_config.num_channels", "vision_config.hidden_size",
    "vision_config.intermediate_size", "vision_config.num_hidden_layers", "vision_config.layer_norm_eps",
    # LLaVA reads the second-to-last layer by default (LLaVA-1.5's choice)
    "vision_feature_layer",
}
# A deletion of a key the base does not have changes nothing: only keys each base holds are deleted.
ABSENT_KEYS = {("qwen2", "text_config.head_dim")}


def test_deletable_keys_are_numeric_keys():
    assert DELETABLE <= set(NUMERIC_KEYS)


@pytest.mark.parametrize("base, key", [(b, k) for b in BASES for k in NUMERIC_KEYS if (b, k) not in ABSENT_KEYS])
def test_deleted_key(bases, tmp_path, base, key):
    directory = with_config(bases, base, tmp_path, **{key.replace(".", "__"): DELETE})
    try:
        with deadline(DEADLINE_S):
            family_of(directory)
    except UserError as exc:  # refused: the default disagrees with the rest of config.json
        assert "\n" not in str(exc) and "config.json" in str(exc), str(exc)
        return
    assert key in DELETABLE, f"deleting {key} is accepted: list it in DELETABLE with the reason, or refuse it"
    load_or_refuse(directory)


def load_or_refuse(directory: Path) -> None:
    """The model loads, or is refused in one line naming a file of the directory, before transformers allocates."""
    try:
        with deadline(DEADLINE_S):
            load_model(directory)
    except UserError as exc:
        message = str(exc)
        assert "\n" not in message and str(directory) in message, message


# -- config.json: relations between keys, JSON types, the file itself ------------------------------------

def _sizes(config: dict) -> dict:
    text, vision = config["text_config"], config["vision_config"]
    return {"text_heads": text["num_attention_heads"], "text_hidden": text["hidden_size"],
            "vision_heads": vision["num_attention_heads"], "vision_hidden": vision["hidden_size"],
            "image": vision["image_size"], "vision_layers": vision["num_hidden_layers"],
            "vocab": text["vocab_size"]}


# name -> (the changes, given the base's sizes; the key the error must name)
RELATIONS = {
    "text_hidden_not_a_multiple_of_heads": (lambda s: {"text_config.hidden_size": s["text_hidden"] + 1},
                                            "text_config.hidden_size"),
    "kv_heads_do_not_divide_heads": (lambda s: {"text_config.num_key_value_heads": 3},
                                     "text_config.num_key_value_heads"),
    "vision_hidden_not_a_multiple_of_heads": (lambda s: {"vision_config.hidden_size": s["vision_hidden"] + 1},
                                              "vision_config.hidden_size"),
    "patch_larger_than_image": (lambda s: {"vision_config.patch_size": s["image"] + 1}, "vision_config.patch_size"),
    "feature_layer_past_the_tower": (lambda s: {"vision_feature_layer": s["vision_layers"] + 1},
                                     "vision_feature_layer"),
    "feature_layer_before_the_tower": (lambda s: {"vision_feature_layer": -s["vision_layers"] - 2},
                                       "vision_feature_layer"),
    "one_listed_feature_layer_past_the_tower": (lambda s: {"vision_feature_layer": [-1, s["vision_layers"] + 5]},
                                                "vision_feature_layer"),
    "image_seq_length_not_the_towers": (lambda s: {"image_seq_length": 15}, "image_seq_length"),
    "bos_past_the_vocabulary": (lambda s: {"text_config.bos_token_id": s["vocab"]}, "text_config.bos_token_id"),
    "one_eos_past_the_vocabulary": (lambda s: {"text_config.eos_token_id": [0, s["vocab"] + 7]},
                                    "text_config.eos_token_id"),
    "pad_past_the_vocabulary": (lambda s: {"text_config.pad_token_id": s["vocab"] * 2}, "text_config.pad_token_id"),
    "image_token_past_the_vocabulary": (lambda s: {"image_token_index": s["vocab"]}, "image_token_index"),
    "vocabulary_smaller_than_its_tokens": (lambda s: {"text_config.vocab_size": 2}, "vocab_size"),
}


@pytest.mark.parametrize("relation", sorted(RELATIONS))
@pytest.mark.parametrize("base", BASES)
def test_keys_that_disagree(bases, tmp_path, base, relation):
    changes, key = RELATIONS[relation]
    directory = with_config(bases, base, tmp_path, **{k.replace(".", "__"): v
                                                        for k, v in changes(_sizes(base_config(bases, base))).items()})
    expect_user_error(lambda: family_of(directory), "config.json", key)


def test_a_patch_that_does_not_divide_the_image_is_a_real_tower(bases, tmp_path):
    """60 px with 14 px patches: the patch convolution floors to 4 x 4 (as SigLIP so400m-patch14-384 reads
    27 x 27 patches of 384 px); the same 16 image tokens, the same weights: the model loads."""
    directory = with_config(bases, "clip_llama", tmp_path, vision_config__image_size=60)
    with deadline(DEADLINE_S):
        family, _, _ = load_model(directory)
    assert family.image_tokens == 16


# key -> values of the wrong JSON type (or kind) for a key the family reads; the error names the key.
WRONG_TYPES = {
    "model_type": [3, None, ["llava"]],
    "text_config": [[], "llama", None, 3],
    "vision_config": [[], "clip", None],
    "text_config.model_type": [3, None],
    "vision_config.model_type": [[], 7],
    "text_config.rope_parameters": [[], "default", 10000.0],
    "text_config.attention_bias": ["no", 0],
    "text_config.tie_word_embeddings": ["true"],
    "vision_config.hidden_act": [3, None],
    "vision_config.vision_use_head": ["false"],
    "projector_hidden_act": [None, ["gelu"]],
    "tie_word_embeddings": ["yes", 1],
    "multimodal_projector_bias": [None],
    "vision_feature_select_strategy": ["first", 3, None],
    "vision_feature_layer": [[-2, "x"], [True], [None], [-1] * 2000],
    "text_config.eos_token_id": [[2, None], [True], [[2]]],
    "image_token_index": [True, None, "318"],
}


@pytest.mark.parametrize("key, value", [(k, v) for k, values in WRONG_TYPES.items() for v in values],
                         ids=lambda x: repr(x)[:30])
def test_value_of_the_wrong_json_type(bases, tmp_path, key, value):
    directory = with_config(bases, "bundled", tmp_path, **{key.replace(".", "__"): value})
    expect_user_error(lambda: family_of(directory), "config.json", key)


def test_missing_model_type_is_named(bases, tmp_path):
    directory = with_config(bases, "bundled", tmp_path, model_type=DELETE)
    expect_user_error(lambda: family_of(directory), "config.json", "model_type")


def _nested(levels: int, inner: str = "1") -> str:
    return "[" * levels + inner + "]" * levels


# name -> the new config.json, from the original bytes
CONFIG_FILES = {
    "garbage": lambda data: garbage(),
    "not_utf8": lambda data: data[:1] + b"\xff\xfe" + data[1:],
    "truncated": lambda data: data[:len(data) // 2],
    "a_list": lambda data: b"[" + data + b"]",
    "100000_levels_deep": lambda data: _nested(100_000).encode(),
    "100000_levels_deep_inside_text_config": lambda data: ('{"model_type": "llava", "text_config": '
                                                           + _nested(100_000) + "}").encode(),
    # parses (within Python's recursion), but transformers deep-copies configs recursively
    "900_levels_deep_in_an_unread_key": lambda data: data.replace(b"{", b'{"unread": '
                                                                  + _nested(900).encode() + b", ", 1),
    "empty": lambda data: b"",
    "nul_bytes": lambda data: b"\0" * 256,
    "a_number": lambda data: b"3",
    "huge": lambda data: data.replace(b"{", b'{"padding": "' + b" " * (17 << 20) + b'", ', 1),
}


@pytest.mark.parametrize("mutation", sorted(CONFIG_FILES))
@pytest.mark.parametrize("base", BASES)
def test_config_json_file(bases, tmp_path, base, mutation):
    directory = fresh_copy(bases, base, tmp_path)
    write(directory / "config.json", CONFIG_FILES[mutation]((bases[base] / "config.json").read_bytes()))
    expect_user_error(lambda: family_of(directory), "config.json")


def test_config_limits_keep_a_billion_layers_from_transformers(bases, tmp_path):
    """The attack run's hang: refused from the JSON, before transformers builds a per-layer list."""
    directory = with_config(bases, "qwen2", tmp_path, text_config__num_hidden_layers=10 ** 9,
                            text_config__layer_types=DELETE)
    expect_user_error(lambda: load_model(directory), "config.json", "text_config.num_hidden_layers")


# -- processor files -----------------------------------------------------------------------------------------

def processor_entry(directory: Path) -> None:
    """What every runtime config is written from: the processor, its prompt and its preprocessing."""
    family = family_of(directory)
    processor = family.load_processor(directory)
    family.prompt(processor)
    family.preprocessing(processor)


def gguf_entry(directory: Path) -> None:
    """What the GGUF export reads of the tokenizer: the vocabulary and the chat template."""
    from vlm_factory.export.gguf_tokenizer import read_vocabulary

    read_vocabulary(directory, family_of(directory).text.vocab_size)


ENTRY_POINTS = {"processor": processor_entry, "gguf": gguf_entry}
BOTH = ("processor", "gguf")
# Files each base holds that transformers parses as JSON objects when it loads the processor.
PROCESSOR_JSON = {"bundled": ("tokenizer.json", "tokenizer_config.json", "processor_config.json"),
                  "clip_llama": ("tokenizer.json", "tokenizer_config.json", "processor_config.json",
                                 "preprocessor_config.json", "chat_template.json"),
                  "qwen2": ("tokenizer.json", "tokenizer_config.json", "processor_config.json",
                            "preprocessor_config.json", "chat_template.json")}
FILE_MUTATIONS = {
    "garbage": lambda data: garbage(seed=len(data)),
    "not_utf8": lambda data: data[:1] + b"\xff\xfe" + data[1:],
    "truncated": lambda data: data[:len(data) // 2],
    "a_list": lambda data: b"[" + data + b"]",
    "deeply_nested": lambda data: _nested(100_000).encode(),
    "empty": lambda data: b"",
}


@pytest.mark.parametrize("mutation", sorted(FILE_MUTATIONS))
@pytest.mark.parametrize("base, name", [(b, n) for b, names in PROCESSOR_JSON.items() for n in names])
def test_processor_json_file(bases, tmp_path, base, name, mutation):
    directory = fresh_copy(bases, base, tmp_path)
    write(directory / name, FILE_MUTATIONS[mutation]((bases[base] / name).read_bytes()))
    for entry in BOTH:
        expect_user_error(lambda: ENTRY_POINTS[entry](directory), name)


QUESTION_AND_ANSWER = ("{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
                       "{% endif %}{% endfor %}")


def _template(image: str = "{{ '<image>' }}", text: str = QUESTION_AND_ANSWER) -> str:
    return ("{% for message in messages %}{{ message['role'] + ': ' }}"
            "{% for item in message['content'] %}{% if item['type'] == 'image' %}" + image + "{% endif %}{% endfor %}"
            + text + "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


# name -> (template, the entry points that must refuse it): a template that parses is only rendered
# for the prompt; the GGUF carries the text as it is (after the same parse check).
TEMPLATES = {
    "syntax_error": ("{% for message in messages %}{{ message['role'] }", BOTH),
    "unclosed_block": ("{% if add_generation_prompt %}ASSISTANT:", BOTH),
    "unknown_tag": ("{% frobnicate %}", BOTH),
    "too_large": ("{% if true %}" * 100_000 + "{% endif %}" * 100_000, BOTH),
    "nested_past_the_recursion_limit": ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", BOTH),
    "no_image": (_template(image=""), ("processor",)),
    "two_images": (_template(image="{{ '<image><image>' }}"), ("processor",)),
    "no_question": (_template(text=""), ("processor",)),
    "raises_when_rendered": ("{{ raise_exception('refused') }}", ("processor",)),
    "calls_what_is_undefined": ("{{ messages.nothing() }}", ("processor",)),
    "plain_text": ("hello", ("processor",)),
}
# Where a base's template is put: its own file, or moved into another source transformers reads.
TEMPLATE_HOMES = [("bundled", "chat_template.jinja"), ("qwen2", "chat_template.json"),
                  ("clip_llama", "tokenizer_config.json"), ("qwen2", "processor_config.json")]
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def put_template(directory: Path, home: str, template) -> None:
    """Make `template` the directory's chat template, held by `home` (other template files removed)."""
    for name in TEMPLATE_FILES:
        (directory / name).unlink(missing_ok=True)
    if home == "chat_template.jinja":
        write(directory / home, template if isinstance(template, (str, bytes)) else json.dumps(template))
    elif home == "chat_template.json":
        write(directory / home, json.dumps({"chat_template": template}))
    else:
        edit_json(directory / home, lambda data: data.update(chat_template=template))


@pytest.mark.parametrize("template_name", sorted(TEMPLATES))
@pytest.mark.parametrize("base, home", TEMPLATE_HOMES)
def test_chat_template(bases, tmp_path, base, home, template_name):
    template, refused_by = TEMPLATES[template_name]
    directory = fresh_copy(bases, base, tmp_path)
    put_template(directory, home, template)
    for entry in refused_by:
        expect_user_error(lambda: ENTRY_POINTS[entry](directory), home)


# name -> a `chat_template` value of the wrong type, for each home that holds it in JSON
TEMPLATE_VALUES = {"a_number": 3, "a_list_of_numbers": [1, 2], "named_templates_without_text": [{"name": "default"}],
                   "named_template_a_number": [{"name": "default", "template": 7}],
                   "an_object_of_numbers": {"default": 3}}


@pytest.mark.parametrize("value_name", sorted(TEMPLATE_VALUES))
@pytest.mark.parametrize("base, home", [h for h in TEMPLATE_HOMES if h[1] != "chat_template.jinja"])
def test_chat_template_value_of_the_wrong_type(bases, tmp_path, base, home, value_name):
    directory = fresh_copy(bases, base, tmp_path)
    put_template(directory, home, TEMPLATE_VALUES[value_name])
    for entry in BOTH:
        expect_user_error(lambda: ENTRY_POINTS[entry](directory), home, "chat_template")


def test_a_template_file_not_utf8_is_named(bases, tmp_path):
    directory = fresh_copy(bases, "bundled", tmp_path)
    write(directory / "chat_template.jinja", b"{{ '\xff' }}" + garbage())
    for entry in BOTH:
        expect_user_error(lambda: ENTRY_POINTS[entry](directory), "chat_template.jinja", "UTF-8")


def test_named_templates_give_the_default(bases, tmp_path):
    """The legacy list of named templates (tokenizer_config.json) is read: its `default` is the template."""
    directory = fresh_copy(bases, "clip_llama", tmp_path)
    original = json.loads((bases["clip_llama"] / "chat_template.json").read_text())["chat_template"]
    put_template(directory, "tokenizer_config.json", [{"name": "tool_use", "template": "x"},
                                                      {"name": "default", "template": original}])
    from vlm_factory.export.gguf_tokenizer import read_chat_template

    with deadline(DEADLINE_S):
        assert read_chat_template(directory) == original


def _image_processor(data: dict) -> dict:
    """The image processor settings of a preprocessor_config.json, or nested in processor_config.json."""
    return data.get("image_processor", data)


# name -> changes of the image processor settings; the key the error names
PREPROCESSING = {
    "mean_a_string": ({"image_mean": "x"}, "image_mean"),
    "mean_empty": ({"image_mean": []}, "image_mean"),
    "mean_nan": ({"image_mean": [math.nan] * 3}, "image_mean"),
    "std_zero": ({"image_std": [0.0, 0.0, 0.0]}, "image_std"),
    "std_negative": ({"image_std": [-0.5, 0.5, 0.5]}, "image_std"),
    "size_negative": ({"size": {"height": -1, "width": 56}, "do_resize": True}, "size"),
    "size_huge": ({"size": {"height": 10 ** 9, "width": 56}, "do_resize": True}, "size"),
    "resample_a_string": ({"resample": "x"}, "resample"),
    "rescale_a_string": ({"rescale_factor": "x", "do_rescale": True}, "rescale_factor"),
    "rescale_zero": ({"rescale_factor": 0, "do_rescale": True}, "rescale_factor"),
}
PREPROCESSOR_FILE = {"bundled": "processor_config.json", "clip_llama": "preprocessor_config.json",
                     "qwen2": "preprocessor_config.json"}


@pytest.mark.parametrize("change", sorted(PREPROCESSING))
@pytest.mark.parametrize("base", BASES)
def test_preprocessing_values(bases, tmp_path, base, change):
    changes, key = PREPROCESSING[change]
    directory = fresh_copy(bases, base, tmp_path)
    edit_json(directory / PREPROCESSOR_FILE[base], lambda data: _image_processor(data).update(changes))
    expect_user_error(lambda: processor_entry(directory), PREPROCESSOR_FILE[base], key)


def _tokenizer_id_past_the_embedding(data: dict) -> None:
    data["model"]["vocab"]["zzzz"] = 4_000_000_000  # an id tokenizers accepts, far past any embedding table


def _tokenizer_model_unknown(data: dict) -> None:
    data["model"]["type"] = "Nope"


def _tokenizer_added_token_not_an_object(data: dict) -> None:
    data["added_tokens"] = [3]


# name -> (change of tokenizer.json, the entry points that refuse it)
TOKENIZERS = {
    "id_past_the_embedding_table": (_tokenizer_id_past_the_embedding, ("gguf",)),
    "unknown_model_type": (_tokenizer_model_unknown, BOTH),
    "added_token_not_an_object": (_tokenizer_added_token_not_an_object, BOTH),
}


@pytest.mark.parametrize("change", sorted(TOKENIZERS))
@pytest.mark.parametrize("base", BASES)
def test_tokenizer_json_structure(bases, tmp_path, base, change):
    edit, refused_by = TOKENIZERS[change]
    directory = fresh_copy(bases, base, tmp_path)
    edit_json(directory / "tokenizer.json", edit)
    for entry in refused_by:
        expect_user_error(lambda: ENTRY_POINTS[entry](directory), "tokenizer.json")


# -- weights and the other files a model load reads --------------------------------------------------------

def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length]), data[8 + length:]


def join_safetensors(header: dict | bytes, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


def _first_tensor(header: dict) -> str:
    return next(name for name in header if name != "__metadata__")


def _edit_header(change: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    def mutate(data: bytes) -> bytes:
        header, body = split_safetensors(data)
        change(header)
        return join_safetensors(header, body)
    return mutate


def _set_entry(field: str, value) -> Callable[[dict], None]:
    def change(header: dict) -> None:
        header[_first_tensor(header)][field] = value
    return change


def _grow_first_dimension(header: dict) -> None:
    entry = header[_first_tensor(header)]
    entry["shape"] = [entry["shape"][0] + 1, *entry["shape"][1:]]


def _end_past_the_file(header: dict) -> None:
    last = max((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][1])
    header[last]["data_offsets"][1] += 4096


WEIGHT_FILES = {
    "truncated_half": lambda data: data[:len(data) // 2],
    "truncated_to_4_bytes": lambda data: data[:4],
    "truncated_by_one_byte": lambda data: data[:-1],
    "empty": lambda data: b"",
    "64_zero_bytes": lambda data: b"\0" * 64,
    "header_length_absurd": lambda data: (1 << 63).to_bytes(8, "little") + data[8:],
    "header_length_past_the_end": lambda data: len(data).to_bytes(8, "little") + data[8:],
    "header_not_json": lambda data: join_safetensors(b"{not json at all" + b" " * 16, split_safetensors(data)[1]),
    "header_not_utf8": lambda data: join_safetensors(b'{"\xff\xfe": 1}', split_safetensors(data)[1]),
    "header_a_list": lambda data: join_safetensors(b"[1, 2]", split_safetensors(data)[1]),
    "header_deeply_nested": lambda data: join_safetensors(_nested(100_000).encode(), split_safetensors(data)[1]),
    "dtype_unknown": _edit_header(_set_entry("dtype", "F17")),
    "dtype_not_a_string": _edit_header(_set_entry("dtype", 16)),
    "shape_negative": _edit_header(_set_entry("shape", [-1, 4])),
    "shape_not_a_list": _edit_header(_set_entry("shape", "x")),
    "shape_of_absurd_rank": _edit_header(_set_entry("shape", [1] * 10_000)),
    "data_size_disagrees_with_shape": _edit_header(_grow_first_dimension),
    "offsets_not_a_pair": _edit_header(_set_entry("data_offsets", [0])),
    "offsets_reversed": _edit_header(_set_entry("data_offsets", [8, 0])),
    "offsets_past_the_end": _edit_header(_end_past_the_file),
    "entry_not_an_object": _edit_header(lambda header: header.update({_first_tensor(header): 3})),
    "metadata_not_strings": _edit_header(lambda header: header.update({"__metadata__": {"format": 3}})),
}


@pytest.mark.parametrize("mutation", sorted(WEIGHT_FILES))
@pytest.mark.parametrize("base", ["bundled", "qwen2"])
def test_safetensors_file(bases, tmp_path, base, mutation):
    directory = fresh_copy(bases, base, tmp_path)
    write(directory / "model.safetensors", WEIGHT_FILES[mutation]((bases[base] / "model.safetensors").read_bytes()))
    expect_user_error(lambda: load_model(directory), "model.safetensors", "unreadable checkpoint")


def _rewrite_tensors(path: Path, change: Callable[[dict], None]) -> None:
    """A valid safetensors file again, after `change` edits its tensors."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    change(tensors)
    path.unlink()
    save_file(tensors, path, metadata={"format": "pt"})


def _first_matrix(tensors: dict) -> str:
    return next(name for name, t in sorted(tensors.items()) if t.dim() == 2)


# name -> (change of the tensors, what the error says)
WEIGHTS_VS_CONFIG = {
    "a_matrix_one_row_short": (lambda t: t.update({_first_matrix(t): t[_first_matrix(t)][:-1].clone()}), "shape"),
    "a_tensor_missing": (lambda t: t.pop(_first_matrix(t)), "lacks 1 tensor"),
    "a_layer_missing": (lambda t: [t.pop(n) for n in [n for n in t if ".layers.1." in n]], "lacks"),
}


@pytest.mark.parametrize("change", sorted(WEIGHTS_VS_CONFIG))
@pytest.mark.parametrize("base", ["bundled", "qwen2"])
def test_weights_that_disagree_with_the_config(bases, tmp_path, base, change):
    edit, needle = WEIGHTS_VS_CONFIG[change]
    directory = fresh_copy(bases, base, tmp_path)
    _rewrite_tensors(directory / "model.safetensors", edit)
    expect_user_error(lambda: load_model(directory), "model.safetensors", needle, "config.json")


@pytest.mark.parametrize("key, value", [("text_config.num_hidden_layers", 3), ("text_config.vocab_size", 1000),
                                        ("vision_config.intermediate_size", 32), ("text_config", DELETE)])
def test_config_describing_other_weights_is_refused_before_allocation(bases, tmp_path, key, value):
    """Valid config values that describe another model: refused from the safetensors headers, before
    transformers would initialise missing layers at random (or allocate a default 7B LLM)."""
    directory = with_config(bases, "bundled", tmp_path, **{key.replace(".", "__"): value})
    expect_user_error(lambda: load_model(directory), "model.safetensors", "config.json")


@pytest.mark.parametrize("mutation", sorted(FILE_MUTATIONS))
def test_generation_config(bases, tmp_path, mutation):
    directory = fresh_copy(bases, "bundled", tmp_path)
    data = (bases["bundled"] / "generation_config.json").read_bytes()
    write(directory / "generation_config.json", FILE_MUTATIONS[mutation](data))
    expect_user_error(lambda: load_model(directory), "generation_config.json")


@pytest.mark.parametrize("base", BASES)
def test_the_unbroken_bases_load(bases, base):
    """The checks refuse nothing real: every base loads, with its prompt, preprocessing and GGUF vocabulary."""
    with deadline(DEADLINE_S):
        family, _, processor = load_model(bases[base])
        family.prompt(processor), family.preprocessing(processor)
    gguf_entry(bases[base])


# -- through the CLI ---------------------------------------------------------------------------------------------

def _break_config(directory: Path) -> None:
    edit_json(directory / "config.json", lambda c: set_key(c, "vision_config.patch_size", 0))


def _break_weights(directory: Path) -> None:
    write(directory / "model.safetensors", (directory / "model.safetensors").read_bytes()[:1000])


def _break_template(directory: Path) -> None:
    write(directory / "chat_template.jinja", "{% for message in messages %}{{ message['role'] }")


def _break_tokenizer(directory: Path) -> None:
    write(directory / "tokenizer.json", garbage())


CLI_CASES = {"config_patch_size_zero": (_break_config, "vision_config.patch_size"),
             "weights_truncated": (_break_weights, "model.safetensors"),
             "template_syntax_error": (_break_template, "chat_template.jinja"),
             "tokenizer_garbage": (_break_tokenizer, "tokenizer.json")}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_ask_prints_one_error_line(bases, tmp_path, case):
    from PIL import Image

    breaker, needle = CLI_CASES[case]
    directory = fresh_copy(bases, "bundled", tmp_path)
    breaker(directory)
    image = tmp_path / "image.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    # A fresh interpreter imports torch and transformers: ~10 s on a busy 2-core machine; 120 s is a hang.
    result = subprocess.run([sys.executable, "-m", "vlm_factory.cli", "ask", str(image), "What color?",
                             "--model", str(directory)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], result.stderr[-2000:]
