"""One tier's TFLite (LiteRT) package: vision graph, a KV-cache decoder and the token-embedding table.

Settings (`targets.tflite.<tier>`): `precision` fp32 | fp16 (fp16 = litert-torch's
`quant_recipes.full_fp16_recipe()`: float16 weights, float32 inputs/outputs).

Files, written atomically with an export report:

    vision.tflite         signature `serving_default`: pixel_values [1, 3, H, W] (NCHW, float32)
                          -> image_features [1, image tokens, text hidden]
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
    tflite_config.json    file / signature / tensor names, cache shape, token ids, prompt template and
                          image preprocessing (the same spec as the ONNX export's genai_config.json)
    processor files       as transformers saves them (tokenizer.json etc.)

The decoder is a hand-written static-shape Llama over the checkpoint's own modules (the norms,
projections and MLPs are the transformers modules; only attention, RoPE and the cache are written
out), because transformers' DynamicCache does not trace to static shapes. `self_check` compares it
with PyTorch before anything is accepted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from vlm_factory.artifacts import EXPORT_REPORT
from vlm_factory.errors import UserError
from vlm_factory.io import atomic_dir, write_json

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


class VisionModule(torch.nn.Module):
    """pixel_values -> projected image features, exactly `project(model, tower_features(model, pixels))`."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> dict:
        from vlm_factory.model.features import project, tower_features

        return {"image_features": project(self.model, tower_features(self.model, pixel_values))}


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class StaticCacheDecoder(torch.nn.Module):
    """The Llama decoder + LM head over a fixed-size KV cache, batch 1, static shapes.

    forward(inputs_embeds [1, T, hidden], input_pos [T] int32, k_cache, v_cache [layers, kv heads, S, head dim])
    -> {"logits": [1, T, vocab], "k_cache", "v_cache"} with positions `input_pos` written. Cache writes
    are one-hot matmuls and the causal mask compares slot indices with positions, so nothing in the
    graph depends on data-dependent shapes. Positions >= S write nothing.
    """

    def __init__(self, model, max_context: int):
        super().__init__()
        text = model.model.language_model
        config = text.config
        self.layers = text.layers
        self.norm = text.norm
        self.lm_head = model.lm_head
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.register_buffer("inv_freq", text.rotary_emb.inv_freq.detach().clone().float(), persistent=False)
        self.rope_scale = float(getattr(text.rotary_emb, "attention_scaling", 1.0))
        self.register_buffer("slots", torch.arange(max_context, dtype=torch.int32), persistent=False)

    def forward(self, inputs_embeds, input_pos, k_cache, v_cache):
        length = inputs_embeds.shape[1]
        freqs = input_pos.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos() * self.rope_scale, angles.sin() * self.rope_scale  # [T, D]
        write = (self.slots[None, :] == input_pos[:, None]).float()  # [T, S]
        keep = (1.0 - write.sum(0))[None, :, None]  # [1, S, 1]
        scatter = write.transpose(0, 1)[None]  # [1, S, T]
        mask = torch.where(self.slots[None, :] <= input_pos[:, None], 0.0, -1e9)  # [T, S]
        hidden = inputs_embeds
        new_k, new_v = [], []
        groups = self.n_heads // self.n_kv
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)[0]  # [T, hidden]
            q = attn.q_proj(x).view(length, self.n_heads, self.head_dim).transpose(0, 1)
            k = attn.k_proj(x).view(length, self.n_kv, self.head_dim).transpose(0, 1)
            v = attn.v_proj(x).view(length, self.n_kv, self.head_dim).transpose(0, 1)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys = k_cache[i] * keep + torch.matmul(scatter, k)  # [kv heads, S, D]
            values = v_cache[i] * keep + torch.matmul(scatter, v)
            new_k.append(keys)
            new_v.append(values)
            if groups > 1:
                keys, values = keys.repeat_interleave(groups, 0), values.repeat_interleave(groups, 0)
            scores = torch.matmul(q, keys.transpose(1, 2)) * attn.scaling + mask  # [heads, T, S]
            out = torch.matmul(torch.softmax(scores, dim=-1), values)  # [heads, T, D]
            out = out.transpose(0, 1).reshape(1, length, self.n_heads * self.head_dim)
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return {"logits": self.lm_head(self.norm(hidden)), "k_cache": torch.stack(new_k),
                "v_cache": torch.stack(new_v)}


