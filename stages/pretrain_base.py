"""Stage pretrain_base (frozen): make the bundled tiny base from scratch. Minutes to an hour on a CPU.

Regenerate on purpose with `dvc unfreeze pretrain_base && dvc repro pretrain_base`.
"""

import argparse
from pathlib import Path

from vlm_factory.config import load_params
from vlm_factory.errors import UserError, exits_cleanly
from vlm_factory.logs import setup_logging
from vlm_factory.train.base import make_base


@exits_cleanly
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    setup_logging()
    model = load_params(args.params).model
    if model.architecture is None or model.pretrain is None:
        raise UserError(f"{args.params}: model '{model.name}' has no architecture/pretrain recipe to build from")
    make_base(args.out, model.architecture, model.pretrain)


if __name__ == "__main__":
    main()
