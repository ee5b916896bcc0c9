"""The parity gate's verdict: every check an artifact must pass, each against its own threshold.

An artifact fails when any check fails, and the verdict names each failing one. The checks:

- accuracy: drift (point estimate) below `-max_drop`; the worst aspect's drift below `-max_aspect_drop`;
  flip rate (questions right in one and wrong in the other) above `max_flip_rate`. When the reference is
  within `min_informative_margin` points of the blind baseline, accuracy says nothing about whether the
  artifact computes what the model computes (a random model scores 0 % in every runtime): these checks are
  then reported as uninformative, neither passing nor failing, and the agreement checks decide;
- agreement with the reference model itself, meaningful for any model: the share of questions whose
  normalised answer equals the reference's own (`min_answer_agreement`); on every question, whether the
  first answer token's top-1 agrees (`min_first_token_agreement`) and the mean KL divergence
  KL(reference || artifact) of the two first-token distributions (`max_first_token_kl`);
- vision: the image-embedding cosine with the PyTorch model's, mean and worst aspect; the preprocessing
  check's cosine on every aspect (square, tall, wide);
- budget (budget.artifact_budget): the artifact's bytes, the KV cache at the tier's context and one image's
  vision activations within the tier's memory; `images_per_prompt` images plus `min_text_tokens` within
  its context.

Why the drift check uses the point estimate and not a confidence bound: at our n (1,080 questions) the
paired 95 % CI is 0.4 to 1.7 points wide on each side for an artifact that flips 0.4 % to 8 % of the
answers, as wide as the thresholds themselves (0.2 to 2 points). Gating on the lower bound would fail
faithful artifacts whose drift is 0 (false fails on every 8-bit target); gating on the upper bound
would pass any artifact on a small eval set. The point estimate is unbiased; what it cannot see, an
artifact that loses as many answers as it gains, is what the flip-rate and agreement checks catch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from vlm_factory.errors import UserError

# The setting of a target that picks its per-precision thresholds (eval.<table>.<format>.<setting>).
GATE_SETTING = {"gguf": "llm", "onnx": "precision", "coreml": "nbits", "tflite": "precision"}
# Thresholds chosen per (format, setting), and per format only.
PER_SETTING = ("max_drop", "max_aspect_drop", "max_flip_rate", "min_answer_agreement", "min_first_token_agreement",
               "max_first_token_kl")
PER_FORMAT = ("min_embedding_cosine", "min_aspect_embedding_cosine", "min_preprocessing_cosine")


@dataclass(frozen=True)
class GateThresholds:
    max_drop: float  # points
    max_aspect_drop: float  # points, on the worst of square / tall / wide
    max_flip_rate: float  # share of questions
    min_answer_agreement: float  # share of questions
    min_first_token_agreement: float  # share of questions
    max_first_token_kl: float  # nats, mean over questions
    min_embedding_cosine: float
    min_aspect_embedding_cosine: float
    min_preprocessing_cosine: float
    min_informative_margin: float  # points the reference must lie above the blind baseline


def gate_thresholds(eval_cfg, fmt: str, tier: str, settings: dict) -> GateThresholds:
    """Every threshold of one target, or a one-line error naming the missing key."""
    setting = str(settings.get(GATE_SETTING[fmt], ""))
    values = {}
    for table in PER_SETTING:
        by_setting = {str(k).upper(): v for k, v in getattr(eval_cfg, table).get(fmt, {}).items()}
        if setting.upper() not in by_setting:
            raise UserError(f"key 'eval.{table}.{fmt}' has no threshold for {setting!r} "
                            f"(targets.{fmt}.{tier}.{GATE_SETTING[fmt]}); add one in conf/eval/")
        values[table] = float(by_setting[setting.upper()])
    for table in PER_FORMAT:
        if fmt not in getattr(eval_cfg, table):
            raise UserError(f"key 'eval.{table}.{fmt}' is missing; add it in conf/eval/")
        values[table] = float(getattr(eval_cfg, table)[fmt])
    return GateThresholds(**values, min_informative_margin=float(eval_cfg.min_informative_margin))


def _check(name: str, value: float, limit: float, *, at_least: bool, informative: bool = True,
           detail: str = "") -> dict:
    ok = value >= limit if at_least else value <= limit
    status = "uninformative" if not informative else ("pass" if ok else "fail")
    return {"check": name, "value": round(float(value), 6), "limit": limit, "at_least": at_least,
            "status": status, **({"detail": detail} if detail else {})}


def gate_checks(result: dict, t: GateThresholds, informative: bool) -> list[dict]:
    """Every check of one parity result (artifact_parity.evaluate_artifact's fields; the budget checks where
    it was measured against a tier)."""
    aspect_drift = result["by_aspect"]["drift"]
    worst_aspect = min(aspect_drift, key=aspect_drift.get)
    embeddings = result["image_embedding_cosine"]["by_aspect"]
    worst_embedding = min(embeddings, key=embeddings.get)
    preprocessing = {aspect: v["cosine"] for aspect, v in result["preprocessing"].items()}
    worst_preprocessing = min(preprocessing, key=preprocessing.get)
    agreement = result["agreement"]
    return [
        _check("drift", result["drift"], -t.max_drop, at_least=True, informative=informative),
        _check("worst_aspect_drift", aspect_drift[worst_aspect], -t.max_aspect_drop, at_least=True,
               informative=informative, detail=worst_aspect),
        _check("flip_rate", result["flip_rate"], t.max_flip_rate, at_least=False, informative=informative),
        _check("answer_agreement", agreement["answers"], t.min_answer_agreement, at_least=True),
        _check("first_token_agreement", agreement["first_token_top1"], t.min_first_token_agreement, at_least=True),
        _check("first_token_kl", agreement["first_token_kl"], t.max_first_token_kl, at_least=False),
        _check("embedding_cosine", result["image_embedding_cosine"]["mean"], t.min_embedding_cosine, at_least=True),
        _check("worst_aspect_embedding_cosine", embeddings[worst_embedding], t.min_aspect_embedding_cosine,
               at_least=True, detail=worst_embedding),
        _check("preprocessing_cosine", preprocessing[worst_preprocessing], t.min_preprocessing_cosine, at_least=True,
               detail=worst_preprocessing),
        *(budget_checks(result["budget"]) if "budget" in result else []),
    ]


def budget_checks(budget: dict) -> list[dict]:
    """Memory in MiB against the tier's budget; the context tokens a prompt needs against the context."""
    mib = 2**20
    return [
        _check("memory_mib", budget["total_bytes"] / mib, budget["memory_budget_bytes"] / mib, at_least=False,
               detail=f"weights {budget['weights_bytes_in_memory'] / mib:.1f} + KV cache "
                      f"{budget['kv_cache_bytes_at_context'] / mib:.1f} + vision activations "
                      f"{budget['vision_activation_bytes'] / mib:.1f} MiB"),
        _check("context_tokens_needed", budget["context_tokens_needed"], budget["context_tokens"], at_least=False,
               detail=f"{budget['images_per_prompt']} x {budget['visual_tokens_per_image']} image + "
                      f"{budget['min_text_tokens']} text tokens"),
    ]


