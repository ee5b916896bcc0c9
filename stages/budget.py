"""Stage budget@<tier>: visual tokens, KV cache, weights and what fits, for one device tier."""

import argparse
from pathlib import Path

from vlm_factory.budget import tier_budget
from vlm_factory.config import load_params
from vlm_factory.errors import UserError, exits_cleanly
from vlm_factory.families import family_of
from vlm_factory.io import write_json
from vlm_factory.logs import setup_logging


@exits_cleanly
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--tier", required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    setup_logging()
    tiers = load_params(args.params).tiers
    if args.tier not in tiers:
        raise UserError(f"{args.params}: no tier '{args.tier}' under 'tiers'; known: {', '.join(tiers)}")
    family = family_of(args.model)
    write_json(tier_budget(family, args.tier, tiers[args.tier], family.load_processor(args.model)), args.out)


if __name__ == "__main__":
    main()
