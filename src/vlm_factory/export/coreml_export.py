"""One tier's Core ML package: a vision .mlpackage and a stateful text-decoder .mlpackage, palettized.

Settings (`targets.coreml.<tier>`): `nbits` 4 | 6 | 8, `granularity` per_tensor | per_grouped_channel,
`group_size` (a positive integer, used by per_grouped_channel); optionally `vision`, `projector`, `llm`
(4 | 6 | 8 | fp16, default `nbits`) per component, fp16 leaving that component unpalettized.

- `vision.mlpackage`: `pixel_values` float32 TensorType [1, 3, H, W], already preprocessed as the
  family's spec in coreml_config.json says (an ImageType takes one scalar scale, so per-channel std
  cannot be folded in) -> `image_features` [1, tokens, hidden] (`family.image_features`: the tower at
  its feature layer + the connector). One view per call: a family that cuts images into tiles (a tiling
  spec) runs it on each tile and the global view, and `image_tokens` counts the tokens of one view.
- `text.mlpackage`: the family's LLM as a static-cache decoder (export/static_cache.py) with its KV cache
  as iOS18 `ct.StateType` states (`k_cache`, `v_cache`, float16, [layers, 1, kv_heads, max_context,
  head_dim]). Inputs: `inputs_embeds` [1, S, hidden], `position_ids` [1, S] int32, `causal_mask`
  [1, 1, S, past+S] additive float (0 / -inf); the cache window written is [past, past+S) with past =
  mask width - S. Output `logits` [1, S, vocab]. max_context = min(the tier's context_tokens, the
  model's max positions), refused if one image (every view of the largest grid of tiles), the prompt and
  an answer do not fit (export/context.py).
- The token-embedding table stays outside the packages, unpalettized, as `embed_tokens.npy`
  (float32 [vocab, hidden]): the app looks rows up itself and writes image features into the image-token
  positions before calling the decoder. With tied embeddings the text package still holds the (palettized)
  output projection: `output_projection` in coreml_config.json names it.
- `coreml_config.json`: the weight maps back to the model's parameter names, the prompt
  (`family.prompt(processor)`) and the preprocessing spec (`family.preprocessing(processor)`).

Both packages are converted with jit.trace + `ct.convert(minimum_deployment_target=iOS18)` and
palettized with `coremltools.optimize.coreml` (k-means LUT, nbits, per_grouped_channel); see
export/coreml_convert.py. `runtime/coreml_runtime.py` reads the weights back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from vlm_factory.artifacts import EXPORT_REPORT
from vlm_factory.errors import UserError
from vlm_factory.export.tool_versions import package_versions
from vlm_factory.export.coreml_convert import (convert, describe, package_entry, palettize, parameter_names,
                                               resolve_weights, used_parameters, weight_map)
from vlm_factory.export.context import static_context
from vlm_factory.export.static_cache import ImageFeatures, StatefulDecoder
from vlm_factory.families import COMPONENTS
from vlm_factory.io import atomic_dir, write_json
from vlm_factory.logs import native_stderr_filtered

log = logging.getLogger(__name__)

NBITS = (4, 6, 8)
GRANULARITIES = ("per_tensor", "per_grouped_channel")
SETTINGS = ("nbits", "granularity", "group_size", *COMPONENTS)
UNPALETTIZED = "fp16"
DEFAULTS = {"granularity": "per_grouped_channel", "group_size": 16}
COREML_CONFIG = "coreml_config.json"
EMBED_FILE = "embed_tokens.npy"
VISION_PACKAGE, TEXT_PACKAGE = "vision.mlpackage", "text.mlpackage"
CHECK_BATCH = 32  # views per torch call in the export's check (tiles of many images at once would not fit)


def _nbits(value, key: str, *, unpalettized_ok: bool):
    """4 | 6 | 8, or "fp16" (left unpalettized: the program's own float16) where a component may say so."""
    if unpalettized_ok and isinstance(value, str) and value.lower() == UNPALETTIZED:
        return UNPALETTIZED
    if isinstance(value, bool) or value not in NBITS:
        allowed = [*map(str, NBITS), *([UNPALETTIZED] if unpalettized_ok else [])]
        raise UserError(f"key '{key}' must be one of {', '.join(allowed)}; got {value!r}")
    return int(value)


def coreml_settings(settings, tier: str) -> dict:
    """The tier's Core ML settings validated, with defaults; a one-line UserError naming the key otherwise.

    `vision`, `projector`, `llm` (each 4 | 6 | 8 | fp16, default `nbits`) set one component's palettization:
    fp16 leaves its weights as the converter wrote them (attribution and the precision search use this)."""
    key = f"targets.coreml.{tier}"
    if not isinstance(settings, Mapping):
        raise UserError(f"key '{key}' must be a mapping with nbits, granularity and group_size; got {settings!r}")
    for name in settings:
        if name not in SETTINGS:
            raise UserError(f"key '{key}.{name}' is not a Core ML setting (known: {', '.join(SETTINGS)})")
    if "nbits" not in settings:
        raise UserError(f"key '{key}.nbits' is missing: set one of {', '.join(map(str, NBITS))}")
    nbits = _nbits(settings["nbits"], f"{key}.nbits", unpalettized_ok=False)
    granularity = settings.get("granularity", DEFAULTS["granularity"])
    if granularity not in GRANULARITIES:
        raise UserError(f"key '{key}.granularity' must be one of {', '.join(GRANULARITIES)}; got {granularity!r}")
    group_size = settings.get("group_size", DEFAULTS["group_size"])
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise UserError(f"key '{key}.group_size' must be a positive integer; got {group_size!r}")
    components = {c: _nbits(settings.get(c, nbits), f"{key}.{c}", unpalettized_ok=True) for c in COMPONENTS}
    return {"nbits": nbits, "granularity": granularity, "group_size": group_size, **components}


def _tiling_text(spec: dict) -> list[str]:
    """The resize and cut steps of a tiling spec (runtime/tiling.py), in words."""
    steps, tile, resample = [], spec["tile_size"], spec["resample"]
    if spec.get("resize_longest_edge"):
        steps.append(f"{resample} resize to longest edge {spec['resize_longest_edge']} (at most "
                     f"{spec['max_resolution']})")
    if spec.get("split"):
        steps.append(f"{resample} resize up to whole {tile}x{tile} tiles; views: the tiles row by row, then the whole "
                     f"image {resample}-resized to {tile}x{tile} (one view if it fits one tile)")
    else:
        steps.append(f"{resample} resize to {tile}x{tile} (one view)")
    return steps


def preprocessing_text(spec: dict) -> str:
    """The preprocessing spec in one line, for the package's metadata (apps read the spec itself)."""
    steps = ["RGB"] if spec.get("convert_rgb", True) else []
    if spec.get("kind") == "idefics3_tiling":
        steps += _tiling_text(spec)
    if spec.get("pad_to_square"):
        steps.append(f"pad to square with RGB {tuple(spec['pad_color'])}")
    if spec.get("resize"):
        size = spec["resize"]
        target = (f"shortest edge {size['shortest_edge']}" if "shortest_edge" in size
                  else f"{size['width']}x{size['height']}")
        steps.append(f"{spec['resample']} resize to {target}")
    if spec.get("center_crop"):
        steps.append(f"centre crop {spec['center_crop']['width']}x{spec['center_crop']['height']}")
    steps.append(f"x*{spec['rescale_factor']:.6g}")
    steps.append(f"(x - mean) / std per channel with mean={spec['mean']} std={spec['std']}")
    return "; ".join(steps + ["NCHW float32" + (", one view per call" if spec.get("kind") else "")])


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _bits_per_weight(family, weights: dict[str, str], settings: dict) -> dict[str, int | None]:
    """{MIL const name: nbits, or None to leave it unpalettized} from its parameter's component."""
    bits = {}
    for mil_name, torch_name in weights.items():
        component = family.component_of(torch_name)
        if component is None:
            raise RuntimeError(f"{torch_name}: the model family places this weight in no component")
        bits[mil_name] = None if settings[component] == UNPALETTIZED else settings[component]
    return bits


def _convert_vision(ct, family, model, settings: dict, metadata: dict, spec_text: str):
    """(palettized vision model, its weight map, image tokens, unused names, constant parameters)."""
    vision = family.vision
    pixels = torch.zeros(1, vision.num_channels, vision.image_size, vision.image_size)
    wrapper = ImageFeatures(family, model).eval()
    weights = weight_map(wrapper, model, used_parameters(wrapper, pixels))
    with torch.no_grad():
        tokens, hidden = wrapper(pixels).shape[1:]
    mlmodel = convert(wrapper, (pixels,), [ct.TensorType(name="pixel_values", shape=tuple(pixels.shape),
                                                         dtype=np.float32)],
                      [ct.TensorType(name="image_features", dtype=np.float32)])
    unused: list[str] = []
    constants: dict[str, float] = {}
    weights = resolve_weights(mlmodel, wrapper, weights, unused, constants)
    mlmodel = palettize(mlmodel, weights, settings, _bits_per_weight(family, weights, settings))
    describe(mlmodel, f"{family.variant}: vision tower + connector, {tokens} image features for the LLM",
             {"pixel_values": f"[1,{vision.num_channels},{vision.image_size},{vision.image_size}] float32, "
                              f"preprocessed: {spec_text}"},
             {"image_features": f"[1,{tokens},{hidden}] image features, one per image token of the prompt"},
             {**metadata, "vlm_factory.preprocessing": spec_text})
    return mlmodel, weights, int(tokens), unused, constants


def _convert_text(ct, family, model, settings: dict, metadata: dict, max_context: int):
    """(palettized stateful decoder, its weight map, unused names, constant parameters)."""
    facts = family.text
    decoder = StatefulDecoder(family.decoder_parts(model), max_context).eval()
    weights = weight_map(decoder, model)
    seq, width = ct.RangeDim(1, max_context, default=1), ct.RangeDim(1, max_context, default=1)
    example = (torch.zeros(1, 2, facts.hidden_size), torch.arange(2, dtype=torch.int32)[None], torch.zeros(1, 1, 2, 2))
    state = ct.TensorType(shape=tuple(decoder.k_cache.shape), dtype=np.float16)
    mlmodel = convert(
        decoder, example,
        [ct.TensorType(name="inputs_embeds", shape=(1, seq, facts.hidden_size), dtype=np.float32),
         ct.TensorType(name="position_ids", shape=(1, seq), dtype=np.int32),
         ct.TensorType(name="causal_mask", shape=(1, 1, seq, width), dtype=np.float32)],
        [ct.TensorType(name="logits", dtype=np.float32)],
        [ct.StateType(wrapped_type=state, name="k_cache"), ct.StateType(wrapped_type=state, name="v_cache")])
    unused: list[str] = []
    constants: dict[str, float] = {}
    weights = resolve_weights(mlmodel, decoder, weights, unused, constants)
    mlmodel = palettize(mlmodel, weights, settings, _bits_per_weight(family, weights, settings))
    describe(mlmodel, f"{facts.num_layers}-layer {facts.arch} decoder with a stateful KV cache "
                      f"(max {max_context} tokens); token embeddings are looked up outside ({EMBED_FILE})",
             {"inputs_embeds": f"[1,S,{facts.hidden_size}] token embeddings (rows of {EMBED_FILE}) with image "
                               "features at the image-token positions",
              "position_ids": "[1,S] int32 absolute positions past..past+S-1",
              "causal_mask": "[1,1,S,past+S] additive float mask (0 attend, -inf not); its width sets the cache "
                             "window written"},
             {"logits": f"[1,S,{facts.vocab_size}] next-token logits"},
             {**metadata, "vlm_factory.max_context": max_context, "vlm_factory.kv_cache": "k_cache, v_cache states"})
    return mlmodel, weights, unused, constants


def export_coreml(model_dir: Path, out_dir: Path, tier: str, settings: dict, data_dir: Path | None = None,
                  check_images: int = 8, *, context_tokens: int) -> dict:
    """Write `out_dir` (atomically): vision.mlpackage, text.mlpackage, embed_tokens.npy, coreml_config.json,
    config.json + processor/tokenizer files and export_report.json; return the report.
    `context_tokens` is the tier's context (`tiers.<tier>.context_tokens`); it sizes the KV cache."""
    settings = coreml_settings(settings, tier)
    try:
        with native_stderr_filtered():  # coremltools imports TensorFlow: its native libraries' loading chatter
            import coremltools as ct
    except ImportError:
        raise UserError("coremltools is not installed; install it (pip install coremltools) for Core ML exports") from None
    from vlm_factory.model.checkpoint import load_model

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    started = time.perf_counter()
    family, model, processor = load_model(model_dir)
    max_context = static_context(family, processor, context_tokens, tier)
    spec, prompt = family.preprocessing(processor), family.prompt(processor)
    spec_text = preprocessing_text(spec)
    metadata = {"vlm_factory.tier": tier, "vlm_factory.family": family.name, "vlm_factory.variant": family.variant,
                "vlm_factory.nbits": settings["nbits"], "vlm_factory.granularity": settings["granularity"],
                "vlm_factory.group_size": settings["group_size"],
                **{f"vlm_factory.{c}": settings[c] for c in COMPONENTS},
                **{f"tools.{k}": v for k, v in package_versions("coremltools", "torch", "transformers").items()}}

    vision_ml, vision_weights, tokens, unused_vision, constants = _convert_vision(ct, family, model, settings,
                                                                                 metadata, spec_text)
    if tokens != family.image_tokens:
        raise RuntimeError(f"the vision graph makes {tokens} image features, the family expects {family.image_tokens}")
    text_ml, text_weights, unused_text, text_constants = _convert_text(ct, family, model, settings, metadata,
                                                                       max_context)
    constants.update(text_constants)

    names = parameter_names(model)
    embed_name = names[id(family.input_embeddings(model).weight)]
    # Tied embeddings: the decoder's output projection IS the embedding parameter. The app looks rows up in
    # the float table and computes logits with the package's palettized copy, so the runtime unties them.
    tied = {mil: name for mil, name in text_weights.items() if name == embed_name}
    mapped = set(vision_weights.values()) | set(text_weights.values()) | set(constants) | {embed_name}
    unused = sorted(set(unused_vision + unused_text) | (set(names.values()) - mapped))
    embed = family.input_embeddings(model).weight.detach().numpy().astype(np.float32)
    vision = family.vision
    with atomic_dir(out_dir) as staging:
        vision_ml.save(str(staging / VISION_PACKAGE))
        text_ml.save(str(staging / TEXT_PACKAGE))
        np.save(staging / EMBED_FILE, embed)
        processor.save_pretrained(staging)
        model.config.save_pretrained(staging)
        config = {
            "format": "coreml", "family": family.name, "variant": family.variant, "max_context": max_context,
            "image_size": vision.image_size, "image_tokens": tokens, "image_token_id": family.image_token_id,
            "eos_token_id": processor.tokenizer.eos_token_id,
            "vision": {"package": VISION_PACKAGE, "image_size": [vision.image_size, vision.image_size],
                       "num_channels": vision.num_channels, "preprocessing": spec},
            "preprocessing_text": spec_text,
            "prompt": prompt.as_dict(),
            "packages": {"vision": {"file": VISION_PACKAGE, "weights": vision_weights},
                         "text": {"file": TEXT_PACKAGE,
                                  "weights": {k: v for k, v in text_weights.items() if k not in tied}}},
            "output_projection": ({"package": "text", "weight": next(iter(tied)), "tied_to": embed_name}
                                  if tied else None),
            "constant_parameters": constants,
            "unused_parameters": unused,
            "embedding": {"file": EMBED_FILE, "parameter": embed_name, "dtype": "float32", "palettized": False},
        }
        write_json(config, staging / COREML_CONFIG)
        files = {"vision": package_entry(staging / VISION_PACKAGE, vision_weights,
                                         {c: settings[c] for c in ("vision", "projector")}),
                 "text": package_entry(staging / TEXT_PACKAGE, text_weights, {"llm": settings["llm"]}),
                 "embedding": {"file": EMBED_FILE, "file_bytes": (staging / EMBED_FILE).stat().st_size,
                               "palettized": False}}
        checks = _checks(family, model, staging, data_dir, check_images)
        report = {"format": "coreml", "tier": tier, "family": family.name, "variant": family.variant,
                  "settings": settings, "components": {c: settings[c] for c in COMPONENTS}, "files": files,
                  "total_bytes": sum(f["file_bytes"] for f in files.values()),
                  "unused_parameters": unused, "constant_parameters": sorted(constants),
                  "decoder": {"stateful": True, "kv_cache": "ct.StateType float16", "max_context": max_context,
                              "tied_embeddings": bool(tied)},
                  "preprocessing": spec_text, "minimum_deployment_target": "iOS18",
                  "compute_precision": "float16", "checks": checks, "tools": package_versions("coremltools", "torch", "transformers")}
        write_json(report, staging / EXPORT_REPORT)
    log.info("coreml %d-bit for %s: %.1f MiB, vision cosine vs torch >= %.4f, in %.1fs", settings["nbits"], tier,
             report["total_bytes"] / 2**20, checks["vision_cosine_vs_torch"]["min"], time.perf_counter() - started)
    return report


def _checks(family, model, artifact_dir: Path, data_dir: Path | None, count: int) -> dict:
    """The artifact's weights (read back from the packages) vs torch: vision cosines on a few images."""
    from PIL import Image

    from vlm_factory.runtime.coreml_runtime import CoreMLRuntime

    images = []
    if data_dir is not None and (Path(data_dir) / "train.jsonl").is_file():
        from vlm_factory.data.images import load_image
        from vlm_factory.data.records import read_jsonl

        records = read_jsonl(Path(data_dir) / "train.jsonl")
        picks = np.unique(np.linspace(0, len(records) - 1, num=min(count, len(records))).round().astype(int))
        images = [load_image(Path(data_dir) / records[i].image) for i in picks]
    if not images:
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(count)]

    with CoreMLRuntime(artifact_dir) as runtime, torch.no_grad():
        views = [runtime.pixel_values(image) for image in images]
        pixels = torch.cat(views)
        batches = [pixels[start:start + CHECK_BATCH] for start in range(0, len(pixels), CHECK_BATCH)]
        got = np.concatenate([family.image_features(runtime.model, batch).numpy() for batch in batches])
        want = np.concatenate([family.image_features(model, batch).numpy() for batch in batches])
        errors = runtime.weight_errors(model)
    # Per image, all its views' features flattened (as the parity gate compares them).
    ends = np.cumsum([len(v) for v in views])
    cosines = np.concatenate([_cosines(want[start:end].reshape(1, -1), got[start:end].reshape(1, -1))
                              for start, end in zip([0, *ends[:-1]], ends)])
    return {"vision_cosine_vs_torch": {"images": len(images), "min": round(float(cosines.min()), 6),
                                       "mean": round(float(cosines.mean()), 6)},
            "weight_max_abs_diff": {k: round(v, 6) for k, v in errors.items()}}


def report_summary(report: dict) -> dict:
    """The small, committed part of the export report."""
    return {"format": report["format"], "tier": report["tier"], "settings": report["settings"],
            "total_bytes": report["total_bytes"], "decoder": report["decoder"],
            "checks": {"vision_cosine_vs_torch": report["checks"]["vision_cosine_vs_torch"]},
            "files": {role: {k: v for k, v in f.items() if k != "float_weights"} for role, f in report["files"].items()},
            "tools": report["tools"]}
