"""Reading images with one-line errors that name the file at fault."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vlm_factory.errors import UserError


def load_image(path: Path) -> Image.Image:
    """Open an image file as RGB, decoded now so that a truncated file fails here and not later."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found; regenerate or remove it") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise UserError(f"{path}: not a readable image ({exc}); regenerate or remove it") from None


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode encoded image bytes (PNG, JPEG, ...) as RGB; `name` says where they came from in errors."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise UserError(f"{name}: not a readable image ({exc}); fix or drop it in the source data") from None
