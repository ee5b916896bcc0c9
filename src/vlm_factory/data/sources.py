"""The `download` stage's data half: synthetic generation, or a hub / local VQA dataset."""

from __future__ import annotations

from pathlib import Path

from vlm_factory.config import DataConfig
from vlm_factory.data.synthetic import build_dataset


def fetch_data(data: DataConfig, out_dir: Path) -> dict[str, int]:
    """Write <split>.jsonl + images/ for the train and eval splits; returns questions per split."""
    if data.source == "synthetic":
        return build_dataset(out_dir, data.seed, {
            "train": (data.train_images, data.train_questions_per_image),
            "eval": (data.eval_images, data.eval_questions_per_image),
        }, data.cell_px)
    from vlm_factory.data.hub import load_vqa_dataset

    return load_vqa_dataset(
        out_dir, dict(data.splits),
        hub_dataset=data.hub_dataset if data.source == "hub" else None,
        revision=data.hub_revision,
        local_path=data.local_path if data.source == "local" else None,
        max_questions=dict(data.max_questions) if data.max_questions else None,
    )
