"""Stage parity_<format>@<tier>: the artifact, in its own runtime, against the reference; exits 1 if its gate fails."""

import argparse
from pathlib import Path

from vlm_factory.artifacts import artifact_bytes
from vlm_factory.budget import artifact_budget
from vlm_factory.config import load_params, target_settings
from vlm_factory.data.records import read_jsonl
from vlm_factory.errors import GateFailed, exits_cleanly
from vlm_factory.eval.artifact_parity import evaluate_artifact
from vlm_factory.eval.gates import gate_table, gate_thresholds
from vlm_factory.export.targets import refused_target
from vlm_factory.families import family_of
from vlm_factory.io import read_json, write_json
from vlm_factory.logs import setup_logging
from vlm_factory.model.checkpoint import load_model
from vlm_factory.runtime.open import open_runtime


@exits_cleanly
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--format", required=True)
    parser.add_argument("--tier", required=True)
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True, help="the reference (fine-tuned) checkpoint")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--reference", type=Path, required=True, help="reference_eval's predictions.jsonl")
    parser.add_argument("--reference-metrics", type=Path, required=True, help="reference_eval's metrics")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    settings = target_settings(params, args.format, args.tier, args.params)
    thresholds = gate_thresholds(params.eval, args.format, args.tier, settings)
    tier = params.tiers[args.tier]
    reason = family_of(args.model).format_refusal(args.format)
    if reason is not None:  # nothing was exported (stage export): nothing to gate, nothing to publish
        write_json(refused_target(args.format, args.tier, reason), args.out)
        return
    family, model, processor = load_model(args.model)
    size = artifact_bytes(args.artifact)
    budget = artifact_budget(family, args.tier, tier, size, processor)
    with open_runtime(args.format, args.artifact, context_tokens=budget["context_tokens"],
                      kv_cache=tier.kv_cache_dtype) as runtime:
        reference_metrics = read_json(args.reference_metrics, missing=f"{args.reference_metrics}: not found; run "
                                      "the reference_eval stage", fix="run the reference_eval stage again")
        result = evaluate_artifact(
            runtime, fmt=args.format, tier=args.tier, records=read_jsonl(args.data / "eval.jsonl"), data_dir=args.data,
            reference_predictions=args.reference, reference_metrics=reference_metrics, model=model,
            processor=processor, thresholds=thresholds, artifact_bytes=size, budget=budget,
            embedding_images=params.eval.embedding_images, max_new_tokens=params.eval.max_answer_tokens,
            vqa_metric=params.eval.vqa_metric, known_issue=family.known_issue(args.format))
    write_json(result, args.out)
    if not result["passed"]:
        raise GateFailed(gate_table({f"{args.tier}-{args.format}": result}))


if __name__ == "__main__":
    main()
