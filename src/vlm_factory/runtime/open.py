"""Open an exported artifact directory in its own runtime, by format."""

from __future__ import annotations

import json
from pathlib import Path

from vlm_factory.errors import UserError

EXPORT_REPORT = "export_report.json"


def export_report(artifact_dir: Path) -> dict:
    path = artifact_dir / EXPORT_REPORT
    if not path.is_file():
        raise UserError(f"{path}: not found; {artifact_dir} is not a finished export (re-run its export stage)")
    return json.loads(path.read_text(encoding="utf-8"))


def artifact_bytes(artifact_dir: Path) -> int:
    """Bytes a device downloads: every file of the export but its report."""
    return sum(p.stat().st_size for p in artifact_dir.rglob("*") if p.is_file() and p.name != EXPORT_REPORT)


def open_runtime(fmt: str, artifact_dir: Path, *, context_tokens: int, kv_cache: str):
    """A runtime adapter (answer, image_embeddings, close) over the artifact in `artifact_dir`."""
    report = export_report(artifact_dir)
    if report.get("format") != fmt:
        raise UserError(f"{artifact_dir}: holds a {report.get('format')!r} export, not {fmt!r}")
    if fmt == "gguf":
        from vlm_factory.runtime.llama_cpp import LlamaCppRuntime

        files = report["files"]
        return LlamaCppRuntime(artifact_dir / files["llm"]["file"], artifact_dir / files["mmproj"]["file"],
                               n_ctx=context_tokens, kv_cache=kv_cache)
    raise UserError(f"format {fmt!r} has no runtime adapter yet")
