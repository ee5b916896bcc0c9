"""Run one exported artifact, in its own runtime, through the parity gate against the reference model.

Every format uses this: a runtime adapter answers the reference's eval questions and encodes
images; this module pairs its per-question scores with the reference's, measures how close its
image embeddings are to the PyTorch model's, checks its preprocessing on square, tall and wide
images, and returns the verdict dict written to `metrics/parity/<tier>-<format>.json`.

A runtime adapter provides `answer(images, questions, progress)` and `image_embeddings(image)`;
one that exposes its pixel input also provides `pixel_values(image)` (compared with the
reference processor's directly), otherwise preprocessing is checked through the embeddings of the
raw image against those of the reference processor's own pixels fed to the same runtime.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from vlm_factory.data.images import load_image
from vlm_factory.data.records import VQARecord
from vlm_factory.errors import UserError
from vlm_factory.eval.parity import drift_by, gate, paired_drift
from vlm_factory.eval.reference import score
from vlm_factory.families import family_for

log = logging.getLogger(__name__)


# The setting of a target that picks its accuracy threshold in eval.max_drop.<format>.
GATE_SETTING = {"gguf": "llm", "onnx": "precision", "coreml": "nbits", "tflite": "precision"}


def gate_thresholds(eval_cfg, fmt: str, tier: str, settings: dict) -> tuple[float, float]:
    """(max_drop, min_embedding_cosine) for one target, or a one-line error naming the missing key."""
    setting = str(settings.get(GATE_SETTING[fmt], ""))
    table = eval_cfg.max_drop.get(fmt, {})
    match = {k.upper(): v for k, v in table.items()}.get(setting.upper())
    if match is None:
        raise UserError(f"key 'eval.max_drop.{fmt}' has no threshold for {setting!r} "
                        f"(targets.{fmt}.{tier}.{GATE_SETTING[fmt]}); add one in conf/eval/")
    if fmt not in eval_cfg.min_embedding_cosine:
        raise UserError(f"key 'eval.min_embedding_cosine.{fmt}' is missing; add it in conf/eval/")
    return float(match), float(eval_cfg.min_embedding_cosine[fmt])


class Runtime(Protocol):
    def answer(self, images: list[Image.Image], questions: list[str], progress=None) -> list[str]: ...

    def image_embeddings(self, image: Image.Image) -> np.ndarray: ...


def reference_scores(path: Path, records: list[VQARecord]) -> list[float]:
    """The reference model's per-question scores, in the order of `records`."""
    if not path.is_file():
        raise UserError(f"{path}: reference predictions not found; run the reference_eval stage")
    by_id = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            by_id[row["question_id"]] = row["score"]
    missing = [r.question_id for r in records if r.question_id not in by_id]
    if missing:
        raise UserError(f"{path}: no reference score for {len(missing)} eval question(s) (e.g. {missing[0]}); "
                        "re-run reference_eval on the same data")
    return [by_id[r.question_id] for r in records]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two flattened arrays; 0.0 when their sizes differ (e.g. a runtime that cut an image into
    another number of tiles agrees with the reference in nothing)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.size != b.size:
        return 0.0
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def reference_pixels_as_image(image_processor, image: Image.Image, family) -> Image.Image:
    """The reference processor's pixel input, un-normalised back to an RGB image a runtime that preprocesses
    by itself turns into the same pixels: the one view, or the tiles stitched back into the image they
    were cut from (its size is already a whole number of tiles, so the runtime cuts the same tiles)."""
    views = family.image_views(image_processor, [image])[0]
    pixels = np.asarray(views.pixel_values, dtype=np.float64)
    if views.rows and views.cols:
        tiles = pixels[:views.rows * views.cols].reshape(views.rows, views.cols, *pixels.shape[1:])
        pixels = tiles.transpose(2, 0, 3, 1, 4).reshape(pixels.shape[1], views.rows * pixels.shape[2],
                                                         views.cols * pixels.shape[3])
    else:
        pixels = pixels[0]
    mean = np.asarray(image_processor.image_mean)[:, None, None]
    std = np.asarray(image_processor.image_std)[:, None, None]
    rgb = (pixels * std + mean).transpose(1, 2, 0) * 255.0
    return Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8))


@torch.inference_mode()
def reference_embeddings(model, image_processor, images: list[Image.Image]) -> list[np.ndarray]:
    """What the PyTorch model hands the LLM for each image: [views, tokens, hidden]."""
    family = family_for(model.config)
    return [family.image_features(model, views.pixel_values).numpy()
            for views in family.image_views(image_processor, images)]


def embedding_agreement(runtime: Runtime, model, image_processor, images: list[Image.Image],
                        aspects: list[str]) -> dict:
    """Cosine similarity of the runtime's image embeddings with the reference's: mean, min, per aspect."""
    expected = reference_embeddings(model, image_processor, images)
    cosines = [cosine(runtime.image_embeddings(image), ref) for image, ref in zip(images, expected)]
    by_aspect = defaultdict(list)
    for aspect, value in zip(aspects, cosines):
        by_aspect[aspect].append(value)
    return {"mean": round(float(np.mean(cosines)), 6), "min": round(float(np.min(cosines)), 6),
            "n_images": len(images), "by_aspect": {k: round(float(np.mean(v)), 6) for k, v in sorted(by_aspect.items())}}


