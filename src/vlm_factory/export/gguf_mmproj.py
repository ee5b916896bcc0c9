"""The vision half of the llama.cpp packaging: a SigLIP or CLIP tower + LLaVA MLP projector as an mmproj GGUF.

llama.cpp's loader wants the projector as `mm.0` / `mm.2` (gguf-py's name map says `mm.1`).
LLaVA reads a hidden state of the tower (`vision_feature_layer`), never its post-layernorm, so the
post-layernorm is left out (clip.cpp would apply it) and the feature layer is written explicitly
as a non-negative index: clip.cpp's LLaVA graph otherwise stops one block early (LLaVA-1.5's -2).
Preprocessing (image size, mean, std) comes from the model's own processor config.

CLIP towers are written faithfully, but this llama.cpp puts the CLS token after the patches where
transformers puts it first, so their image embeddings do not match: the parity gate's embedding
check is what refuses such an export (see tests/test_gguf.py), not this writer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from vlm_factory.errors import UserError
from vlm_factory.export.gguf_io import checkpoint_tensors, deferred, write_gguf

log = logging.getLogger(__name__)

# gguf-py 0.19 has no writer method for it yet; the key is llama.cpp's KEY_FEATURE_LAYERS.
FEATURE_LAYERS_KEY = "clip.vision.feature_layer"
TOWERS = ("siglip_vision_model", "clip_vision_model")
# clip.cpp runs a GELU (either form; it is tanh-approximated) or, with use_gelu false, a quick GELU.
ACTIVATIONS = {"gelu": True, "gelu_pytorch_tanh": True, "quick_gelu": False}
PROJECTOR_NAMES = {"multi_modal_projector.linear_1": "mm.0", "multi_modal_projector.linear_2": "mm.2"}


def _gguf_name(key: str, name_map) -> str | None:
    for hf, gg in PROJECTOR_NAMES.items():
        if key.startswith(hf + "."):
            return gg + key[len(hf):]
    if "post_layernorm" in key:
        return None
    # Some checkpoints store the tower as `vision_tower.*`; gguf-py's map knows `vision_tower.vision_model.*`.
    if not key.startswith("vision_tower.vision_model."):
        key = key.replace("vision_tower.", "vision_tower.vision_model.", 1)
    name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise UserError(f"tensor {key} has no mmproj name; unsupported vision tower layout")
    return name


def write_mmproj_gguf(model_dir: Path, out_path: Path) -> dict[str, str]:
    """Write the vision tower and projector of an HF LLaVA directory as an F32 mmproj GGUF."""
    import gguf
    from transformers import LlavaConfig

    config = LlavaConfig.from_pretrained(model_dir)
    vision = config.vision_config
    if vision.model_type not in TOWERS:
        raise UserError(f"{model_dir}: vision tower {vision.model_type!r} is not supported by the mmproj exporter "
                        f"(supported: {', '.join(TOWERS)})")
    if vision.hidden_act not in ACTIVATIONS:
        raise UserError(f"{model_dir}: vision activation {vision.hidden_act!r}; clip.cpp runs "
                        f"{', '.join(ACTIVATIONS)}")
    feature_layer = config.vision_feature_layer
    if not isinstance(feature_layer, int) or not -vision.num_hidden_layers - 1 <= feature_layer <= vision.num_hidden_layers:
        raise UserError(f"{model_dir}: vision_feature_layer {feature_layer!r} must be one layer index; "
                        "llama.cpp's 'mlp' projector reads a single layer")
    # llama.cpp drops a CLS token when the tower has one and keeps every token otherwise.
    strategy = "default" if vision.model_type == "clip_vision_model" else "full"
    if config.vision_feature_select_strategy != strategy:
        raise UserError(f"{model_dir}: vision_feature_select_strategy is {config.vision_feature_select_strategy!r}; "
                        f"llama.cpp reads a {vision.model_type} tower as {strategy!r}")
    if config.projector_hidden_act != "gelu":
        raise UserError(f"{model_dir}: projector activation {config.projector_hidden_act!r}; llama.cpp's 'mlp' "
                        "projector is GELU")
    processor = json.loads((model_dir / "processor_config.json").read_text(encoding="utf-8"))["image_processor"]
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, vision.num_hidden_layers)
    summary: dict[str, str] = {}

    def fill(writer) -> None:
        writer.add_type(gguf.GGUFType.MMPROJ)
        writer.add_name(model_dir.name)
        writer.add_clip_has_vision_encoder(True)
        writer.add_clip_projector_type("mlp")
        writer.add_vision_projection_dim(config.text_config.hidden_size)
        writer.add_vision_image_size(vision.image_size)
        writer.add_vision_patch_size(vision.patch_size)
        writer.add_vision_embedding_length(vision.hidden_size)
        writer.add_vision_feed_forward_length(vision.intermediate_size)
        writer.add_vision_block_count(vision.num_hidden_layers)
        writer.add_vision_head_count(vision.num_attention_heads)
        writer.add_vision_attention_layernorm_eps(vision.layer_norm_eps)
        writer.add_vision_image_mean(processor["image_mean"])
        writer.add_vision_image_std(processor["image_std"])
        writer.add_vision_use_gelu(ACTIVATIONS[vision.hidden_act])
        # hidden_states[k] of transformers is clip.cpp's feature layer k (0 = the embeddings).
        writer.add_array(FEATURE_LAYERS_KEY, [feature_layer % (vision.num_hidden_layers + 1)])
        for tensor in checkpoint_tensors(model_dir, ("vision_tower.", "multi_modal_projector.")):
            name = _gguf_name(tensor.key, name_map)
            if name is not None:
                writer.add_tensor(name, deferred(tensor.shape, np.float32, tensor.load))
                summary[name] = "F32"

    write_gguf(out_path, "clip", fill)
    log.info("wrote %s: %d tensors", out_path, len(summary))
    return summary
