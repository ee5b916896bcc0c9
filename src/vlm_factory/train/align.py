"""Joint alignment of a transplanted base: its new connector and its LLM, trained together.

A base moved into another family (model/transplant.py) keeps its trained tower and LLM but gets a
connector of that family's own kind and a new image-token layout (marker tokens, several views per
image). Aligning only the connector against the frozen LLM (the `finetune` recipe) is not enough
there: the LLM learnt to read one image's tokens, never several views of it between markers. So the
derived base is aligned once, connector (from its fitted start) and LLM together, the tower frozen, on
a synthetic split of its own ("pretrain": never the train or eval questions); the pipeline's `finetune`
then aligns a fresh connector against this LLM as it does for the default base.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vlm_factory.config import TrainConfig
from vlm_factory.data.synthetic import write_split
from vlm_factory.train.projector import finetune_projector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlignRecipe:
    steps: int
    n_images: int
    lr: float = 1e-3
    batch_size: int = 64
    questions_per_image: int = 4
    seed: int = 0
    cell_px: int = 32  # the synthetic data's native pixels per grid cell (conf/data)


def align_connector_and_llm(model, processor, recipe: AlignRecipe) -> tuple[object, list[float]]:
    """Train a new connector and the whole LLM on `recipe.n_images` synthetic images; returns (model, losses)."""
    with tempfile.TemporaryDirectory(prefix="align-") as tmp:
        data_dir = Path(tmp)
        records = write_split(data_dir, "pretrain", recipe.seed, recipe.n_images, recipe.questions_per_image,
                              recipe.cell_px)
        cfg = TrainConfig(projector="continue", llm="full", seed=recipe.seed, steps=recipe.steps,
                          batch_size=recipe.batch_size, lr=recipe.lr, warmup_steps=min(30, recipe.steps // 10))
        log.info("aligning the connector and the LLM: %d steps on %d questions", recipe.steps, len(records))
        return finetune_projector(model, processor, records, data_dir, cfg)
