"""The on-disk contract of an exported artifact directory: where its export report lives, what a device downloads."""

from __future__ import annotations

import json
from pathlib import Path

from vlm_factory.errors import UserError
from vlm_factory.paths import contained

EXPORT_REPORT = "export_report.json"


def read_export_report(artifact_dir: Path) -> dict:
    path = artifact_dir / EXPORT_REPORT
    real = contained(artifact_dir, EXPORT_REPORT, what=artifact_dir, key=EXPORT_REPORT)
    if not real.is_file():
        raise UserError(f"{path}: not found; {artifact_dir} is not a finished export (re-run its export stage)")
    try:
        report = json.loads(real.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({str(exc).splitlines()[0][:120]}); re-run its export stage") from None
    if not isinstance(report, dict):
        raise UserError(f"{path}: not a JSON object; re-run its export stage")
    return report


def report_file(artifact_dir: Path, report: dict, role: str) -> Path:
    """The file the report's `files.<role>.file` names, contained in `artifact_dir` (see paths.contained)."""
    key = f"files.{role}.file"
    entry = report.get("files", {}).get(role) if isinstance(report.get("files"), dict) else None
    if not isinstance(entry, dict) or "file" not in entry:
        raise UserError(f"{artifact_dir / EXPORT_REPORT}: no {key}; re-run its export stage")
    return contained(artifact_dir, entry["file"], what=artifact_dir / EXPORT_REPORT, key=key)


def artifact_bytes(artifact_dir: Path) -> int:
    """Bytes a device downloads: every file of the export but its report (nothing a link points out at)."""
    total = 0
    for p in sorted(artifact_dir.rglob("*")):
        real = contained(artifact_dir, str(p.relative_to(artifact_dir)), what=artifact_dir, key="file", kind="any")
        if p.name != EXPORT_REPORT and real.is_file():
            total += real.stat().st_size
    return total
