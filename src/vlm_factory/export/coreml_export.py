"""One tier's Core ML package: a vision .mlpackage and a stateful text-decoder .mlpackage, palettized.

Settings (`targets.coreml.<tier>`): `nbits` 4 | 6 | 8, `granularity` per_tensor | per_grouped_channel,
`group_size` (a positive integer, used by per_grouped_channel).

- `vision.mlpackage`: `pixel_values` float32 TensorType [1, 3, H, W], already normalised (pad to square
  with the mean colour, bicubic resize, x/255, (x - mean) / std: an ImageType takes one scalar scale, so
  per-channel std cannot be folded in) -> `image_features` [1, tokens, hidden] (SigLIP tower at the
  configured feature layer + MLP projector).
- `text.mlpackage`: the Llama decoder with its KV cache as iOS18 `ct.StateType` states (`k_cache`,
  `v_cache`, float16, [layers, 1, kv_heads, MAX_CONTEXT, head_dim]). Inputs: `inputs_embeds`
  [1, S, hidden], `position_ids` [1, S] int32, `causal_mask` [1, 1, S, past+S] additive float
  (0 / -inf); the cache window written is [past, past+S) with past = mask width - S. Output `logits`
  [1, S, vocab].
- The token-embedding table stays outside the packages, unpalettized, as `embed_tokens.npy`
  (float32 [vocab, hidden]): the app looks rows up itself and writes image features into the
  `<image>` positions before calling the decoder. No embedding table is inside a package.

Both packages are converted with jit.trace + `ct.convert(minimum_deployment_target=iOS18)` and
palettized with `coremltools.optimize.coreml` (k-means LUT, nbits, per_grouped_channel). The report
records every palettized weight by name; `runtime/coreml_runtime.py` reads those weights back.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vlm_factory.artifacts import EXPORT_REPORT
from vlm_factory.errors import UserError
from vlm_factory.io import atomic_dir, write_json
from vlm_factory.model.checkpoint import load_checkpoint
from vlm_factory.model.features import project, tower_features
from vlm_factory.runtime.coreml_runtime import CoreMLRuntime
from vlm_factory.runtime.coreml_weights import base_name, read_package_weights

log = logging.getLogger(__name__)

NBITS = (4, 6, 8)
GRANULARITIES = ("per_tensor", "per_grouped_channel")
SETTINGS = ("nbits", "granularity", "group_size")
DEFAULTS = {"granularity": "per_grouped_channel", "group_size": 16}
MAX_CONTEXT = 128  # KV-cache length in text.mlpackage (prompt + answer; the prompts here are ~30 tokens)
COREML_CONFIG = "coreml_config.json"
EMBED_FILE = "embed_tokens.npy"
VISION_PACKAGE, TEXT_PACKAGE = "vision.mlpackage", "text.mlpackage"
# Weights with fewer elements stay float (norm scales, biases); k-means on them saves nothing.
WEIGHT_THRESHOLD = 2048
KMEANS_WORKERS = 1  # >1 forks worker processes that deadlocked here after torch had started its threads
AUTHOR = "vlm-factory"
LICENSE = "Apache-2.0 (model weights: see the checkpoint's README)"
PREPROCESSING = ("RGB; pad to square with the mean colour (round(255*mean)); bicubic resize to {size}x{size}; "
                 "x/255; (x - mean) / std per channel with mean={mean} std={std}; NCHW float32")


def coreml_settings(settings, tier: str) -> dict:
    """The tier's Core ML settings validated, with defaults; a one-line UserError naming the key otherwise."""
    key = f"targets.coreml.{tier}"
    if not isinstance(settings, Mapping):
        raise UserError(f"key '{key}' must be a mapping with nbits, granularity and group_size; got {settings!r}")
    for name in settings:
        if name not in SETTINGS:
            raise UserError(f"key '{key}.{name}' is not a Core ML setting (known: {', '.join(SETTINGS)})")
    if "nbits" not in settings:
        raise UserError(f"key '{key}.nbits' is missing: set one of {', '.join(map(str, NBITS))}")
    nbits = settings["nbits"]
    if isinstance(nbits, bool) or nbits not in NBITS:
        raise UserError(f"key '{key}.nbits' must be one of {', '.join(map(str, NBITS))}; got {nbits!r}")
    granularity = settings.get("granularity", DEFAULTS["granularity"])
    if granularity not in GRANULARITIES:
        raise UserError(f"key '{key}.granularity' must be one of {', '.join(GRANULARITIES)}; got {granularity!r}")
    group_size = settings.get("group_size", DEFAULTS["group_size"])
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise UserError(f"key '{key}.group_size' must be a positive integer; got {group_size!r}")
    return {"nbits": int(nbits), "granularity": granularity, "group_size": group_size}


