"""Pretraining of the bundled tiny base, end to end from random weights.

Two signals make this learnable on a CPU in minutes rather than hours:
- a dense auxiliary loss on the vision tower: per patch, which shape, colour and digit it shows
  (or background, or letterbox padding), so the tower learns to see before the LLM learns to read;
- plain answer-token cross-entropy on single-turn questions, with each image's tower features
  computed once and shared by all of its questions.
The auxiliary heads are dropped when the model is saved: the base is a plain HF LLaVA checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from vlm_factory.data.scenes import COLOURS, DIGITS, SHAPES, Scene
from vlm_factory.data.synthetic import iter_split
from vlm_factory.model.features import merge_image_features, project, tower_features
from vlm_factory.train.batches import EncodedQA, encode_qa, pad_batch

log = logging.getLogger(__name__)

SHAPE_CLASSES = ("background", "padding", *SHAPES, "digit")
COLOUR_CLASSES = ("none", *COLOURS)
DIGIT_CLASSES = ("none", *DIGITS)


@dataclass(frozen=True)
class PretrainRecipe:
    seed: int = 1234
    n_images: int = 24000
    questions_per_image: int = 4
    cell_px: int = 32
    steps: int = 5000
    batch_images: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.01
    aux_weight: float = 1.0
    eval_images: int = 540
    eval_every: int = 500


def patch_labels(scene: Scene, cell_px: int, image_size: int, patch_size: int) -> np.ndarray:
    """[3, patches] class ids (shape, colour, digit) for each patch of the letterboxed image.

    Each patch centre is mapped back through pad-to-square + resize into the scene's grid.
    """
    cols, rows = scene.grid
    width, height = cols * cell_px, rows * cell_px
    side = max(width, height)
    pad_x, pad_y = (side - width) // 2, (side - height) // 2
    per_side = image_size // patch_size
    by_cell = {(o.row, o.col): o for o in scene.objects}
    labels = np.zeros((3, per_side * per_side), dtype=np.int64)
    for p in range(per_side * per_side):
        py, px = divmod(p, per_side)
        x = (px + 0.5) / per_side * side - pad_x
        y = (py + 0.5) / per_side * side - pad_y
        if not (0 <= x < width and 0 <= y < height):
            labels[0, p] = SHAPE_CLASSES.index("padding")
            continue
        obj = by_cell.get((int(y // cell_px), int(x // cell_px)))
        if obj is None:
            continue
        labels[0, p] = SHAPE_CLASSES.index(obj.shape)
        if obj.colour is not None:
            labels[1, p] = COLOUR_CLASSES.index(obj.colour)
        if obj.digit is not None:
            labels[2, p] = DIGIT_CLASSES.index(obj.digit)
    return labels


class AuxHeads(nn.Module):
    """Per-patch classifiers on the tower features; training scaffolding, never saved."""

    def __init__(self, hidden: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(hidden, len(c)) for c in (SHAPE_CLASSES, COLOUR_CLASSES, DIGIT_CLASSES))

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return sum(nn.functional.cross_entropy(head(features).flatten(0, 1), labels[:, k].flatten())
                   for k, head in enumerate(self.heads)) / len(self.heads)


@dataclass
class PretrainData:
    pixel_values: torch.Tensor  # [N, 3, H, W] float16 (halves the memory; exact enough for training)
    labels: torch.Tensor  # [N, 3, patches]
    qas: list[list[EncodedQA]]


def prepare_data(recipe: PretrainRecipe, processor: LlavaProcessor, image_tokens: int,
                 image_size: int, patch_size: int) -> PretrainData:
    images = iter_split(recipe.seed, "pretrain", recipe.n_images, recipe.questions_per_image, recipe.cell_px)
    cache: dict[tuple[str, str], EncodedQA] = {}
    pixels, labels, qas, chunk = [], [], [], []

    def flush():
        pv = processor.image_processor([it.image for it in chunk], return_tensors="pt").pixel_values
        pixels.append(pv.to(torch.float16))
        chunk.clear()

    for item in tqdm(images, total=recipe.n_images, desc="render pretraining set", unit="img"):
        chunk.append(item)
        labels.append(patch_labels(item.scene, recipe.cell_px, image_size, patch_size))
        row = []
        for qa in item.qas:
            key = (qa.question, qa.answer)
            if key not in cache:
                cache[key] = encode_qa(processor.tokenizer, qa.question, qa.answer, image_tokens)
            row.append(cache[key])
        qas.append(row)
        if len(chunk) == 512:
            flush()
    if chunk:
        flush()
    return PretrainData(torch.cat(pixels), torch.from_numpy(np.stack(labels)), qas)


def _lr_factor(step: int, recipe: PretrainRecipe) -> float:
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * cosine


def pretrain(model: LlavaForConditionalGeneration, processor: LlavaProcessor, recipe: PretrainRecipe,
             data: PretrainData, evaluate=None) -> list[dict]:
    """Train every weight of `model` in place; returns the loss/eval history."""
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    aux = AuxHeads(model.config.vision_config.hidden_size)
    params = list(model.parameters()) + list(aux.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, recipe))
    pad_id = processor.tokenizer.pad_token_id
    history: list[dict] = []
    started = time.perf_counter()
    bar = tqdm(range(recipe.steps), desc="pretrain base", unit="step")
    for step in bar:
        model.train()
        idx = torch.randint(len(data.qas), (recipe.batch_images,), generator=generator)
        features = tower_features(model, data.pixel_values[idx].float())
        aux_loss = aux.loss(features, data.labels[idx])
        items = [qa for i in idx.tolist() for qa in data.qas[i]]
        per_image = len(data.qas[0])
        batch = pad_batch(items, pad_id)
        embeds = merge_image_features(model, batch["input_ids"],
                                      project(model, features).repeat_interleave(per_image, dim=0))
        lm_loss = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss = lm_loss + recipe.aux_weight * aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if step % 25 == 0:
            bar.set_postfix(lm=f"{lm_loss.item():.3f}", aux=f"{aux_loss.item():.3f}")
        last = step + 1 == recipe.steps
        if evaluate is not None and ((step + 1) % recipe.eval_every == 0 or last):
            accuracy = evaluate(model)
            record = {"step": step + 1, "lm_loss": lm_loss.item(), "aux_loss": aux_loss.item(),
                      "minutes": (time.perf_counter() - started) / 60, **accuracy}
            history.append(record)
            log.info("step %d: %s", step + 1, record)
    return history


def recipe_dict(recipe: PretrainRecipe) -> dict:
    return asdict(recipe)
