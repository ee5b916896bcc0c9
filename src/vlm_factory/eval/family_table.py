"""One model's whole result in one small file: reference, every target's parity verdict, its releases.

`vlm-factory family-table` writes it after a run (e.g. `dvc exp run -S model=tiny_qwen2`), so each
bundled family's numbers are committed side by side (`metrics/families/<model>.json`) while the
pipeline's own metrics files hold the default model's.
"""

from __future__ import annotations

from pathlib import Path

from vlm_factory.families import family_of
from vlm_factory.io import read_json


def _read(path: Path) -> dict:
    return read_json(path, missing=f"{path}: not found; run the pipeline (dvc repro or dvc exp run) first",
                     fix="run the pipeline again")


def family_table(model_name: str, model_dir: Path, metrics_dir: Path) -> dict:
    """Reference accuracy, blind baseline and per-target parity of the model the pipeline last built."""
    family = family_of(model_dir)
    reference = _read(metrics_dir / "reference.json")
    targets = {}
    refused = {}
    for path in sorted((metrics_dir / "parity").glob("*.json")):
        verdict = _read(path)
        if "refused" in verdict:  # a format the family cannot go to: no artifact, no verdict
            refused[path.stem] = verdict["refused"]
            continue
        targets[path.stem] = {
            "format": verdict["format"], "tier": verdict["tier"], "vqa_accuracy": verdict["vqa_accuracy"],
            "drift": verdict["drift"], "drift_ci95": verdict["drift_ci95"], "flip_rate": verdict["flip_rate"],
            "embedding_cosine": verdict["image_embedding_cosine"]["mean"],
            "answer_agreement": verdict["agreement"]["answers"],
            "first_token_kl": verdict["agreement"]["first_token_kl"],
            "artifact_bytes": verdict["artifact_bytes"], "threshold": verdict["threshold"],
            "passed": verdict["passed"], **({"failure_reason": verdict["failure_reason"]}
                                            if "failure_reason" in verdict else {})}
    published = _read(metrics_dir / "publish.json").get("releases", {}) if (metrics_dir / "publish.json").is_file() else {}
    processor = family.load_processor(model_dir)
    return {"model": model_name, "family": family.name, "variant": family.variant,
            "image_tokens": family.image_tokens, "views_per_image": family.max_views(processor),
            "visual_tokens_per_image": family.visual_tokens(processor), "reference_accuracy": reference["vqa_accuracy"],
            "blind_baseline": reference["blind_baseline"]["vqa_accuracy"],
            "reference_by_aspect": reference["by_aspect"], "targets": targets, "refused": refused,
            "releases": {tier: {"version": r["version"], "formats": r["formats"]} for tier, r in published.items()},
            "all_passed": bool(targets) and all(t["passed"] for t in targets.values())}


def family_markdown(table: dict) -> str:
    """The table as README markdown: one row per (tier, format)."""
    lines = [f"{table['model']} ({table['variant']}): reference {table['reference_accuracy']:.2f} %, "
             f"blind baseline {table['blind_baseline']:.2f} %", "",
             "| target | accuracy | drift (95 % CI) | flips | answers agree | 1st-token KL | emb. cosine | MiB | gate |",
             "| --- |" + " --- |" * 8]
    for name, t in table["targets"].items():
        low, high = t["drift_ci95"]
        verdict = "pass" if t["passed"] else f"FAIL: {t.get('failure_reason', '')}"
        lines.append(f"| {name} | {t['vqa_accuracy']:.2f} % | {t['drift']:+.2f} ({low:+.2f}, {high:+.2f}) | "
                     f"{100 * t['flip_rate']:.1f} % | {100 * t['answer_agreement']:.1f} % | {t['first_token_kl']:.4f} | "
                     f"{t['embedding_cosine']:.4f} | {t['artifact_bytes'] / 2**20:.1f} | {verdict} |")
    for name, reason in table.get("refused", {}).items():
        lines.append(f"| {name} | refused: {reason} |" + " |" * 7)
    return "\n".join(lines) + "\n"
