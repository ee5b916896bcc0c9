"""A tier's release bundle: its gated artifacts, their parity reports, its budget, a manifest, a model card
and a report.

Files of a release (in the store below `<tier>/<version>/<upload prefix>/`, see release.py):

    <format>/...            every file of the tier's export of that format
    parity/<format>.json    the verdict that let it through
    budget.json             the tier's memory budget
    README.md               the model card
    report.html             the parity report: tables, accuracy against size, flipped questions with their
                            images (self-contained, publish/report_html.py)

and `<tier>/<version>/manifest.json`: sha256 and size of every file above; model, data and params
hashes, git commit, tool versions, parity results, budget, the upload prefix; written last.

The version is `publish.version` when set; otherwise it is derived from the content (the files'
hashes), so republishing identical artifacts is a no-op and anything different is a new version.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from vlm_factory.artifacts import EXPORT_REPORT
from vlm_factory.publish.store import file_chunks, sha256_of

MANIFEST = "manifest.json"
CARD = "README.md"
REPORT = "report.html"
# Written here from the other files, so they say nothing new about the release: a different renderer
# (a matplotlib update, a reworded card) must not make identical artifacts a new or conflicting release.
DERIVED = (CARD, REPORT)


@dataclass
class Bundle:
    tier: str
    files: dict[str, Path] = field(default_factory=dict)        # release path -> local file
    generated: dict[str, bytes] = field(default_factory=dict)   # release path -> content made here
    manifest: dict = field(default_factory=dict)

    def entries(self) -> dict[str, dict]:
        """sha256 and size of every file of the release but the manifest."""
        out = {}
        for name, path in self.files.items():
            out[name] = {"sha256": sha256_of(file_chunks(path)), "size": path.stat().st_size}
        for name, data in self.generated.items():
            out[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        return dict(sorted(out.items()))


def artifact_entries(manifest_or_entries: dict) -> dict[str, dict]:
    """What makes two releases the same: every file but the model card and the report (written from them)."""
    entries = manifest_or_entries.get("files", manifest_or_entries)
    return {name: entry for name, entry in entries.items() if name not in DERIVED}


def content_version(entries: dict[str, dict]) -> str:
    """A version named by the content: the same artifact files give the same version."""
    canonical = json.dumps({k: v["sha256"] for k, v in artifact_entries(entries).items()}, sort_keys=True).encode()
    return "c" + hashlib.sha256(canonical).hexdigest()[:12]


def tree_hash(directory: Path) -> str:
    """One hash over a directory's files (names and contents), e.g. the model or the dataset."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode() + b"\0")
        digest.update(sha256_of(file_chunks(path)).encode())
    return digest.hexdigest()


def git_commit(repo: Path) -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def collect(tier: str, formats: list[str], export_root: Path, parity_dir: Path, budget_path: Path) -> Bundle:
    """The tier's files: each format's export directory (its report included), parity reports, budget."""
    bundle = Bundle(tier)
    for fmt in formats:
        export_dir = export_root / tier / fmt
        for path in sorted(p for p in export_dir.rglob("*") if p.is_file()):
            bundle.files[f"{fmt}/{path.relative_to(export_dir)}"] = path
        bundle.files[f"parity/{fmt}.json"] = parity_dir / f"{tier}-{fmt}.json"
    bundle.files["budget.json"] = budget_path
    return bundle


def build_manifest(bundle: Bundle, *, version: str, entries: dict[str, dict], model_name: str, model_dir: Path,
                   data_dir: Path, params_path: Path, repo: Path) -> dict:
    parity = {}
    tools = {}
    for name, path in bundle.files.items():
        if name.startswith("parity/"):
            result = json.loads(path.read_text(encoding="utf-8"))
            parity[result["format"]] = {k: result[k] for k in ("vqa_accuracy", "reference_accuracy", "drift",
                                                              "drift_ci95", "flip_rate", "agreement", "passed",
                                                              "threshold")}
        elif name.endswith("/" + EXPORT_REPORT):
            tools[name.split("/")[0]] = json.loads(path.read_text(encoding="utf-8")).get("tools", {})
    return {
        "tier": bundle.tier, "version": version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": entries,
        "model": {"name": model_name, "sha256": tree_hash(model_dir)},
        "data": {"sha256": tree_hash(data_dir)},
        "params": {"file": params_path.name, "sha256": sha256_of(file_chunks(params_path))},
        "git_commit": git_commit(repo),
        "tools": tools,
        "parity": parity,
        "budget": json.loads(bundle.files["budget.json"].read_text(encoding="utf-8")),
    }
