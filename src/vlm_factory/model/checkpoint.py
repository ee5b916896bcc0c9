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

log = logging.getLogger(__name__)


def load_model(path: Path | str) -> tuple[ModelFamily, object, object]:
    """(family, model in float32 eval mode, processor) from an HF directory; refuses pickles."""
    path = Path(path)
    family = family_of(path)  # config.json present and of a known family
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {', '.join(pickles)}: pickled weights are never loaded)" if pickles else ""
        raise UserError(f"{path}: no .safetensors weights{hint}")
    if (path / CHECKSUM_FILE).is_file():
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
