"""Idefics3 / SmolVLM image tiling and prompt expansion from plain data, as a device app implements it.

SmolVLM does not feed one fixed-size image to its vision tower: the processor resizes the image,
cuts it into `rows x cols` square tiles plus one "global" view of the whole image, and expands each
`<image>` of the prompt into one token block per tile. A runtime (onnxruntime, LiteRT, a Core ML
app) has no transformers, so the exporter writes two plain-data dicts beside every artifact and this
module replays them with PIL + numpy only:

- `tiling_spec(image_processor)` -> what `split_image(image, spec)` needs to produce the processor's
  `pixel_values` for ONE image, bit for bit (same PIL resampling on uint8, same float32 arithmetic);
- `prompt_layout(processor)` -> the token strings `expand_image_tokens(rows, cols, n, layout)` joins
  into the text the processor substitutes for `<image>`.

What a runtime must get right (each is easy to miss and changes the pixels or the prompt):

- the resizes are chained, each one on the uint8 result of the previous one, never composed:
  original -> longest edge `resize_longest_edge` (tiny images are enlarged too) -> each side up to a
  multiple of `tile_size` (aspect ratio not kept exactly) -> tiles cut from that; the global view is
  a resize of that multiple-of-tile image to `tile_size` x `tile_size`, squashing its aspect ratio;
- the filter is whatever the checkpoint says (SmolVLM: LANCZOS, PIL's, applied to 8-bit RGB);
- transparency is composited onto white, not dropped (transformers' `convert_to_rgb`);
- rows = cols = 0 means "one image, no tiles": the prompt then uses the global-only form;
- the processor pads across a batch: every sample gets as many images as the sample with the most,
  the missing ones all-zero, and `pixel_attention_mask` marks real pixels. All tiles of one image are
  `tile_size` square, so for one image nothing is padded and the mask is all ones; the model drops
  any image whose pixels are all exactly 0.0, so a runtime that batches may pad with zero tiles too.

Nothing here imports torch or transformers: `tiling_spec`/`prompt_layout` only read attributes of
the objects they are given, so runtimes can import this module.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from vlm_factory.errors import UserError
from vlm_factory.runtime.preprocess import to_rgb

# PIL's integer filter codes, which is how image processors store `resample`.
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
RESAMPLE = {"nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS,
            "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}
# transformers' Idefics3 processors cap any resized side at 4096 px (their MAX_IMAGE_SIZE).
MAX_RESOLUTION = 4096
# The processor writes tile markers 1-based, row first: <row_1_col_1>, <row_1_col_2>, ...
TILE_TOKEN_PATTERN = "<row_{row}_col_{col}>"


def _longest_edge(size) -> int | None:
    """`longest_edge` of a size given as a dict or as transformers' SizeDict (attribute access)."""
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get("longest_edge")
    return getattr(size, "longest_edge", None)


def tiling_spec(image_processor) -> dict:
    """An Idefics3/SmolVLM image processor's steps as plain JSON-able data (`split_image` replays them)."""
    p = image_processor
    tile = _longest_edge(p.max_image_size)
    if not tile:
        raise UserError(f"{type(p).__name__}: max_image_size has no longest_edge ({p.max_image_size!r})")
    longest = _longest_edge(p.size) if p.do_resize else None
    if p.do_resize and not longest:  # height/width sizes exist in the API but no SmolVLM checkpoint uses them
        raise UserError(f"{type(p).__name__}: size has no longest_edge ({p.size!r}); only longest_edge is supported")
    return {
        "kind": "idefics3_tiling",
        "convert_rgb": bool(p.do_convert_rgb),
        "resize_longest_edge": int(longest) if longest else None,
        "max_resolution": MAX_RESOLUTION,
        "resample": RESAMPLE_NAMES.get(int(p.resample), str(p.resample)),
        "split": bool(p.do_image_splitting),
        "tile_size": int(tile),
        "rescale_factor": float(p.rescale_factor) if p.do_rescale else 1.0,
        "mean": [float(m) for m in p.image_mean] if p.do_normalize else [0.0, 0.0, 0.0],
        "std": [float(s) for s in p.image_std] if p.do_normalize else [1.0, 1.0, 1.0],
        # Batch padding only: one image's tiles are all tile_size square (see the module docstring).
        "pad_batch": bool(p.do_pad),
        "layout": "NCHW", "dtype": "float32",
    }


