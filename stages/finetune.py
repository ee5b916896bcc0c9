"""Stage finetune: align a new projector between the frozen vision tower and the (frozen) LLM."""

import argparse
import contextlib
from pathlib import Path

from vlm_factory.config import load_params
from vlm_factory.data.records import read_jsonl
from vlm_factory.errors import exits_cleanly
from vlm_factory.logs import setup_logging
from vlm_factory.model.checkpoint import load_checkpoint, save_checkpoint
from vlm_factory.train.projector import finetune_projector


@exits_cleanly
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics-dir", type=Path, required=True, help="DVCLive output (loss curve)")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_params(args.params).train
    model, processor = load_checkpoint(args.base)
    records = read_jsonl(args.data / "train.jsonl")

    from accelerate import PartialState
    from dvclive import Live

    # Under `accelerate launch` every process trains; only the main one logs and writes outputs.
    main_process = PartialState().is_main_process
    with contextlib.ExitStack() as stack:
        log_loss = None
        if main_process:
            live = stack.enter_context(Live(str(args.metrics_dir), dvcyaml=None, save_dvc_exp=False, report=None))

            def log_loss(step: int, loss: float) -> None:
                live.step = step
                live.log_metric("train/loss", loss)

        model, _ = finetune_projector(model, processor, records, args.data, cfg, log_metric=log_loss)
    if main_process:
        save_checkpoint(model, processor, args.out)


if __name__ == "__main__":
    main()