def cache_shape(model, max_context: int) -> tuple[int, int, int, int]:
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return (text.num_hidden_layers, text.num_key_value_heads, max_context, head_dim)


def decoder_samples(model, max_context: int, length: int) -> dict:
    hidden = model.config.text_config.hidden_size
    shape = cache_shape(model, max_context)
    return {"inputs_embeds": torch.zeros(1, length, hidden), "input_pos": torch.arange(length, dtype=torch.int32),
            "k_cache": torch.zeros(shape), "v_cache": torch.zeros(shape)}


def _quant_config(precision: str):
    if precision != "fp16":
        return None
    from litert_torch.generative.quantize import quant_recipes

    return quant_recipes.full_fp16_recipe()


def convert_vision(model, path: Path, precision: str) -> float:
    import litert_torch

    size, channels = model.config.vision_config.image_size, model.config.vision_config.num_channels
    started = time.perf_counter()
    edge = litert_torch.convert(VisionModule(model).eval(), sample_kwargs={
        "pixel_values": torch.zeros(1, channels, size, size)}, quant_config=_quant_config(precision))
    edge.export(str(path))
    return time.perf_counter() - started


def convert_decoder(model, path: Path, precision: str, max_context: int) -> float:
    import litert_torch

    module = StaticCacheDecoder(model, max_context).eval()
    started = time.perf_counter()
    edge = (litert_torch.signature("prefill", module, sample_kwargs=decoder_samples(model, max_context, PREFILL_LENGTH))
            .signature("decode", module, sample_kwargs=decoder_samples(model, max_context, 1))
            .convert(quant_config=_quant_config(precision)))
    edge.export(str(path))
    return time.perf_counter() - started


def tflite_config(model, processor, precision: str, max_context: int) -> dict:
    from vlm_factory.export.onnx_graphs import genai_config

    genai = genai_config(model, processor)
    source = genai["model"]
    layers, kv_heads, _, head_dim = cache_shape(model, max_context)
    decoder_io = {"inputs": ["inputs_embeds", "input_pos", "k_cache", "v_cache"],
                  "outputs": ["logits", "k_cache", "v_cache"]}
    return {
        "model": {
            **{k: source[k] for k in ("type", "vocab_size", "context_length", "bos_token_id", "eos_token_id",
                                      "pad_token_id", "image_token_id")},
            "precision": precision,
            "vision": {"filename": VISION_FILE, "signature": "serving_default",
                       "inputs": {"pixel_values": "pixel_values"}, "outputs": {"image_features": "image_features"},
                       **{k: source["vision"][k] for k in ("num_image_tokens", "image_size", "num_channels",
                                                            "preprocessing")}},
            "embedding": {"filename": EMBEDDING_FILE, "format": "npy",
                          "dtype": "float16" if precision == "fp16" else "float32",
                          "shape": [model.config.text_config.vocab_size, model.config.text_config.hidden_size]},
            "decoder": {"filename": DECODER_FILE, "hidden_size": model.config.text_config.hidden_size,
                        "max_context": max_context, "prefill_length": PREFILL_LENGTH,
                        "kv_cache_shape": [layers, kv_heads, max_context, head_dim], "kv_cache_dtype": "float32",
                        "signatures": {"prefill": decoder_io, "decode": decoder_io},
                        "input_pos_dtype": "int32",
                        "note": "cache slot s is visible to position p iff s <= p; pad a short prefill chunk "
                                "with positions continuing after the prompt and read logits at the last real one"},
        },
        "prompt": genai["prompt"],
        "search": genai["search"],
    }


def _open(path: Path):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path))


