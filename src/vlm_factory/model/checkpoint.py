"""Load and save LLaVA checkpoints in HF format, safetensors only, with one-line errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

from vlm_factory.errors import UserError
from vlm_factory.io import atomic_dir
from vlm_factory.model.snapshot import CHECKSUM_FILE, verify_checksums, write_checksums

log = logging.getLogger(__name__)


def load_checkpoint(path: Path | str) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Model and processor from an HF directory; refuses pickles and names what is wrong."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a model directory (no config.json); run the stage that produces it")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {', '.join(pickles)}: pickled weights are never loaded)" if pickles else ""
        raise UserError(f"{path}: no .safetensors weights{hint}")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path / 'config.json'}: not valid JSON ({exc})") from None
    if config.get("model_type") != "llava":
        raise UserError(f"{path}: model_type is {config.get('model_type')!r}; only 'llava' checkpoints are supported")
    if (path / CHECKSUM_FILE).is_file():
        verify_checksums(path)
    try:
        model = LlavaForConditionalGeneration.from_pretrained(path, use_safetensors=True, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: unreadable checkpoint ({first_line[:300]})") from None
    model.eval()
    return model, processor


def save_checkpoint(model: LlavaForConditionalGeneration, processor: LlavaProcessor, path: Path | str,
                    extra_files: dict[str, str] | None = None) -> None:
    """Write model + processor (+ small text files) and their SHA256SUMS atomically as one directory."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        write_checksums(tmp)
    log.info("saved checkpoint to %s", path)
