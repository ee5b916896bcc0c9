"""Greedy answers from the PyTorch model: the reference every artifact is compared with."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from vlm_factory.families import family_for
from vlm_factory.logs import progress_bar
from vlm_factory.model.prompt import MAX_ANSWER_TOKENS, Answer


def _prompt_batches(model, processor, images: Sequence[Image.Image], questions: Sequence[str], batch_size: int,
                    image_processor=None, progress: str | None = None) -> Iterator[tuple[list[int], dict]]:
    """(question indices, model inputs) per batch of prompts.

    Prompts (the model's own chat layout, see families/) are batched by token length and view count, so
    no batch needs padding: batched generation with padding and the image-token merge is where reference
    implementations quietly differ.
    """
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    model.eval()
    tokenizer = processor.tokenizer
    family = family_for(model.config)
    prompt = family.prompt(processor)
    views = family.image_views(image_processor or processor.image_processor, images)
    encoded = [tokenizer(prompt.expanded(q, v.rows, v.cols), add_special_tokens=prompt.add_special_tokens).input_ids
               for q, v in zip(questions, views)]
    # One batch holds prompts of one length and images of one view count: nothing is padded.
    by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, ids in enumerate(encoded):
        by_shape[len(ids), views[index].count].append(index)
    batches = [idx[i:i + batch_size] for idx in by_shape.values() for i in range(0, len(idx), batch_size)]
    for batch in progress_bar(batches, desc=progress or "answer", disable=progress is None, unit="batch"):
        input_ids = torch.tensor([encoded[i] for i in batch])
        pixels = {k: v.to(model.dtype) for k, v in family.generation_pixels([views[i] for i in batch]).items()}
        yield batch, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **pixels}


@torch.inference_mode()
def generate_answers(model, processor, images: Sequence[Image.Image], questions: Sequence[str], batch_size: int = 64,
                     image_processor=None, progress: str | None = None,
                     max_new_tokens: int = MAX_ANSWER_TOKENS) -> list[Answer]:
    """Greedy answers, one per (image, question), with the first token's logits and whether the length cap
    stopped them. `image_processor` replaces the model's own preprocessing (used to measure what another
    preprocessing costs, family.alternative_preprocessing)."""
    tokenizer = processor.tokenizer
    answers: list[Answer | None] = [None] * len(questions)
    for batch, inputs in _prompt_batches(model, processor, images, questions, batch_size, image_processor, progress):
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        new = out.sequences[:, inputs["input_ids"].shape[1]:]
        for row, index in enumerate(batch):
            tokens = new[row].tolist()
            answers[index] = Answer(tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                                    out.logits[0][row].float().numpy(),
                                    truncated=len(tokens) == max_new_tokens and tokenizer.eos_token_id not in tokens)
    return answers


def answer_questions(model, processor, images: Sequence[Image.Image], questions: Sequence[str], batch_size: int = 64,
                     image_processor=None, progress: str | None = None) -> list[str]:
    """Greedy answers' text, one per (image, question) (see generate_answers)."""
    return [a.text for a in generate_answers(model, processor, images, questions, batch_size, image_processor, progress)]


@torch.inference_mode()
def first_token_log_probs(model, processor, images: Sequence[Image.Image], questions: Sequence[str],
                          batch_size: int = 64, progress: str | None = None) -> np.ndarray:
    """[questions, vocab] float32: the log-probabilities of each prompt's first answer token (one forward
    pass per batch; no generation)."""
    rows: dict[int, np.ndarray] = {}
    for batch, inputs in _prompt_batches(model, processor, images, questions, batch_size, None, progress):
        logits = model(**inputs).logits[:, -1].float()
        for row, index in zip(torch.log_softmax(logits, -1).numpy(), batch):
            rows[index] = row
    return np.stack([rows[i] for i in range(len(questions))])