@torch.no_grad()
def self_check(model, out_dir: Path, max_context: int) -> dict:
    """TFLite vs PyTorch on random inputs: vision features, and prefill + one decode step of logits."""
    from vlm_factory.export.onnx_graphs import TextGraph

    generator = torch.Generator().manual_seed(0)
    config = model.config
    size = config.vision_config.image_size
    pixels = torch.randn(1, config.vision_config.num_channels, size, size, generator=generator)
    expected = VisionModule(model)(pixels)["image_features"].numpy()
    got = _open(out_dir / VISION_FILE).get_signature_runner("serving_default")(pixel_values=pixels.numpy())
    got = got["image_features"]
    a, b = got.ravel().astype(np.float64), expected.ravel().astype(np.float64)
    result = {"vision_max_abs_diff": float(np.abs(got - expected).max()),
              "vision_cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))}

    length = 10
    embeds = torch.randn(1, length + 1, config.text_config.hidden_size, generator=generator)
    reference = TextGraph(model)(embeds, torch.ones(1, length + 1, dtype=torch.int64),
                                 torch.arange(length + 1)[None], [])[0][0].numpy()
    interpreter = _open(out_dir / DECODER_FILE)
    prefill, decode = interpreter.get_signature_runner("prefill"), interpreter.get_signature_runner("decode")
    padded = np.zeros((1, PREFILL_LENGTH, embeds.shape[2]), dtype=np.float32)
    padded[0, :length] = embeds[0, :length].numpy()
    empty = np.zeros(cache_shape(model, max_context), dtype=np.float32)
    out = prefill(inputs_embeds=padded, input_pos=np.arange(PREFILL_LENGTH, dtype=np.int32),
                  k_cache=empty, v_cache=empty)
    step = decode(inputs_embeds=embeds[:, length:].numpy(), input_pos=np.asarray([length], dtype=np.int32),
                  k_cache=out["k_cache"], v_cache=out["v_cache"])
    logits = np.concatenate([out["logits"][0, :length], step["logits"][0]])
    result["logits_max_abs_diff"] = float(np.abs(logits - reference).max())
    return result


def tool_versions() -> dict:
    versions = {}
    for package in ("torch", "transformers", "litert-torch", "ai-edge-litert", "tensorflow"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions


def _file_entry(path: Path, precision: str, **extra) -> dict:
    return {"file": path.name, "file_bytes": path.stat().st_size, "precision": precision, **extra}


def export_tflite(model_dir: Path | str, out_dir: Path | str, tier: str, settings, data_dir=None) -> dict:
    """Write `out_dir` (atomically): vision.tflite, decoder.tflite (prefill/decode over a KV cache),
    embedding.npy, tflite_config.json, processor files and export_report.json; return the report.
    `data_dir` is accepted for interface parity with the other exporters and not used."""
    settings = tflite_settings(settings, tier)
    try:
        import ai_edge_litert  # noqa: F401
        import litert_torch  # noqa: F401
    except ImportError as exc:
        raise UserError(f"TFLite export needs litert-torch and ai-edge-litert ({exc.name} is missing)") from None
    from vlm_factory.model.checkpoint import load_checkpoint

    precision = settings["precision"]
    model, processor = load_checkpoint(model_dir)
    model.eval()
    max_context = int(model.config.text_config.max_position_embeddings)
    started = time.perf_counter()
    with atomic_dir(out_dir) as staging:
        seconds = {"vision": convert_vision(model, staging / VISION_FILE, precision)}
        log.info("converted %s in %.1fs", VISION_FILE, seconds["vision"])
        seconds["decoder"] = convert_decoder(model, staging / DECODER_FILE, precision, max_context)
        log.info("converted %s in %.1fs", DECODER_FILE, seconds["decoder"])
        table = model.get_input_embeddings().weight.detach().numpy()
        np.save(staging / EMBEDDING_FILE, table.astype(np.float16 if precision == "fp16" else np.float32))
        processor.save_pretrained(staging)
        write_json(tflite_config(model, processor, precision, max_context), staging / TFLITE_CONFIG)
        checks = self_check(model, staging, max_context)
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
            "format": "tflite", "tier": tier, "settings": settings, "precision": precision,
            "exporter": "litert_torch.convert" + (" + quant_recipes.full_fp16_recipe()" if precision == "fp16"
                                                  else ""),
            "decoder_form": "prefill/decode signatures over a static KV cache",
            "files": files, "total_bytes": sum(f["file_bytes"] for f in files.values()),
            "checks": {"vs_torch_random_inputs": {k: round(v, 7) for k, v in checks.items()}},
            "tools": tool_versions(),
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
