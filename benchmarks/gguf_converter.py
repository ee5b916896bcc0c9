"""Benchmark: wall time and peak memory of our GGUF converter on a larger random LLaVA.

Run from the repository root with the project's virtualenv:

    .venv/bin/python benchmarks/gguf_converter.py                     # ~0.55B params, F16
    .venv/bin/python benchmarks/gguf_converter.py --file-type F16 F32
    .venv/bin/python benchmarks/gguf_converter.py --hidden 2048 --workdir /tmp/bench --keep

The script first writes a random-weight LLaVA checkpoint in HF format: the bundled tiny SigLIP tower
and tokenizer around a Llama text model of `--hidden` x `--layers` x `--intermediate` (head_dim 64,
4 query heads per KV head, like Llama 3.2 1B). The weights are float16, generated and written one
decoder layer at a time, so at most one layer is ever in memory: by default streamed into a single
`model.safetensors` (what `save_pretrained` writes for a model this size, and the bundled model's
layout), or with `--shard-per-layer` one file per layer plus `model.safetensors.index.json`.
The vocabulary is the tiny tokenizer's 512 tokens by default (the GGUF writer requires the token
list to be exactly vocab_size long); `--vocab` trains the tokenizer to another size and pads it
with reserved tokens, for a realistic embedding/lm_head size.

It then runs `vlm_factory.export.gguf_llm.write_llm_gguf` once per `--file-type`, each time in a
fresh child process, and prints one row per run:

- LLM params: the text model's parameters, the part that goes into the GGUF (the header gives the total).
- weights MiB: size of the checkpoint's safetensors files on disk.
- gguf MiB: size of the GGUF file written.
- wall s: wall time of the whole child process (interpreter start, imports, conversion), the same
  thing `/usr/bin/time` measures for another converter; convert s: the `write_llm_gguf` call alone.
- peak RSS MiB: the child's maximum resident set size (`ru_maxrss` from wait4); "x weights" divides
  it by the weights size. It is roughly the fixed cost of the imports (printed on its own, from a
  child that only imports the converter) + what the converter keeps in memory + the checkpoint
  pages resident in its address space.

Two things to know when reading or comparing the peak RSS:

- RSS counts the pages of a memory-mapped safetensors file the child has read for as long as that
  file is open. With one file the whole checkpoint ends up resident on top of what the converter
  holds; with one file per layer only the current layer is. Those pages are page cache the kernel
  can drop under pressure, but they are what `/usr/bin/time` and most monitors report, so compare
  converters on the same layout.
- Linux starts a child's ru_maxrss from its parent's RSS at fork (the high-water mark survives
  exec), and this script holds torch, so each child is started by a small launcher interpreter
  (~10 MiB) that cannot inflate the figure.

The checkpoint has just been written when the first conversion runs, so it is read from the page
cache; compare converters under the same conditions (e.g. the printed llama.cpp command right after
this script, with `--keep`). Nothing is hard-coded: all figures are measured on the machine at hand.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import GenerationConfig, LlavaForConditionalGeneration
from transformers.core_model_loading import revert_weight_conversion

from vlm_factory.config import ArchitectureConfig
from vlm_factory.io import atomic_dir
from vlm_factory.model.tiny import build_config, build_processor

log = logging.getLogger("bench.gguf_converter")

# float16, not bfloat16: the converter reads tensors through numpy, which has no bfloat16.
CHECKPOINT_DTYPE, SAFETENSORS_DTYPE = torch.float16, "F16"
HEAD_DIM = 64
QUERIES_PER_KV_HEAD = 4
INIT_STD = 0.02
CHECKPOINT_NAME = "random-llava"
SPEC_FILE = "benchmark.json"  # what a kept checkpoint was built from, so a rerun can reuse it
LAYER_KEY = re.compile(r"^language_model\.model\.layers\.(\d+)\.")

# The converter runs in a fresh interpreter, so the peak RSS is its alone. Arguments: result JSON
# path, then either nothing (imports only: the fixed cost) or model_dir, out_path, file_type.
CHILD_SCRIPT = """
import json, logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="    [child] %(message)s")
import gguf
from transformers import LlavaConfig
from vlm_factory.export.gguf_llm import write_llm_gguf
result, seconds = sys.argv[1], None
if len(sys.argv) > 2:
    start = time.perf_counter()
    write_llm_gguf(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
    seconds = time.perf_counter() - start
Path(result).write_text(json.dumps({"convert_s": seconds}))
"""

# Starts the command after its first argument and writes its wall time, exit status and peak RSS
# (ru_maxrss of that child alone, from wait4) to the JSON path in its first argument. See the module
# docstring for why the converter is not started directly by this (large) process.
LAUNCHER_SCRIPT = """
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
proc.returncode = os.waitstatus_to_exitcode(status)
wall_s = time.perf_counter() - start
maxrss = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024  # bytes on macOS, KiB on Linux
with open(sys.argv[1], "w") as f:
    json.dump({"wall_s": wall_s, "returncode": proc.returncode, "peak_rss": maxrss}, f)
"""


@dataclass(frozen=True)
class Spec:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    seed: int
    shard_per_layer: bool


@dataclass
class Checkpoint:
    path: Path
    params: int
    text_params: int
    weight_bytes: int
    files: int


@dataclass
class Run:
    file_type: str
    gguf_bytes: int
    wall_s: float
    convert_s: float | None
    peak_rss: int


@contextmanager
def step(what: str) -> Iterator[None]:
    log.info("%s ...", what)
    start = time.perf_counter()
    yield
    log.info("%s: done in %.1f s", what, time.perf_counter() - start)


def architecture(spec: Spec) -> ArchitectureConfig:
    """The tiny model's vision tower and tokenizer settings around a larger Llama text model."""
    heads = spec.hidden // HEAD_DIM
    kv_heads = heads // QUERIES_PER_KV_HEAD if heads % QUERIES_PER_KV_HEAD == 0 else heads
    return ArchitectureConfig(
        text_hidden=spec.hidden, text_intermediate=spec.intermediate, text_layers=spec.layers,
        text_heads=heads, text_kv_heads=kv_heads, vocab_size=spec.vocab,
    )


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=CHECKPOINT_DTYPE)
    if len(shape) == 1:  # norm scales
        return torch.ones(shape, dtype=CHECKPOINT_DTYPE)
    return torch.empty(shape, dtype=CHECKPOINT_DTYPE).normal_(0.0, INIT_STD, generator=generator)


