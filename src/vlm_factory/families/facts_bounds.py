"""Bounds on the numbers a model family reads from config.json, checked before anything is built from them.

A config.json comes from whoever handed the pipeline a model directory. transformers turns its numbers
into Python objects, lists and modules sized by them, so `num_hidden_layers: 1e9` hangs or exhausts memory
and `patch_size: 0` divides by zero somewhere far away. Every number the facts (`TextFacts`,
`VisionFacts`) hold has one rule here, written once and applied twice:

- to config.json as parsed JSON, before transformers sees it (`check_json_keys`, with each family's
  table of the keys it reads): a value of the wrong JSON type or out of bounds is refused there;
- to the normalised facts, once transformers has filled in its defaults (`check_text_facts`,
  `check_vision_facts`): the same bounds, plus what only holds between numbers (heads divide the
  hidden size, token ids lie inside the vocabulary, the patch fits the image). The relations are
  checked on what config.json states as well, before transformers refuses some of them itself in
  messages that name neither the file nor the key.

Either way the error is one line naming config.json and the key a user would edit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from vlm_factory.errors import UserError

# Caps: far above every published checkpoint, far below what would hang transformers or exhaust memory
# building Python objects per layer, head or token. Real numbers, for scale:
MAX_LAYERS = 1024            # deepest decoders ~126 layers (Llama-3.1-405B), towers <= 48 (InternViT-6B)
MAX_HIDDEN = 1 << 16         # widest hidden sizes 16384 (Llama-3.1-405B), towers <= 3200
MAX_INTERMEDIATE = 1 << 18   # widest MLPs ~53248 (Llama-3.1-405B)
MAX_HEADS = 1024             # <= 128 query heads in practice
MAX_HEAD_DIM = 1024          # <= 256 (Gemma)
MAX_VOCAB = 1 << 22          # largest vocabularies ~262144 (Gemma 3)
MAX_POSITIONS = 1 << 24      # longest declared context 10M tokens (Llama 4 Scout)
MAX_IMAGE_SIZE = 1 << 13     # towers read <= ~1500 px (Pixtral 1024, SigLIP 896)
MAX_CHANNELS = 16            # RGB is 3; a little room for RGBA or multispectral towers
MAX_IMAGE_TOKENS = 1 << 20   # tokens one image adds; it must equal what the tower yields anyway
# config.json itself: real ones are a few KB and nest a few levels (rope_parameters in text_config);
# transformers deep-copies the whole document, recursively, so a deep one would overflow its recursion.
MAX_CONFIG_BYTES = 1 << 24
MAX_CONFIG_DEPTH = 32


@dataclass(frozen=True)
class Rule:
    """What one config value may be: `describe` completes "must be ..." in the error message."""

    describe: str
    accepts: Callable[[object], bool]


def _is_int(value) -> bool:
    return type(value) is int  # bool is an int subclass, and 2.0 is not an integer count


def _is_number(value) -> bool:
    if type(value) is int:  # JSON integers are unbounded; past 2**53 no float (and no real setting) is exact
        return abs(value) <= 1 << 53
    return type(value) is float and math.isfinite(value)


def int_in(low: int, high: int) -> Rule:
    return Rule(f"an integer in {low}..{high}", lambda v: _is_int(v) and low <= v <= high)


def positive_int(cap: int) -> Rule:
    return int_in(1, cap)


def optional(rule: Rule) -> Rule:
    """The rule, or null (transformers then derives the value, e.g. num_key_value_heads from the heads)."""
    return Rule(f"null or {rule.describe}", lambda v: v is None or rule.accepts(v))


def one_of(*choices) -> Rule:
    return Rule(f"one of {', '.join(map(repr, choices))}", lambda v: isinstance(v, str) and v in choices)


STRING = Rule("a string", lambda v: isinstance(v, str))
BOOL = Rule("true or false", lambda v: isinstance(v, bool))
OBJECT = Rule("a JSON object", lambda v: isinstance(v, dict))
POSITIVE = Rule("a finite number above 0", lambda v: _is_number(v) and v > 0)
# Norm epsilons are 1e-6 .. 1e-5 in real models; one of 1 or more would drown the activations it guards.
EPSILON = Rule("a finite number in (0, 1)", lambda v: _is_number(v) and 0 < v < 1)
TOKEN_ID = optional(int_in(0, MAX_VOCAB - 1))
# Some configs list several end-of-sequence tokens (Llama 3: end of text and end of turn).
TOKEN_IDS = Rule(f"null, an integer in 0..{MAX_VOCAB - 1} or a non-empty list of them",
                 lambda v: TOKEN_ID.accepts(v) or (isinstance(v, list) and 0 < len(v) <= 64
                                                   and all(v_ is not None and TOKEN_ID.accepts(v_) for v_ in v)))
# An index into the tower's hidden states, negative from the end; LLaVA may list several.
FEATURE_LAYER = Rule(f"an integer in {-MAX_LAYERS - 1}..{MAX_LAYERS} or a non-empty list of them",
                     lambda v: int_in(-MAX_LAYERS - 1, MAX_LAYERS).accepts(v)
                     or (isinstance(v, list) and 0 < len(v) <= MAX_LAYERS
                         and all(int_in(-MAX_LAYERS - 1, MAX_LAYERS).accepts(x) for x in v)))

# The bounds of every numeric fact, by field name (`keys` tables map them to config.json keys).
TEXT_BOUNDS: dict[str, Rule] = {
    "hidden_size": positive_int(MAX_HIDDEN), "intermediate_size": positive_int(MAX_INTERMEDIATE),
    "num_layers": positive_int(MAX_LAYERS), "num_heads": positive_int(MAX_HEADS),
    "num_kv_heads": positive_int(MAX_HEADS), "head_dim": positive_int(MAX_HEAD_DIM),
    "vocab_size": positive_int(MAX_VOCAB), "max_positions": positive_int(MAX_POSITIONS),
    "rope_theta": POSITIVE, "rms_norm_eps": EPSILON,
    "bos_token_id": TOKEN_ID, "eos_token_id": TOKEN_IDS, "pad_token_id": TOKEN_ID,
}
VISION_BOUNDS: dict[str, Rule] = {
    "image_size": positive_int(MAX_IMAGE_SIZE), "patch_size": positive_int(MAX_IMAGE_SIZE),
    "num_channels": positive_int(MAX_CHANNELS), "hidden_size": positive_int(MAX_HIDDEN),
    "intermediate_size": positive_int(MAX_INTERMEDIATE), "num_layers": positive_int(MAX_LAYERS),
    "num_heads": positive_int(MAX_HEADS), "layer_norm_eps": EPSILON,
}


def shown(value) -> str:
    """A value for an error message: short, one line, and safe for any JSON (no recursion into containers)."""
    if isinstance(value, dict):
        return "a JSON object"
    if isinstance(value, list):
        flat = len(value) <= 16 and not any(isinstance(v, (list, dict)) for v in value)
        return repr(value) if flat and len(repr(value)) <= 60 else f"a list of {len(value)}"
    text = repr(value)
    return text if len(text) <= 60 and "\n" not in text else text[:57].replace("\n", " ") + "..."


def json_depth(value) -> int:
    """How deeply a parsed JSON document nests (a scalar is 0), without recursing."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            depth += 1
            deepest = max(deepest, depth)
            stack.extend((child, depth) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def refuse(where: str, key: str, rule_text: str, value) -> UserError:
    return UserError(f"{where}: {key} must be {rule_text} (got {shown(value)})")


def check_json_keys(raw: dict, rules: Mapping[str, Rule], where: str) -> None:
    """Every key of `rules` (dotted paths into config.json) that `raw` holds must satisfy its rule.

    Absent keys are left to transformers' defaults (checked later, as facts). A parent that is not an
    object is reported by its own rule (tables list parents too), so its children are skipped here.
    """
    for path, rule in rules.items():
        node, present = raw, True
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                present = False
                break
            node = node[part]
        if present and not rule.accepts(node):
            raise refuse(where, path, rule.describe, node)


def _check_bounds(values: Mapping[str, object], bounds: Mapping[str, Rule], keys: Mapping[str, str],
                  where: str) -> None:
    for field, rule in bounds.items():
        if field in values and not rule.accepts(values[field]):
            raise refuse(where, keys.get(field, field), rule.describe, values[field])


def _known(values: Mapping[str, object], *fields: str) -> bool:
    return all(values.get(field) is not None for field in fields)


def _token_ids(value) -> list[int]:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def check_text_facts(values: Mapping[str, object], keys: Mapping[str, str], where: str) -> None:
    """The LLM's facts: bounds, heads that divide, token ids inside the vocabulary.

    `values`: the facts (`TextFacts.as_dict()`) or, before transformers runs, the ones config.json states
    (keys left to transformers' defaults absent): a relation is checked when all it involves is known.
    """
    _check_bounds(values, TEXT_BOUNDS, keys, where)
    # transformers' Llama and Qwen2 configs refuse it as well, and no published checkpoint has it.
    if _known(values, "hidden_size", "num_heads") and values["hidden_size"] % values["num_heads"]:
        raise UserError(f"{where}: {keys['hidden_size']} must be a multiple of {keys['num_heads']} "
                        f"(got {values['hidden_size']} and {values['num_heads']} heads)")
    if _known(values, "num_heads", "num_kv_heads") and values["num_heads"] % values["num_kv_heads"]:
        raise UserError(f"{where}: {keys['num_kv_heads']} must divide {keys['num_heads']} (got "
                        f"{values['num_kv_heads']} and {values['num_heads']}): each key/value head serves a "
                        "whole group of query heads")
    if _known(values, "vocab_size"):
        for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
            for token in _token_ids(values.get(field)):
                if token >= values["vocab_size"]:
                    raise UserError(f"{where}: {keys[field]} must be below {keys['vocab_size']} "
                                    f"(got {token} with {values['vocab_size']} tokens)")


def check_vision_facts(values: Mapping[str, object], keys: Mapping[str, str], where: str) -> None:
    """The tower's facts (`VisionFacts.as_dict()`, or what config.json states): bounds, heads that divide,
    a patch that fits the image.

    The patch need not divide the image: the patch convolution floors, and real towers rely on it
    (SigLIP so400m-patch14-384 reads 27 x 27 patches of a 384 px image).
    """
    _check_bounds(values, VISION_BOUNDS, keys, where)
    if _known(values, "patch_size", "image_size") and values["patch_size"] > values["image_size"]:
        raise UserError(f"{where}: {keys['patch_size']} must be a positive size no larger than "
                        f"{keys['image_size']} (got {values['patch_size']} for {values['image_size']} px images)")
    if _known(values, "hidden_size", "num_heads") and values["hidden_size"] % values["num_heads"]:
        raise UserError(f"{where}: {keys['hidden_size']} must be a multiple of {keys['num_heads']} "
                        f"(got {values['hidden_size']} and {values['num_heads']} heads)")
