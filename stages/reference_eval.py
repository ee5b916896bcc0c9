"""Stage reference_eval: greedy VQA accuracy of the fine-tuned PyTorch model, with its baselines."""

import argparse
from pathlib import Path

from vlm_factory.config import load_params
from vlm_factory.data.records import read_jsonl
from vlm_factory.errors import exits_cleanly
from vlm_factory.eval.reference import evaluate_reference
from vlm_factory.io import write_json, write_jsonl_rows
from vlm_factory.logs import setup_logging
from vlm_factory.model.checkpoint import load_checkpoint


@exits_cleanly
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_params(args.params).eval
    model, processor = load_checkpoint(args.model)
    metrics, rows = evaluate_reference(model, processor, read_jsonl(args.data / "eval.jsonl"), args.data,
                                       read_jsonl(args.data / "train.jsonl"), cfg.batch_size, cfg.vqa_metric,
                                       cfg.max_answer_tokens)
    write_jsonl_rows(rows, args.predictions)
    write_json(metrics, args.metrics)


if __name__ == "__main__":
    main()
