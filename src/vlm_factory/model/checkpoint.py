"""Load and save model checkpoints in HF format, safetensors only, with one-line errors.

Which classes load a directory is the model family's business (families/): this module checks the
directory, its checksums and that no pickle is ever read, then asks the family.

Before transformers builds anything, the weights are checked against config.json: every safetensors
header is read and checked against its file (a truncated file, an absurd header length, a header that
is not JSON, an unknown dtype are each named), and every parameter of the model config.json describes
must be there with its shape (compared on a model built on the meta device, which holds no memory).
transformers itself would initialise missing parameters at random, allocating whatever config.json
says, and report mismatched shapes only after allocating the whole model.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from pathlib import Path

from vlm_factory.errors import UserError, first_line
from vlm_factory.families import ModelFamily, family_of
from vlm_factory.families.facts_bounds import shown
from vlm_factory.io import atomic_dir, read_json
from vlm_factory.model.snapshot import CHECKSUM_FILE, verify_checksums, write_checksums
from vlm_factory.paths import contained

log = logging.getLogger(__name__)

FIX = "re-download or re-save it"
# Bits per element of every dtype the safetensors format defines.
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
              "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
              "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
# The safetensors library refuses headers above 100 MB itself; a real one is a few hundred KB.
MAX_HEADER_BYTES = 100_000_000
# Tensors have a handful of dimensions; a shape listing thousands is not a tensor's.
MAX_RANK = 16
# Other JSON files transformers reads while loading the model (the processor's are checked by the family).
MODEL_JSON_FILES = ("generation_config.json", "model.safetensors.index.json")


def _unreadable(path: Path, reason: str) -> UserError:
    return UserError(f"{path}: unreadable checkpoint ({reason}); {FIX}")


def _entry_problem(entry, data_bytes: int) -> str | None:
    """Why one tensor entry of a safetensors header is malformed, or None."""
    if not isinstance(entry, dict):
        return f"an entry of {shown(entry)}, not a JSON object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        return f"dtype {shown(dtype)} is not a safetensors dtype"
    if not (isinstance(shape, list) and len(shape) <= MAX_RANK and all(type(d) is int and d >= 0 for d in shape)):
        return f"shape {shown(shape)} is not a list of at most {MAX_RANK} non-negative integers"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        return f"data_offsets {shown(offsets)} are not [begin, end] byte offsets"
    if offsets[1] > data_bytes:
        return f"its data ends at byte {offsets[1]} of {data_bytes}: the file is truncated"
    expected = (math.prod(shape) * DTYPE_BITS[dtype] + 7) // 8
    if offsets[1] - offsets[0] != expected:
        return f"{offsets[1] - offsets[0]} bytes of data for a {dtype} tensor of shape {shape} ({expected} expected)"
    return None


def read_safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a safetensors file whose header agrees with the file, else a one-line
    'unreadable checkpoint' error naming the file and what is wrong."""
    size = path.stat().st_size
    if size < 8:
        raise _unreadable(path, f"{size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
            raise _unreadable(path, f"header length {length} does not fit a {size}-byte file")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _unreadable(path, f"header is not JSON: {first_line(exc, 120)}") from None
    except RecursionError:
        raise _unreadable(path, "header nested too deeply to be JSON a safetensors writer made") from None
    if not isinstance(header, dict):
        raise _unreadable(path, "header is not a JSON object")
    shapes = {}
    for name, entry in header.items():
        if name == "__metadata__":  # the format's free-form part: strings to strings
            if not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise _unreadable(path, "__metadata__ is not a JSON object of strings")
            continue
        problem = _entry_problem(entry, size - 8 - length)
        if problem:
            raise _unreadable(path, f"tensor {shown(name)}: {problem}")
        shapes[name] = tuple(entry["shape"])
    return shapes


def check_weights_match_config(family: ModelFamily, weights: list[Path]) -> None:
    """Every parameter of the model `family.config` describes is in `weights` with the same shape.

    Names are compared as the family places them (component, local name), so the hub's and
    transformers 5's layouts both match; tied parameters (one tensor, several names) need one of
    their names on disk. Tensors the model has no place for are left to transformers (it ignores them).
    """
    import torch

    on_disk: dict[tuple[str, str], tuple[Path, str, tuple[int, ...]]] = {}
    for path in weights:
        for name, shape in read_safetensors_header(path).items():
            placed = family.checkpoint_key(name)
            if placed is not None:
                on_disk[(placed.component, placed.local)] = (path, name, shape)
    with torch.device("meta"):  # shapes only: no memory, however large config.json says the model is
        model = family.empty_model()
    aliases: dict[int, list[tuple[str, tuple[int, ...]]]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases[id(param)].append((name, tuple(param.shape)))
    missing = []
    for names in aliases.values():
        found = [on_disk[key] for key in (_placed(family, name) for name, _ in names) if key in on_disk]
        if not found:
            missing.append(names[0][0])
            continue
        path, disk_name, disk_shape = found[0]
        if disk_shape != names[0][1]:
            raise UserError(f"{path}: tensor {disk_name} has shape {list(disk_shape)} but {family.config_file} "
                            f"describes {list(names[0][1])}; config.json and the weights must belong together ({FIX})")
    if missing:
        files = weights[0] if len(weights) == 1 else f"{weights[0].parent}/*.safetensors"
        raise UserError(f"{files}: lacks {len(missing)} tensor(s) of the model {family.config_file} describes "
                        f"(first: {missing[0]}); config.json and the weights must belong together ({FIX})")


def _placed(family: ModelFamily, name: str) -> tuple[str, str] | None:
    key = family.checkpoint_key(name)
    return (key.component, key.local) if key is not None else None


def _require_safetensors(path: Path) -> None:
    if not any(path.glob("*.safetensors")):
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {', '.join(pickles)}: pickled weights are never loaded)" if pickles else ""
        raise UserError(f"{path}: no .safetensors weights{hint}")


def load_model(path: Path | str) -> tuple[ModelFamily, object, object]:
    """(family, model in float32 eval mode, processor) from an HF directory; refuses pickles."""
    path = Path(path)
    if path.is_dir():
        # Every file of the checkpoint (weights, configs, tokenizer) must resolve inside it: a *.safetensors
        # (or config.json) linked to somewhere else is refused before anything reads it, and weights must be
        # regular files (not a FIFO or directory named *.safetensors).
        for entry in sorted(path.iterdir()):
            weights_file = entry.name.endswith(".safetensors")
            contained(path, entry.name, what=path, key="weights" if weights_file else "file",
                      kind="file" if weights_file else "any", fix="copy the file in instead of linking it")
        _require_safetensors(path)  # before config.json is read: whatever it says, pickles are never loaded
    family = family_of(path)  # config.json present, of a known family, its values within bounds
    weights = sorted(path.glob("*.safetensors"))
    if (path / CHECKSUM_FILE).exists() or (path / CHECKSUM_FILE).is_symlink():
        verify_checksums(path)
    for name in MODEL_JSON_FILES:
        if (path / name).is_file():
            read_json(path / name, missing=f"{path / name}: missing", fix=FIX)
    check_weights_match_config(family, weights)
    model, processor = family.load(path)
    return family, model, processor


def load_checkpoint(path: Path | str):
    """Model and processor from an HF directory (see load_model)."""
    _, model, processor = load_model(path)
    return model, processor


def save_checkpoint(model, processor, path: Path | str, extra_files: dict[str, str] | None = None) -> None:
    """Write model + processor (+ small text files) and their SHA256SUMS atomically as one directory."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        write_checksums(tmp)
    log.info("saved checkpoint to %s", path)
