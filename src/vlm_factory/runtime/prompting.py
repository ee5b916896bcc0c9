"""The prompt and the greedy loop every runtime adapter shares, read from an export's own config.

Exporters write the model family's PromptSpec (`family.prompt(processor)`, rendered from the
checkpoint's chat template) into each artifact's runtime config; adapters read it back here, so a
runtime never guesses a template and every format answers the same prompt as the reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlm_factory.errors import UserError
from vlm_factory.families.base import PromptSpec
from vlm_factory.model.prompt import MAX_ANSWER_TOKENS

PROMPT_FIELDS = ("template", "image_token", "image_token_repeat", "answer", "add_special_tokens")


def prompt_from_config(section: dict, source: Path | str) -> PromptSpec:
    """A PromptSpec from the `prompt` section of an export's config, or a one-line error naming it."""
    if not isinstance(section, dict) or any(key not in section for key in PROMPT_FIELDS):
        raise UserError(f"{source}: 'prompt' must hold {', '.join(PROMPT_FIELDS)}; re-run the export")
    return PromptSpec(**{key: section[key] for key in PROMPT_FIELDS})


def prompt_token_ids(prompt: PromptSpec, tokenizer, question: str) -> list[int]:
    """The model's prompt for one question, one image token per visual token, tokenized."""
    return tokenizer(prompt.expanded(question), add_special_tokens=prompt.add_special_tokens).input_ids


def eos_ids(value, source: Path) -> set[int]:
    """The stop tokens of a config's `eos_token_id`: one id or a list of ids (ORT GenAI writes either;
    the ONNX and TFLite configs both carry it).

    An empty list (a model without EOS) answers MAX_ANSWER_TOKENS tokens, as transformers does."""
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise UserError(f"{source}: model.eos_token_id must be a token id or a list of them; got {value!r}")
    return set(ids)


def greedy_tokens(logits: np.ndarray, step, eos: set[int]) -> list[int]:
    """Greedy answer tokens from the prompt's last logits; `step(token)` returns the next logits.

    Stops at EOS or after MAX_ANSWER_TOKENS, like the reference, without running the decoder once more.
    """
    tokens: list[int] = []
    for _ in range(MAX_ANSWER_TOKENS):
        token = int(np.argmax(logits))
        if token in eos:
            break
        tokens.append(token)
        if len(tokens) == MAX_ANSWER_TOKENS:
            break
        logits = step(token)
    return tokens
