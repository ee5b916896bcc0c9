"""Stage download: the base model (hub or local, checksummed) and the VQA data (synthetic, hub or local)."""

import argparse
import logging
from pathlib import Path

from vlm_factory.config import load_params
from vlm_factory.data.sources import fetch_data
from vlm_factory.errors import exits_cleanly
from vlm_factory.families import family_of
from vlm_factory.logs import setup_logging
from vlm_factory.model.snapshot import fetch_model


@exits_cleanly
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model-out", type=Path, required=True)
    parser.add_argument("--data-out", type=Path, required=True)
    args = parser.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    fetch_model(params.model, args.model_out)
    family = family_of(args.model_out)
    # Say now, not after the fine-tune, which targets this model cannot go to: their stages record the refusal
    # and publishing leaves them out (the export stages ask the family again: `targets` is no dependency here).
    for fmt, by_tier in params.targets.items():
        reason = family.format_refusal(fmt)
        if by_tier and reason is not None:
            logging.getLogger("download").warning("%s targets refused (%s): model family %s cannot go to %s: %s",
                                                  fmt, ", ".join(by_tier), family.name, fmt, reason)
    logging.getLogger("download").info("model family %s (%s): %d image tokens per view, up to %d per image",
                                       family.name, family.variant, family.image_tokens,
                                       family.visual_tokens(family.load_processor(args.model_out)))
    fetch_data(params.data, args.data_out)


if __name__ == "__main__":
    main()
