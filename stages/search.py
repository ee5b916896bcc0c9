"""Stage search@<tier>-<format>: the smallest artifact of one (tier, format) that passes its gate (eval/search.py)."""

import argparse
from pathlib import Path

from vlm_factory.config import load_params
from vlm_factory.errors import UserError, exits_cleanly
from vlm_factory.eval.search import plot_points, render_picture, run, table
from vlm_factory.io import write_json
from vlm_factory.logs import setup_logging


@exits_cleanly
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--key", required=True, help="the entry of search.targets")
    parser.add_argument("--model", type=Path, required=True, help="the reference (fine-tuned) checkpoint")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--reference", type=Path, required=True, help="reference_eval's predictions.jsonl")
    parser.add_argument("--reference-metrics", type=Path, required=True, help="reference_eval's metrics")
    parser.add_argument("--out", type=Path, required=True, help="the search's table (JSON)")
    parser.add_argument("--points", type=Path, required=True, help="one row per candidate, for dvc plots")
    parser.add_argument("--picture", type=Path, required=True, help="accuracy vs size (PNG)")
    args = parser.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    if args.key not in params.search.targets:
        raise UserError(f"{args.params}: no key 'search.targets.{args.key}'; known: {', '.join(params.search.targets)}")
    entry = params.search.targets[args.key]
    result = run(params, entry.tier, entry.format, model_dir=args.model, data_dir=args.data,
                 reference_predictions=args.reference, reference_metrics=args.reference_metrics, mode=entry.evaluate)
    write_json(result, args.out)
    write_json(plot_points(result), args.points)
    render_picture(result, args.picture)
    print(table(result))


if __name__ == "__main__":
    main()
