"""Greedy answers from the PyTorch model: the reference every artifact is compared with."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from PIL import Image
from tqdm import tqdm

from vlm_factory.families import family_for
from vlm_factory.model.prompt import MAX_ANSWER_TOKENS


@torch.inference_mode()
def answer_questions(model, processor, images: Sequence[Image.Image], questions: Sequence[str], batch_size: int = 64,
                     image_processor=None, progress: str | None = None) -> list[str]:
    """Greedy answers, one per (image, question).

    Prompts (the model's own chat layout, see families/) are batched by token length and view count, so
    no batch needs padding: batched generation with padding and the image-token merge is where reference
    implementations quietly differ. `image_processor` replaces the model's own preprocessing (used to
    measure what another preprocessing costs, family.alternative_preprocessing).
    """
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    model.eval()
    tokenizer = processor.tokenizer
    image_processor = image_processor or processor.image_processor
    family = family_for(model.config)
    prompt = family.prompt(processor)
    views = family.image_views(image_processor, images)
    encoded = [tokenizer(prompt.expanded(q, v.rows, v.cols), add_special_tokens=prompt.add_special_tokens).input_ids
               for q, v in zip(questions, views)]
    # One batch holds prompts of one length and images of one view count: nothing is padded.
    by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, ids in enumerate(encoded):
        by_shape[len(ids), views[index].count].append(index)
    batches = [idx[i:i + batch_size] for idx in by_shape.values() for i in range(0, len(idx), batch_size)]

    answers: list[str] = [""] * len(questions)
    for batch in tqdm(batches, desc=progress or "answer", disable=progress is None, unit="batch"):
        input_ids = torch.tensor([encoded[i] for i in batch])
        pixels = {k: v.to(model.dtype) for k, v in family.generation_pixels([views[i] for i in batch]).items()}
        out = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **pixels,
            max_new_tokens=MAX_ANSWER_TOKENS, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        for row, index in enumerate(batch):
            answers[index] = tokenizer.decode(out[row, input_ids.shape[1]:], skip_special_tokens=True).strip()
    return answers