def checkpoint_shapes(config) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes exactly as `save_pretrained` writes them, from a model on the meta device."""
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    # save_pretrained renames through the same function (e.g. model.language_model.* -> language_model.model.*).
    state = revert_weight_conversion(model, model.state_dict())
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def layer_groups(shapes: dict[str, tuple[int, ...]], layers: int) -> list[list[str]]:
    """Tensor names in write order: everything outside the decoder layers (embeddings, final norm,
    lm_head, vision tower, projector), then each decoder layer."""
    groups: list[list[str]] = [[] for _ in range(layers + 1)]
    for name in shapes:
        layer = LAYER_KEY.match(name)
        groups[int(layer.group(1)) + 1 if layer else 0].append(name)
    return groups


def write_single_file(file: Path, groups: list[list[str]], shapes: dict[str, tuple[int, ...]],
                      make: Callable[[str], torch.Tensor]) -> None:
    """Stream one safetensors file: the header (all shapes and offsets) first, then the data group by group."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in (name for group in groups for name in group):
        nbytes = CHECKPOINT_DTYPE.itemsize
        for dim in shapes[name]:
            nbytes *= dim
        header[name] = {"dtype": SAFETENSORS_DTYPE, "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for group in tqdm(groups, desc="writing checkpoint", unit="layer"):
            for name in group:
                f.write(make(name).numpy().tobytes())


def write_shard_per_layer(directory: Path, groups: list[list[str]], make: Callable[[str], torch.Tensor]) -> None:
    """One safetensors file per group, and the index that maps tensor names to files."""
    files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map, total = {}, 0
    for names, file in zip(tqdm(groups, desc="writing checkpoint", unit="layer"), files):
        tensors = {name: make(name) for name in names}
        save_file(tensors, directory / file, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_checkpoint(spec: Spec, path: Path) -> None:
    """An HF LLaVA directory with random float16 weights, generated and written one decoder layer at a time."""
    with step("building config and tokenizer"):
        processor = build_processor(architecture(spec))
        config = build_config(architecture(spec), processor)
        config.dtype = "float16"
        shapes = checkpoint_shapes(config)
    groups = layer_groups(shapes, spec.layers)
    generator = torch.Generator().manual_seed(spec.seed)

    def make(name: str) -> torch.Tensor:
        return random_tensor(name, shapes[name], generator)

    with atomic_dir(path) as tmp:
        processor.save_pretrained(tmp)
        config.save_pretrained(tmp)
        tok = processor.tokenizer
        GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id).save_pretrained(tmp)
        start = time.perf_counter()
        if spec.shard_per_layer:
            write_shard_per_layer(tmp, groups, make)
        else:
            write_single_file(tmp / "model.safetensors", groups, shapes, make)
        log.info("wrote %d tensors in %.1f s", len(shapes), time.perf_counter() - start)
        (tmp / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=2) + "\n")


