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

MODEL_CARD = """# tiny-llava-siglip (vlm-factory bundled base)

A tiny LLaVA-style vision-language model (SigLIP tower, 2-layer MLP projector, Llama LLM),
pretrained from scratch by `stages/pretrain_base.py` on the synthetic shapes VQA task.
It exists so the factory runs end to end with no network; it knows nothing of real images.

- recipe, seed and architecture: `recipe.json`
- accuracy per question type during pretraining: `pretrain_metrics.json`
- regenerate: `dvc unfreeze pretrain_base && dvc repro pretrain_base`
"""


def make_base(out_dir: Path, arch: ArchitectureConfig, recipe: PretrainConfig) -> dict:
    """Pretrain a tiny base into `out_dir` (atomically); returns the final accuracy report."""
    started = time.perf_counter()
    model, processor = build_model(arch, recipe.seed)
    data = prepare_data(recipe, processor, model.config.image_seq_length, arch.image_size, arch.patch_size)
    held_out = list(iter_split(recipe.seed, "eval", recipe.eval_images, 2, recipe.cell_px))
    images = [it.image for it in held_out for _ in it.qas]
    qas = [qa for it in held_out for qa in it.qas]
    aspects = [it.scene.aspect for it in held_out for _ in it.qas]

    def evaluate(m) -> dict:
        predictions = answer_questions(m, processor, images, [qa.question for qa in qas])
        scores = [vqa_score(p, [qa.answer] * 10) for p, qa in zip(predictions, qas)]
        return accuracy_report(scores, [qa.question_type for qa in qas], aspects)

    history = pretrain(model, processor, recipe, data, evaluate=evaluate)
    final = history[-1] if history else evaluate(model)
    minutes = (time.perf_counter() - started) / 60
    recipe_json = {"architecture": asdict(arch), "recipe": asdict(recipe), "torch": torch.__version__}
    metrics = {"final": final, "history": history, "wall_minutes": round(minutes, 2)}
    save_checkpoint(model, processor, out_dir, extra_files={
        "recipe.json": json.dumps(recipe_json, indent=2) + "\n",
        "pretrain_metrics.json": json.dumps(metrics, indent=2) + "\n",
        "README.md": MODEL_CARD,
    })
    log.info("base pretrained in %.1f min: %.2f%% VQA accuracy", minutes, final["vqa_accuracy"])
    return final
