"""Make the bundled tiny base: build, pretrain, measure, save with its recipe and metrics."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from vlm_factory.data.synthetic import iter_split
from vlm_factory.eval.generate import answer_questions
from vlm_factory.eval.report import accuracy_report
from vlm_factory.eval.vqa_metric import vqa_score
from vlm_factory.model.checkpoint import save_checkpoint
from vlm_factory.config import ArchitectureConfig, PretrainConfig
from vlm_factory.train.pretrain import prepare_data, pretrain
from vlm_factory.model.tiny import build_model

log = logging.getLogger(__name__)

DESCRIPTIONS = {
    "llava": "A tiny LLaVA-style vision-language model (SigLIP tower, 2-layer MLP projector, Llama LLM)",
    "mobilevlm": "A tiny MobileVLM V2 (CLIP tower read at its second-to-last layer, LDPv2 projector: MLP, 2x2 "
                 "average pooling and a depthwise-conv positional residual; Llama LLM), in MobileVLM's published "
                 "checkpoint layout",
    "idefics3": "A tiny SmolVLM / Idefics3 (SigLIP-style tower on each tile of an image split into tiles plus a "
                "global view, pixel shuffle and a linear connector, Llama LLM between Idefics3's marker tokens)",
}
MODEL_CARD = """# {name} (vlm-factory bundled base)

{description},
pretrained from scratch by `stages/pretrain_base.py` on the synthetic shapes VQA task.
It exists so the factory runs end to end with no network; it knows nothing of real images.

- recipe, seed and architecture: `recipe.json`
- accuracy per question type during pretraining: `pretrain_metrics.json`
- regenerate: `dvc unfreeze {stage} && dvc repro {stage}`
"""


def make_base(out_dir: Path, arch: ArchitectureConfig, recipe: PretrainConfig, stage: str = "pretrain_base") -> dict:
    """Pretrain a tiny base from scratch into `out_dir` (atomically); returns the final accuracy report.
    `stage`: the DVC stage that makes it (named in the model card)."""
    model, processor = build_model(arch, recipe.seed)
    card = MODEL_CARD.format(name=out_dir.name, description=DESCRIPTIONS[arch.family], stage=stage)
    return train_and_save(model, processor, recipe, out_dir, card, {"architecture": asdict(arch)})


def train_and_save(model, processor, recipe: PretrainConfig, out_dir: Path, card: str, origin: dict) -> dict:
    """Pretrain every weight of `model` by `recipe` (train/pretrain.py), measuring it on held-out synthetic
    questions as it goes, and save it with its recipe (`origin`: what it was built from) and metrics."""
    started = time.perf_counter()
    data = prepare_data(recipe, model, processor)
    held_out = list(iter_split(recipe.seed, "eval", recipe.eval_images, 2, recipe.cell_px))
    images = [it.image for it in held_out for _ in it.qas]
    qas = [qa for it in held_out for qa in it.qas]
    aspects = [it.scene.aspect for it in held_out for _ in it.qas]

    def evaluate(m) -> dict:
        predictions = answer_questions(m, processor, images, [qa.question for qa in qas])
        # normalized: the metric the bundled bases' recorded pretrain_metrics.json were measured with
        scores = [vqa_score(p, [qa.answer] * 10, mode="normalized") for p, qa in zip(predictions, qas)]
        return accuracy_report(scores, [qa.question_type for qa in qas], aspects)

    history = pretrain(model, processor, recipe, data, evaluate=evaluate)
    final = history[-1] if history else evaluate(model)
    minutes = (time.perf_counter() - started) / 60
    recipe_json = {**origin, "recipe": asdict(recipe), "torch": torch.__version__}
    metrics = {"final": final, "history": history, "wall_minutes": round(minutes, 2)}
    save_checkpoint(model, processor, out_dir, extra_files={
        "recipe.json": json.dumps(recipe_json, indent=2) + "\n",
        "pretrain_metrics.json": json.dumps(metrics, indent=2) + "\n",
        "README.md": card,
    })
    log.info("base pretrained in %.1f min: %.2f%% VQA accuracy", minutes, final["vqa_accuracy"])
    return final
