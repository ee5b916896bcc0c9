"""Answer VQA questions with llama.cpp: LLM GGUF + mmproj through libmtmd (llama-cpp-python).

Same prompt as the reference (`model.prompt.user_prompt`: question first, then the image) and
greedy decoding, so the answers can be compared question by question.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from vlm_factory.model.prompt import MAX_ANSWER_TOKENS

# The chat handler substitutes the image URL with libmtmd's media marker; this renders exactly
# `USER: {question}\n<image> ASSISTANT:` (see model/prompt.py).
_CHAT_FORMAT = (
    "{% for message in messages %}{% if message.role == 'user' %}USER: "
    "{% for c in message.content %}{% if c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}"
    "{% for c in message.content %}{% if c.type == 'image_url' %}\n"
    "{{ c.image_url.url if c.image_url is mapping else c.image_url }}{% endif %}{% endfor %}"
    " ASSISTANT:{% endif %}{% endfor %}"
)


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class LlamaCppRuntime:
    """A loaded LLM + mmproj pair. `kv_cache_f32` keeps llama.cpp's KV cache exact for parity checks."""

    def __init__(self, llm_path: Path, mmproj_path: Path, n_ctx: int = 256, kv_cache_f32: bool = True):
        from llama_cpp import GGML_TYPE_F32, Llama
        from llama_cpp.llama_chat_format import Llava15ChatHandler

        class Handler(Llava15ChatHandler):
            CHAT_FORMAT = _CHAT_FORMAT

        cache_type = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if kv_cache_f32 else {}
        self._llm = Llama(model_path=str(llm_path), chat_handler=Handler(clip_model_path=str(mmproj_path), verbose=False),
                          n_ctx=n_ctx, verbose=False, **cache_type)

    def answer(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[str]:
        answers = []
        for image, question in zip(images, questions, strict=True):
            content = [{"type": "text", "text": question.strip()}, {"type": "image_url", "image_url": {"url": _data_uri(image)}}]
            out = self._llm.create_chat_completion(messages=[{"role": "user", "content": content}],
                                                   max_tokens=MAX_ANSWER_TOKENS, temperature=0.0)
            answers.append(out["choices"][0]["message"]["content"].strip())
            self._llm.reset()
        return answers
