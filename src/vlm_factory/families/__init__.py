"""Model families: one module per family that every stage, exporter and runtime asks (see base.py)."""

from vlm_factory.families.base import (COMPONENTS, FORMATS, CheckpointKey, DecoderParts, ImageViews, ModelFamily,
                                       PromptSpec, TextFacts, VisionFacts)
from vlm_factory.families.registry import FAMILIES, family_for, family_of, support_matrix

__all__ = ["COMPONENTS", "FAMILIES", "FORMATS", "CheckpointKey", "DecoderParts", "ImageViews", "ModelFamily",
           "PromptSpec", "TextFacts", "VisionFacts", "family_for", "family_of", "support_matrix"]
