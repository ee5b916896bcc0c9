"""The vision half of the llama.cpp packaging: SigLIP tower + LLaVA MLP projector as an mmproj GGUF.

llama.cpp's loader wants the projector as `mm.0` / `mm.2` (gguf-py's name map says `mm.1`), and
LLaVA reads the tower's last hidden state *before* SigLIP's post-layernorm
(`vision_feature_layer=-1`), so the post-layernorm is left out: clip.cpp applies it when present.
clip.cpp's LLaVA graph stops one block early unless told otherwise (LLaVA-1.5 reads layer -2), so
the feature layer is written explicitly, as a non-negative index: the output of the last block.
Preprocessing (image size, mean, std) comes from the model's own processor config.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vlm_factory.errors import UserError
from vlm_factory.export.gguf_io import checkpoint_tensors, write_gguf

log = logging.getLogger(__name__)

# gguf-py 0.19 has no writer method for it yet; the key is llama.cpp's KEY_FEATURE_LAYERS.
FEATURE_LAYERS_KEY = "clip.vision.feature_layer"
PROJECTOR_NAMES = {"multi_modal_projector.linear_1": "mm.0", "multi_modal_projector.linear_2": "mm.2"}


def _gguf_name(key: str, name_map) -> str | None:
    for hf, gg in PROJECTOR_NAMES.items():
        if key.startswith(hf + "."):
            return gg + key[len(hf):]
    if "post_layernorm" in key:
        return None
    # Checkpoints store the tower as `vision_tower.*`; gguf-py's map knows `vision_tower.vision_model.*`.
    name = name_map.get_name(key.replace("vision_tower.", "vision_tower.vision_model.", 1),
                             try_suffixes=(".weight", ".bias"))
    if name is None:
        raise UserError(f"tensor {key} has no mmproj name; unsupported vision tower layout")
    return name


def write_mmproj_gguf(model_dir: Path, out_path: Path) -> dict[str, str]:
    """Write the vision tower and projector of an HF LLaVA directory as an F32 mmproj GGUF."""
    import gguf
    from transformers import LlavaConfig

    config = LlavaConfig.from_pretrained(model_dir)
    vision = config.vision_config
    if vision.model_type != "siglip_vision_model" or config.vision_feature_layer != -1:
        raise UserError(f"{model_dir}: only SigLIP towers read at vision_feature_layer=-1 are exported to mmproj "
                        f"(got {vision.model_type}, layer {config.vision_feature_layer}); llama.cpp orders "
                        "CLIP's CLS token differently from transformers")
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
        writer.add_vision_use_gelu(True)
        writer.add_array(FEATURE_LAYERS_KEY, [vision.num_hidden_layers])
        for key, data in checkpoint_tensors(model_dir, ("vision_tower.", "multi_modal_projector.")):
            name = _gguf_name(key, name_map)
            if name is not None:
                writer.add_tensor(name, data)
                summary[name] = "F32"

    write_gguf(out_path, "clip", fill)
    log.info("wrote %s: %d tensors", out_path, len(summary))
    return summary
