"""The one prompt template shared by training, evaluation and every runtime adapter.

LLaVA-1.5 style turns, question first: `USER: {question}\\n<image> ASSISTANT:`, then the answer
and `</s>`. With the question before the image, every image token can already see what is asked
and mark itself relevant, so a tiny LLM only has to gather marked tokens at the answer; with the
image first it must learn query-key binding from scratch, which a 2-layer model trained on a CPU
did not within the time budget. Keeping the template in one place is what makes a parity
comparison between runtimes meaningful.
"""

from __future__ import annotations

IMAGE_TOKEN = "<image>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
# Greedy answers are short words; every runtime stops here at the latest.
MAX_ANSWER_TOKENS = 8

# A Jinja chat template that renders the same text, stored with the processor for tools that use one.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}\n<image>{% endif %}{% endfor %}"
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


def answer_text(answer: str) -> str:
    """What the model is trained to produce after the prompt (EOS is appended by the tokenizer step)."""
    return f" {answer.strip()}"
