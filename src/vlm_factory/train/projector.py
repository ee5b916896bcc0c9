"""Projector fine-tuning, the LLaVA alignment recipe, for any registered model family.

The vision tower is frozen, so its features are computed once and cached; the connector is trained
with answer-token cross-entropy in the model's own chat layout; the LLM stays frozen unless
`train.llm` asks for LoRA adapters (merged back before saving) or full fine-tuning.

`train.projector` says where the connector starts: `reinit` throws the checkpoint's away (the
bundled bases: a new projector is aligned), `continue` fine-tunes the checkpoint's own trained
connector on the user's data, `frozen` skips training (the model is evaluated as downloaded).
Accelerate drives the loop, so the same code runs on a laptop CPU, one GPU, or under
`accelerate launch` / torchrun.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from vlm_factory.config import TrainConfig
from vlm_factory.data.images import load_image
from vlm_factory.data.records import VQARecord
from vlm_factory.families import ModelFamily, PromptSpec, family_for
from vlm_factory.logs import progress_bar
from vlm_factory.train.batches import EncodedQA, encode_qa, pad_batch
from vlm_factory.train.schedule import warmup_cosine

log = logging.getLogger(__name__)


def reinitialise_projector(model, seed: int, features: torch.Tensor | None = None) -> float:
    """Throw away the base's projector: fresh nn.Linear initialisation, deterministic for a seed.

    With `features` (tower outputs), the new output layer is rescaled so that its embeddings have
    the mean norm the old projector's had: the frozen LLM was trained on image embeddings of that
    scale, and a random projector starts an order of magnitude off, which the answer loss alone
    corrects only slowly. Only that one scalar survives from the old projector; it is returned (1.0
    without `features`).
    """
    family = family_for(model.config)
    projector = family.connector(model)
    output_layer = family.connector_output_layer(model)
    target_norm = None
    if features is not None:
        with torch.no_grad():
            target_norm = family.project(model, features).norm(dim=-1).mean()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    for module in projector.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):  # MobileVLM's LDPv2 has a depthwise conv
            module.reset_parameters()
    torch.random.set_rng_state(generator_state)
    if target_norm is None:
        return 1.0
    with torch.no_grad():
        scale = float(target_norm / family.project(model, features).norm(dim=-1).mean())
        output_layer.weight.mul_(scale)
        if output_layer.bias is not None:
            output_layer.bias.mul_(scale)
    return scale


def parameter_groups(model, trainable_params: list, lr: float, output_scale: float) -> list[dict]:
    """AdamW groups: everything at `lr`, except a connector that is one layer (Idefics3's Linear).

    Adam moves every weight by about `lr` a step whatever its size, so a layer rescaled by `output_scale`
    learns `output_scale` times slower relative to its weights. A connector with a hidden layer does
    not notice: the hidden layer's updates reach the embeddings amplified by the rescaled output layer.
    A one-layer connector has no such path, so its layer gets `lr * output_scale`, the relative step it
    had at its default initialisation (measured on the SmolVLM transplant, together with a connector
    started at the LLM's image-embedding scale: frozen-LLM alignment at loss 0.99 by step 150, against
    1.8 without both and the LLaVA MLP's 0.76).
    """
    family = family_for(model.config)
    layers = [m for m in family.connector(model).modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    if len(layers) != 1 or output_scale == 1.0:
        return [{"params": trainable_params, "lr": lr}]
    scaled = {id(p) for p in layers[0].parameters()}
    return [{"params": [p for p in trainable_params if id(p) not in scaled], "lr": lr},
            {"params": [p for p in trainable_params if id(p) in scaled], "lr": lr * output_scale}]


def set_trainable(model, llm_mode: str, lora_rank: int, lora_alpha: int):
    """Freeze what the recipe freezes; returns the model to train (a PEFT wrapper for LoRA)."""
    family = family_for(model.config)
    model.requires_grad_(False)
    family.connector(model).requires_grad_(True)
    if llm_mode == "full":
        parts = family.decoder_parts(model)
        parts.core.requires_grad_(True)
        parts.lm_head.requires_grad_(True)
    elif llm_mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0,
                          target_modules=family.llm_module_pattern)
        peft_model = get_peft_model(model, lora)
        family.connector(model).requires_grad_(True)  # PEFT froze everything but the adapters
        return peft_model
    return model


@dataclass
class TowerFeatures:
    """The frozen tower's features of every view of every image: `features` [views, tokens, vision hidden],
    image i's views at rows `starts[i]:starts[i + 1]`, its tile grid in `grids[i]`."""

    features: torch.Tensor
    starts: list[int]
    grids: list[tuple[int, int]]

    def of(self, images: torch.Tensor) -> torch.Tensor:
        """The views of `images` (indices), concatenated in order: what one batch's prompts hold."""
        if len(self.starts) == len(self.features) + 1:  # one view per image
            return self.features[images]
        return torch.cat([self.features[self.starts[i]:self.starts[i + 1]] for i in images.tolist()])

    def to(self, device) -> TowerFeatures:
        return TowerFeatures(self.features.to(device), self.starts, self.grids)


@torch.inference_mode()
def cache_tower_features(family: ModelFamily, model, processor, data_dir: Path, image_paths: list[str],
                         batch_size: int = 128) -> TowerFeatures:
    """The tower's features of each image's views (family.image_views), in the order of `image_paths`."""
    chunks, starts, grids = [], [0], []
    for start in progress_bar(range(0, len(image_paths), batch_size), desc="cache tower features", unit="batch"):
        images = [load_image(data_dir / p) for p in image_paths[start:start + batch_size]]
        views = family.image_views(processor.image_processor, images)
        pixel_values = torch.cat([v.pixel_values for v in views])
        chunks.append(family.tower_features(model, pixel_values.to(model.dtype)))
        for v in views:
            starts.append(starts[-1] + v.count)
            grids.append((v.rows, v.cols))
    return TowerFeatures(torch.cat(chunks), starts, grids)


@dataclass
class _Example:
    image_index: int
    qa: EncodedQA


class _QADataset(Dataset):
    def __init__(self, examples: list[_Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> _Example:
        return self.examples[i]


def _examples(records: list[VQARecord], tokenizer, prompt: PromptSpec, image_index: dict[str, int],
              grids: list[tuple[int, int]]) -> list[_Example]:
    cache: dict[tuple, EncodedQA] = {}
    examples = []
    for r in records:
        index = image_index[r.image]
        key = (r.question, r.multiple_choice_answer, grids[index])
        if key not in cache:
            cache[key] = encode_qa(tokenizer, prompt, r.question, r.multiple_choice_answer, *grids[index])
        examples.append(_Example(index, cache[key]))
    return examples


def finetune_projector(model, processor, records: list[VQARecord], data_dir: Path, cfg: TrainConfig,
                       log_metric: Callable[[int, float], None] | None = None) -> tuple[object, list[float]]:
    """Align the connector on `records` (see train.projector); returns the model (LoRA merged) and the loss curve."""
    from accelerate import Accelerator

    if cfg.projector == "frozen":
        log.info("train.projector=frozen: the model is kept as downloaded, nothing is trained")
        model.requires_grad_(False)
        return model.eval(), []
    family = family_for(model.config)
    started = time.perf_counter()
    torch.set_flush_denormal(True)  # denormal gradients slow CPU training several-fold
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(cfg.seed)
    model.eval()
    image_paths = sorted({r.image for r in records})
    features = cache_tower_features(family, model, processor, data_dir, image_paths)
    output_scale = 1.0
    if cfg.projector == "reinit":
        output_scale = reinitialise_projector(model, cfg.seed, features.features[:256])
    image_index = {p: i for i, p in enumerate(image_paths)}
    examples = _examples(records, processor.tokenizer, family.prompt(processor), image_index, features.grids)
    pad_id = processor.tokenizer.pad_token_id

    def collate(batch: list[_Example]) -> dict[str, torch.Tensor]:
        out = pad_batch([ex.qa for ex in batch], pad_id)
        out["image_index"] = torch.tensor([ex.image_index for ex in batch])
        return out

    loader = DataLoader(_QADataset(examples), batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        collate_fn=collate, generator=torch.Generator().manual_seed(cfg.seed))
    trainable = set_trainable(model, cfg.llm, cfg.lora_rank, cfg.lora_alpha)
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameter_groups(model, params, cfg.lr, output_scale), lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, cfg.warmup_steps, cfg.steps))
    trainable, optimizer, loader, scheduler = accelerator.prepare(trainable, optimizer, loader, scheduler)
    core = accelerator.unwrap_model(trainable)
    base = core.get_base_model() if hasattr(core, "get_base_model") else core
    features = features.to(accelerator.device)

    losses: list[float] = []
    step = 0
    bar = progress_bar(total=cfg.steps, desc="finetune projector", unit="step", disable=not accelerator.is_main_process)
    while step < cfg.steps:
        for batch in loader:
            trainable.train()
            embeds = family.merge_image_features(base, batch["input_ids"],
                                                 family.project(base, features.of(batch["image_index"])))
            loss = trainable(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                window = losses[-cfg.log_every:]
                mean = sum(window) / len(window)
                bar.set_postfix(loss=f"{mean:.4f}")
                if log_metric is not None and accelerator.is_main_process:
                    log_metric(step, mean)
            if step >= cfg.steps:
                break
    bar.close()
    accelerator.wait_for_everyone()
    trained = accelerator.unwrap_model(trainable)
    if hasattr(trained, "merge_and_unload"):
        trained = trained.merge_and_unload()
    trained.requires_grad_(False)
    trained.eval()
    log.info("projector fine-tuned: %d steps in %.1fs, loss %.4f -> %.4f", step, time.perf_counter() - started,
             sum(losses[:10]) / min(10, len(losses)), sum(losses[-10:]) / min(10, len(losses)))
    return trained, losses
