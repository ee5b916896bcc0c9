"""Stages pretrain_base and pretrain_mobilevlm_base (frozen): a bundled tiny base from scratch. Minutes to
an hour on a CPU.

Regenerate on purpose with `dvc unfreeze <stage> && dvc repro <stage>`.
"""

import argparse
from pathlib import Path

from vlm_factory.config import compose, load_params, parse_params
from vlm_factory.errors import UserError, exits_cleanly
from vlm_factory.logs import setup_logging
from vlm_factory.train.base import make_base


@exits_cleanly
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", help="a conf/model/ entry to build (default: the model of --params)")
    parser.add_argument("--stage", default="pretrain_base", help="the DVC stage running this (for the model card)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    setup_logging()
    source = f"conf/model/{args.model}.yaml" if args.model else args.params
    model = (parse_params(compose([f"model={args.model}"]), source) if args.model else load_params(args.params)).model
    if model.architecture is None or model.pretrain is None:
        raise UserError(f"{source}: model '{model.name}' has no architecture/pretrain recipe to build from")
    make_base(args.out, model.architecture, model.pretrain, stage=args.stage)


if __name__ == "__main__":
    main()
