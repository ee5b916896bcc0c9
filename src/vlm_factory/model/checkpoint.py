"""Load and save model checkpoints in HF format, safetensors only, with one-line errors.

Which classes load a directory is the model family's business (families/): this module checks the
directory, its checksums and that no pickle is ever read, then asks the family.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vlm_factory.errors import UserError
from vlm_factory.families import ModelFamily, family_of
from vlm_factory.io import atomic_dir
from vlm_factory.model.snapshot import CHECKSUM_FILE, verify_checksums, write_checksums
from vlm_factory.paths import contained

log = logging.getLogger(__name__)


def load_model(path: Path | str) -> tuple[ModelFamily, object, object]:
    """(family, model in float32 eval mode, processor) from an HF directory; refuses pickles."""
    path = Path(path)
    if path.is_dir():
        # Every file of the checkpoint (weights, configs, tokenizer) must resolve inside it: a *.safetensors
        # (or config.json) linked to somewhere else is refused before anything reads it.
        for entry in sorted(path.iterdir()):
            contained(path, entry.name, what=path, key="file", kind="any", fix="copy the file in instead of linking it")
    family = family_of(path)  # config.json present and of a known family
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {', '.join(pickles)}: pickled weights are never loaded)" if pickles else ""
        raise UserError(f"{path}: no .safetensors weights{hint}")
    for weight in weights:  # and weights are regular files (not a FIFO or directory named *.safetensors)
        contained(path, weight.name, what=path, key="weights", fix="copy the file in instead of linking it")
    if (path / CHECKSUM_FILE).exists() or (path / CHECKSUM_FILE).is_symlink():
        verify_checksums(path)
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