def preprocessing_check(runtime: Runtime, model, image_processor, samples: dict[str, Image.Image]) -> dict:
    """Per aspect (square, tall, wide): does the runtime see the pixels the reference processor makes?"""
    family = family_for(model.config)
    result = {}
    for aspect, image in samples.items():
        if hasattr(runtime, "pixel_values"):
            expected = np.asarray(family.image_views(image_processor, [image])[0].pixel_values)
            actual = np.asarray(runtime.pixel_values(image))
            if actual.size != expected.size:
                result[aspect] = {"method": "pixel input", "views": [int(actual.shape[0]), int(expected.shape[0])],
                                  "cosine": 0.0}
                continue
            actual = actual.reshape(expected.shape)
            result[aspect] = {"method": "pixel input", "max_abs_diff": round(float(np.abs(actual - expected).max()), 6),
                              "cosine": round(cosine(actual, expected), 6)}
        else:
            own = runtime.image_embeddings(image)
            given = runtime.image_embeddings(reference_pixels_as_image(image_processor, image, family))
            result[aspect] = {"method": "embeddings of the raw image vs of the reference processor's pixels",
                              "cosine": round(cosine(own, given), 6)}
    return result


def _first_per_aspect(records: list[VQARecord], images: dict[str, Image.Image]) -> dict[str, Image.Image]:
    samples: dict[str, Image.Image] = {}
    for r in records:
        samples.setdefault(r.aspect, images[r.image])
    return dict(sorted(samples.items()))


def evaluate_artifact(runtime: Runtime, *, fmt: str, tier: str, records: list[VQARecord], data_dir: Path,
                      reference_predictions: Path, model, processor, max_drop: float,
                      min_embedding_cosine: float, artifact_bytes: int, embedding_images: int = 64,
                      known_issue: str | None = None) -> dict:
    """The parity verdict of one artifact (see the module docstring); `passed` decides the gate.

    `known_issue` is a runtime defect the model family knows this artifact hits (family.known_issue):
    it never passes the gate, it only says why the embedding check fails, in the result and its reason.
    """
    started = time.perf_counter()
    reference = reference_scores(reference_predictions, records)
    images = {name: load_image(data_dir / name) for name in dict.fromkeys(r.image for r in records)}
    with tqdm(total=len(records), desc=f"{tier}-{fmt} answers", unit="q") as progress:
        predictions = runtime.answer([images[r.image] for r in records], [r.question for r in records], progress)
    scores, accuracy = score(records, predictions)
    stats = paired_drift(reference, scores)
    reference_accuracy = round(100.0 * sum(reference) / len(reference), 2)

    # Embeddings on a sample spread evenly over the eval images (they are ordered by generation).
    names = list(images)
    picked = names[:: max(1, len(names) // embedding_images)][:embedding_images]
    aspect_of = {r.image: r.aspect for r in records}
    embeddings = embedding_agreement(runtime, model, processor.image_processor, [images[n] for n in picked],
                                     [aspect_of[n] for n in picked])
    verdict = gate(stats["drift"], max_drop)
    verdict["min_embedding_cosine"] = min_embedding_cosine
    embeddings_pass = embeddings["mean"] >= min_embedding_cosine
    reasons = [] if verdict["passed"] else [f"accuracy drift {stats['drift']:+.2f} points beyond -{max_drop}"]
    if not embeddings_pass:
        reasons.append(f"image embedding cosine {embeddings['mean']:.4f} below {min_embedding_cosine}"
                       + (f" (known issue: {known_issue})" if known_issue else ""))
    verdict["passed"] = bool(verdict["passed"] and embeddings_pass)
    result = {
        "format": fmt, "tier": tier,
        "vqa_accuracy": accuracy["vqa_accuracy"], "reference_accuracy": reference_accuracy,
        **stats,
        "by_question_type": {"accuracy": accuracy["by_question_type"],
                             "drift": drift_by(records, reference, scores, "question_type")},
        "by_aspect": {"accuracy": accuracy["by_aspect"], "drift": drift_by(records, reference, scores, "aspect")},
        "image_embedding_cosine": embeddings,
        "preprocessing": preprocessing_check(runtime, model, processor.image_processor,
                                             _first_per_aspect(records, images)),
        "artifact_bytes": artifact_bytes,
        "threshold": {"max_drop": max_drop, "min_embedding_cosine": min_embedding_cosine},
        "passed": verdict["passed"],
    }
    if reasons:
        result["failure_reason"] = "; ".join(reasons)
    if known_issue and not embeddings_pass:
        result["known_issue"] = known_issue
    log.info("%s-%s: %.2f%% vs reference %.2f%% (drift %+.2f, 95%% CI %+.2f..%+.2f, flips %.1f%%), "
             "embedding cosine %.4f: %s in %.1fs", tier, fmt, result["vqa_accuracy"], reference_accuracy,
             stats["drift"], *stats["drift_ci95"], 100 * stats["flip_rate"], embeddings["mean"],
             "pass" if result["passed"] else "FAIL", time.perf_counter() - started)
    return result
