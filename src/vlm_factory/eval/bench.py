"""The bench a parity stage and the precision search judge artifacts on: one reference, one tier.

It holds what every measurement of a (model, tier) shares, loaded once: the reference model and its
eval-side data (artifact_parity.ReferenceSide), reference_eval's metrics, the tier, and the params the
exporters read. It exports a target or a variant as the export stage would, opens it as the parity stage
does, measures it through the gate, and attributes its drift to components (eval/attribution.py).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from vlm_factory.artifacts import artifact_bytes
from vlm_factory.budget import artifact_budget
from vlm_factory.config import Params
from vlm_factory.data.records import read_jsonl
from vlm_factory.eval.artifact_parity import ReferenceSide, evaluate_artifact
from vlm_factory.eval.attribution import attribute
from vlm_factory.eval.gates import GateThresholds
from vlm_factory.families import family_of
from vlm_factory.io import read_json
from vlm_factory.model.checkpoint import load_model
from vlm_factory.runtime.open import open_runtime


class Bench:
    """Reference side loaded on first use, so a broken artifact is refused (when opened) before any of it."""

    def __init__(self, params: Params, tier: str, *, model_dir: Path, data_dir: Path, reference_predictions: Path,
                 reference_metrics: Path):
        self.params, self.tier_name, self.tier = params, tier, params.tiers[tier]
        self.model_dir, self.data_dir = Path(model_dir), Path(data_dir)
        self._predictions, self._metrics = Path(reference_predictions), Path(reference_metrics)
        self.family = family_of(self.model_dir)
        self.processor = self.family.load_processor(self.model_dir)

    @cached_property
    def reference_metrics(self) -> dict:
        return read_json(self._metrics, missing=f"{self._metrics}: not found; run the reference_eval stage",
                         fix="run the reference_eval stage again")

    @cached_property
    def reference(self) -> ReferenceSide:
        _, model, processor = load_model(self.model_dir)
        return ReferenceSide.load(read_jsonl(self.data_dir / "eval.jsonl"), self.data_dir, self._predictions, model,
                                  processor, embedding_images=self.params.eval.embedding_images)

    @cached_property
    def context_tokens(self) -> int:
        """The context a runtime opens at: the tier's, bounded by the model's (the budget's own answer; it does
        not depend on the artifact)."""
        return artifact_budget(self.family, self.tier_name, self.tier, 0, self.processor)["context_tokens"]

    def export(self, fmt: str, settings: dict, out: Path) -> dict:
        """Export `settings` of `fmt` for this tier into `out`, as the export stage does; its summary."""
        from vlm_factory.export.targets import export_target

        _, summary = export_target(fmt, model_dir=self.model_dir, out_dir=out, tier=self.tier_name, settings=settings,
                                   data_dir=self.data_dir, export_cfg=self.params.export,
                                   context_tokens=self.tier.context_tokens)
        return summary

    def open(self, fmt: str, artifact: Path):
        """The artifact's runtime, at the tier's context (bounded by the model's) and KV cache type."""
        return open_runtime(fmt, artifact, context_tokens=self.context_tokens, kv_cache=self.tier.kv_cache_dtype)

    def evaluate(self, fmt: str, artifact: Path, thresholds: GateThresholds, label: str | None = None) -> dict:
        """The artifact's parity result with the gate's verdict, its budget included."""
        size = artifact_bytes(artifact)
        budget = artifact_budget(self.family, self.tier_name, self.tier, size, self.processor)
        with self.open(fmt, artifact) as runtime:
            return evaluate_artifact(
                runtime, fmt=fmt, tier=self.tier_name, reference=self.reference,
                reference_metrics=self.reference_metrics, thresholds=thresholds, artifact_bytes=size, budget=budget,
                max_new_tokens=self.params.eval.max_answer_tokens, vqa_metric=self.params.eval.vqa_metric,
                known_issue=self.family.known_issue(fmt), label=label)

    def attribute(self, fmt: str, settings: dict, target: dict | None = None) -> dict:
        """The target's drift by component, or why it was not measured."""
        if not self.params.eval.attribution:
            return {"skipped": "eval.attribution is false (set it true to attribute drift to components)"}
        return attribute(fmt, self.tier_name, settings, self.reference,
                         export=lambda variant, out: self.export(fmt, variant, out),
                         open_runtime=lambda artifact: self.open(fmt, artifact),
                         max_new_tokens=self.params.eval.max_answer_tokens, vqa_metric=self.params.eval.vqa_metric,
                         target=target)
