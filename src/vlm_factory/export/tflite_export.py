"""One tier's TFLite (LiteRT) package: vision graph, a KV-cache decoder and the token-embedding table.

Settings (`targets.tflite.<tier>`): `precision` fp32 | fp16 (fp16 = litert-torch's
`quant_recipes.full_fp16_recipe()`: float16 weights, float32 inputs/outputs).

Files, written atomically with an export report:

    vision.tflite         signature `serving_default`: pixel_values [1, 3, H, W] (NCHW, float32)
                          -> image_features [1, image tokens, text hidden]; one view per call (a family that
                          cuts images into tiles runs it on each tile and the global view, in order)
    decoder.tflite        two signatures over one fixed-size KV cache (litert-torch generative style):
                          `prefill`: inputs_embeds [1, PREFILL_LENGTH, hidden], input_pos [PREFILL_LENGTH] int32,
                                     k_cache / v_cache [layers, kv heads, max context, head dim]
                          `decode`:  the same with 1 position
                          both -> logits [1, positions, vocab], k_cache, v_cache (the cache with these
                          positions written). Cache slot s is attended by a query at position p iff s <= p,
                          so slots never written yet (or written by a padded prefill position) are masked.
                          A prompt longer than PREFILL_LENGTH is prefilled in chunks.
    embedding.npy         the token-embedding table [vocab, hidden] (float16 at fp16, float32 otherwise);
                          a Gather is all a device needs, so no graph for it
    tflite_config.json    file / signature / tensor names, cache shape, token ids, the family's prompt
                          (`family.prompt(processor)`) and image preprocessing spec (`family.preprocessing`)
    processor files       as transformers saves them (tokenizer.json etc.)

Vision is `family.image_features`; the decoder is the family's LLM as export/static_cache.py's
FunctionalDecoder (shared with Core ML), because transformers' DynamicCache does not trace to static
shapes. The cache length is min(the tier's context_tokens, the model's max positions), refused if one
image (every view of the largest grid of tiles), the prompt and an answer do not fit (export/context.py). `self_check` compares the graphs with
PyTorch before anything is accepted.
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
from vlm_factory.export.context import static_context
from vlm_factory.export.static_cache import FunctionalDecoder, ImageFeatures
from vlm_factory.io import atomic_dir, write_json
from vlm_factory.model.prompt import MAX_ANSWER_TOKENS

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
SETTINGS = ("precision",)
VISION_FILE, DECODER_FILE, EMBEDDING_FILE = "vision.tflite", "decoder.tflite", "embedding.npy"
TFLITE_CONFIG = "tflite_config.json"
PREFILL_LENGTH = 64  # static prefill chunk; the bundled base's prompts are ~30 tokens
# fp32 TFLite vs PyTorch on random inputs (the self-check). Measured on the bundled base: ~3e-5 on
# vision features (|features| up to ~60) and ~1e-5 on logits.
SELF_CHECK_ATOL = 1e-3


def tflite_settings(settings, tier: str) -> dict:
    """The tier's TFLite settings validated; a one-line UserError naming the key otherwise."""
    key = f"targets.tflite.{tier}"
    if not isinstance(settings, Mapping):
        raise UserError(f"key '{key}' must be a mapping with precision; got {settings!r}")
    for name in settings:
        if name not in SETTINGS:
            raise UserError(f"key '{key}.{name}' is not a TFLite setting (known: {', '.join(SETTINGS)})")
    if "precision" not in settings:
        raise UserError(f"key '{key}.precision' is missing: set one of {', '.join(PRECISIONS)}")
    precision = settings["precision"]
    if not isinstance(precision, str) or precision.lower() not in PRECISIONS:
        raise UserError(f"key '{key}.precision' must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return {"precision": precision.lower()}


def cache_shape(family, max_context: int) -> tuple[int, int, int, int]:
    facts = family.text
    return (facts.num_layers, facts.num_kv_heads, max_context, facts.head_dim)


def decoder_samples(family, max_context: int, length: int) -> dict:
    shape = cache_shape(family, max_context)
    return {"inputs_embeds": torch.zeros(1, length, family.text.hidden_size),
            "input_pos": torch.arange(length, dtype=torch.int32),
            "k_cache": torch.zeros(shape), "v_cache": torch.zeros(shape)}


def _quant_config(precision: str):
    if precision != "fp16":
        return None
    from litert_torch.generative.quantize import quant_recipes

    return quant_recipes.full_fp16_recipe()


def convert_vision(family, model, path: Path, precision: str) -> float:
    import litert_torch

    vision = family.vision
    started = time.perf_counter()
    edge = litert_torch.convert(ImageFeatures(family, model, "image_features").eval(), sample_kwargs={
        "pixel_values": torch.zeros(1, vision.num_channels, vision.image_size, vision.image_size)},
        quant_config=_quant_config(precision))
    edge.export(str(path))
    return time.perf_counter() - started


def convert_decoder(family, model, path: Path, precision: str, max_context: int) -> float:
    import litert_torch

    module = FunctionalDecoder(family.decoder_parts(model), max_context).eval()
    started = time.perf_counter()
    edge = (litert_torch.signature("prefill", module, sample_kwargs=decoder_samples(family, max_context, PREFILL_LENGTH))
            .signature("decode", module, sample_kwargs=decoder_samples(family, max_context, 1))
            .convert(quant_config=_quant_config(precision)))
    edge.export(str(path))
    return time.perf_counter() - started


def tflite_config(family, processor, precision: str, max_context: int, table_shape) -> dict:
    """The runtime config, written from the family: files, signatures, cache, token ids, prompt, preprocessing."""
    facts, vision, tokenizer = family.text, family.vision, processor.tokenizer
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else facts.eos_token_id
    decoder_io = {"inputs": ["inputs_embeds", "input_pos", "k_cache", "v_cache"],
                  "outputs": ["logits", "k_cache", "v_cache"]}
    return {
        "model": {
            "type": family.name, "variant": family.variant, "vocab_size": int(table_shape[0]),
            "context_length": max_context, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos,
            "pad_token_id": tokenizer.pad_token_id, "image_token_id": family.image_token_id,
            "precision": precision,
            "vision": {"filename": VISION_FILE, "signature": "serving_default",
                       "inputs": {"pixel_values": "pixel_values"}, "outputs": {"image_features": "image_features"},
                       "num_image_tokens": family.image_tokens, "image_size": [vision.image_size, vision.image_size],
                       "num_channels": vision.num_channels, "preprocessing": family.preprocessing(processor)},
            "embedding": {"filename": EMBEDDING_FILE, "format": "npy",
                          "dtype": "float16" if precision == "fp16" else "float32", "shape": list(table_shape)},
            "decoder": {"filename": DECODER_FILE, "hidden_size": facts.hidden_size,
                        "max_context": max_context, "prefill_length": PREFILL_LENGTH,
                        "kv_cache_shape": list(cache_shape(family, max_context)), "kv_cache_dtype": "float32",
                        "signatures": {"prefill": decoder_io, "decode": decoder_io},
                        "input_pos_dtype": "int32",
                        "note": "cache slot s is visible to position p iff s <= p; pad a short prefill chunk "
                                "with positions continuing after the prompt and read logits at the last real one"},
        },
        "prompt": family.prompt(processor).as_dict(),
        "search": {"do_sample": False, "num_beams": 1, "max_new_tokens": MAX_ANSWER_TOKENS, "max_length": max_context},
    }


def _open(path: Path):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path))


