"""Run one exported artifact, in its own runtime, through the parity gate against the reference model.

Every format uses this: a runtime adapter answers the reference's eval questions and encodes
images; this module pairs its per-question scores and answers with the reference's, compares its
first-token distributions with the PyTorch model's on every question, measures how close its image
embeddings are to the PyTorch model's, checks its preprocessing on square, tall and wide images, and
returns the result with eval/gates.py's verdict, written to `metrics/parity/<tier>-<format>.json`.

A runtime adapter provides `iter_answers(images, questions, progress, max_new_tokens)` (each answer with
its first-token logits) and `image_embeddings(image)`; one that exposes its pixel input also provides
`pixel_values(image)` (compared with the reference processor's directly), otherwise preprocessing is
checked through the embeddings of the raw image against those of the reference processor's own pixels
fed to the same runtime.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from vlm_factory.data.images import load_image
from vlm_factory.data.records import VQARecord
from vlm_factory.errors import UserError
from vlm_factory.eval.gates import GateThresholds, verdict
from vlm_factory.eval.generate import first_token_log_probs
from vlm_factory.eval.parity import CORRECT_AT, answer_agreement, drift_by, first_token_agreement, paired_drift
from vlm_factory.eval.reference import score
from vlm_factory.families import family_for
from vlm_factory.model.prompt import MAX_ANSWER_TOKENS, Answer

log = logging.getLogger(__name__)

# Flipped questions a parity result lists (`flips`); `flips_total` counts them all. Enough to look at
# in a report, small enough to keep metrics files diffable in git.
MAX_FLIPS_LISTED = 50


class Runtime(Protocol):
    def iter_answers(self, images: list[Image.Image], questions: list[str], progress=None,
                     max_new_tokens: int = MAX_ANSWER_TOKENS) -> Iterator[Answer]: ...

    def image_embeddings(self, image: Image.Image) -> np.ndarray: ...


def reference_answers(path: Path, records: list[VQARecord]) -> tuple[list[float], list[str]]:
    """The reference model's per-question scores and answers, in the order of `records`."""
    if not path.is_file():
        raise UserError(f"{path}: reference predictions not found; run the reference_eval stage")
    by_id = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            by_id[row["question_id"]] = row
    missing = [r.question_id for r in records if r.question_id not in by_id]
    if missing:
        raise UserError(f"{path}: no reference score for {len(missing)} eval question(s) (e.g. {missing[0]}); "
                        "re-run reference_eval on the same data")
    return [by_id[r.question_id]["score"] for r in records], [by_id[r.question_id]["prediction"] for r in records]


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


