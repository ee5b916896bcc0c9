"""The vision half of the llama.cpp packaging: vision tower + connector as an mmproj GGUF.

What is written comes from the model family: the tower's and connector's tensors
(`family.checkpoint_key`), the tower's facts (`family.vision`), the projector type
(`family.connector_type`) and the preprocessing (`family.preprocessing(processor)`, read from the
checkpoint's own processor, hub or transformers-5 layout). What differs between projector types
(`PROJECTORS`) is the connector's tensor names, whether the tower's post-layernorm is part of what
the connector reads, and the keys only that projector has:

- "mlp" (LLaVA): `linear_1`/`linear_2` -> `mm.0`/`mm.2`, the explicit feature layer (below);
- "idefics3" (SmolVLM): `modality_projection.proj` -> `mm.model.fc`, the last hidden state through
  `v.post_ln`, `clip.vision.projector.scale_factor` (pixel shuffle) and the tile size as
  `clip.vision.image_size` with the processor's longest edge as `clip.vision.preproc_image_size`
  (llama.cpp cuts the image into tiles itself, with its own resampling: see families/idefics3.py).
- "ldpv2" (MobileVLM V2): `mlp.mlp.{0,2}` -> `mm.model.mlp.{0,2}` and the depthwise 3x3 convolution
  `peg.peg.0` -> `mm.model.peg.0`, the explicit feature layer as for "mlp" (clip.cpp runs it in the same
  llava graph). The convolution kernel is written in F16 whatever the file's precision: ggml's
  depthwise convolution (ggml_conv_2d_dw) unfolds its input into F16 columns and multiplies them by
  the kernel, which must then be F16 too. The graph reshapes the patches to a fixed 24x24 grid
  (`int n_patch = 24` in clip.cpp / tools/mtmd/models/llava.cpp): a tower with another grid is refused
  by the family, and by runtime/gguf_check before libmtmd would abort on it.

CLIP and SigLIP towers are written faithfully: patch embedding, class embedding and pre-layernorm
when the tower has them. A LLaVA connector reads one hidden state of the tower before any
post-layernorm, so the post-layernorm (and a SigLIP pooling head) is left out, and the feature
layer is written explicitly as a non-negative index: clip.cpp's llava graph saves
`hidden_states[k]` as transformers counts them (0 = the embeddings after the pre-layernorm) and
otherwise stops one block early (LLaVA-1.5's -2). For a tower with a class token the graph drops
one position before the projector, without one it keeps all: the checkpoint's select strategy must
say the same.

The pinned llama.cpp puts the class token after the patches where transformers puts it first
(ggml-org/llama.cpp#25814), so a CLIP tower's image embeddings do not match: the parity gate's
embedding check refuses such an export (`family.known_issue("gguf")` says why), not this writer.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from vlm_factory.errors import UserError
from vlm_factory.export.gguf_io import component_tensors, deferred, write_gguf

log = logging.getLogger(__name__)

# gguf-py 0.19 has no writer method for it yet; the key is llama.cpp's KEY_FEATURE_LAYERS.
FEATURE_LAYERS_KEY = "clip.vision.feature_layer"
# clip.cpp runs a GELU (either form; it is tanh-approximated) or, with use_gelu false, a quick GELU.
ACTIVATIONS = {"gelu": True, "gelu_pytorch_tanh": True, "quick_gelu": False}


@dataclass(frozen=True)
class ProjectorLayout:
    """What one llama.cpp projector type reads of a checkpoint's tower and connector."""

    connector: dict[str, str]   # connector layer (local name without .weight/.bias) -> llama.cpp's name
    post_layernorm: bool        # the connector reads the tower's output after its post-layernorm (v.post_ln)
    feature_layer: bool         # clip.vision.feature_layer is written (clip.cpp's llava graph reads it)
    tiles: bool                 # image_size is one tile; the processor's longest edge is preproc_image_size
    f16_tensors: frozenset[str] = frozenset()  # llama.cpp names written in F16 at every precision (see above)


