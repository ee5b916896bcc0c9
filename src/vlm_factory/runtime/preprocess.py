"""Image preprocessing from a plain-data spec, as a device app implements it (PIL + numpy, no transformers).

The spec is what the model family writes into every exported config (`family.preprocessing`):
convert to RGB, letterbox to square with `pad_color`, resize (`shortest_edge` or a fixed size),
centre crop, rescale, normalise, NCHW float32. It is validated first (runtime/artifact_schema.py
`Preprocessing`: known resample names, finite mean and non-zero std, colours 0..255, a fixed output
size), so a malformed spec is a one-line error rather than a traceback inside PIL or numpy. The
parity stage compares the output with the reference processor's pixels on square, tall and wide images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vlm_factory.errors import UserError
from vlm_factory.runtime.artifact_schema import Preprocessing, Tiling, VisionSection, parse_config

RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC}


def preprocessing_spec(spec: dict | Preprocessing | Tiling,
                       source: Path | str = "preprocessing spec") -> Preprocessing | Tiling:
    """The spec validated (a parsed one passes through), or a one-line UserError naming `source` and the key.
    A spec with a `kind` is a tiling spec (runtime/tiling.py), otherwise a resize spec."""
    if isinstance(spec, (Preprocessing, Tiling)):
        return spec
    return parse_config(Tiling if isinstance(spec, dict) and "kind" in spec else Preprocessing, spec, source)


def _resize_target(width: int, height: int, spec: Preprocessing) -> tuple[int, int]:
    """(width, height) after resizing, as transformers computes it for `shortest_edge` or a fixed size."""
    resize = spec.resize
    if resize.shortest_edge is not None:
        short, long = sorted((width, height))
        new_short, new_long = resize.shortest_edge, int(resize.shortest_edge * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)
    return resize.width, resize.height


def _center_crop(pixels: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """HWC crop around the centre; the spec's crop is never larger than its resize (artifact_schema)."""
    crop = spec.center_crop
    height, width = pixels.shape[:2]
    top, left = (height - crop.height) // 2, (width - crop.width) // 2
    if top < 0 or left < 0:
        raise UserError(f"centre crop {crop.height}x{crop.width} is larger than the resized image ({width}x{height})")
    return pixels[top:top + crop.height, left:left + crop.width]


def to_rgb(image: Image.Image, convert: bool = True) -> Image.Image:
    """RGB as transformers' processors make it: transparency (an alpha band or a palette's) composited onto
    white, not dropped (PIL's plain convert("RGB") keeps the colour under a transparent pixel)."""
    if not convert:
        if image.mode != "RGB":
            raise UserError(f"a {image.mode} image, and the preprocessing spec says not to convert it to RGB")
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(image: Image.Image, spec: dict | Preprocessing) -> np.ndarray:
    """One image as [3, H, W] float32: letterbox to square with `pad_color`, resize, crop, rescale, normalise."""
    spec = preprocessing_spec(spec)
    if isinstance(spec, Tiling):
        raise UserError("the preprocessing spec cuts images into tiles: use image_views, not preprocess")
    image = to_rgb(image, spec.convert_rgb)
    if spec.pad_to_square and image.width != image.height:
        side = max(image.size)
        canvas = Image.new("RGB", (side, side), tuple(spec.pad_color))
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas
    image = image.resize(_resize_target(image.width, image.height, spec), resample=RESAMPLE[spec.resample])
    pixels = np.asarray(image)
    if spec.center_crop is not None:
        pixels = _center_crop(pixels, spec)
    pixels = pixels.astype(np.float64) * spec.rescale_factor
    pixels = (pixels - np.asarray(spec.mean)) / np.asarray(spec.std)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)


def image_views(image: Image.Image, spec: dict | Preprocessing | Tiling) -> tuple[np.ndarray, int, int]:
    """One image as its vision model takes it: [views, 3, H, W] float32 and the grid of tiles (rows, cols).

    A resize spec makes one view (grid 0, 0); a tiling spec the tiles row by row, then the global view."""
    spec = preprocessing_spec(spec)
    if isinstance(spec, Tiling):
        from vlm_factory.runtime.tiling import split_image

        return split_image(image, spec.model_dump())
    return preprocess(image, spec)[None], 0, 0


def config_image_views(vision: VisionSection, image: Image.Image, config_path: Path) -> tuple[np.ndarray, int, int]:
    """`image_views` as an export's validated vision section describes them."""
    pixels, rows, cols = image_views(image, vision.preprocessing)
    if list(pixels.shape[2:]) != list(vision.image_size):  # the schema makes this impossible; kept as a guard
        raise UserError(f"{config_path}: preprocessing makes {pixels.shape[2:]} images, "
                        f"the vision model takes {vision.image_size}")
    return pixels, rows, cols


def config_pixel_values(vision: VisionSection, image: Image.Image, config_path: Path) -> np.ndarray:
    """[1, 3, H, W] float32 of a one-view preprocessing (a tiling spec: use config_image_views)."""
    pixels, _, _ = config_image_views(vision, image, config_path)
    if pixels.shape[0] != 1:
        raise UserError(f"{config_path}: the preprocessing cuts images into {pixels.shape[0]} views; "
                        "this runtime takes one")
    return pixels
