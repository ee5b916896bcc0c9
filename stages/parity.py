"""Stage parity_<format>@<tier>: the artifact, in its own runtime, against the reference; exits 1 if its gate fails."""

import argparse
from pathlib import Path

from vlm_factory.config import load_params, target_settings
from vlm_factory.errors import GateFailed, exits_cleanly
from vlm_factory.eval.bench import Bench
from vlm_factory.eval.gates import gate_table, gate_thresholds
from vlm_factory.export.targets import refused_target
from vlm_factory.families import family_of
from vlm_factory.io import write_json
from vlm_factory.logs import setup_logging


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
    reason = family_of(args.model).format_refusal(args.format)
    if reason is not None:  # nothing was exported (stage export): nothing to gate, nothing to publish
        write_json(refused_target(args.format, args.tier, reason), args.out)
        return
    bench = Bench(params, args.tier, model_dir=args.model, data_dir=args.data, reference_predictions=args.reference,
                  reference_metrics=args.reference_metrics)
    result = bench.evaluate(args.format, args.artifact, thresholds)
    result["attribution"] = bench.attribute(args.format, settings, target=result)
    write_json(result, args.out)
    if not result["passed"]:
        raise GateFailed(gate_table({f"{args.tier}-{args.format}": result}))


if __name__ == "__main__":
    main()
