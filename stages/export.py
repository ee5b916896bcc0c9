"""Stage export_<format>@<tier>: one target's artifact, as the tier's settings say, with its report."""

import argparse
import logging
from pathlib import Path

from vlm_factory.config import load_params, target_settings
from vlm_factory.errors import exits_cleanly
from vlm_factory.export.targets import export_target, refused_target
from vlm_factory.families import family_of
from vlm_factory.io import write_json
from vlm_factory.logs import setup_logging


@exits_cleanly
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--format", required=True)
    parser.add_argument("--tier", required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="the dataset (calibration images come from train)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--summary", type=Path, required=True)
    args = parser.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    settings = target_settings(params, args.format, args.tier, args.params)
    reason = family_of(args.model).format_refusal(args.format)
    if reason is not None:
        logging.getLogger("export").warning("%s %s refused: %s", args.tier, args.format, reason)
        write_json(refused_target(args.format, args.tier, reason, args.out), args.summary)
        return
    _, summary = export_target(args.format, model_dir=args.model, out_dir=args.out, tier=args.tier,
                               settings=settings, data_dir=args.data, export_cfg=params.export,
                               context_tokens=params.tiers[args.tier].context_tokens)
    write_json(summary, args.summary)


if __name__ == "__main__":
    main()
