"""Reading images with one-line errors that name the file at fault.

Before anything is decoded: a path that is not a regular file (a FIFO would block the open forever,
a directory or device is no image) is refused, and so is an image whose letterboxed square
(max(width, height)^2 pixels, what preprocessing and llama.cpp allocate) exceeds
MAX_LETTERBOX_PIXELS: a valid 65535x1 PNG letterboxes to 4.3 gigapixels (12 GiB as RGB floats).
PIL's own decompression-bomb check (Image.MAX_IMAGE_PIXELS) stays in force too.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

from PIL import Image

from vlm_factory.errors import UserError

# The most pixels an image may have once letterboxed to a square: a 12 MP 4:3 photo is 16 MP there.
MAX_LETTERBOX_PIXELS = 64_000_000


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "") or type(exc).__name__


def _check_size(image: Image.Image, name: str) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise UserError(f"{name}: image is {width}x{height} pixels, an empty image; regenerate or remove it")
    square = max(width, height) ** 2
    if square > MAX_LETTERBOX_PIXELS:
        raise UserError(f"{name}: image is {width}x{height} pixels, {square / 1e6:.0f} megapixels once letterboxed "
                        f"to a square, over the limit of {MAX_LETTERBOX_PIXELS / 1e6:.0f} "
                        "(vlm_factory.data.images.MAX_LETTERBOX_PIXELS); resize or remove it")


def _decode(source, name: str) -> Image.Image:
    """Open, size-check, fully decode and convert to RGB; `source` is a path or a binary file object."""
    with Image.open(source) as image:
        _check_size(image, name)  # from the header, before the pixels are decoded
        image.load()
        return image.convert("RGB")


def load_image(path: Path) -> Image.Image:
    """Open an image file as RGB, decoded now so that a truncated file fails here and not later."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found; regenerate or remove it") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the image file ({_first_line(exc)})") from None
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a regular file")
        raise UserError(f"{path}: is {kind}, not an image file; give a regular image file")
    try:
        return _decode(path, str(path))
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found; regenerate or remove it") from None
    except MemoryError:
        raise UserError(f"{path}: not a readable image (out of memory decoding it); regenerate or remove it") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure on a user file is that file's fault
        raise UserError(f"{path}: not a readable image ({_first_line(exc)}); regenerate or remove it") from None


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode encoded image bytes (PNG, JPEG, ...) as RGB; `name` says where they came from in errors."""
    try:
        return _decode(io.BytesIO(data), name)
    except UserError:
        raise
    except MemoryError:
        raise UserError(f"{name}: not a readable image (out of memory decoding it); fix or drop it in the source "
                        "data") from None
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{name}: not a readable image ({_first_line(exc)}); fix or drop it in the source data") from None
