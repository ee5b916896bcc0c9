"""One tier's TFLite (LiteRT) package: vision graph, a KV-cache decoder and the token-embedding table.

Settings (`targets.tflite.<tier>`): `precision` fp32 | fp16 | int8, and optionally `vision`, `projector`,
`llm`, each a precision for that component's weights (default: `precision`). Every graph is converted at
fp32 by litert-torch, then ai-edge-quantizer stores each component's weights at its precision
(export/tflite_precision.py): fp16 = float16 weights dequantized in the graph (what litert-torch's
`quant_recipes.full_fp16_recipe()` does, so a uniform fp16 file is byte for byte today's), int8 = dynamic
range (per-channel int8 weights, float activations); inputs and outputs stay float32. Which weight is which
component's is the family's word (`family.component_of`); the report counts each component's weight bytes
by dtype (`components`).

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
    embedding.npy         the token-embedding table [vocab, hidden], the llm's: float32 at fp32, float16 at
                          fp16 and at int8 (a Gather is all a device needs, so no graph for it, and int8 rows
                          would need scales the runtime does not apply; float16 keeps it no bigger than fp16's)
    tflite_config.json    file / signature / tensor names, cache shape, token ids, the family's prompt
                          (`family.prompt(processor)`) and image preprocessing spec (`family.preprocessing`);
                          `model.precision` the target's setting, `model.components` each component's
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
from vlm_factory.export.tflite_precision import PRECISIONS, check_weights, quantize, segment_components, weight_bytes
from vlm_factory.families import COMPONENTS
from vlm_factory.io import atomic_dir, write_json
from vlm_factory.logs import native_stderr_filtered
from vlm_factory.model.prompt import MAX_ANSWER_TOKENS

log = logging.getLogger(__name__)

SETTINGS = ("precision", *COMPONENTS)
# The components each graph holds, its main one first (the vision graph ends with the projector).
GRAPH_COMPONENTS = {"vision": ("vision", "projector"), "decoder": ("llm",)}
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
    checked = {}
    for name in SETTINGS:
        value = settings.get(name, checked.get("precision"))
        if not isinstance(value, str) or value.lower() not in PRECISIONS:
            raise UserError(f"key '{key}.{name}' must be one of {', '.join(PRECISIONS)}; got {value!r}")
        checked[name] = value.lower()
    return checked


def embedding_dtype(llm_precision: str) -> str:
    """The table is the llm's and stays float: float32 at fp32, float16 at fp16 and int8 (see the docstring)."""
    return "float32" if llm_precision == "fp32" else "float16"


def cache_shape(family, max_context: int) -> tuple[int, int, int, int]:
    facts = family.text
    return (facts.num_layers, facts.num_kv_heads, max_context, facts.head_dim)


def decoder_samples(family, max_context: int, length: int) -> dict:
    shape = cache_shape(family, max_context)
    return {"inputs_embeds": torch.zeros(1, length, family.text.hidden_size),
            "input_pos": torch.arange(length, dtype=torch.int32),
            "k_cache": torch.zeros(shape), "v_cache": torch.zeros(shape)}


def _write_graph(family, model, wrapper, edge, path: Path, precisions: dict[str, str]) -> dict:
    """The fp32 graph with each component's weights at its precision, written and checked; its weight bytes."""
    segments = segment_components(family, model, wrapper)
    content = quantize(edge.model_content(), segments, precisions, path.name)
    check_weights(content, segments, precisions, path.name)
    path.write_bytes(content)
    return weight_bytes(content, segments, next(iter(precisions)))


def convert_vision(family, model, path: Path, precisions: dict[str, str]) -> tuple[float, dict]:
    """Seconds taken and {component: {dtype: bytes}}; `precisions` for vision and projector."""
    import litert_torch

    vision = family.vision
    started = time.perf_counter()
    wrapper = ImageFeatures(family, model, "image_features").eval()
    edge = litert_torch.convert(wrapper, sample_kwargs={
        "pixel_values": torch.zeros(1, vision.num_channels, vision.image_size, vision.image_size)})
    weights = _write_graph(family, model, wrapper, edge, path, precisions)
    return time.perf_counter() - started, weights


def convert_decoder(family, model, path: Path, precisions: dict[str, str], max_context: int) -> tuple[float, dict]:
    """Seconds taken and {component: {dtype: bytes}}; `precisions` for the llm."""
    import litert_torch

    module = FunctionalDecoder(family.decoder_parts(model), max_context).eval()
    started = time.perf_counter()
    edge = (litert_torch.signature("prefill", module, sample_kwargs=decoder_samples(family, max_context, PREFILL_LENGTH))
            .signature("decode", module, sample_kwargs=decoder_samples(family, max_context, 1))
            .convert())
    weights = _write_graph(family, model, module, edge, path, precisions)
    return time.perf_counter() - started, weights


def tflite_config(family, processor, settings: dict, max_context: int, table_shape) -> dict:
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
            "precision": settings["precision"],
            "components": {c: settings[c] for c in COMPONENTS},
            "vision": {"filename": VISION_FILE, "signature": "serving_default",
                       "inputs": {"pixel_values": "pixel_values"}, "outputs": {"image_features": "image_features"},
                       "num_image_tokens": family.image_tokens, "image_size": [vision.image_size, vision.image_size],
                       "num_channels": vision.num_channels, "preprocessing": family.preprocessing(processor)},
            "embedding": {"filename": EMBEDDING_FILE, "format": "npy",
                          "dtype": embedding_dtype(settings["llm"]), "shape": list(table_shape)},
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