# llama.cpp's names of a connector's layers, by projector type: its loader wants mm.0 / mm.2 for "mlp",
# mm.model.fc (TN_MM_PROJECTOR) for "idefics3", mm.model.mlp.N / mm.model.peg.N (TN_MVLM_PROJ_MLP / _PEG)
# for "ldpv2".
PROJECTORS = {
    "mlp": ProjectorLayout({"linear_1": "mm.0", "linear_2": "mm.2"}, post_layernorm=False, feature_layer=True,
                           tiles=False),
    "idefics3": ProjectorLayout({"modality_projection.proj": "mm.model.fc"}, post_layernorm=True,
                                feature_layer=False, tiles=True),
    "ldpv2": ProjectorLayout({"mlp.mlp.0": "mm.model.mlp.0", "mlp.mlp.2": "mm.model.mlp.2",
                              "peg.peg.0": "mm.model.peg.0"}, post_layernorm=False, feature_layer=True, tiles=False,
                             f16_tensors=frozenset({"mm.model.peg.0.weight"})),
}
# A CLIP or SigLIP tower's tensors (local names) -> llama.cpp's; None: not part of what the connector reads.
TOWER_NAMES = (
    (r"embeddings\.patch_embedding\.(weight|bias)", "v.patch_embd.{0}"),
    (r"embeddings\.position_embedding\.weight", "v.position_embd.weight"),
    (r"embeddings\.class_embedding", "v.class_embd"),
    (r"pre_layrnorm\.(weight|bias)", "v.pre_ln.{0}"),
    (r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", "v.blk.{0}.attn_{1}.{2}"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", "v.blk.{0}.attn_out.{1}"),
    (r"encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)", "v.blk.{0}.ln{1}.{2}"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", "v.blk.{0}.ffn_up.{1}"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", "v.blk.{0}.ffn_down.{1}"),
    (r"post_layernorm\..*", None),
    (r"head\..*", None),
)
POST_LAYERNORM = (r"post_layernorm\.(weight|bias)", "v.post_ln.{0}")


def tower_name(local: str, post_layernorm: bool = False) -> str | None:
    """llama.cpp's name of a tower tensor (None: left out); an unknown tensor is a one-line error.

    `post_layernorm`: the connector reads the tower's output after it (Idefics3), so it is written."""
    for pattern, name in ((POST_LAYERNORM,) if post_layernorm else ()) + TOWER_NAMES:
        match = re.fullmatch(pattern, local)
        if match:
            return None if name is None else name.format(*match.groups())
    raise UserError(f"vision tower tensor {local!r} has no mmproj name; unsupported vision tower layout")


def _load(tensor, dtype) -> np.ndarray:
    return tensor.load().astype(dtype)


def _check(family, preprocessing: dict, source: Path) -> None:
    vision = family.vision
    if vision.hidden_act not in ACTIVATIONS:
        raise UserError(f"{source}: vision activation {vision.hidden_act!r}; clip.cpp runs {', '.join(ACTIVATIONS)}")
    if family.connector_type not in PROJECTORS:
        raise UserError(f"{source}: connector {family.connector_type!r} has no mmproj writer "
                        f"(written: {', '.join(PROJECTORS)})")
    if vision.drop_cls != vision.has_cls_token:
        raise UserError(f"{source}: vision_feature_select_strategy {'drops' if vision.drop_cls else 'keeps'} the first "
                        f"position of a {vision.tower} tower {'with' if vision.has_cls_token else 'without'} a class "
                        "token; llama.cpp drops it exactly when there is a class token")
    if abs(preprocessing["rescale_factor"] - 1 / 255) > 1e-9:
        raise UserError(f"{source}: image rescale_factor {preprocessing['rescale_factor']}; clip.cpp scales pixels "
                        "by 1/255 only")
    if PROJECTORS[family.connector_type].tiles:
        _check_tiling(family, preprocessing, source)


