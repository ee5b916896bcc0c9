"""The bundled tiny bases' prompt template (saved as their chat template) and the answer-length cap.

Hub checkpoints bring their own chat template; every stage and runtime reads the prompt through the
model family (`family.prompt(processor)`, a PromptSpec rendered from the checkpoint's template), so
this module matters only where a bundled base is built.

LLaVA-1.5 style turns, question first: `USER: {question}\\n<image> ASSISTANT:`, then the answer
and `</s>`. With the question before the image, every image token can already see what is asked
and mark itself relevant, so a tiny LLM only has to gather marked tokens at the answer; with the
image first it must learn query-key binding from scratch, which a 2-layer model trained on a CPU
did not within the time budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_TOKEN = "<image>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
# Greedy answers are short words; every runtime stops here at the latest (eval.max_answer_tokens may
# lower it for an evaluation).
MAX_ANSWER_TOKENS = 8


@dataclass
class Answer:
    """One greedy answer as a model or runtime produced it."""

    text: str
    first_logits: np.ndarray  # [vocab]: the logits the first answer token was chosen from
    truncated: bool  # stopped at the answer-length cap, not at EOS

# The Jinja chat template saved with the bundled bases: it renders exactly `user_prompt` (a test checks).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    # The newline is inside an expression: transformers renders templates with trim_blocks, which drops a
    # newline written right after a block tag (the prompt would lose the "\n" the model was trained with).
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '\\n<image>' }}{% endif %}{% endfor %}"
    " ASSISTANT:"
    "{% else %} {% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}"
)


def user_prompt(question: str, with_image: bool = True) -> str:
    """The text up to and including `ASSISTANT:`; the model's answer follows after one space."""
    image = f"\n{IMAGE_TOKEN}" if with_image else ""
    return f"USER: {question.strip()}{image} ASSISTANT:"


def expand_image_tokens(text: str, image_tokens: int) -> str:
    """One `<image>` placeholder per visual token, as LlavaProcessor expands it before tokenizing."""
    return text.replace(IMAGE_TOKEN, IMAGE_TOKEN * image_tokens)


def tiny_prompt_spec(image_tokens: int):
    """The bundled bases' prompt as a PromptSpec: what their saved chat template renders (a test keeps
    the two equal), used where the base is being built and has no processor on disk yet."""
    from vlm_factory.families.base import PromptSpec

    return PromptSpec(template=user_prompt("{question}"), image_token=IMAGE_TOKEN, image_token_repeat=image_tokens,
                      answer=answer_text("{answer}") + EOS_TOKEN, add_special_tokens=True)


def answer_text(answer: str) -> str:
    """What the model is trained to produce after the prompt (EOS is appended by the tokenizer step)."""
    return f" {answer.strip()}"
