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
The auxiliary heads are dropped when the model is saved: the base is a plain HF LLaVA checkpoint.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from vlm_factory.config import PretrainConfig
from vlm_factory.data.scenes import COLOURS, DIGITS, SHAPES, Scene
from vlm_factory.data.questions import QA
from vlm_factory.data.synthetic import iter_split
from vlm_factory.model.features import merge_image_features, project, tower_features
from vlm_factory.model.prompt import tiny_prompt_spec
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


def patch_cells(scene: Scene, cell_px: int, image_size: int, patch_size: int) -> list[tuple[int, int] | None]:
    """The scene grid cell (row, col) under each patch centre of the letterboxed image, or None on padding."""
    cols, rows = scene.grid
    width, height = cols * cell_px, rows * cell_px
    side = max(width, height)
    pad_x, pad_y = (side - width) // 2, (side - height) // 2
    per_side = image_size // patch_size
    cells: list[tuple[int, int] | None] = []
    for p in range(per_side * per_side):
        py, px = divmod(p, per_side)
        x = (px + 0.5) / per_side * side - pad_x
        y = (py + 0.5) / per_side * side - pad_y
        inside = 0 <= x < width and 0 <= y < height
        cells.append((int(y // cell_px), int(x // cell_px)) if inside else None)
    return cells


def relevance(cells: list[tuple[int, int] | None], qa: QA) -> list[float]:
    """1.0 for each patch showing an object the answer depends on, else 0.0."""
    wanted = {(o.row, o.col) for o in qa.subjects}
    return [float(cell in wanted) for cell in cells]


def answer_targets(relevant: list[float], qa: QA, encoded: EncodedQA) -> list[int]:
    """The answer's first token on relevant patches (a count is no single patch's answer), else ignored."""
    first = next(label for label in encoded.labels if label != IGNORE_INDEX)
    use = qa.question_type != "count"
    return [first if use and r else IGNORE_INDEX for r in relevant]


def patch_labels(scene: Scene, cell_px: int, image_size: int, patch_size: int) -> np.ndarray:
    """[5, patches] class ids (shape, colour, digit, vertical half, horizontal half) per patch.

    Each patch centre is mapped back through pad-to-square + resize into the scene's grid; the
    halves are those of the scene's grid, which is what `Scene.position_of` answers with.
    """
    cols, rows = scene.grid
    by_cell = {(o.row, o.col): o for o in scene.objects}
    cells = patch_cells(scene, cell_px, image_size, patch_size)
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
    pixel_values: torch.Tensor  # [N, 3, H, W] float16 (halves the memory; exact enough for training)
    labels: torch.Tensor  # [N, len(LABEL_CLASSES), patches]
    qas: list[list[EncodedQA]]
    relevance: torch.Tensor  # [N, questions per image, patches] float 0/1
    answers: torch.Tensor  # [N, questions per image, patches] first answer token id or IGNORE_INDEX


def prepare_data(recipe: PretrainConfig, processor: LlavaProcessor, image_tokens: int,
                 image_size: int, patch_size: int) -> PretrainData:
    images = iter_split(recipe.seed, "pretrain", recipe.n_images, recipe.questions_per_image, recipe.cell_px)
    cache: dict[tuple[str, str], EncodedQA] = {}
    prompt = tiny_prompt_spec(image_tokens)
    pixels, labels, qas, relevant, answers, chunk = [], [], [], [], [], []

    def flush():
        pv = processor.image_processor([it.image for it in chunk], return_tensors="pt").pixel_values
        pixels.append(pv.to(torch.float16))
        chunk.clear()

    for item in tqdm(images, total=recipe.n_images, desc="render pretraining set", unit="img"):
        chunk.append(item)
        labels.append(patch_labels(item.scene, recipe.cell_px, image_size, patch_size))
        cells = patch_cells(item.scene, recipe.cell_px, image_size, patch_size)
        row, rel_row, ans_row = [], [], []
        for qa in item.qas:
            key = (qa.question, qa.answer)
            if key not in cache:
                cache[key] = encode_qa(processor.tokenizer, prompt, qa.question, qa.answer)
            row.append(cache[key])
            rel_row.append(relevance(cells, qa))
            ans_row.append(answer_targets(rel_row[-1], qa, cache[key]))
        qas.append(row)
        relevant.append(rel_row)
        answers.append(ans_row)
        if len(chunk) == 512:
            flush()
    if chunk:
        flush()
    return PretrainData(torch.cat(pixels), torch.from_numpy(np.stack(labels)), qas, torch.tensor(relevant),
                        torch.tensor(answers))


class Scaffolding(nn.Module):
    """Every training-only head: tower attributes, per image token relevance and answer token."""

    def __init__(self, config):
        super().__init__()
        self.tower = AuxHeads(config.vision_config.hidden_size)
        self.relevance = nn.Linear(config.text_config.hidden_size, 1)
        self.answer = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size)
        # The image tokens' states entering the last layer are what the answer position attends to.
        self.probe_layer = config.text_config.num_hidden_layers - 1


def step_losses(model: LlavaForConditionalGeneration, heads: Scaffolding, data: PretrainData, idx: torch.Tensor,
                pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(answer loss, tower attribute loss, relevance + answer-token loss) for the images `idx`."""
    features = tower_features(model, data.pixel_values[idx].float())
    aux_loss = heads.tower.loss(features, data.labels[idx])
    items = [qa for i in idx.tolist() for qa in data.qas[i]]
    batch = pad_batch(items, pad_id)
    per_image = len(data.qas[0])
    embeds = merge_image_features(model, batch["input_ids"],
                                  project(model, features).repeat_interleave(per_image, dim=0))
    out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"],
                output_hidden_states=True)
    image_states = out.hidden_states[heads.probe_layer][batch["input_ids"] == model.config.image_token_id]
    relevance_loss = nn.functional.binary_cross_entropy_with_logits(
        heads.relevance(image_states).squeeze(-1), data.relevance[idx].flatten())
    relevance_loss = relevance_loss + nn.functional.cross_entropy(
        heads.answer(image_states), data.answers[idx].flatten(), ignore_index=IGNORE_INDEX)
    return out.loss, aux_loss, relevance_loss


def pretrain(model: LlavaForConditionalGeneration, processor: LlavaProcessor, recipe: PretrainConfig,
             data: PretrainData, evaluate=None) -> list[dict]:
    """Train every weight of `model` in place; returns the loss/eval history."""
    # Tiny gradients and Adam moments turn denormal as training converges, and denormal
    # arithmetic made CPU steps ~3x slower after a few hundred steps.
    torch.set_flush_denormal(True)
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    heads = Scaffolding(model.config)
    params = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, recipe.warmup_steps, recipe.steps, recipe.min_lr_ratio))
    pad_id = processor.tokenizer.pad_token_id
    history: list[dict] = []
    started = time.perf_counter()
    bar = tqdm(range(recipe.steps), desc="pretrain base", unit="step")
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
