"""The on-disk contract of an exported artifact directory: where its export report lives, what a device downloads."""

from __future__ import annotations

import json
from pathlib import Path

from vlm_factory.errors import UserError

EXPORT_REPORT = "export_report.json"


def read_export_report(artifact_dir: Path) -> dict:
    path = artifact_dir / EXPORT_REPORT
    if not path.is_file():
        raise UserError(f"{path}: not found; {artifact_dir} is not a finished export (re-run its export stage)")
    return json.loads(path.read_text(encoding="utf-8"))


def artifact_bytes(artifact_dir: Path) -> int:
    """Bytes a device downloads: every file of the export but its report."""
    return sum(p.stat().st_size for p in artifact_dir.rglob("*") if p.is_file() and p.name != EXPORT_REPORT)