def describe_checkpoint(path: Path) -> Checkpoint:
    files = sorted(path.glob("*.safetensors"))
    params = text_params = 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                count = 1
                for dim in f.get_slice(name).get_shape():
                    count *= dim
                params += count
                text_params += count if name.startswith("language_model.") else 0
    weight_bytes = sum(file.stat().st_size for file in files)
    return Checkpoint(path, params, text_params, weight_bytes, len(files))


def ensure_checkpoint(spec: Spec, path: Path) -> Checkpoint:
    """Reuse a checkpoint this script kept from the same settings; otherwise write a new one."""
    if path.exists():
        spec_file = path / SPEC_FILE
        kept = json.loads(spec_file.read_text()) if spec_file.is_file() else None
        if kept != asdict(spec):
            raise SystemExit(f"{path} exists and was not built with these settings; "
                             "remove it or pick another --workdir")
        log.info("reusing the checkpoint at %s (built with the same settings)", path)
    else:
        with step(f"writing the random checkpoint to {path}"):
            write_checkpoint(spec, path)
    return describe_checkpoint(path)


def run_child(args: list[str], scratch: Path) -> tuple[float, int, dict]:
    """Run CHILD_SCRIPT through LAUNCHER_SCRIPT; return its wall time, peak RSS and result JSON."""
    measured, result = scratch / "measured.json", scratch / "result.json"
    child = [sys.executable, "-c", CHILD_SCRIPT, str(result), *args]
    subprocess.run([sys.executable, "-c", LAUNCHER_SCRIPT, str(measured), *child], check=True)
    measurement = json.loads(measured.read_text())
    if measurement["returncode"] != 0:
        raise SystemExit(f"the converter child process failed with exit status {measurement['returncode']}")
    return measurement["wall_s"], measurement["peak_rss"], json.loads(result.read_text())


def convert(checkpoint: Checkpoint, out_path: Path, file_type: str) -> Run:
    with step(f"converting to {out_path.name} ({file_type}) in a child process"):
        with tempfile.TemporaryDirectory() as scratch:
            wall, rss, result = run_child([str(checkpoint.path), str(out_path), file_type], Path(scratch))
    return Run(file_type, out_path.stat().st_size, wall, result["convert_s"], rss)


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def print_report(spec: Spec, checkpoint: Checkpoint, baseline_rss: int, runs: list[Run]) -> None:
    arch = architecture(spec)
    print()
    vocab_note = " (the tiny tokenizer's: embeddings are a negligible share)" if spec.vocab == 512 else ""
    print(f"Random LLaVA: Llama text model hidden={spec.hidden} layers={spec.layers} "
          f"intermediate={spec.intermediate} heads={arch.text_heads} kv_heads={arch.text_kv_heads} "
          f"vocab={spec.vocab}{vocab_note}")
    print(f"Parameters: {checkpoint.params / 1e6:,.1f} M in all, {checkpoint.text_params / 1e6:,.1f} M in the LLM "
          f"(written to GGUF); checkpoint weights {mib(checkpoint.weight_bytes)} MiB "
          f"({str(CHECKPOINT_DTYPE).removeprefix('torch.')}, "
          f"{'one file per layer' if spec.shard_per_layer else 'one file'}: {checkpoint.files} safetensors)")
    print(f"Child that only imports the converter: peak RSS {mib(baseline_rss)} MiB")
    print()
    header = ["file type", "LLM params", "weights MiB", "gguf MiB", "wall s", "convert s", "peak RSS MiB", "x weights"]
    rows = [[run.file_type, f"{checkpoint.text_params / 1e6:,.1f} M", mib(checkpoint.weight_bytes),
             mib(run.gguf_bytes), f"{run.wall_s:.1f}",
             f"{run.convert_s:.1f}" if run.convert_s is not None else "-", mib(run.peak_rss),
             f"{run.peak_rss / checkpoint.weight_bytes:.2f}"] for run in runs]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    print()


