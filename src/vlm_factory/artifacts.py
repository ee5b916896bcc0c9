"""The on-disk contract of an exported artifact directory: where its export report lives, what a device downloads."""

from __future__ import annotations

from pathlib import Path

from vlm_factory.errors import UserError
from vlm_factory.io import read_json
from vlm_factory.paths import contained

EXPORT_REPORT = "export_report.json"


def read_artifact_json(artifact_dir: Path, name: str, kind: str) -> tuple[dict, Path]:
    """(contents, path) of a JSON file an export keeps at its top level (its report, its runtime config):
    contained in `artifact_dir`, and a one-line error naming it when missing or not a JSON object."""
    path = artifact_dir / name
    real = contained(artifact_dir, name, what=artifact_dir, key=name)
    data = read_json(real, shown=path, fix="re-run its export stage",
                     missing=f"{path}: not found; {artifact_dir} is not {kind} (re-run its export stage)")
    return data, path


def read_export_report(artifact_dir: Path) -> dict:
    return read_artifact_json(artifact_dir, EXPORT_REPORT, "a finished export")[0]


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
