"""Answer a question about an image with this ONNX package, using onnxruntime, numpy, tokenizers and Pillow only.

    pip install onnxruntime numpy tokenizers pillow
    python answer.py IMAGE "QUESTION" [--package DIR]

DIR is the package directory (onnx_config.json, the three graphs, tokenizer.json); by default the one
this file is in. The steps follow the package contract that onnx_config.json describes (format
"vlm-factory-onnx", schema_version 1): preprocess the image, build the prompt, run vision -> embedding ->
splice the image features in at the image-token positions -> greedy decoding with the KV cache.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image
from tokenizers import Tokenizer

FORMAT, SCHEMA_VERSION = "vlm-factory-onnx", 1
RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
            "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}


def read_config(package: Path) -> dict:
    path = package / "onnx_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    found = (config.get("format"), config.get("schema_version"))
    if found != (FORMAT, SCHEMA_VERSION):
        sys.exit(f"{path}: format {found[0]!r} version {found[1]!r}, but this answer.py reads {FORMAT!r} "
                 f"version {SCHEMA_VERSION} only; run the answer.py that package carries")
    return config


# -- the image: model.vision.preprocessing -----------------------------------------------------------

def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited onto white, as the model's processor does (not dropped)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def resized_view(image: Image.Image, spec: dict) -> np.ndarray:
    """A resize spec: letterbox to square, resize, centre crop, rescale and normalise (float64, then float32)."""
    if spec["pad_to_square"] and image.width != image.height:
        side = max(image.size)
        canvas = Image.new("RGB", (side, side), tuple(spec["pad_color"]))
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas
    resize = spec["resize"]
    if "shortest_edge" in resize:  # the short side to shortest_edge, the long one scaled and truncated
        edge, (short, long) = resize["shortest_edge"], sorted(image.size)
        size = (edge, int(edge * long / short)) if image.width <= image.height else (int(edge * long / short), edge)
    else:
        size = (resize["width"], resize["height"])
    pixels = np.asarray(image.resize(size, resample=RESAMPLE[spec["resample"]]))
    if spec["center_crop"]:
        crop = spec["center_crop"]
        top, left = (pixels.shape[0] - crop["height"]) // 2, (pixels.shape[1] - crop["width"]) // 2
        pixels = pixels[top:top + crop["height"], left:left + crop["width"]]
    pixels = (pixels.astype(np.float64) * spec["rescale_factor"] - spec["mean"]) / spec["std"]
    return pixels.transpose(2, 0, 1).astype(np.float32)


def longest_edge_size(width: int, height: int, longest: int, cap: int) -> tuple[int, int]:
    """The long side to `longest` (the short one truncated, then made even), then capped at `cap`."""
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2
    else:
        width, height = int(longest * aspect), longest
        width += width % 2
    width, height = max(width, 1), max(height, 1)
    if max(width, height) > cap:
        aspect = width / height
        width, height = (cap, int(cap / aspect)) if width >= height else (int(cap * aspect), cap)
    return max(width, 1), max(height, 1)


def tiles(image: Image.Image, spec: dict) -> tuple[list[Image.Image], int, int]:
    """A tiling spec (Idefics3/SmolVLM): rows x cols tiles, row by row, then a global view; each resize
    works on the previous one's 8-bit result. rows = cols = 0: the global view only."""
    resample, tile = RESAMPLE[spec["resample"]], spec["tile_size"]
    if spec["resize_longest_edge"]:
        size = longest_edge_size(*image.size, spec["resize_longest_edge"], spec["max_resolution"])
        image = image.resize(size, resample=resample)
    if not spec["split"]:
        return [image.resize((tile, tile), resample=resample)], 0, 0
    aspect = image.width / image.height  # up to whole tiles: the long side first, the short one re-derived
    if image.width >= image.height:
        width = math.ceil(image.width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(image.height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    image = image.resize((width, height), resample=resample)
    if width <= tile and height <= tile:
        return [image], 0, 0
    rows, cols = height // tile, width // tile
    views = [image.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)]
    return views + [image.resize((tile, tile), resample=resample)], rows, cols


def image_views(image: Image.Image, spec: dict) -> tuple[np.ndarray, int, int]:
    """[views, 3, H, W] float32 and the grid of tiles (rows, cols); one view and 0, 0 without a tiling spec."""
    if spec["convert_rgb"]:
        image = to_rgb(image)
    if spec.get("kind") != "idefics3_tiling":
        return resized_view(image, spec)[None], 0, 0
    views, rows, cols = tiles(image, spec)
    mean, std = np.asarray(spec["mean"], np.float32), np.asarray(spec["std"], np.float32)
    # The tiling processor's arithmetic: rescale in float64, cast, then normalise in float32.
    pixels = [((np.asarray(v).astype(np.float64) * spec["rescale_factor"]).astype(np.float32) - mean) / std
              for v in views]
    return np.stack([p.transpose(2, 0, 1) for p in pixels]), rows, cols


# -- the graphs --------------------------------------------------------------------------------------

class Package:
    """The ONNX package in `directory`: its config, one onnxruntime session per graph, its tokenizer."""

    def __init__(self, directory: Path):
        self.config = read_config(directory)
        self.model = self.config["model"]
        self.sessions = {role: ort.InferenceSession(str(directory / self.model[role]["filename"]),
                                                    providers=["CPUExecutionProvider"])
                         for role in ("vision", "embedding", "decoder")}
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))

    def run(self, role: str, outputs: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One graph on `feed` ({input role: array}); `outputs` are output roles (names from the config)."""
        section = self.model[role]
        return self.sessions[role].run([section["outputs"][out]["name"] for out in outputs],
                                       {section["inputs"][name]["name"]: value for name, value in feed.items()})

    def prompt_ids(self, question: str, rows: int, cols: int) -> np.ndarray:
        """[1, tokens] int64: the template with the question in and one image token per image feature."""
        prompt = self.config["prompt"]
        image, repeat, layout = prompt["image_token"], prompt["image_token_repeat"], prompt.get("image_layout")
        if layout is None:
            expansion = image * repeat
        else:  # tiles as <fake><row_r_col_c> + image tokens, a newline after each row, then the global view
            fake = layout["fake_image_token"]
            expansion = fake + layout["global_image_token"] + image * repeat + fake
            if rows or cols:
                lines = ["".join(fake + layout["tile_token_pattern"].format(row=r + 1, col=c + 1) + image * repeat
                                 for c in range(cols)) + "\n" for r in range(rows)]
                expansion = "".join(lines) + "\n" + expansion
        text = prompt["template"].replace("{question}", question.strip()).replace(image, expansion, 1)
        ids = self.tokenizer.encode(text, add_special_tokens=prompt["add_special_tokens"]).ids
        return np.asarray([ids], np.int64)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.run("embedding", ["inputs_embeds"], {"input_ids": ids})[0]

    def prompt_embeddings(self, image: Image.Image, question: str) -> np.ndarray:
        """[1, tokens, hidden]: the prompt's embeddings, image features in place of the image tokens'."""
        pixels, rows, cols = image_views(image, self.model["vision"]["preprocessing"])
        ids = self.prompt_ids(question, rows, cols)
        features = self.run("vision", ["image_features"], {"pixel_values": pixels})[0]
        features = features.reshape(-1, features.shape[-1])  # view by view: [views x image tokens, hidden]
        slots = ids[0] == self.model["image_token_id"]
        if slots.sum() != len(features):
            sys.exit(f"the prompt has {slots.sum()} image tokens for {len(features)} image features")
        embeds = self.embed(ids)
        embeds[0, slots] = features
        return embeds

    def cache_names(self, prefix: str) -> list[str]:
        """The KV-cache tensors, "past" (inputs) or "present" (outputs): layer by layer, key before value."""
        decoder = self.model["decoder"]
        side = decoder["inputs"] if prefix == "past" else decoder["outputs"]
        return [side[f"{prefix}_{kind}"]["name"] % layer
                for layer in range(decoder["num_hidden_layers"]) for kind in ("key", "value")]

    def empty_cache(self) -> dict[str, np.ndarray]:
        """The prefill's past: zero tokens, [1, kv heads, 0, head size] for every layer's key and value."""
        decoder = self.model["decoder"]
        empty = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), np.float32)
        return dict.fromkeys(self.cache_names("past"), empty)

    def decoder_step(self, embeds: np.ndarray, past: dict[str, np.ndarray], length: int):
        """One text.onnx call on `embeds` after `length` cached tokens: the last position's logits, and the
        presents (this call's keys and values appended to the past) as the next call's past."""
        decoder, step = self.model["decoder"], embeds.shape[1]
        inputs = decoder["inputs"]
        feed = {inputs["inputs_embeds"]["name"]: embeds, **past,
                inputs["attention_mask"]["name"]: np.ones((1, length + step), np.int64),
                inputs["position_ids"]["name"]: np.arange(length, length + step, dtype=np.int64)[None]}
        logits, *present = self.sessions["decoder"].run(
            [decoder["outputs"]["logits"]["name"], *self.cache_names("present")], feed)
        return logits[0, -1], dict(zip(self.cache_names("past"), present))

    def answer_tokens(self, image: Image.Image, question: str) -> list[int]:
        """Greedy decoding: prefill the prompt, then one token at a time until an EOS id or max_new_tokens."""
        embeds, past, length, tokens = self.prompt_embeddings(image, question), self.empty_cache(), 0, []
        for _ in range(self.config["generation"]["max_new_tokens"]):
            logits, past = self.decoder_step(embeds, past, length)
            length += embeds.shape[1]
            token = int(np.argmax(logits))
            if token in self.model["eos_token_ids"]:
                break
            tokens.append(token)
            embeds = self.embed(np.asarray([[token]], np.int64))
        return tokens

    def answer(self, image: Image.Image, question: str) -> str:
        return self.tokenizer.decode(self.answer_tokens(image, question), skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("question")
    parser.add_argument("--package", type=Path, default=Path(__file__).resolve().parent,
                        help="the ONNX package directory (default: the one this file is in)")
    args = parser.parse_args()
    print(Package(args.package).answer(Image.open(args.image), args.question))


if __name__ == "__main__":
    main()
