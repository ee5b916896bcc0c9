"""One tier's ONNX package: vision / embedding / text graphs at the tier's precision, with an export report.

Settings (`targets.onnx.<tier>`): `precision` fp32 | fp16 | int8, `ort_format` true | false, and per model
component `vision`, `projector`, `llm` (each fp32 | fp16 | int8, default `precision`). text.onnx follows
`llm` (embedding.onnx too: fp32 beside an int8 decoder, converted with it at fp16); vision.onnx holds the
vision encoder and the projector, so they may differ only as fp32 beside one reduced precision: the
family places each node of the graph in its component (onnx_quantize.py `node_components`) and only the
reduced component's nodes are quantized or converted. A uniform setting takes exactly the steps below.

Steps, all in a staging directory swapped in only when everything succeeded:

1. `export_onnx_fp32` (onnx_graphs.py): the three fp32 graphs from torch's dynamo exporter, checked
   against PyTorch at batch 1 / past 0, plus onnx_config.json (the package contract: onnx_graphs.py),
   the standalone example answer.py and the processor files.
2. Optimisation (onnx_optimize.py) of vision and text: onnxscript's transformer fusions, then
   onnxruntime's offline ORT_ENABLE_EXTENDED, saved to file. The optimised graphs must match the
   exported ones within onnx_graphs.SELF_CHECK_ATOL (at two shapes), or the export fails.
3. Precision (onnx_quantize.py):
   - fp32: the optimised graphs;
   - fp16: the optimised graphs converted to float16 with float32 inputs/outputs (embedding too);
   - int8: decoder dynamic per-channel QInt8 from the fused graph, vision static QDQ from the exported
     graph, calibrated on `calibration_images` training images (all their views: a family that cuts
     images into tiles calibrates on every tile and global view); both then ORT-optimised, which turns
     the quantized ops into MatMulIntegerToFloat / DynamicQuantizeMatMul; the embedding stays fp32.
4. With `ort_format`, each final graph also as `<name>.ort` (ONNX Runtime Mobile) beside it.

The final graphs keep the names onnx_config.json gives (vision.onnx, embedding.onnx, text.onnx) and
their tensors' names, dtypes and shapes (float32 inputs and outputs at every precision), so
`OnnxRuntime(out_dir)` and the package's answer.py load them; the config records each graph's
precision and `.ort` name.
The report also measures the result against the fp32 export: vision-feature cosines on the
calibration images (per image, all its views' features flattened) and the first answer token's log-probability on training questions (the parity
stage gates on held-out data; these numbers are for the record).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from vlm_factory.artifacts import EXPORT_REPORT
from vlm_factory.data.images import load_image
from vlm_factory.data.records import read_jsonl
from vlm_factory.errors import UserError
from vlm_factory.eval.parity import log_softmax
from vlm_factory.export.tool_versions import package_versions
from vlm_factory.export.onnx_graphs import ONNX_TOOLS, OPSET, SELF_CHECK_ATOL, describe_onnx, export_onnx_fp32
from vlm_factory.export.onnx_optimize import (cpu_fallback_ops, fusions_applied, max_abs_diff, op_histogram,
                                              ort_optimize, run_graph, to_ort_format, transformer_fusions)
from vlm_factory.export.onnx_quantize import (calibration_pixels, convert_fp16, graph_components, node_components,
                                              quantize_decoder_dynamic, quantize_vision_static)
from vlm_factory.families import COMPONENTS, family_of
from vlm_factory.io import atomic_dir, scratch_dir, write_json
from vlm_factory.runtime.artifact_schema import ONNX_CONFIG
from vlm_factory.runtime.onnx_check import check_external_data
from vlm_factory.runtime.onnx_runtime import OnnxRuntime

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
SETTINGS = ("precision", "ort_format", *COMPONENTS)
VISION_GRAPH = ("vision", "projector")  # the components vision.onnx computes, in order
DEFAULTS = {"ort_format": False}
# (report role, onnx_config.json section, file name); file names as onnx_graphs writes them.
ROLES = (("vision", "vision", "vision.onnx"), ("embedding", "embedding", "embedding.onnx"),
         ("text", "decoder", "text.onnx"))
CHECK_QUESTIONS = 8  # training questions whose first answer token is compared with the fp32 export
VISION_BATCH = 32  # views per vision-graph run when comparing with the fp32 export


def _precision(value, key: str) -> str:
    if not isinstance(value, str) or value.lower() not in PRECISIONS:
        raise UserError(f"key '{key}' must be one of {', '.join(PRECISIONS)}; got {value!r}")
    return value.lower()


def onnx_settings(settings, tier: str) -> dict:
    """The tier's ONNX settings validated, with defaults (`vision`, `projector`, `llm` default to `precision`);
    a one-line UserError naming the key otherwise."""
    key = f"targets.onnx.{tier}"
    if not isinstance(settings, Mapping):
        raise UserError(f"key '{key}' must be a mapping with precision and ort_format; got {settings!r}")
    for name in settings:
        if name not in SETTINGS:
            raise UserError(f"key '{key}.{name}' is not an ONNX setting (known: {', '.join(SETTINGS)})")
    if "precision" not in settings:
        raise UserError(f"key '{key}.precision' is missing: set one of {', '.join(PRECISIONS)}")
    precision = _precision(settings["precision"], f"{key}.precision")
    components = {c: _precision(settings.get(c, precision), f"{key}.{c}") for c in COMPONENTS}
    ort_format = settings.get("ort_format", DEFAULTS["ort_format"])
    if not isinstance(ort_format, bool):
        raise UserError(f"key '{key}.ort_format' must be true or false; got {ort_format!r}")
    if {components[c] for c in VISION_GRAPH} == {"int8", "fp16"}:
        # One graph quantized in part and converted to float16 in part is neither tool's input; fp32 beside
        # one reduced precision is what attribution and the precision search need.
        raise UserError(f"keys '{key}.vision' and '{key}.projector' cannot be int8 and fp16: both run in "
                        "vision.onnx, which holds at most one reduced precision (beside fp32); set them equal "
                        "or one of them to fp32")
    if "fp16" in components.values() and ort_format:
        # The .ort file is written by this (CPU) onnxruntime, which bakes casts to float32 around every
        # op without a CPU float16 kernel into the file: useless for the GPU/NPU an fp16 tier targets.
        raise UserError(f"key '{key}.ort_format' must be false with precision fp16 (here on "
                        f"{', '.join(c for c in COMPONENTS if components[c] == 'fp16')}): the ORT format is saved "
                        "after CPU partitioning, which runs most float16 ops in float32; use int8 or fp32 for it")
    return {"precision": precision, "ort_format": ort_format, **components}


def _vision_graph_precision(components: Mapping[str, str]) -> tuple[str, list[str] | None]:
    """(the reduced precision of vision.onnx or fp32, the components it applies to; None: the whole graph)."""
    precisions = {components[c] for c in VISION_GRAPH}
    reduced = (precisions - {"fp32"} or {"fp32"}).pop()  # at most one besides fp32 (onnx_settings)
    return reduced, (None if len(precisions) == 1 else [c for c in VISION_GRAPH if components[c] == reduced])


def _precision_label(precision: str, only: list[str] | None) -> str:
    """"int8" for a whole graph, "int8 (projector), fp32 (vision)" for a mixed one."""
    if only is None:
        return precision
    return f"{precision} ({', '.join(only)}), fp32 ({', '.join(c for c in VISION_GRAPH if c not in only)})"


def _components_label(components: Mapping[str, str]) -> str:
    """"int8" when uniform, else "vision fp32, projector int8, llm fp32"."""
    if len(set(components.values())) == 1:
        return next(iter(components.values()))
    return ", ".join(f"{c} {p}" for c, p in components.items())


@contextlib.contextmanager
def _timed(message: str, *args) -> Iterator[None]:
    """Log `message` with the seconds the block took."""
    started = time.perf_counter()
    yield
    log.info(message + " in %.1fs", *args, time.perf_counter() - started)


def _random_feeds(config: dict) -> tuple[list[dict], list[dict]]:
    """Vision and decoder feeds at two shapes each (batch 1 / past 0, and batch 2 / past 4)."""
    model = config["model"]
    vision, decoder = model["vision"], model["decoder"]
    rng = np.random.default_rng(0)
    pixels = vision["inputs"]["pixel_values"]["name"]
    vision_feeds = [{pixels: rng.standard_normal((batch, vision["num_channels"], *vision["image_size"]),
                                                 dtype=np.float32)} for batch in (1, 2)]
    inputs = {role: tensor["name"] for role, tensor in decoder["inputs"].items()}
    text_feeds = []
    for batch, sequence, past in ((1, 1, 0), (2, 3, 4)):
        embeds = rng.standard_normal((batch, sequence, decoder["hidden_size"]), dtype=np.float32)
        feed = {inputs["inputs_embeds"]: embeds,
                inputs["attention_mask"]: np.ones((batch, past + sequence), dtype=np.int64),
                inputs["position_ids"]: np.tile(np.arange(past, past + sequence, dtype=np.int64), (batch, 1))}
        kv_shape = (batch, decoder["num_key_value_heads"], past, decoder["head_size"])
        for i in range(decoder["num_hidden_layers"]):
            for kind in ("past_key", "past_value"):
                feed[inputs[kind] % i] = rng.standard_normal(kv_shape, dtype=np.float32)
        text_feeds.append(feed)
    return vision_feeds, text_feeds


def _check_optimised(raw: dict[str, Path], optimised: dict[str, Path], config: dict) -> dict[str, float]:
    """Max abs diff optimised vs exported fp32 graph; fusions must not change the numbers."""

    vision_feeds, text_feeds = _random_feeds(config)
    diffs = {role: max(max_abs_diff(raw[role], optimised[role], feed) for feed in feeds)
             for role, feeds in (("vision", vision_feeds), ("text", text_feeds))}
    bad = {role: diff for role, diff in diffs.items() if not diff <= SELF_CHECK_ATOL}
    if bad:
        raise RuntimeError(f"optimised ONNX graphs disagree with the exported ones: {bad} "
                           f"(max abs diff, atol {SELF_CHECK_ATOL}); a fusion is wrong for this model")
    return diffs


def _vision_features(path: Path, pixels: np.ndarray) -> np.ndarray:
    """The vision graph on every view, VISION_BATCH views per run (tiles of many images at once would not fit)."""
    return np.concatenate([run_graph(path, {"pixel_values": pixels[start:start + VISION_BATCH]})[0]
                           for start in range(0, len(pixels), VISION_BATCH)])


def _compare_with_fp32(reference_dir: Path, artifact_dir: Path, pixels: np.ndarray, view_counts: list[int],
                       questions: list) -> dict:
    """The final graphs vs the fp32 export: vision cosines per image (all its views' features flattened, as
    the parity gate compares them), first-token log-probs per question."""

    reference = _vision_features(reference_dir / "vision.onnx", pixels)
    actual = _vision_features(artifact_dir / "vision.onnx", pixels)
    ends = np.cumsum(view_counts)
    cosines = []
    for start, end in zip(ends - view_counts, ends):
        flat_ref, flat = reference[start:end].reshape(1, -1), actual[start:end].reshape(1, -1)
        cosines.append((flat_ref * flat).sum(1) / (np.linalg.norm(flat_ref, axis=1) * np.linalg.norm(flat, axis=1)))
    cosines = np.concatenate(cosines)
    result = {"vision_cosine_vs_fp32": {"images": len(view_counts), "min": round(float(cosines.min()), 6),
                                        "mean": round(float(cosines.mean()), 6)}}
    if questions:

        diffs, agree = [], 0
        with OnnxRuntime(reference_dir) as ref_rt, OnnxRuntime(artifact_dir) as rt:
            for image, question in questions:
                expected = log_softmax(ref_rt.first_token_logits(image, question))
                got = log_softmax(rt.first_token_logits(image, question))
                top = int(expected.argmax())
                diffs.append(abs(float(got[top] - expected[top])))
                agree += int(got.argmax()) == top
        result["first_token_vs_fp32"] = {"questions": len(questions), "logprob_max_abs_diff": round(max(diffs), 6),
                                         "top1_agreement": round(agree / len(questions), 4)}
    return result


def _check_questions(records: list, data_dir: Path, count: int) -> list:

    picks = np.unique(np.linspace(0, len(records) - 1, num=min(count, len(records))).round().astype(int))
    return [(load_image(data_dir / records[i].image), records[i].question) for i in picks]


def _graph_entry(path: Path, raw_ops: dict, precision: str, pipeline: list[str], extra: dict) -> dict:

    ops = op_histogram(path)
    return {**describe_onnx(path), "precision": precision, "pipeline": pipeline, "ops_exported": raw_ops,
            "ops": ops, "fusions": fusions_applied(raw_ops, ops), **extra}


def export_onnx(model_dir: Path, out_dir: Path, tier: str, settings: dict, data_dir: Path,
                calibration_images: int = 32) -> dict:
    """Write `out_dir` (atomically) with the tier's three graphs, onnx_config.json, answer.py, processor files
    and export_report.json; return the report. `data_dir` holds train.jsonl (INT8 calibration, checks)."""
    settings = onnx_settings(settings, tier)
    if isinstance(calibration_images, bool) or not isinstance(calibration_images, int) or calibration_images < 1:
        raise UserError(f"calibration_images must be a positive number of images; got {calibration_images!r}")

    model_dir, out_dir, data_dir = Path(model_dir), Path(out_dir), Path(data_dir)
    records = read_jsonl(data_dir / "train.jsonl")  # before any work: a missing split fails in a second
    precision, components = settings["precision"], {c: settings[c] for c in COMPONENTS}
    llm = components["llm"]
    vision_precision, vision_only = _vision_graph_precision(components)
    started = time.perf_counter()
    with atomic_dir(out_dir) as staging, scratch_dir(out_dir) as scratch:
        raw_dir = scratch / "fp32"
        fp32_report = export_onnx_fp32(model_dir, raw_dir)
        for path in raw_dir.iterdir():
            if path.suffix != ".onnx" and path.name != EXPORT_REPORT:
                shutil.copy2(path, staging / path.name)
        config = json.loads((raw_dir / ONNX_CONFIG).read_text(encoding="utf-8"))
        raw = {role: raw_dir / name for role, _, name in ROLES}
        raw_ops = {role: op_histogram(path) for role, path in raw.items()}

        fused, optimised, onnxscript_counts = {}, {}, {}
        for role in ("vision", "text"):
            fused[role], optimised[role] = scratch / f"{role}.fused.onnx", scratch / f"{role}.opt.onnx"
            with _timed("%s: onnxscript fusions + ORT_ENABLE_EXTENDED", role):
                onnxscript_counts[role] = transformer_fusions(raw[role], fused[role])
                ort_optimize(fused[role], optimised[role])
        optimised_diffs = _check_optimised(raw, optimised, config)
        with _timed("reading %d calibration images", calibration_images):
            pixels, view_counts = calibration_pixels(records, data_dir, config["model"]["vision"]["preprocessing"],
                                                     calibration_images)

        exported = "torch.onnx.export(dynamo=True)"
        optimise = ["onnxscript optimize_for_ort", "onnxruntime ORT_ENABLE_EXTENDED"]
        pipelines = {"vision": [exported, *optimise], "embedding": [exported], "text": [exported, *optimise]}
        precisions = {"vision": _precision_label(vision_precision, vision_only), "embedding": llm, "text": llm}
        extra = {role: {"onnxscript_fusions": onnxscript_counts.get(role, {})} for role in raw}
        extra["vision"]["components"] = {c: components[c] for c in VISION_GRAPH}
        final = {role: staging / name for role, _, name in ROLES}
        # The family places the vision graph's nodes: from the exported graph's metadata (int8 quantizes it),
        # from the fused graph's by node name for the optimised one (fp16 converts it; its nodes lost theirs).
        family = family_of(model_dir)

        # vision.onnx: vision encoder + projector.
        if vision_precision == "fp32":
            shutil.copy2(optimised["vision"], final["vision"])
        elif vision_precision == "fp16":
            placed = graph_components(optimised["vision"], node_components(fused["vision"], family))
            with _timed("vision: float16 (%s)", precisions["vision"]):
                extra["vision"]["conversion"] = convert_fp16(optimised["vision"], final["vision"], components=placed,
                                                             only=vision_only)
            extra["vision"]["cpu_fallback_ops"] = cpu_fallback_ops(final["vision"], scratch)
            block = "" if vision_only is None else f", node_block_list: all but the {' and '.join(vision_only)}"
            pipelines["vision"].append(f"convert_float_to_float16(keep_io_types{block})")
        else:
            quantized = scratch / "vision.int8.onnx"
            with _timed("vision: static QDQ INT8 (%s) on %d images (%d views)", precisions["vision"],
                        len(view_counts), len(pixels)):
                extra["vision"]["quantization"] = quantize_vision_static(
                    raw["vision"], quantized, pixels, images=len(view_counts),
                    components=node_components(raw["vision"], family), only=vision_only)
            ort_optimize(quantized, final["vision"])
            only = "" if vision_only is None else f" (nodes_to_quantize: the {' and '.join(vision_only)})"
            pipelines["vision"] = [exported, f"quantize_static QDQ{only}", "onnxruntime ORT_ENABLE_EXTENDED"]
            extra["vision"]["onnxscript_fusions"] = {}

        # text.onnx and embedding.onnx: the LLM.
        if llm == "fp32":
            for role in ("embedding", "text"):
                shutil.copy2(optimised.get(role, raw[role]), final[role])
        elif llm == "fp16":
            for role in ("embedding", "text"):
                with _timed("%s: float16", role):
                    extra[role]["conversion"] = convert_fp16(optimised.get(role, raw[role]), final[role])
                extra[role]["cpu_fallback_ops"] = cpu_fallback_ops(final[role], scratch)
                pipelines[role].append("convert_float_to_float16(keep_io_types)")
        else:
            quantized = scratch / "text.int8.onnx"
            with _timed("text: dynamic INT8"):
                extra["text"]["quantization"] = quantize_decoder_dynamic(fused["text"], quantized)
            ort_optimize(quantized, final["text"])
            pipelines["text"] = [exported, "onnxscript optimize_for_ort", "quantize_dynamic",
                                 "onnxruntime ORT_ENABLE_EXTENDED"]
            shutil.copy2(raw["embedding"], final["embedding"])
            precisions["embedding"] = "fp32"
            extra["embedding"]["quantization"] = None  # a Gather table: see onnx_quantize.py

        for role, section, name in ROLES:
            check_external_data(final[role])  # our own files; a cheap guard that nothing points elsewhere
            entry = config["model"][section]
            entry["precision"] = precisions[role]
            if settings["ort_format"]:
                ort_path = final[role].with_suffix(".ort")
                with _timed("%s: ORT format", ort_path.name):
                    to_ort_format(final[role], ort_path)
                entry["ort_filename"] = ort_path.name
                extra[role]["ort"] = {"file": ort_path.name, "file_bytes": ort_path.stat().st_size}
        write_json(config, staging / ONNX_CONFIG)

        with _timed("comparing the %s graphs with the fp32 export", _components_label(components)):
            checks = _compare_with_fp32(raw_dir, staging, pixels, view_counts,
                                        _check_questions(records, data_dir, CHECK_QUESTIONS))
        files = {role: _graph_entry(final[role], raw_ops[role], precisions[role], pipelines[role], extra[role])
                 for role in raw}
        report = {
            "format": "onnx", "tier": tier, "settings": settings, "precision": precision, "components": components,
            "family": fp32_report["family"], "variant": fp32_report["variant"], "exporter": fp32_report["exporter"],
            "opset": OPSET, "files": files,
            "total_bytes": sum(f["file_bytes"] for f in files.values()),
            "ort_total_bytes": (sum(f["ort"]["file_bytes"] for f in files.values()) if settings["ort_format"]
                                else None),
            "calibration": ({"split": "train", "images": len(view_counts), "views": int(len(pixels)),
                             "method": "MinMax"}
                            if vision_precision == "int8" else None),
            "checks": {"fp32_export_vs_torch_max_abs_diff": fp32_report["self_check_max_abs_diff"],
                       "optimised_vs_export_max_abs_diff": optimised_diffs, **checks},
            "tools": package_versions(*ONNX_TOOLS),
        }
        write_json(report, staging / EXPORT_REPORT)
    log.info("onnx %s for %s: %.1f MiB in 3 graphs%s, vision cosine vs fp32 >= %.4f, in %.1fs",
             _components_label(components), tier,
             report["total_bytes"] / 2**20,
             f" (+ {report['ort_total_bytes'] / 2**20:.1f} MiB .ort)" if settings["ort_format"] else "",
             checks["vision_cosine_vs_fp32"]["min"], time.perf_counter() - started)
    return report


def report_summary(report: dict) -> dict:
    """The small, committed part of the export report (no op histograms, shapes or pipelines)."""
    def graph(f: dict) -> dict:
        quantization = f.get("quantization") or {}
        return {"file": f["file"], "file_bytes": f["file_bytes"], "precision": f["precision"], "fusions": f["fusions"],
                "quantized_nodes": quantization.get("quantized_nodes", {}),
                "ort_file_bytes": (f.get("ort") or {}).get("file_bytes")}

    return {
        "format": report["format"], "tier": report["tier"], "settings": report["settings"],
        "total_bytes": report["total_bytes"], "ort_total_bytes": report["ort_total_bytes"],
        "calibration_images": (report["calibration"] or {}).get("images"),
        "checks": {k: v for k, v in report["checks"].items() if k in ("vision_cosine_vs_fp32", "first_token_vs_fp32")},
        "files": {role: graph(f) for role, f in report["files"].items()}, "tools": report["tools"],
    }
