"""Image preprocessing from a plain-data spec, as a device app implements it (PIL + numpy, no transformers).

The spec is what the model family writes into every exported config (`family.preprocessing`):
convert to RGB, letterbox to square with `pad_color`, resize (`shortest_edge` or a fixed size),
centre crop, rescale, normalise, NCHW float32. The parity stage compares its output with the
reference processor's pixels on square, tall and wide images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vlm_factory.errors import UserError

RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC}


def _resize_target(width: int, height: int, resize: dict) -> tuple[int, int]:
    """(width, height) after resizing, as transformers computes it for `shortest_edge` or a fixed size."""
    if "shortest_edge" in resize:
        short, long = sorted((width, height))
        new_short, new_long = resize["shortest_edge"], int(resize["shortest_edge"] * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)
    return resize["width"], resize["height"]


def _center_crop(pixels: np.ndarray, crop: dict) -> np.ndarray:
    """HWC crop around the centre; the exporter only writes crops no larger than the resized image."""
    height, width = pixels.shape[:2]
    top, left = (height - crop["height"]) // 2, (width - crop["width"]) // 2
    if top < 0 or left < 0:
        raise UserError(f"centre crop {crop} is larger than the resized image ({width}x{height})")
    return pixels[top:top + crop["height"], left:left + crop["width"]]


def preprocess(image: Image.Image, spec: dict) -> np.ndarray:
    """One image as [3, H, W] float32: letterbox to square with `pad_color`, resize, crop, rescale, normalise."""
    if spec.get("convert_rgb", True):
        image = image.convert("RGB")
    if spec.get("pad_to_square") and image.width != image.height:
        side = max(image.size)
        canvas = Image.new("RGB", (side, side), tuple(spec["pad_color"]))
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas
    if spec.get("resize"):
        image = image.resize(_resize_target(image.width, image.height, spec["resize"]),
                             resample=RESAMPLE[spec["resample"]])
    pixels = np.asarray(image)
    if spec.get("center_crop"):
        pixels = _center_crop(pixels, spec["center_crop"])
    pixels = pixels.astype(np.float64) * spec["rescale_factor"]
    pixels = (pixels - np.asarray(spec["mean"])) / np.asarray(spec["std"])
    return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)


def config_pixel_values(config: dict, image: Image.Image, config_path: Path) -> np.ndarray:
    """[1, 3, H, W] float32, preprocessed as an export's config (`model.vision.preprocessing`) describes."""
    vision = config["model"]["vision"]
    pixels = preprocess(image, vision["preprocessing"])[None]
    if list(pixels.shape[2:]) != list(vision["image_size"]):
        raise UserError(f"{config_path}: preprocessing makes {pixels.shape[2:]} images, "
                        f"the vision model takes {vision['image_size']}")
    return pixels
