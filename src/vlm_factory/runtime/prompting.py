"""The prompt and the greedy loop every runtime adapter shares, read from an export's own config.

Exporters write the model family's PromptSpec (`family.prompt(processor)`, rendered from the
checkpoint's chat template) into each artifact's runtime config; adapters read it back here, so a
runtime never guesses a template and every format answers the same prompt as the reference. The
section is validated (runtime/artifact_schema.py `PromptSection`), and `check_special_tokens`
checks the config's token ids against the export's own tokenizer before anything runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vlm_factory.errors import UserError
from vlm_factory.families.base import PromptSpec
from vlm_factory.model.prompt import MAX_ANSWER_TOKENS, Answer
from vlm_factory.runtime.artifact_schema import PromptSection, config_error, parse_config

PROMPT_FIELDS = ("template", "image_token", "image_token_repeat", "answer", "add_special_tokens")


def prompt_from_config(section, source: Path | str) -> PromptSpec:
    """A PromptSpec from the `prompt` section of an export's config, or a one-line error naming it."""
    if not isinstance(section, dict):
        raise UserError(f"{source}: 'prompt' must hold {', '.join(PROMPT_FIELDS)}; re-run the export")
    return parse_config(PromptSection, section, source, prefix="prompt").spec()


def prompt_token_ids(prompt: PromptSpec, tokenizer, question: str, rows: int = 0, cols: int = 0) -> list[int]:
    """The model's prompt for one question, one image token per visual token, tokenized; for a family that
    cuts images into tiles, `rows` x `cols` is the image's grid (0, 0: one view, `image_views` says which)."""
    return tokenizer(prompt.expanded(question, rows, cols), add_special_tokens=prompt.add_special_tokens).input_ids


def check_special_tokens(prompt: PromptSpec, tokenizer, source: Path | str, *, image_token_id: int,
                         image_key: str, eos: set[int] | None, eos_key: str) -> None:
    """The config's image token id is what the tokenizer makes of the prompt's image token, and its EOS
    ids include the tokenizer's (every exporter writes them from that tokenizer). Otherwise the image
    features land nowhere, or generation never stops where the reference does: a one-line error."""
    found = tokenizer.convert_tokens_to_ids(prompt.image_token)
    if found != image_token_id:
        raise config_error(source, image_key, f"{image_token_id}, but the export's tokenizer gives "
                                              f"{prompt.image_token[:40]!r} the id {found}")
    tokenizer_eos = tokenizer.eos_token_id
    if eos is not None and tokenizer_eos is not None and tokenizer_eos not in eos:
        raise config_error(source, eos_key, f"{sorted(eos)[:4]} lacks the tokenizer's EOS id {tokenizer_eos}")


@dataclass
class Decoded:
    tokens: list[int]  # EOS not included
    first_logits: np.ndarray  # the prompt's last logits, which chose the first token
    truncated: bool  # the cap stopped it, not EOS


def greedy_decode(logits: np.ndarray, step, eos: set[int], max_new_tokens: int = MAX_ANSWER_TOKENS) -> Decoded:
    """Greedy answer tokens from the prompt's last logits; `step(token)` returns the next logits.

    Stops at EOS or after `max_new_tokens`, like the reference, without running the decoder once more.
    """
    first, tokens = np.array(logits, dtype=np.float32, copy=True), []
    for _ in range(max_new_tokens):
        token = int(np.argmax(logits))
        if token in eos:
            return Decoded(tokens, first, truncated=False)
        tokens.append(token)
        if len(tokens) == max_new_tokens:
            break
        logits = step(token)
    return Decoded(tokens, first, truncated=True)


class AnswersOneByOne:
    """`answer` and `iter_answers` for an adapter that answers one (image, question) at a time with
    `answer_one(image, question, max_new_tokens) -> Answer`, as an app on a device does."""

    def answer_one(self, image: Image.Image, question: str, max_new_tokens: int = MAX_ANSWER_TOKENS) -> Answer:
        raise NotImplementedError

    def iter_answers(self, images: Sequence[Image.Image], questions: Sequence[str], progress=None,
                     max_new_tokens: int = MAX_ANSWER_TOKENS) -> Iterator[Answer]:
        for image, question in zip(images, questions, strict=True):
            yield self.answer_one(image, question, max_new_tokens)
            if progress is not None:
                progress.update(1)

    def answer(self, images: Sequence[Image.Image], questions: Sequence[str], progress=None) -> list[str]:
        """Greedy answers, one per (image, question), at most MAX_ANSWER_TOKENS tokens each."""
        return [a.text for a in self.iter_answers(images, questions, progress)]


class TokenizerAnswers(AnswersOneByOne):
    """For an adapter whose `decode(image, question, max_new_tokens) -> Decoded` runs its own graphs and whose
    `tokenizer` is the export's (ONNX, TFLite): the answer's text is that tokenizer's decoding."""

    def decode(self, image: Image.Image, question: str, max_new_tokens: int = MAX_ANSWER_TOKENS) -> Decoded:
        raise NotImplementedError

    def answer_tokens(self, image: Image.Image, question: str) -> list[int]:
        """The greedy answer's token ids (EOS not included), at most MAX_ANSWER_TOKENS."""
        return self.decode(image, question).tokens

    def answer_one(self, image: Image.Image, question: str, max_new_tokens: int = MAX_ANSWER_TOKENS) -> Answer:
        decoded = self.decode(image, question, max_new_tokens)
        return Answer(self.tokenizer.decode(decoded.tokens, skip_special_tokens=True).strip(), decoded.first_logits,
                      decoded.truncated)
