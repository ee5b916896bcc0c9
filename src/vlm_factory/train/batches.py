"""Token sequences for supervised VQA: the prompt is context, only the answer (and EOS) is learned."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from vlm_factory.families import PromptSpec

IGNORE_INDEX = -100


@dataclass
class EncodedQA:
    input_ids: list[int]
    labels: list[int]


def encode_qa(tokenizer: PreTrainedTokenizerBase, prompt: PromptSpec, question: str, answer: str,
              rows: int = 0, cols: int = 0) -> EncodedQA:
    """Token ids and labels (-100 on the prompt) for one question about one image (of rows x cols tiles),
    in the model's own chat layout; the answer's labels run up to and including its end-of-turn token."""
    prompt_ids = tokenizer(prompt.expanded(question, rows, cols), add_special_tokens=prompt.add_special_tokens).input_ids
    answer_ids = tokenizer(prompt.answer_text(answer), add_special_tokens=False).input_ids
    return EncodedQA(prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids)


def pad_batch(items: list[EncodedQA], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors; padding is masked out of attention and loss."""
    length = max(len(it.input_ids) for it in items)
    input_ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(items), length), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it.input_ids)
        input_ids[row, :n] = torch.tensor(it.input_ids)
        labels[row, :n] = torch.tensor(it.labels)
        attention[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
