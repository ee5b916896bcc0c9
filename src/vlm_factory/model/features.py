"""The VLM forward split at the seams training needs, for any registered family.

`tower_features` is the frozen, cacheable part; `project` is what projector fine-tuning trains;
`merge_image_features` puts projected features where the prompt has image tokens. Together they
compute exactly what the family's `forward(pixel_values=...)` computes. Each asks the family.
"""

from __future__ import annotations

import torch

from vlm_factory.families import family_for


def tower_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Vision tower hidden states at the configured feature layer, as the connector reads them."""
    return family_for(model.config).tower_features(model, pixel_values)


def project(model, features: torch.Tensor) -> torch.Tensor:
    return family_for(model.config).project(model, features)


def merge_image_features(model, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    """Token embeddings with each image-token position replaced by one projected image feature."""
    return family_for(model.config).merge_image_features(model, input_ids, image_embeds)