@torch.no_grad()
def self_check(family, model, out_dir: Path, max_context: int) -> dict:
    """TFLite vs PyTorch on random inputs: vision features, and prefill + one decode step of logits
    against the family's own decoder stack (transformers' attention, not the static-cache rewrite)."""
    generator = torch.Generator().manual_seed(0)
    vision, facts = family.vision, family.text
    pixels = torch.randn(1, vision.num_channels, vision.image_size, vision.image_size, generator=generator)
    expected = family.image_features(model, pixels).numpy()
    got = _open(out_dir / VISION_FILE).get_signature_runner("serving_default")(pixel_values=pixels.numpy())
    got = got["image_features"]
    a, b = got.ravel().astype(np.float64), expected.ravel().astype(np.float64)
    result = {"vision_max_abs_diff": float(np.abs(got - expected).max()),
              "vision_cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))}

    length = 10
    parts = family.decoder_parts(model)
    embeds = torch.randn(1, length + 1, facts.hidden_size, generator=generator)
    reference = parts.lm_head(parts.core(inputs_embeds=embeds).last_hidden_state)[0].numpy()
    interpreter = _open(out_dir / DECODER_FILE)
    prefill, decode = interpreter.get_signature_runner("prefill"), interpreter.get_signature_runner("decode")
    padded = np.zeros((1, PREFILL_LENGTH, embeds.shape[2]), dtype=np.float32)
    padded[0, :length] = embeds[0, :length].numpy()
    empty = np.zeros(cache_shape(family, max_context), dtype=np.float32)
    out = prefill(inputs_embeds=padded, input_pos=np.arange(PREFILL_LENGTH, dtype=np.int32),
                  k_cache=empty, v_cache=empty)
    step = decode(inputs_embeds=embeds[:, length:].numpy(), input_pos=np.asarray([length], dtype=np.int32),
                  k_cache=out["k_cache"], v_cache=out["v_cache"])
    logits = np.concatenate([out["logits"][0, :length], step["logits"][0]])
    result["logits_max_abs_diff"] = float(np.abs(logits - reference).max())
    return result


def _file_entry(path: Path, precision: str, **extra) -> dict:
    return {"file": path.name, "file_bytes": path.stat().st_size, "precision": precision, **extra}


def export_tflite(model_dir: Path | str, out_dir: Path | str, tier: str, settings, data_dir=None, *,
                  context_tokens: int) -> dict:
    """Write `out_dir` (atomically): vision.tflite, decoder.tflite (prefill/decode over a KV cache),
    embedding.npy, tflite_config.json, processor files and export_report.json; return the report.
    `context_tokens` is the tier's context (`tiers.<tier>.context_tokens`); it sizes the KV cache.
    `data_dir` is accepted for interface parity with the other exporters and not used."""
    settings = tflite_settings(settings, tier)
    try:
        import ai_edge_litert  # noqa: F401
        import litert_torch  # noqa: F401
    except ImportError as exc:
        raise UserError(f"TFLite export needs litert-torch and ai-edge-litert ({exc.name} is missing)") from None
    from vlm_factory.model.checkpoint import load_model

    precision = settings["precision"]
    family, model, processor = load_model(model_dir)
    max_context = static_context(family, processor, context_tokens, tier)
    started = time.perf_counter()
    with atomic_dir(out_dir) as staging:
        seconds = {"vision": convert_vision(family, model, staging / VISION_FILE, precision)}
        log.info("converted %s in %.1fs", VISION_FILE, seconds["vision"])
        seconds["decoder"] = convert_decoder(family, model, staging / DECODER_FILE, precision, max_context)
        log.info("converted %s in %.1fs", DECODER_FILE, seconds["decoder"])
        table = family.input_embeddings(model).weight.detach().numpy()
        np.save(staging / EMBEDDING_FILE, table.astype(np.float16 if precision == "fp16" else np.float32))
        processor.save_pretrained(staging)
        write_json(tflite_config(family, processor, precision, max_context, table.shape), staging / TFLITE_CONFIG)
        checks = self_check(family, model, staging, max_context)
        if precision == "fp32":
            bad = {k: v for k, v in checks.items() if k.endswith("max_abs_diff") and not v <= SELF_CHECK_ATOL}
            if bad:
                raise RuntimeError(f"fp32 TFLite graphs disagree with PyTorch: {bad} (atol {SELF_CHECK_ATOL})")
        files = {
            "vision": _file_entry(staging / VISION_FILE, precision, signatures=["serving_default"],
                                  convert_seconds=round(seconds["vision"], 2)),
            "decoder": _file_entry(staging / DECODER_FILE, precision, signatures=["prefill", "decode"],
                                   kv_cache=True, max_context=max_context, prefill_length=PREFILL_LENGTH,
                                   convert_seconds=round(seconds["decoder"], 2)),
            "embedding": _file_entry(staging / EMBEDDING_FILE, "fp16" if precision == "fp16" else "fp32",
                                     format="npy"),
        }
        report = {
            "format": "tflite", "tier": tier, "family": family.name, "variant": family.variant,
            "settings": settings, "precision": precision,
            "exporter": "litert_torch.convert" + (" + quant_recipes.full_fp16_recipe()" if precision == "fp16"
                                                  else ""),
            "decoder_form": "prefill/decode signatures over a static KV cache",
            "files": files, "total_bytes": sum(f["file_bytes"] for f in files.values()),
            "checks": {"vs_torch_random_inputs": {k: round(v, 7) for k, v in checks.items()}},
            "tools": package_versions("torch", "transformers", "litert-torch", "ai-edge-litert", "tensorflow"),
        }
        write_json(report, staging / EXPORT_REPORT)
    log.info("tflite %s for %s: %.1f MiB, vision cosine vs torch %.5f, in %.1fs", precision, tier,
             report["total_bytes"] / 2**20, checks["vision_cosine"], time.perf_counter() - started)
    return report


def report_summary(report: dict) -> dict:
    """The small, committed part of the export report."""
    return {
        "format": report["format"], "tier": report["tier"], "settings": report["settings"],
        "total_bytes": report["total_bytes"], "decoder_form": report["decoder_form"],
        "checks": report["checks"],
        "files": {role: {k: f[k] for k in ("file", "file_bytes", "precision")} for role, f in report["files"].items()},
        "tools": report["tools"],
    }
