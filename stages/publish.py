"""Stage publish: refuse unless every parity gate passed; then one verified, immutable release per tier."""

import argparse
from pathlib import Path

from vlm_factory.config import load_params
from vlm_factory.errors import exits_cleanly
from vlm_factory.io import write_json
from vlm_factory.logs import setup_logging
from vlm_factory.publish.run import publish_tiers


@exits_cleanly
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--exports", type=Path, required=True)
    parser.add_argument("--parity", type=Path, required=True)
    parser.add_argument("--budgets", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="record of what was published where")
    args = parser.parse_args(argv)
    setup_logging()
    record = publish_tiers(load_params(args.params), export_root=args.exports, parity_dir=args.parity,
                           budget_dir=args.budgets, model_dir=args.model, data_dir=args.data,
                           params_path=args.params, repo=Path.cwd())
    write_json(record, args.out)


if __name__ == "__main__":
    main()
