"""Synthetic scenes: coloured shapes and digits laid out on a grid of cells.

A scene is a grid of square cells (4x4 for square images, 2 wide x 4 tall for tall ones,
4 wide x 2 tall for wide ones).  Objects sit in distinct cells, so every question has one
unambiguous answer, and in tall/wide scenes half of the cells lie in the outer quarters that a
centre-crop preprocessing throws away.  After letterboxing to the model's input, one cell maps
onto exactly one vision patch, which keeps the tiny base model learnable on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 215, 45),
    "purple": (155, 65, 205),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
DIGITS = tuple("123456789")

# (columns, rows) of the cell grid per aspect class.
GRIDS: dict[str, tuple[int, int]] = {"square": (4, 4), "tall": (2, 4), "wide": (4, 2)}
ASPECTS = tuple(GRIDS)


@dataclass(frozen=True)
class SceneObject:
    """One thing drawn in one cell: a shape with a colour, or a white digit (shape == "digit")."""

    shape: str
    colour: str | None
    row: int
    col: int
    digit: str | None = None


@dataclass
class Scene:
    aspect: str
    objects: list[SceneObject] = field(default_factory=list)

    @property
    def grid(self) -> tuple[int, int]:
        return GRIDS[self.aspect]

    @property
    def shapes(self) -> list[SceneObject]:
        return [o for o in self.objects if o.shape != "digit"]

    @property
    def digit(self) -> SceneObject | None:
        return next((o for o in self.objects if o.shape == "digit"), None)

    def position_of(self, obj: SceneObject) -> str:
        """'top left' ... 'bottom right': which half of the image, vertically then horizontally."""
        cols, rows = self.grid
        vertical = "top" if obj.row < rows // 2 else "bottom"
        horizontal = "left" if obj.col < cols // 2 else "right"
        return f"{vertical} {horizontal}"


def sample_scene(rng: np.random.Generator, aspect: str, with_digit: bool) -> Scene:
    """Draw 1-5 shapes (and optionally one digit) into distinct random cells."""
    cols, rows = GRIDS[aspect]
    n_shapes = int(rng.integers(1, 6))
    cells = rng.permutation(cols * rows)[: n_shapes + int(with_digit)]
    colours = list(COLOURS)
    objects = []
    for cell in cells[:n_shapes]:
        objects.append(
            SceneObject(
                shape=SHAPES[int(rng.integers(len(SHAPES)))],
                colour=colours[int(rng.integers(len(colours)))],
                row=int(cell) // cols,
                col=int(cell) % cols,
            )
        )
    if with_digit:
        cell = int(cells[-1])
        objects.append(
            SceneObject(shape="digit", colour=None, row=cell // cols, col=cell % cols,
                        digit=DIGITS[int(rng.integers(len(DIGITS)))])
        )
    return Scene(aspect=aspect, objects=objects)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow bundles a FreeType font for load_default(size=...), so rendering is the same everywhere.
    return ImageFont.load_default(size=size)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A muted colour with a random linear gradient and pixel noise: never one flat colour."""
    base = rng.uniform(35, 105, size=3) + rng.uniform(-12, 12)
    gx, gy = rng.uniform(-25, 25, size=2)
    ys, xs = np.mgrid[0:height, 0:width]
    gradient = gx * xs[..., None] / width + gy * ys[..., None] / height
    noise = rng.normal(0.0, 7.0, size=(height, width, 3))
    return np.clip(base + gradient + noise, 0, 255).astype(np.uint8)


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-18, 19), 0, 255)) for c in rgb)  # type: ignore[return-value]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float],
                fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":
        arm = (x1 - x0) / 6
        draw.rectangle((cx - arm, y0, cx + arm, y1), fill=fill)
        draw.rectangle((x0, cy - arm, x1, cy + arm), fill=fill)
    else:  # pragma: no cover - guarded by SHAPES
        raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: Scene, rng: np.random.Generator, cell_px: int) -> Image.Image:
    """Render a scene at `cell_px` pixels per cell, with jittered size, offset and colour."""
    cols, rows = scene.grid
    width, height = cols * cell_px, rows * cell_px
    image = Image.fromarray(_background(rng, width, height))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        size = cell_px * rng.uniform(0.62, 0.86)
        slack = cell_px - size
        x0 = obj.col * cell_px + rng.uniform(0.15, 0.85) * slack
        y0 = obj.row * cell_px + rng.uniform(0.15, 0.85) * slack
        if obj.shape == "digit":
            font = _font(int(cell_px * 0.85))
            centre = (obj.col * cell_px + cell_px / 2, obj.row * cell_px + cell_px / 2)
            draw.text(centre, obj.digit, fill=_jitter(rng, (245, 245, 245)), font=font, anchor="mm")
        else:
            _draw_shape(draw, obj.shape, (x0, y0, x0 + size, y0 + size), _jitter(rng, COLOURS[obj.colour]))
    return image
