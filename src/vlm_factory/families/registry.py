"""The registry of model families, keyed by HF `model_type`, and the support matrix it implies."""

from __future__ import annotations

from pathlib import Path

from vlm_factory.errors import UserError
from vlm_factory.hf_files import load_pretrained
from vlm_factory.families.base import FORMATS, ModelFamily
from vlm_factory.families.hf_config import read_config_json
from vlm_factory.families.idefics3 import Idefics3Family
from vlm_factory.families.llava import LlavaFamily
from vlm_factory.families.mobilevlm import MobileVLMFamily

FAMILIES: tuple[type[ModelFamily], ...] = (LlavaFamily, Idefics3Family, MobileVLMFamily)
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


def family_class(model_type: str, source: str = "model config") -> type[ModelFamily]:
    if model_type not in _BY_MODEL_TYPE:
        raise UserError(f"{source}: model_type {model_type!r} belongs to no supported model family; "
                        f"supported: {', '.join(sorted(_BY_MODEL_TYPE))}")
    return _BY_MODEL_TYPE[model_type]


def family_for(config, source: Path | str | None = None) -> ModelFamily:
    """The family of a loaded HF config (a PretrainedConfig)."""
    return family_class(getattr(config, "model_type", None), str(source or "model config"))(config, source)


def family_of(model_dir: Path | str) -> ModelFamily:
    """The family of an HF model directory, from its config.json alone (no weights are read)."""
    model_dir = Path(model_dir)
    raw = read_config_json(model_dir)
    cls = family_class(raw.get("model_type"), str(model_dir))
    cls.check_config_json(raw, str(model_dir / "config.json"))
    config = load_pretrained(cls.config_class(), model_dir, f"config.json as a {cls.name} config",
                             fix="fix or re-download config.json")
    return cls(config, model_dir)


def support_matrix() -> list[dict]:
    """One row per (family, format): supported (with its caveat), or refused with the reason."""
    rows = []
    for family in FAMILIES:
        for fmt in FORMATS:
            reason = family.format_support.get(fmt, "no exporter registered")
            rows.append({"family": family.name, "model_types": list(family.model_types), "format": fmt,
                         "supported": reason is None, "reason": reason, "note": family.format_notes.get(fmt)})
    return rows


def support_matrix_markdown() -> str:
    """The README's support matrix, generated from the registry (tests/test_families.py keeps them equal)."""
    lines = ["| family (HF model_type) | what it covers | " + " | ".join(FORMATS) + " |",
             "|" + " --- |" * (2 + len(FORMATS))]
    footnotes: list[str] = []
    for family in FAMILIES:
        cells = []
        for row in (r for r in support_matrix() if r["family"] == family.name):
            if not row["supported"]:
                cells.append(f"refused: {row['reason']}")
            elif row["note"]:
                footnotes.append(f"{family.name} / {row['format']}: {row['note']}.")
                cells.append(f"supported [{len(footnotes)}]")
            else:
                cells.append("supported")
        lines.append(f"| {family.name} ({', '.join(family.model_types)}) | {family.description} | "
                     + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"[{i}] {note}" for i, note in enumerate(footnotes, start=1)]
    lines += [f"Refused for every format ({family.name}): {'; '.join(family.variants_refused)}."
              for family in FAMILIES if family.variants_refused]
    return "\n".join(lines) + "\n"