def _graph_entry(path: Path, precisions: dict[str, str], **extra) -> dict:
    """`precision` is the graph's if all its components agree, else "mixed"; `components` says each one's."""
    uniform = set(precisions.values())
    return _file_entry(path, uniform.pop() if len(uniform) == 1 else "mixed", components=precisions, **extra)


def export_tflite(model_dir: Path | str, out_dir: Path | str, tier: str, settings, data_dir=None, *,
                  context_tokens: int) -> dict:
    """Write `out_dir` (atomically): vision.tflite, decoder.tflite (prefill/decode over a KV cache),
    embedding.npy, tflite_config.json, processor files and export_report.json; return the report.
    `context_tokens` is the tier's context (`tiers.<tier>.context_tokens`); it sizes the KV cache.
    `data_dir` is accepted for interface parity with the other exporters and not used."""
    settings = tflite_settings(settings, tier)
    try:
        with native_stderr_filtered():  # litert-torch loads TensorFlow's native libraries: their loading chatter
            import ai_edge_litert  # noqa: F401
            import ai_edge_quantizer  # noqa: F401
            import litert_torch  # noqa: F401
    except ImportError as exc:
        raise UserError(f"TFLite export needs litert-torch, ai-edge-quantizer and ai-edge-litert ({exc.name} is "
                        "missing)") from None
    from vlm_factory.model.checkpoint import load_model

    precision = settings["precision"]
    graph_precisions = {role: {c: settings[c] for c in GRAPH_COMPONENTS[role]} for role in GRAPH_COMPONENTS}
    family, model, processor = load_model(model_dir)
    max_context = static_context(family, processor, context_tokens, tier)
    started = time.perf_counter()
    with atomic_dir(out_dir) as staging:
        seconds, weights = {}, {}
        for role, path in (("vision", VISION_FILE), ("decoder", DECODER_FILE)):
            seconds[role], placed = (
                convert_vision(family, model, staging / path, graph_precisions[role]) if role == "vision" else
                convert_decoder(family, model, staging / path, graph_precisions[role], max_context))
            weights.update({c: {**weights.get(c, {}), path: bytes_} for c, bytes_ in placed.items()})
            log.info("converted %s in %.1fs", path, seconds[role])
        table = family.input_embeddings(model).weight.detach().numpy().astype(embedding_dtype(settings["llm"]))
        np.save(staging / EMBEDDING_FILE, table)
        weights["llm"] = {**weights.get("llm", {}), EMBEDDING_FILE: {table.dtype.name: table.nbytes}}
        processor.save_pretrained(staging)
        write_json(tflite_config(family, processor, settings, max_context, table.shape), staging / TFLITE_CONFIG)
        checks = self_check(family, model, staging, max_context)
        if all(settings[c] == "fp32" for c in COMPONENTS):
            bad = {k: v for k, v in checks.items() if k.endswith("max_abs_diff") and not v <= SELF_CHECK_ATOL}
            if bad:
                raise RuntimeError(f"fp32 TFLite graphs disagree with PyTorch: {bad} (atol {SELF_CHECK_ATOL})")
        files = {
            "vision": _graph_entry(staging / VISION_FILE, graph_precisions["vision"], signatures=["serving_default"],
                                   convert_seconds=round(seconds["vision"], 2)),
            "decoder": _graph_entry(staging / DECODER_FILE, graph_precisions["decoder"],
                                    signatures=["prefill", "decode"], kv_cache=True, max_context=max_context,
                                    prefill_length=PREFILL_LENGTH, convert_seconds=round(seconds["decoder"], 2)),
            "embedding": _file_entry(staging / EMBEDDING_FILE, "fp16" if table.dtype == np.float16 else "fp32",
                                     format="npy", dtype=table.dtype.name),
        }
        quantized = sorted({settings[c] for c in COMPONENTS} - {"fp32"})
        report = {
            "format": "tflite", "tier": tier, "family": family.name, "variant": family.variant,
            "settings": settings, "precision": precision,
            "components": {c: {"precision": settings[c], "weight_bytes": weights.get(c, {})} for c in COMPONENTS},
            "exporter": "litert_torch.convert" + (f" + ai_edge_quantizer per component ({', '.join(quantized)})"
                                                  if quantized else ""),
            "decoder_form": "prefill/decode signatures over a static KV cache",
            "files": files, "total_bytes": sum(f["file_bytes"] for f in files.values()),
            "checks": {"vs_torch_random_inputs": {k: round(v, 7) for k, v in checks.items()}},
            "tools": package_versions("torch", "transformers", "litert-torch", "ai-edge-quantizer", "ai-edge-litert",
                                      "tensorflow"),
        }
        write_json(report, staging / EXPORT_REPORT)
    log.info("tflite %s for %s: %.1f MiB, vision cosine vs torch %.5f, in %.1fs",
             "/".join(settings[c] for c in COMPONENTS), tier, report["total_bytes"] / 2**20, checks["vision_cosine"],
             time.perf_counter() - started)
    return report


def report_summary(report: dict) -> dict:
    """The small, committed part of the export report."""
    return {
        "format": report["format"], "tier": report["tier"], "settings": report["settings"],
        "total_bytes": report["total_bytes"], "decoder_form": report["decoder_form"],
        "checks": report["checks"], "components": report["components"],
        "files": {role: {k: f[k] for k in ("file", "file_bytes", "precision")} for role, f in report["files"].items()},
        "tools": report["tools"],
    }
