"""The LLaVA forward split at the seams that training needs.

`tower_features` is the frozen, cacheable part; `project` is what projector fine-tuning trains;
`merge_image_features` puts projected features where the prompt has image tokens. Together they
compute exactly what `LlavaForConditionalGeneration.forward(pixel_values=...)` computes.
"""

from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration


def tower_features(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """Vision tower hidden states at the configured feature layer, as LLaVA selects them."""
    config = model.config
    out = model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    selected = out.hidden_states[config.vision_feature_layer]
    if config.vision_feature_select_strategy == "default":
        selected = selected[:, 1:]
    return selected


def project(model: LlavaForConditionalGeneration, features: torch.Tensor) -> torch.Tensor:
    return model.model.multi_modal_projector(features)


def merge_image_features(model: LlavaForConditionalGeneration, input_ids: torch.Tensor,
                         image_embeds: torch.Tensor) -> torch.Tensor:
    """Token embeddings with each image-token position replaced by one projected image feature.

    `image_embeds` holds one [tokens, hidden] block per sequence, in order.
    """
    embeds = model.get_input_embeddings()(input_ids)
    mask = (input_ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    n_slots = int(mask[..., 0].sum())
    if n_slots != image_embeds.shape[0] * image_embeds.shape[1]:
        raise ValueError(f"prompt has {n_slots} image tokens but {image_embeds.shape[0]} images of "
                         f"{image_embeds.shape[1]} features were given")
    return embeds.masked_scatter(mask, image_embeds.to(embeds.dtype))