def tool_versions() -> dict:
    versions = {}
    for package in ("coremltools", "torch", "transformers"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions


# -- traceable modules -------------------------------------------------------------------------------

class _Vision(nn.Module):
    """pixel_values -> projected image features, exactly `project(tower_features(model, pixels))`."""

    def __init__(self, model):
        super().__init__()
        self.vision_tower = model.model.vision_tower
        self.multi_modal_projector = model.model.multi_modal_projector
        self._model = [model]  # not a submodule: its parameters must not be traced twice

    def forward(self, pixel_values):
    
        return project(self._model[0], tower_features(self._model[0], pixel_values))


def _rms_norm(x, weight, eps):
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Decoder(nn.Module):
    """The Llama decoder with a KV cache held in registered buffers (Core ML states)."""

    def __init__(self, model, max_context: int = MAX_CONTEXT):
        super().__init__()
        config = model.config.text_config
        language = model.model.language_model
        self.layers = language.layers
        self.norm = language.norm
        self.lm_head = model.lm_head
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", 1e4))
        inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        freqs = torch.outer(torch.arange(max_context, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("rope_cos", emb.cos(), persistent=False)
        self.register_buffer("rope_sin", emb.sin(), persistent=False)
        shape = (len(self.layers), 1, self.kv_heads, max_context, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=torch.float16))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=torch.float16))

    def forward(self, inputs_embeds, position_ids, causal_mask):
        seq = inputs_embeds.shape[1]
        end = causal_mask.shape[-1]
        past = end - seq
        cos = self.rope_cos[position_ids.long()].unsqueeze(1)  # [1, 1, S, D]
        sin = self.rope_sin[position_ids.long()].unsqueeze(1)
        hidden = inputs_embeds
        groups = self.heads // self.kv_heads
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = _rms_norm(hidden, layer.input_layernorm.weight, self.eps)
            q = attn.q_proj(x).view(1, seq, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, seq, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(1, seq, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.k_cache[index:index + 1, :, :, past:end, :] = k.to(torch.float16).unsqueeze(0)
            self.v_cache[index:index + 1, :, :, past:end, :] = v.to(torch.float16).unsqueeze(0)
            keys = self.k_cache[index, :, :, :end, :].to(torch.float32)
            values = self.v_cache[index, :, :, :end, :].to(torch.float32)
            if groups > 1:
                keys = keys.repeat_interleave(groups, dim=1)
                values = values.repeat_interleave(groups, dim=1)
            scores = torch.matmul(q, keys.transpose(-1, -2)) / math.sqrt(self.head_dim) + causal_mask
            out = torch.matmul(torch.softmax(scores, dim=-1), values)
            out = out.transpose(1, 2).reshape(1, seq, self.heads * self.head_dim)
            hidden = hidden + attn.o_proj(out)
            x = _rms_norm(hidden, layer.post_attention_layernorm.weight, self.eps)
            mlp = layer.mlp
            hidden = hidden + mlp.down_proj(nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        return self.lm_head(_rms_norm(hidden, self.norm.weight, self.eps))


# -- conversion ----------------------------------------------------------------------------------

def mil_weight_name(name: str) -> str:
    """The MIL const name jit.trace + ct.convert give a module parameter (before any `_to_fp16` suffix)."""
    return name.replace(".", "_")


def _weight_map(wrapper: nn.Module, prefix: str) -> dict[str, str]:
    """{MIL const name: LlavaForConditionalGeneration parameter name} for one traced wrapper."""
    return {mil_weight_name(name): prefix + name for name, _ in wrapper.named_parameters()}


def _convert(wrapper: nn.Module, example: tuple, inputs: list, outputs: list, states: list | None = None):
    import coremltools as ct

    with torch.no_grad():
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    kwargs = {"states": states} if states else {}
    try:
        return ct.convert(traced, inputs=inputs, outputs=outputs, minimum_deployment_target=ct.target.iOS18,
                          compute_precision=ct.precision.FLOAT16, convert_to="mlprogram", **kwargs)
    except Exception as exc:
        raise RuntimeError(f"coremltools could not convert {type(wrapper).__name__}: "
                           f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__}") from exc


def _resolve_weights(mlmodel, wrapper: nn.Module, weights: dict[str, str], unused: list[str]) -> dict[str, str]:
    """The weight map with each parameter the converter folded into an unnamed const (SigLIP's position
    embedding: a gather over constant position ids) renamed to that const, found by its values.

    Parameters the graph does not hold at all go to `unused` (SigLIP's post_layernorm: LLaVA takes the last
    hidden state before it); the runtime fills them with NaN, so a wrong guess here poisons every output."""
    params = {mil_weight_name(name): p.detach().numpy() for name, p in wrapper.named_parameters()}
    consts = {base_name(op.name): np.asarray(op.outputs[0].val)
              for op in mlmodel._mil_program.functions["main"].operations
              if op.op_type == "const" and op.outputs[0].val is not None and np.ndim(op.outputs[0].val) > 0}
    resolved = {}
    for name, torch_name in weights.items():
        if name in consts:
            resolved[name] = torch_name
            continue
        want = params[name].astype(np.float16).astype(np.float32)
        matches = [c for c, value in consts.items() if c not in weights and value.size == want.size
                   and np.array_equal(value.astype(np.float32).reshape(want.shape), want)]
        if not matches:
            unused.append(torch_name)
            continue
        if len(matches) != 1:
            raise RuntimeError(f"{torch_name}: no single const in the converted program holds it "
                               f"({len(matches)} candidates); the package could not be mapped back to torch")
        resolved[matches[0]] = torch_name
    return resolved


def _palettize(mlmodel, weights: dict[str, str], settings: dict):
    """k-means LUT palettization of every mapped weight above WEIGHT_THRESHOLD elements; other consts
    (RoPE tables, zero biases the converter adds) are excluded by name."""
    from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights

    kwargs = {"group_size": settings["group_size"]} if settings["granularity"] == "per_grouped_channel" else {}
    op_config = OpPalettizerConfig(mode="kmeans", nbits=settings["nbits"], granularity=settings["granularity"],
                                   weight_threshold=WEIGHT_THRESHOLD, num_kmeans_workers=KMEANS_WORKERS, **kwargs)
    skip = {}
    for op in mlmodel._mil_program.functions["main"].operations:
        if op.op_type == "const" and base_name(op.name) not in weights:
            skip[op.name] = None
    return palettize_weights(mlmodel, OptimizationConfig(global_config=op_config, op_name_configs=skip))


def _describe(mlmodel, short: str, inputs: dict, outputs: dict, metadata: dict) -> None:
    mlmodel.author = AUTHOR
    mlmodel.license = LICENSE
    mlmodel.short_description = short
    mlmodel.version = metadata.get("vlm_factory.tier", "")
    for name, text in inputs.items():
        mlmodel.input_description[name] = text
    for name, text in outputs.items():
        mlmodel.output_description[name] = text
    mlmodel.user_defined_metadata.update({k: str(v) for k, v in metadata.items()})


def _package_entry(path: Path, weights: dict[str, str], nbits: int) -> dict:
    found = read_package_weights(path)
    missing = sorted(set(weights) - set(found))
    if missing:
        raise RuntimeError(f"{path.name}: weights not found in the saved package: {missing[:5]} "
                           f"(it holds {sorted(found)[:8]})")
    palettized = sorted(n for n in weights if found[n][1] == "constexpr_lut_to_dense")
    return {"file": path.name, "file_bytes": sum(p.stat().st_size for p in path.rglob("*") if p.is_file()),
            "weights": len(weights), "palettized_weights": len(palettized), "nbits": nbits,
            "float_weights": sorted(set(weights) - set(palettized))}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def export_coreml(model_dir: Path, out_dir: Path, tier: str, settings: dict, data_dir: Path | None = None,
                  check_images: int = 8) -> dict:
    """Write `out_dir` (atomically): vision.mlpackage, text.mlpackage, embed_tokens.npy, coreml_config.json,
    config.json + processor/tokenizer files and export_report.json; return the report."""
    settings = coreml_settings(settings, tier)
    try:
        import coremltools as ct
    except ImportError:
        raise UserError("coremltools is not installed; install it (pip install coremltools) for Core ML exports") from None

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    started = time.perf_counter()
    model, processor = load_checkpoint(model_dir)
    vision_config, text_config = model.config.vision_config, model.config.text_config
    size = vision_config.image_size
    image_processor = processor.image_processor
    preprocessing = PREPROCESSING.format(size=size, mean=list(image_processor.image_mean), std=list(image_processor.image_std))
    metadata = {"vlm_factory.tier": tier, "vlm_factory.nbits": settings["nbits"],
                "vlm_factory.granularity": settings["granularity"], "vlm_factory.group_size": settings["group_size"],
                **{f"tools.{k}": v for k, v in tool_versions().items()}}
    if len(image_processor.image_mean) != 3:
        raise UserError(f"{model_dir}: image_mean must have 3 channels")

    vision = _Vision(model).eval()
    vision_weights = _weight_map(vision, "model.")
    with torch.no_grad():
        tokens = vision(torch.zeros(1, 3, size, size)).shape[1]
    vision_ml = _convert(vision, (torch.zeros(1, 3, size, size),),
                         [ct.TensorType(name="pixel_values", shape=(1, 3, size, size), dtype=np.float32)],
                         [ct.TensorType(name="image_features", dtype=np.float32)])
    unused: list[str] = []
    vision_weights = _resolve_weights(vision_ml, vision, vision_weights, unused)
    vision_ml = _palettize(vision_ml, vision_weights, settings)
    _describe(vision_ml, f"SigLIP vision tower + MLP projector: {tokens} image features for the LLM",
              {"pixel_values": f"[1,3,{size},{size}] float32, preprocessed: {preprocessing}"},
              {"image_features": f"[1,{tokens},{text_config.hidden_size}] projected image features, one per "
                                 "<image> token of the prompt"},
              {**metadata, "vlm_factory.preprocessing": preprocessing})

    decoder = _Decoder(model, MAX_CONTEXT).eval()
    text_weights = {name: "model.language_model." + torch_name if not torch_name.startswith("lm_head") else torch_name
                    for name, torch_name in _weight_map(decoder, "").items()}
    hidden = text_config.hidden_size
    seq, width = ct.RangeDim(1, MAX_CONTEXT, default=1), ct.RangeDim(1, MAX_CONTEXT, default=1)
    example = (torch.zeros(1, 2, hidden), torch.arange(2, dtype=torch.int32)[None], torch.zeros(1, 1, 2, 2))
    text_ml = _convert(
        decoder, example,
        [ct.TensorType(name="inputs_embeds", shape=(1, seq, hidden), dtype=np.float32),
         ct.TensorType(name="position_ids", shape=(1, seq), dtype=np.int32),
         ct.TensorType(name="causal_mask", shape=(1, 1, seq, width), dtype=np.float32)],
        [ct.TensorType(name="logits", dtype=np.float32)],
        [ct.StateType(wrapped_type=ct.TensorType(shape=tuple(decoder.k_cache.shape), dtype=np.float16), name="k_cache"),
         ct.StateType(wrapped_type=ct.TensorType(shape=tuple(decoder.v_cache.shape), dtype=np.float16), name="v_cache")])
    text_weights = _resolve_weights(text_ml, decoder, text_weights, unused)
    text_ml = _palettize(text_ml, text_weights, settings)
    _describe(text_ml, f"{text_config.num_hidden_layers}-layer Llama decoder with a stateful KV cache "
                       f"(max {MAX_CONTEXT} tokens); token embeddings are looked up outside ({EMBED_FILE})",
              {"inputs_embeds": f"[1,S,{hidden}] token embeddings (rows of {EMBED_FILE}) with image features at the "
                                "<image> positions",
               "position_ids": "[1,S] int32 absolute positions past..past+S-1",
               "causal_mask": "[1,1,S,past+S] additive float mask (0 attend, -inf not); its width sets the cache "
                              "window written"},
              {"logits": f"[1,S,{text_config.vocab_size}] next-token logits"},
              {**metadata, "vlm_factory.max_context": MAX_CONTEXT, "vlm_factory.kv_cache": "k_cache, v_cache states"})

    embed = model.get_input_embeddings().weight.detach().numpy().astype(np.float32)
    with atomic_dir(out_dir) as staging:
        vision_ml.save(str(staging / VISION_PACKAGE))
        text_ml.save(str(staging / TEXT_PACKAGE))
        np.save(staging / EMBED_FILE, embed)
        processor.save_pretrained(staging)
        model.config.save_pretrained(staging)
        config = {
            "format": "coreml", "max_context": MAX_CONTEXT, "image_size": size, "image_tokens": tokens,
            "image_token_id": model.config.image_token_id, "eos_token_id": text_config.eos_token_id,
            "preprocessing": preprocessing,
            "packages": {"vision": {"file": VISION_PACKAGE, "weights": vision_weights},
                         "text": {"file": TEXT_PACKAGE, "weights": text_weights}},
            "unused_parameters": sorted(unused),
            "embedding": {"file": EMBED_FILE, "parameter": "model.language_model.embed_tokens.weight",
                          "dtype": "float32", "palettized": False},
        }
        write_json(config, staging / COREML_CONFIG)
        files = {"vision": _package_entry(staging / VISION_PACKAGE, vision_weights, settings["nbits"]),
                 "text": _package_entry(staging / TEXT_PACKAGE, text_weights, settings["nbits"]),
                 "embedding": {"file": EMBED_FILE, "file_bytes": (staging / EMBED_FILE).stat().st_size,
                               "palettized": False}}
        checks = _checks(model, staging, data_dir, check_images)
        report = {"format": "coreml", "tier": tier, "settings": settings, "files": files,
                  "total_bytes": sum(f["file_bytes"] for f in files.values()),
                  "unused_parameters": sorted(unused),
                  "decoder": {"stateful": True, "kv_cache": "ct.StateType float16", "max_context": MAX_CONTEXT},
                  "preprocessing": preprocessing, "minimum_deployment_target": "iOS18",
                  "compute_precision": "float16", "checks": checks, "tools": tool_versions()}
        write_json(report, staging / EXPORT_REPORT)
    log.info("coreml %d-bit for %s: %.1f MiB, vision cosine vs torch >= %.4f, in %.1fs", settings["nbits"], tier,
             report["total_bytes"] / 2**20, checks["vision_cosine_vs_torch"]["min"], time.perf_counter() - started)
    return report


def _checks(model, artifact_dir: Path, data_dir: Path | None, count: int) -> dict:
    """The artifact's weights (read back from the packages) vs torch: vision cosines on a few images."""
    from PIL import Image


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
        pixels = torch.cat([runtime.pixel_values(image) for image in images])
        got = project(runtime.model, tower_features(runtime.model, pixels)).numpy()
        want = project(model, tower_features(model, pixels)).numpy()
        errors = runtime.weight_errors(model)
    cosines = _cosines(want, got)
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