def _check_tiling(family, preprocessing: dict, source: Path) -> None:
    """An Idefics3-style processor llama.cpp's tiling can follow: it always splits, tiles of the tower's size."""
    vision = family.vision
    if preprocessing.get("tile_size") != vision.image_size:
        raise UserError(f"{source}: the processor cuts {preprocessing.get('tile_size')} px tiles (max_image_size) "
                        f"but the vision tower reads {vision.image_size} px (vision_config.image_size); llama.cpp "
                        "cuts tiles of the tower's size")
    if not preprocessing.get("split") or (preprocessing.get("resize_longest_edge") or 0) <= vision.image_size:
        # The processor then gives the global view alone; llama.cpp's idefics3 preprocessing always resizes to
        # preproc_image_size and adds a grid of tiles (at least 1x1) before the global view.
        raise UserError(f"{source}: the image processor does not resize to a longest edge beyond the "
                        f"{vision.image_size} px tile and split the image (do_resize, size.longest_edge, "
                        "do_image_splitting); llama.cpp's idefics3 preprocessing always does, so it would not see "
                        "what the model was trained on")
    side = vision.image_size // vision.patch_size
    if side % family.scale_factor:
        raise UserError(f"{source}: scale_factor {family.scale_factor} does not divide the tile's {side} patches")


def write_mmproj_gguf(model_dir: Path, out_path: Path, family=None, processor=None) -> dict[str, str]:
    """Write the vision tower and connector of a checkpoint directory as an F32 mmproj GGUF (the projector's
    `f16_tensors` in F16)."""
    import gguf

    from vlm_factory.families import family_of

    model_dir = Path(model_dir)
    family = family or family_of(model_dir)
    family.require_format("gguf")
    processor = processor if processor is not None else family.load_processor(model_dir)
    preprocessing = family.preprocessing(processor)
    _check(family, preprocessing, model_dir)
    vision = family.vision
    layout = PROJECTORS[family.connector_type]
    connector_names = layout.connector
    summary: dict[str, str] = {}

    def connector_name(local: str) -> str:
        layer, _, suffix = local.rpartition(".")
        if layer not in connector_names:
            raise UserError(f"{model_dir}: connector tensor {local!r} is not part of a "
                            f"{family.connector_type!r} projector")
        return f"{connector_names[layer]}.{suffix}"

    def fill(writer) -> None:
        writer.add_type(gguf.GGUFType.MMPROJ)
        writer.add_name(model_dir.name)
        writer.add_clip_has_vision_encoder(True)
        writer.add_clip_projector_type(family.connector_type)
        writer.add_vision_projection_dim(family.text.hidden_size)
        writer.add_vision_image_size(vision.image_size)
        writer.add_vision_patch_size(vision.patch_size)
        writer.add_vision_embedding_length(vision.hidden_size)
        writer.add_vision_feed_forward_length(vision.intermediate_size)
        writer.add_vision_block_count(vision.num_layers)
        writer.add_vision_head_count(vision.num_heads)
        writer.add_vision_attention_layernorm_eps(vision.layer_norm_eps)
        writer.add_vision_image_mean(preprocessing["mean"])
        writer.add_vision_image_std(preprocessing["std"])
        writer.add_vision_use_gelu(ACTIVATIONS[vision.hidden_act])
        if layout.feature_layer:
            writer.add_array(FEATURE_LAYERS_KEY, [vision.feature_layer])
        if layout.tiles:
            writer.add_vision_projector_scale_factor(family.scale_factor)
            writer.add_vision_preproc_image_size(preprocessing["resize_longest_edge"])

        def vision_name(local: str) -> str | None:
            return tower_name(local, layout.post_layernorm)

        for component, rename in (("vision", vision_name), ("connector", connector_name)):
            for tensor in component_tensors(model_dir, family, component):
                name = rename(tensor.local)
                if name is not None:
                    half = name in layout.f16_tensors
                    writer.add_tensor(name, deferred(tensor.shape, np.float16 if half else np.float32,
                                                     partial(_load, tensor, np.float16) if half else tensor.load))
                    summary[name] = "F16" if half else "F32"

    write_gguf(out_path, "clip", fill)
    if not any(name.startswith("mm.") for name in summary) or "v.patch_embd.weight" not in summary:
        out_path.unlink(missing_ok=True)
        raise UserError(f"{model_dir}: the checkpoint has no vision tower or connector tensors the family recognises")
    log.info("wrote %s: %d tensors (%s tower, %s projector)", out_path, len(summary), vision.tower,
             family.connector_type)
    return summary
