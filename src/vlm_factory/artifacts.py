"""The on-disk contract of an exported artifact directory: where its export report lives, what a device downloads.

Every JSON file read back from an export is validated at this boundary (runtime/artifact_schema.py):
a malformed file is one line naming it and the key, never a traceback from the code that uses it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlm_factory.errors import UserError, first_line
from vlm_factory.io import read_json
from vlm_factory.paths import contained, contained_tree

EXPORT_REPORT = "export_report.json"
FIX = "re-run its export stage"


def read_artifact_json(artifact_dir: Path, name: str, kind: str) -> tuple[dict, Path]:
    """(contents, path) of a JSON file an export keeps at its top level (its report, its runtime config):
    contained in `artifact_dir`, and a one-line error naming it when missing or not a JSON object."""
    path = artifact_dir / name
    real = contained(artifact_dir, name, what=artifact_dir, key=name)
    data = read_json(real, shown=path, fix=FIX,
                     missing=f"{path}: not found; {artifact_dir} is not {kind} (re-run its export stage)")
    return data, path


def _named(data: dict, key: str) -> str | None:
    """The string at dotted `key` of `data`; None when absent or not a string (the schema says what is wrong)."""
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data if isinstance(data, str) else None


def config_files(artifact_dir: Path, data: dict, keys: list[str], config_path: Path,
                 kinds: dict[str, str] | None = None) -> dict[str, Path | None]:
    """{key: the file (kind "file", the default) or directory (kind "dir") a JSON file's dotted key names}:
    every name contained in `artifact_dir` (paths.contained; a directory with everything inside it) before
    any is looked for, then each present, else a one-line error naming `config_path` and the key.

    None for a key that is absent or not a string: the file's schema says what is wrong with it. Called
    before the schema, so a name that leaves the directory is refused before anything else reads it."""
    kinds = kinds or {}
    paths = {}
    for key in keys:
        name = _named(data, key)
        paths[key] = None if name is None else contained(artifact_dir, name, what=config_path, key=key,
                                                         kind=kinds.get(key, "file"))
        if paths[key] is not None and kinds.get(key) == "dir" and paths[key].is_dir():
            # a library reads what the directory holds: no link inside it may lead out either
            contained_tree(artifact_dir, paths[key], what=config_path, key=key)
    for key, path in paths.items():
        if path is not None and not (path.is_dir() if kinds.get(key) == "dir" else path.exists()):
            raise UserError(f"{config_path}: {key}: names {_named(data, key)!r}, which is not in the export; {FIX}")
    return paths


def read_npy(path: Path, *, shape: tuple[int, ...] | None = None, dtype: str | None = None,
             what: str = "", fix: str = "re-run its export") -> np.ndarray:
    """A plain (non-object) .npy array an export keeps, its header checked before any data is read: the
    `shape` and `dtype` expected (when given; `what` says who expects them) and a file size that matches
    the header. A header claiming a huge shape therefore never makes numpy allocate it; a corrupt file
    is one line naming it."""
    def refuse(reason: str) -> UserError:
        return UserError(f"{path}: {reason}; {fix}")

    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                found_shape, _fortran, found_dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                found_shape, _fortran, found_dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise refuse(f".npy format version {version} is not one numpy.save writes for tables")
            offset = f.tell()
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise refuse(f"not a readable .npy array ({first_line(exc)})") from None
    if found_dtype.hasobject:
        raise refuse("holds Python objects, not numbers")
    if shape is not None and tuple(found_shape) != tuple(shape):
        raise refuse(f"holds shape {tuple(found_shape)}, {what or 'the config'} says {tuple(shape)}")
    if dtype is not None and found_dtype != np.dtype(dtype):
        raise refuse(f"holds {found_dtype}, {what or 'the config'} says {dtype}")
    expected = offset + int(np.prod(found_shape, dtype=np.float64) * found_dtype.itemsize)
    if path.stat().st_size != expected:
        raise refuse(f"{path.stat().st_size} bytes where its header says {expected}: truncated or corrupt")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise refuse(f"not a readable .npy array ({first_line(exc)})") from None


def read_export_report(artifact_dir: Path) -> dict:
    """The export report, validated (runtime/artifact_schema.py `ExportReport`), every file it names
    contained in `artifact_dir` and present."""
    from vlm_factory.runtime.artifact_schema import ExportReport, parse_config

    data, path = read_artifact_json(artifact_dir, EXPORT_REPORT, "a finished export")
    report = parse_config(ExportReport, data, path)
    kinds = {f"files.{role}.file": "dir" if entry.file.endswith(".mlpackage") else "file"  # Core ML packages
             for role, entry in report.files.items()}
    config_files(artifact_dir, data, list(kinds), path, kinds)
    return data


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