@dataclass
class ReferenceSide:
    """Everything a parity measurement compares an artifact with, computed once per stage: the eval records
    and images, the reference model's scores and answers (reference_eval's predictions), its first-token
    log-probs on every question and its image embeddings on the embedding sample. A parity stage measures
    the target and every attribution variant against the same object; a search, every candidate."""

    records: list[VQARecord]
    images: dict[str, Image.Image]
    scores: list[float]
    answers: list[str]
    first_token_log_probs: list[np.ndarray]
    embedding_images: list[Image.Image]
    embedding_aspects: list[str]
    embeddings: list[np.ndarray]
    model: object
    processor: object

    @classmethod
    def load(cls, records: list[VQARecord], data_dir: Path, reference_predictions: Path, model, processor,
             embedding_images: int = 64) -> "ReferenceSide":
        scores, answers = reference_answers(reference_predictions, records)
        images = {name: load_image(data_dir / name) for name in dict.fromkeys(r.image for r in records)}
        log_probs = first_token_log_probs(model, processor, [images[r.image] for r in records],
                                          [r.question for r in records], progress="reference first-token logits")
        # Embeddings on a sample spread evenly over the eval images (they are ordered by generation).
        names = list(images)
        picked = names[:: max(1, len(names) // embedding_images)][:embedding_images]
        aspect_of = {r.image: r.aspect for r in records}
        sample = [images[n] for n in picked]
        return cls(records, images, scores, answers, list(log_probs), sample, [aspect_of[n] for n in picked],
                   reference_embeddings(model, processor.image_processor, sample), model, processor)

    @property
    def accuracy(self) -> float:
        return round(100.0 * sum(self.scores) / len(self.scores), 2)


def run_answers(runtime: Runtime, label: str, reference: ReferenceSide, max_new_tokens: int) -> tuple[list[str], dict]:
    """The runtime's answers, and how its first-token distributions agree with the reference model's on every
    question (top-1 share, mean KL) and how many answers the length cap cut."""
    records = reference.records
    answers, top1, kls, truncated = [], 0, [], 0
    with tqdm(total=len(records), desc=f"{label} answers", unit="q") as progress:
        for index, answer in enumerate(runtime.iter_answers([reference.images[r.image] for r in records],
                                                            [r.question for r in records], progress, max_new_tokens)):
            same, kl = first_token_agreement(reference.first_token_log_probs[index], answer.first_logits)
            answers.append(answer.text)
            top1 += same
            kls.append(kl)
            truncated += answer.truncated
    stats = {"first_token_top1": round(top1 / len(records), 4), "first_token_kl": round(float(np.mean(kls)), 6),
             "first_token_kl_max": round(float(np.max(kls)), 6), "truncated_answers": truncated,
             "max_answer_tokens": max_new_tokens}
    return answers, stats


def embedding_agreement(runtime: Runtime, images: list[Image.Image], expected: list[np.ndarray],
                        aspects: list[str]) -> dict:
    """Cosine similarity of the runtime's image embeddings with the reference's (`expected`, from
    reference_embeddings): mean, min, per aspect."""
    cosines = [cosine(runtime.image_embeddings(image), ref) for image, ref in zip(images, expected)]
    by_aspect = defaultdict(list)
    for aspect, value in zip(aspects, cosines):
        by_aspect[aspect].append(value)
    return {"mean": round(float(np.mean(cosines)), 6), "min": round(float(np.min(cosines)), 6),
            "n_images": len(cosines), "by_aspect": {k: round(float(np.mean(v)), 6) for k, v in sorted(by_aspect.items())}}


def flipped_questions(reference: ReferenceSide, scores: list[float], predictions: list[str],
                      limit: int = MAX_FLIPS_LISTED) -> dict:
    """The questions whose correctness differs between the reference and the artifact, by the flip rate's own
    rule (eval/parity.py: correct means a score of at least CORRECT_AT), so `flips_total / n_questions` is
    the flip rate. Lost answers (right in the reference, wrong in the artifact) come first, each group by
    question id; at most `limit` are listed."""
    flips = []
    for record, ref_score, ref_answer, score_, answer in zip(reference.records, reference.scores, reference.answers,
                                                            scores, predictions):
        if (ref_score >= CORRECT_AT) == (score_ >= CORRECT_AT):
            continue
        flips.append({"question_id": record.question_id, "image": record.image, "question": record.question,
                      "question_type": record.question_type, "aspect": record.aspect,
                      "reference_answer": ref_answer, "artifact_answer": answer,
                      "reference_score": round(float(ref_score), 4), "artifact_score": round(float(score_), 4)})
    flips.sort(key=lambda f: (f["artifact_score"] >= CORRECT_AT, f["question_id"]))
    return {"flips": flips[:limit], "flips_total": len(flips)}


def headline(measured: dict, precisions: dict[str, str], size: int) -> dict:
    """One row of a comparison of artifacts (drift attribution, the precision search): the numbers a gate
    reads, out of a `measure()` (or parity) result, with the precisions and bytes of the artifact."""
    agreement, embeddings = measured["agreement"], measured["image_embedding_cosine"]
    return {"precisions": precisions, "artifact_bytes": size, "vqa_accuracy": measured["vqa_accuracy"],
            "drift": measured["drift"], "flip_rate": measured["flip_rate"], "answer_agreement": agreement["answers"],
            "first_token_top1": agreement["first_token_top1"], "first_token_kl": agreement["first_token_kl"],
            "embedding_cosine": embeddings["mean"], "embedding_cosine_min": embeddings["min"]}


def measure(runtime: Runtime, reference: ReferenceSide, label: str, *, max_new_tokens: int = MAX_ANSWER_TOKENS,
            vqa_metric: str = "official") -> dict:
    """What one runtime computes against the reference: accuracy and paired drift (overall, per question
    type, per aspect), agreement with the reference's answers and first-token distributions, and the
    image-embedding cosine. The gate's inputs, without the preprocessing and budget checks; and the flipped
    questions themselves, for a person to look at."""
    records = reference.records
    predictions, agreement = run_answers(runtime, label, reference, max_new_tokens)
    agreement["answers"] = round(answer_agreement(reference.answers, predictions), 4)
    scores, accuracy = score(records, predictions, vqa_metric)
    return {
        "vqa_metric": vqa_metric, "vqa_accuracy": accuracy["vqa_accuracy"], "reference_accuracy": reference.accuracy,
        **paired_drift(reference.scores, scores),
        **flipped_questions(reference, scores, predictions),
        "agreement": agreement,
        "by_question_type": {"accuracy": accuracy["by_question_type"],
                             "drift": drift_by(records, reference.scores, scores, "question_type")},
        "by_aspect": {"accuracy": accuracy["by_aspect"], "drift": drift_by(records, reference.scores, scores, "aspect")},
        "image_embedding_cosine": embedding_agreement(runtime, reference.embedding_images, reference.embeddings,
                                                      reference.embedding_aspects),
    }


def evaluate_artifact(runtime: Runtime, *, fmt: str, tier: str, reference: ReferenceSide, reference_metrics: dict,
                      thresholds: GateThresholds, artifact_bytes: int, max_new_tokens: int = MAX_ANSWER_TOKENS,
                      vqa_metric: str = "official", budget: dict | None = None, known_issue: str | None = None,
                      label: str | None = None) -> dict:
    """The parity verdict of one artifact (see the module docstring; eval/gates.py judges it).

    `reference_metrics`: reference_eval's metrics (its accuracy and blind baseline say whether accuracy
    can tell anything here). `budget`: budget.artifact_budget for the target's tier (gated when given).
    `known_issue` is a runtime defect the model family knows this artifact hits (family.known_issue): it
    never passes the gate, it only says why an embedding check fails.
    """
    started = time.perf_counter()
    label = label or f"{tier}-{fmt}"
    model, processor = reference.model, reference.processor
    result = {"format": fmt, "tier": tier,
              **measure(runtime, reference, label, max_new_tokens=max_new_tokens, vqa_metric=vqa_metric),
              "preprocessing": preprocessing_check(runtime, model, processor.image_processor,
                                                   _first_per_aspect(reference.records, reference.images)),
              "artifact_bytes": artifact_bytes,
              **({"budget": budget} if budget is not None else {})}
    result.update(verdict(result, thresholds, reference_metrics["vqa_accuracy"],
                          reference_metrics["blind_baseline"]["vqa_accuracy"], known_issue))
    agreement = result["agreement"]
    log.info("%s: %.2f%% vs reference %.2f%% (drift %+.2f, 95%% CI %+.2f..%+.2f, flips %.1f%%), answers agree "
             "%.1f%%, first token top-1 %.1f%% KL %.4f, embedding cosine %.4f: %s in %.1fs", label,
             result["vqa_accuracy"], reference.accuracy, result["drift"], *result["drift_ci95"],
             100 * result["flip_rate"], 100 * agreement["answers"], 100 * agreement["first_token_top1"],
             agreement["first_token_kl"], result["image_embedding_cosine"]["mean"],
             "pass" if result["passed"] else f"FAIL ({result['failure_reason']})", time.perf_counter() - started)
    if agreement["truncated_answers"]:
        log.warning("%s: %d of %d answers hit the %d-token cap without EOS", label, agreement["truncated_answers"],
                    len(reference.records), max_new_tokens)
    return result
