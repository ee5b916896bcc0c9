"""Stage export_gguf@<tier>: LLM + mmproj GGUF quantized by llama.cpp as the tier says, with its report."""

import argparse
from pathlib import Path

from vlm_factory.config import load_params, target_settings
from vlm_factory.errors import exits_cleanly
from vlm_factory.export.gguf_export import export_gguf, report_summary
from vlm_factory.io import write_json
from vlm_factory.logs import setup_logging


@exits_cleanly
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--tier", required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--summary", type=Path, required=True)
    args = parser.parse_args(argv)
    setup_logging()
    settings = target_settings(load_params(args.params), "gguf", args.tier, args.params)
    report = export_gguf(args.model, args.out, args.tier, settings)
    write_json(report_summary(report), args.summary)


if __name__ == "__main__":
    main()