def print_llama_cpp_command(checkpoint: Path, workdir: Path, file_types: list[str], kept: bool) -> None:
    print("Same checkpoint through llama.cpp's converter (from a llama.cpp checkout, with its gguf-py):")
    for file_type in file_types:
        out = workdir / f"llama.cpp-{file_type.lower()}.gguf"
        print("  /usr/bin/time -v python convert_hf_to_gguf.py "
              f"{shlex.quote(str(checkpoint))} --outtype {file_type.lower()} --outfile {shlex.quote(str(out))}")
    print("  (compare 'Elapsed (wall clock) time' and 'Maximum resident set size' with the table above.)")
    print("  The tokenizer is a custom byte-level BPE whose pre-tokenizer hash llama.cpp does not know, so")
    print("  convert_hf_to_gguf.py stops with 'BPE pre-tokenizer was not recognized'. For a timing run, replace")
    print("  that raise in get_vocab_base_pre() with `res = \"gpt-2\"` in a scratch checkout.")
    if not kept:
        print("  This run's checkpoint is deleted on exit: rerun with --keep (and --workdir) to use that command.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1536, help="LLM hidden size, a multiple of 64 (default 1536)")
    parser.add_argument("--layers", type=int, default=16, help="LLM decoder layers (default 16)")
    parser.add_argument("--intermediate", type=int, default=None,
                        help="LLM MLP size, a multiple of 256 (default: 4 x hidden rounded to 256)")
    parser.add_argument("--vocab", type=int, default=512,
                        help="vocabulary size: the tiny tokenizer trained to it and padded with reserved tokens "
                             "(default 512, the bundled model's)")
    parser.add_argument("--shard-per-layer", action="store_true",
                        help="one safetensors file per decoder layer instead of a single model.safetensors")
    parser.add_argument("--file-type", nargs="+", choices=["F16", "F32"], default=["F16"],
                        help="GGUF file types to convert to, one child process each (default F16)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the checkpoint and GGUF files go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and GGUF files at the end")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = parser.parse_args(argv)
    if args.intermediate is None:
        args.intermediate = round(4 * args.hidden / 256) * 256
    if args.hidden <= 0 or args.hidden % HEAD_DIM:
        parser.error(f"--hidden must be a positive multiple of {HEAD_DIM} (head_dim)")
    if args.intermediate <= 0 or args.intermediate % 256:
        parser.error("--intermediate must be a positive multiple of 256")
    if args.layers <= 0:
        parser.error("--layers must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    spec = Spec(args.hidden, args.layers, args.intermediate, args.vocab, args.seed, args.shard_per_layer)
    file_types = list(dict.fromkeys(args.file_type))

    workdir = Path(tempfile.mkdtemp(prefix="gguf-bench-")) if args.workdir is None else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = workdir / CHECKPOINT_NAME
    outputs = {file_type: workdir / f"ours-{file_type.lower()}.gguf" for file_type in file_types}
    # Without --keep, remove what this run created: the temporary directory, or its files in --workdir.
    created = [workdir] if args.workdir is None else [
        path for path in [checkpoint_path, *outputs.values()] if not path.exists()]
    log.info("working in %s", workdir)

    try:
        checkpoint = ensure_checkpoint(spec, checkpoint_path)
        with step("measuring a child that only imports the converter"):
            with tempfile.TemporaryDirectory() as scratch:
                _, baseline_rss, _ = run_child([], Path(scratch))
        runs = [convert(checkpoint, out, file_type) for file_type, out in outputs.items()]
        print_report(spec, checkpoint, baseline_rss, runs)
        print_llama_cpp_command(checkpoint_path, workdir, file_types, kept=args.keep)
    finally:
        if args.keep:
            log.info("kept %s", workdir)
        else:
            for path in created:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            log.info("removed %s", ", ".join(str(p) for p in created) or "nothing")


if __name__ == "__main__":
    main()