def describe(check: dict) -> str:
    """'flip_rate 0.0824 above 0.03' (with the aspect where the check looks at the worst one, and the known
    runtime issue that explains a failing check)."""
    where = f" ({check['detail']})" if "detail" in check else ""
    relation = "below" if check["at_least"] else "above"
    known = f" (known issue: {check['known_issue']})" if "known_issue" in check else ""
    return f"{check['check']}{where} {check['value']:g} {relation} {check['limit']:g}{known}"


def verdict(result: dict, t: GateThresholds, reference_accuracy: float, blind_accuracy: float,
            known_issue: str | None = None) -> dict:
    """The gate fields of a parity result: passed, every check, the failing reasons, the thresholds.

    `known_issue`: a runtime defect the model family knows this artifact's vision path hits
    (family.known_issue); it never passes a check, it explains a failing embedding check.
    """
    informative = reference_accuracy - blind_accuracy >= t.min_informative_margin
    checks = gate_checks(result, t, informative)
    failed = [c for c in checks if c["status"] == "fail"]
    explained = [c for c in failed if known_issue and "embedding_cosine" in c["check"]]
    for check in explained:
        check["known_issue"] = known_issue
    fields = {"checks": checks, "accuracy_informative": informative, "threshold": asdict(t),
              "passed": not failed}
    if failed:
        fields["failure_reason"] = "; ".join(describe(c) for c in failed)
    if explained:
        fields["known_issue"] = known_issue
    if not informative:
        fields["note"] = (f"reference {reference_accuracy:.2f} % is within {t.min_informative_margin} points of the "
                          f"blind baseline {blind_accuracy:.2f} %: accuracy checks are uninformative, agreement decides")
    return fields


def gate_table(results: dict[str, dict]) -> str:
    """One line per target, failures first, with the reasons it failed."""
    rows = sorted(results.items(), key=lambda kv: (kv[1]["passed"], kv[0]))
    width = max((len(name) for name in results), default=6)
    lines = [f"{'target':<{width}}  verdict  drift (95% CI)            flips   agree  emb. cosine  reasons"]
    for name, v in rows:
        low, high = v["drift_ci95"]
        lines.append(f"{name:<{width}}  {'pass' if v['passed'] else 'FAIL':<7}  {v['drift']:+7.2f} "
                     f"({low:+.2f}, {high:+.2f})  {100 * v['flip_rate']:5.1f}%  {v['agreement']['answers']:.3f}  "
                     f"{v['image_embedding_cosine']['mean']:.4f}       {v.get('failure_reason', '')}"
                     + (f" [drift by component: {v['attribution']['summary']}]"
                        if not v["passed"] and "summary" in v.get("attribution", {}) else ""))
    return "\n".join(lines)