def longest_edge_size(width: int, height: int, longest: int, max_resolution: int = MAX_RESOLUTION) -> tuple[int, int]:
    """(width, height) with the longest side at `longest`, as the processor rounds it.

    The short side is truncated, then bumped to the next even number; images smaller than `longest`
    are enlarged. A second pass caps the result at `max_resolution` (truncating, no even rule).
    """
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2
    else:
        width, height = int(longest * aspect), longest
        width += width % 2
    width, height = max(width, 1), max(height, 1)
    aspect = width / height
    if width >= height and width > max_resolution:
        width, height = max_resolution, int(max_resolution / aspect)
    elif height > width and height > max_resolution:
        width, height = int(max_resolution * aspect), max_resolution
    return max(width, 1), max(height, 1)


def tile_multiple_size(width: int, height: int, tile: int) -> tuple[int, int]:
    """(width, height) rounded up to whole tiles, as the processor does before cutting.

    The long side is rounded up first; the short side is re-derived from the rounded long side and
    the old aspect ratio (truncated) and then rounded up, so the aspect ratio is only approximately kept.
    """
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return width, height


def _normalise(image: Image.Image, spec: dict) -> np.ndarray:
    """[3, H, W] float32 in the processor's arithmetic: uint8 * scale in float64, cast, then (x - mean) / std in float32."""
    pixels = (np.asarray(image).astype(np.float64) * spec["rescale_factor"]).astype(np.float32)
    mean, std = np.asarray(spec["mean"], np.float32), np.asarray(spec["std"], np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))


def split_images_pil(image: Image.Image, spec: dict) -> tuple[list[Image.Image], int, int]:
    """The tiles (row-major) then the global view, as PIL images before normalisation, with rows and cols."""
    resample = RESAMPLE[spec["resample"]]
    tile = spec["tile_size"]
    image = to_rgb(image, spec.get("convert_rgb", True))
    if spec.get("resize_longest_edge"):
        size = longest_edge_size(*image.size, spec["resize_longest_edge"], spec.get("max_resolution", MAX_RESOLUTION))
        image = image.resize(size, resample=resample)
    if not spec.get("split", True):  # one view, squashed to a tile whatever its aspect ratio
        return [image.resize((tile, tile), resample=resample)], 0, 0
    image = image.resize(tile_multiple_size(*image.size, tile), resample=resample)
    if image.width <= tile and image.height <= tile:  # already one tile: no tiles, only the "global" image
        return [image], 0, 0
    rows, cols = image.height // tile, image.width // tile
    tiles = [image.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)]
    # The global view is resized from the multiple-of-tile image, not from the original.
    return tiles + [image.resize((tile, tile), resample=resample)], rows, cols


def split_image(image: Image.Image, spec: dict) -> tuple[np.ndarray, int, int]:
    """One image as the processor's `pixel_values[0]`: [rows*cols + 1, 3, T, T] float32 (or [1, ...] when
    rows = cols = 0), tiles row-major then the global view; plus rows and cols for `expand_image_tokens`."""
    views, rows, cols = split_images_pil(image, spec)
    return np.stack([_normalise(view, spec) for view in views]), rows, cols


def prompt_layout(processor) -> dict:
    """The token strings an Idefics3/SmolVLM processor expands `<image>` with, as plain data."""
    return {
        "kind": "idefics3_prompt",
        "image_token": processor.image_token,
        "fake_image_token": processor.fake_image_token,
        "global_image_token": processor.global_image_tag,
        "tile_token_pattern": TILE_TOKEN_PATTERN,
        "tokens_per_tile": int(processor.image_seq_len),
    }


def expand_image_tokens(rows: int, cols: int, tokens_per_tile: int, layout: dict) -> str:
    """The text the processor puts in place of one `<image>` for an image split into rows x cols.

    Each tile is `<fake><row_r_col_c>` + `<image>` * n; each row of tiles ends with a newline; the
    global view follows after one more newline as `<fake><global-img>` + `<image>` * n + `<fake>`.
    With rows = cols = 0 only the global block is written, without the newlines.
    """
    fake, image = layout["fake_image_token"], layout["image_token"]
    global_block = fake + layout["global_image_token"] + image * tokens_per_tile + fake
    if rows == 0 and cols == 0:
        return global_block
    pattern = layout["tile_token_pattern"]
    lines = ["".join(fake + pattern.format(row=r + 1, col=c + 1) + image * tokens_per_tile for c in range(cols)) + "\n"
             for r in range(rows)]
    return "".join(lines) + "\n" + global_block
