"""Pretraining of the bundled tiny base, end to end from random weights.

Three signals make this learnable on a CPU in minutes rather than hours:
- a dense auxiliary loss on the vision tower: per patch, which shape, colour and digit it shows,
  which half of the image it lies in (or background, or letterbox padding), so the tower learns
  to see before the LLM learns to read;
- a dense relevance loss inside the LLM: the prompt puts the question before the image, and the
  hidden state of each image token entering the last layer must say whether that patch holds an
  object the answer depends on, and (unless the question counts) predict the answer's first token.
  This teaches question-patch binding and attribute read-out directly, which the answer loss
  alone teaches only after a long plateau;
- plain answer-token cross-entropy on single-turn questions, with each image's tower features
  computed once and shared by all of its questions.
The auxiliary heads are dropped when the model is saved: the base is a plain checkpoint of its family
(a LLaVA, or a MobileVLM V2 whose image tokens each pool 2x2 patches).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import LlavaProcessor

from vlm_factory.config import PretrainConfig
from vlm_factory.data.scenes import COLOURS, DIGITS, SHAPES, Scene
from vlm_factory.data.questions import QA
from vlm_factory.data.synthetic import iter_split
from vlm_factory.families import family_for
from vlm_factory.logs import progress_bar
from vlm_factory.model.features import merge_image_features, project, tower_features
from vlm_factory.train.batches import IGNORE_INDEX, EncodedQA, encode_qa, pad_batch
from vlm_factory.train.schedule import warmup_cosine

log = logging.getLogger(__name__)

SHAPE_CLASSES = ("background", "padding", *SHAPES, "digit")
COLOUR_CLASSES = ("none", *COLOURS)
DIGIT_CLASSES = ("none", *DIGITS)
# Which half of the image (vertical, horizontal) a patch lies in, as position questions ask it;
# the LLM can only answer them if the tower's features keep where they came from.
HALF_CLASSES = ("first", "second")
LABEL_CLASSES = (SHAPE_CLASSES, COLOUR_CLASSES, DIGIT_CLASSES, HALF_CLASSES, HALF_CLASSES)


Cell = tuple[int, int] | None
# A view's extent in its image's normalised coordinates (x0, y0, x1, y1): (0, 0, 1, 1) is the whole image;
# beyond [0, 1) lies letterbox padding (families/base.py: ModelFamily.view_rectangles).
Rect = tuple[float, float, float, float]


def grid_cells(scene: Scene, rect: Rect, per_side: int) -> list[Cell]:
    """The scene grid cell (row, col) under each point of a per_side x per_side grid over the view `rect`
    (the centres of its patches, row-major), or None where the view shows padding."""
    cols, rows = scene.grid
    x0, y0, x1, y1 = rect
    cells: list[Cell] = []
    for p in range(per_side * per_side):
        py, px = divmod(p, per_side)
        x = x0 + (px + 0.5) / per_side * (x1 - x0)
        y = y0 + (py + 0.5) / per_side * (y1 - y0)
        inside = 0 <= x < 1 and 0 <= y < 1
        cells.append((int(y * rows), int(x * cols)) if inside else None)
    return cells


def token_relevance(cells: list[Cell], per_side: int, block: int, qa: QA) -> list[float]:
    """1.0 for each image token whose block x block patches (row-major tokens; 1 when a token is one patch,
    2 for LDPv2's pooling or a x2 pixel shuffle) show an object the answer depends on, else 0.0."""
    wanted = {(o.row, o.col) for o in qa.subjects}
    tokens = per_side // block
    return [float(any(cells[(ty * block + dy) * per_side + tx * block + dx] in wanted
                      for dy in range(block) for dx in range(block)))
            for ty in range(tokens) for tx in range(tokens)]


def answer_targets(relevant: list[float], qa: QA, encoded: EncodedQA) -> list[int]:
    """The answer's first token on relevant image tokens (a count is no single token's answer), else ignored."""
    first = next(label for label in encoded.labels if label != IGNORE_INDEX)
    use = qa.question_type != "count"
    return [first if use and r else IGNORE_INDEX for r in relevant]


def patch_labels(scene: Scene, cells: list[Cell]) -> np.ndarray:
    """[5, patches] class ids (shape, colour, digit, vertical half, horizontal half) per patch of one view.

    `cells` maps each patch centre back into the scene's grid (`grid_cells`); the halves are those of
    the scene's grid, which is what `Scene.position_of` answers with.
    """
    cols, rows = scene.grid
    by_cell = {(o.row, o.col): o for o in scene.objects}
    labels = np.zeros((len(LABEL_CLASSES), len(cells)), dtype=np.int64)
    for p, cell in enumerate(cells):
        if cell is None:
            labels[0, p] = SHAPE_CLASSES.index("padding")
            labels[3:, p] = IGNORE_INDEX  # letterbox padding has no position in the scene
            continue
        row, col = cell
        labels[3, p] = int(row >= rows // 2)
        labels[4, p] = int(col >= cols // 2)
        obj = by_cell.get(cell)
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
        self.heads = nn.ModuleList(nn.Linear(hidden, len(c)) for c in LABEL_CLASSES)

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return sum(nn.functional.cross_entropy(head(features).flatten(0, 1), labels[:, k].flatten())
                   for k, head in enumerate(self.heads)) / len(self.heads)


@dataclass
class PretrainData:
    """Every view of every image (one, or a family's tiles plus a global view) and its dense labels."""

    pixel_values: torch.Tensor  # [views, 3, H, W] float16 (halves the memory; exact enough for training)
    starts: list[int]  # image i's views at rows starts[i]:starts[i + 1]
    labels: torch.Tensor  # [views, len(LABEL_CLASSES), patches]
    qas: list[list[EncodedQA]]
    relevance: list[torch.Tensor]  # per image [questions, image tokens of all its views] float 0/1
    answers: list[torch.Tensor]  # per image, as relevance: first answer token id or IGNORE_INDEX

    def views_of(self, images: list[int]) -> list[range]:
        return [range(self.starts[i], self.starts[i + 1]) for i in images]


def prepare_data(recipe: PretrainConfig, model, processor) -> PretrainData:
    """Rendered images in the family's own views, encoded questions and the dense labels: per tower patch,
    and per image token, whose grid is coarser when the connector merges patches."""
    family = family_for(model.config)
    per_side = family.vision.image_size // family.vision.patch_size
    block = per_side // math.isqrt(family.image_tokens)
    prompt = family.prompt(processor)
    images = iter_split(recipe.seed, "pretrain", recipe.n_images, recipe.questions_per_image, recipe.cell_px)
    cache: dict[tuple, EncodedQA] = {}
    pixels, starts, labels, qas, relevant, answers, chunk = [], [0], [], [], [], [], []

    def flush():
        views = family.image_views(processor.image_processor, [it.image for it in chunk])
        for item, view in zip(chunk, views):
            rects = family.view_rectangles(processor.image_processor, *item.image.size, view.rows, view.cols)
            if len(rects) != view.count:
                raise ValueError(f"{family.name}: {len(rects)} view rectangles for {view.count} views")
            cells = [grid_cells(item.scene, rect, per_side) for rect in rects]
            labels.extend(patch_labels(item.scene, view_cells) for view_cells in cells)
            pixels.append(torch.as_tensor(view.pixel_values).to(torch.float16))
            starts.append(starts[-1] + view.count)
            row, rel_row, ans_row = [], [], []
            for qa in item.qas:
                key = (qa.question, qa.answer, view.rows, view.cols)
                if key not in cache:
                    cache[key] = encode_qa(processor.tokenizer, prompt, qa.question, qa.answer, view.rows, view.cols)
                row.append(cache[key])
                rel_row.append([r for view_cells in cells for r in token_relevance(view_cells, per_side, block, qa)])
                ans_row.append(answer_targets(rel_row[-1], qa, cache[key]))
            qas.append(row)
            relevant.append(torch.tensor(rel_row))
            answers.append(torch.tensor(ans_row))
        chunk.clear()

    for item in progress_bar(images, total=recipe.n_images, desc="render pretraining set", unit="img"):
        chunk.append(item)
        if len(chunk) == 512:
            flush()
    if chunk:
        flush()
    return PretrainData(torch.cat(pixels), starts, torch.from_numpy(np.stack(labels)), qas, relevant, answers)


class Scaffolding(nn.Module):
    """Every training-only head: tower attributes, per image token relevance and answer token."""

    def __init__(self, family):
        super().__init__()
        self.tower = AuxHeads(family.vision.hidden_size)
        self.relevance = nn.Linear(family.text.hidden_size, 1)
        self.answer = nn.Linear(family.text.hidden_size, family.text.vocab_size)
        # The image tokens' states entering the last layer are what the answer position attends to.
        self.probe_layer = family.text.num_layers - 1
        self.image_token_id = family.image_token_id


def step_losses(model, heads: Scaffolding, data: PretrainData, idx: torch.Tensor,
                pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(answer loss, tower attribute loss, relevance + answer-token loss) for the images `idx`."""
    images = idx.tolist()
    view_ranges = data.views_of(images)
    views = torch.tensor([v for r in view_ranges for v in r])
    features = tower_features(model, data.pixel_values[views].float())
    aux_loss = heads.tower.loss(features, data.labels[views])
    items = [qa for i in images for qa in data.qas[i]]
    batch = pad_batch(items, pad_id)
    # Each image's views once per question about it: the batch's prompts in order.
    per_image = len(data.qas[0])
    offsets = np.cumsum([0] + [len(r) for r in view_ranges])
    order = torch.cat([torch.arange(offsets[k], offsets[k + 1]).repeat(per_image) for k in range(len(images))])
    embeds = merge_image_features(model, batch["input_ids"], project(model, features)[order])
    out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"],
                output_hidden_states=True)
    image_states = out.hidden_states[heads.probe_layer][batch["input_ids"] == heads.image_token_id]
    relevance_loss = nn.functional.binary_cross_entropy_with_logits(
        heads.relevance(image_states).squeeze(-1), torch.cat([data.relevance[i].flatten() for i in images]))
    relevance_loss = relevance_loss + nn.functional.cross_entropy(
        heads.answer(image_states), torch.cat([data.answers[i].flatten() for i in images]), ignore_index=IGNORE_INDEX)
    return out.loss, aux_loss, relevance_loss


def pretrain(model, processor: LlavaProcessor, recipe: PretrainConfig,
             data: PretrainData, evaluate=None) -> list[dict]:
    """Train every weight of `model` in place; returns the loss/eval history."""
    # Tiny gradients and Adam moments turn denormal as training converges, and denormal
    # arithmetic made CPU steps ~3x slower after a few hundred steps.
    torch.set_flush_denormal(True)
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    heads = Scaffolding(family_for(model.config))
    params = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, recipe.warmup_steps, recipe.steps, recipe.min_lr_ratio))
    pad_id = processor.tokenizer.pad_token_id
    history: list[dict] = []
    started = time.perf_counter()
    bar = progress_bar(range(recipe.steps), desc="pretrain base", unit="step")
    for step in bar:
        model.train()
        idx = torch.randint(len(data.qas), (recipe.batch_images,), generator=generator)
        lm_loss, aux_loss, relevance_loss = step_losses(model, heads, data, idx, pad_id)
        loss = lm_loss + recipe.aux_weight * (aux_loss + relevance_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if step % 25 == 0:
            bar.set_postfix(lm=f"{lm_loss.item():.3f}", aux=f"{aux_loss.item():.3f}", rel=f"{relevance_loss.item():.3f}")
        last = step + 1 == recipe.steps
        if evaluate is not None and ((step + 1) % recipe.eval_every == 0 or last):
            accuracy = evaluate(model)
            record = {"step": step + 1, "lm_loss": lm_loss.item(), "aux_loss": aux_loss.item(),
                      "relevance_loss": relevance_loss.item(),
                      "minutes": (time.perf_counter() - started) / 60, **accuracy}
            history.append(record)
            log.info("step %d: %s", step + 1, record)
    return history
