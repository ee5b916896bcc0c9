"""Benchmark: vision latency and decode speed of the ONNX exports next to PyTorch, in one run on this CPU.

Run from the repository root with the project's virtualenv (`make bench` runs it too):

    .venv/bin/python benchmarks/onnx_runtime.py                           # the bundled tiny model
    .venv/bin/python benchmarks/onnx_runtime.py --model artifacts/finetuned --data artifacts/data
    .venv/bin/python benchmarks/onnx_runtime.py --runs 200 --tokens 128 --threads 1 --fp16
    .venv/bin/python benchmarks/onnx_runtime.py --workdir /tmp/onnx-bench --keep   # keep the exports

It exports the model (`--model`, default models/tiny-llava-siglip) into a work directory three ways,
with the production exporters: ONNX fp32 as exported (`export_onnx_fp32`), ONNX optimised (fp32,
onnxscript fusions + ORT_ENABLE_EXTENDED: `export_onnx(precision=fp32)`), ONNX INT8
(`export_onnx(precision=int8)`, calibrated on `--calibration-images` training images of `--data`;
without `--data` a small synthetic dataset is generated in the work directory), and with `--fp16`
also ONNX FP16 (which on an x86 CPU runs most ops in float32 behind casts: a correctness build, not a
speed one). Then all variants are loaded side by side in this process, with the same thread count
(`--threads`, default: the runtime adapter's own default, min(cores, 4)) for torch and onnxruntime,
warmed up, and measured in `--repeats` rounds that visit every variant in turn (so that other load on
the machine hits each about equally); each figure is the median over the rounds:

- vision ms/image: the vision graph (tower + projector) on one preprocessed image, batch 1; per round the
  median of `--runs` calls (preprocessing excluded; torch: the family's `image_features` under
  inference_mode);
- prefill ms: the whole first step of an answer (vision + embedding + the prompt through the decoder
  into an empty KV cache), per round the fastest of 3;
- decode tok/s: `--tokens` greedy steps through the KV cache after that prompt (EOS ignored, so every
  variant does the same work), one token per decoder call. ONNX variants run through the runtime
  adapter (runtime/onnx_runtime.py: embedding graph + decoder graph per token, as a device app would);
  torch calls the transformers model with its DynamicCache.

The sizes are the three .onnx graphs (the torch row: the safetensors weights). Timings at this model size
are dominated by per-call overhead, not by arithmetic; other load on the machine shows as noise (the
load average is printed first).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_BASE = ROOT / "models" / "tiny-llava-siglip"
log = logging.getLogger("bench.onnx_runtime")


def default_threads() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 4))


def median_ms(fn, runs: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def sample(data_dir: Path):
    from vlm_factory.data.images import load_image
    from vlm_factory.data.records import read_jsonl

    split = data_dir / "eval.jsonl" if (data_dir / "eval.jsonl").is_file() else data_dir / "train.jsonl"
    record = read_jsonl(split)[0]
    return load_image(data_dir / record.image), record.question


class TorchRunner:
    """The transformers model in eager PyTorch, with its DynamicCache; prompt and vision from its family."""

    def __init__(self, model_dir: Path, image, question: str):
        from vlm_factory.model.checkpoint import load_model
        from vlm_factory.runtime.prompting import prompt_token_ids

        self.family, self.model, processor = load_model(model_dir)
        self.ids = torch.tensor([prompt_token_ids(self.family.prompt(processor), processor.tokenizer, question)])
        self.pixels = processor.image_processor([image], return_tensors="pt").pixel_values
        self.bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))

    @torch.inference_mode()
    def vision(self):
        return self.family.image_features(self.model, self.pixels)

    @torch.inference_mode()
    def prefill(self):
        out = self.model(input_ids=self.ids, pixel_values=self.pixels, use_cache=True)
        return out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

    @torch.inference_mode()
    def decode(self, state, tokens: int) -> None:
        cache, token = state
        for _ in range(tokens):
            out = self.model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)


class OnnxRunner:
    """An ONNX export through the runtime adapter (the parity gate's code path)."""

    def __init__(self, artifact_dir: Path, image, question: str, threads: int):
        from vlm_factory.runtime.onnx_runtime import OnnxRuntime

        self.rt = OnnxRuntime(artifact_dir, intra_op_threads=threads)
        self.image, self.question = image, question
        self.pixels = {"pixel_values": self.rt.pixel_values(image)}
        self.bytes = sum((artifact_dir / name).stat().st_size
                         for name in ("vision.onnx", "embedding.onnx", "text.onnx"))

    def vision(self):
        return self.rt._sessions["vision"].run(None, self.pixels)

    def prefill(self):
        return self.rt._prefill(self.image, self.question)

    def decode(self, state, tokens: int) -> None:
        logits, past, length = state
        for _ in range(tokens):
            token = int(np.argmax(logits))
            logits, past = self.rt._decode(self.rt._embed(np.asarray([[token]], dtype=np.int64)), past, length)
            length += 1


def measure(runners: dict, args) -> dict[str, dict]:
    """Rounds over all variants in turn, so that other load on the machine hits each about equally;
    each figure is the median over the rounds (vision: of each round's median of `--runs` calls)."""
    samples = {label: {"vision_ms": [], "prefill_ms": [], "tok_s": []} for label in runners}
    for runner in runners.values():  # warm-up: thread pools, allocator arenas, first-shape costs
        for _ in range(5):
            runner.vision()
        runner.decode(runner.prefill(), 4)
    for _ in range(args.repeats):
        for label, runner in runners.items():
            got = samples[label]
            got["vision_ms"].append(median_ms(runner.vision, args.runs, warmup=1))
            got["prefill_ms"].append(min(median_ms(runner.prefill, 1, warmup=0) for _ in range(3)))
            state = runner.prefill()
            started = time.perf_counter()
            runner.decode(state, args.tokens)
            got["tok_s"].append(args.tokens / (time.perf_counter() - started))
    return {label: {**{k: statistics.median(v) for k, v in got.items()}, "bytes": runners[label].bytes}
            for label, got in samples.items()}


def build_exports(model_dir: Path, data_dir: Path, work: Path, args) -> dict[str, Path]:
    from vlm_factory.export.onnx_export import export_onnx
    from vlm_factory.export.onnx_graphs import export_onnx_fp32

    exports = {"ONNX fp32": work / "onnx-fp32-exported", "ONNX optimised": work / "onnx-fp32-optimised",
               "ONNX INT8": work / "onnx-int8"}
    if args.fp16:
        exports["ONNX FP16"] = work / "onnx-fp16"
    for label, path in exports.items():
        started = time.perf_counter()
        if label == "ONNX fp32":
            export_onnx_fp32(model_dir, path)
        else:
            precision = {"ONNX optimised": "fp32", "ONNX INT8": "int8", "ONNX FP16": "fp16"}[label]
            export_onnx(model_dir, path, "benchmark", {"precision": precision, "ort_format": False}, data_dir,
                        calibration_images=args.calibration_images)
        log.info("%s exported in %.1fs", label, time.perf_counter() - started)
    return exports


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=BUNDLED_BASE, help="checkpoint directory (HF format) of a "
                                                                      "supported model family")
    parser.add_argument("--data", type=Path, help="dataset directory with train.jsonl (INT8 calibration) and "
                                                  "eval.jsonl; default: a small synthetic one in the work directory")
    parser.add_argument("--runs", type=int, default=50, help="vision calls per variant and round (median)")
    parser.add_argument("--tokens", type=int, default=64, help="greedy decode steps after the prompt")
    parser.add_argument("--repeats", type=int, default=10, help="rounds over all variants (median over rounds)")
    parser.add_argument("--threads", type=int, default=default_threads(), help="intra-op threads, torch and ORT")
    parser.add_argument("--calibration-images", type=int, default=32)
    parser.add_argument("--fp16", action="store_true", help="also benchmark the FP16 export")
    parser.add_argument("--workdir", type=Path, help="where to put the exports (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directory "
                                                            "(a --workdir is always kept)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "onnxruntime"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="onnx-bench."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        data_dir = args.data
        if data_dir is None:
            from vlm_factory.data.synthetic import build_dataset

            data_dir = work / "data"
            if not (data_dir / "train.jsonl").is_file():
                build_dataset(data_dir, seed=7, splits={"train": (max(args.calibration_images, 8), 1), "eval": (4, 1)},
                              cell_px=32)
        exports = build_exports(args.model, data_dir, work, args)
        image, question = sample(data_dir)
        runners = {"torch fp32 (eager)": TorchRunner(args.model, image, question)}
        runners.update((label, OnnxRunner(path, image, question, args.threads)) for label, path in exports.items())
        results = measure(runners, args)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    import onnxruntime
    import transformers

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    kept = f" | kept in {work}" if args.keep or args.workdir else ""
    print(f"\nmodel {args.model} | {args.threads} thread(s) | {args.repeats} rounds over all variants | "
          f"vision: batch 1, median of {args.runs} calls per round | decode: {args.tokens} greedy tokens after "
          f"the prompt\ntorch {torch.__version__}, transformers {transformers.__version__}, onnxruntime "
          f"{onnxruntime.__version__} | load average {load[0]:.2f} on {os.cpu_count()} CPUs{kept}")
    base = results["torch fp32 (eager)"]
    header = (f"{'variant':<20} {'MiB':>6} {'vision ms/img':>14} {'x torch':>8} {'prefill ms':>11} "
              f"{'decode tok/s':>13} {'x torch':>8}")
    print(header)
    print("-" * len(header))
    for label, r in results.items():
        print(f"{label:<20} {r['bytes'] / 2**20:>6.1f} {r['vision_ms']:>14.3f} "
              f"{base['vision_ms'] / r['vision_ms']:>8.2f} {r['prefill_ms']:>11.2f} {r['tok_s']:>13.0f} "
              f"{r['tok_s'] / base['tok_s']:>8.2f}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
