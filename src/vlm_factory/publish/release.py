"""Publish a bundle as an immutable, verified release, and verify any release against its manifest.

Order of writes: every object first, each read back and hashed; then the manifest, conditionally
(it must not exist yet); then the whole release is verified from the store; only then does
`<tier>/latest.json` move. A release is visible only through its manifest, so an upload that
dies halfway leaves objects nobody points at and no release.
"""

from __future__ import annotations

import json
import logging
import time

from tqdm import tqdm

from vlm_factory.errors import UserError
from vlm_factory.publish.bundle import MANIFEST, Bundle, artifact_entries
from vlm_factory.publish.store import AlreadyExists, Store

log = logging.getLogger(__name__)

LATEST = "latest.json"


def release_prefix(tier: str, version: str) -> str:
    return f"{tier}/{version}"


def _existing_manifest(store: Store, prefix: str) -> dict | None:
    data = store.get_bytes(f"{prefix}/{MANIFEST}")
    return json.loads(data) if data is not None else None


def publish_bundle(store: Store, bundle: Bundle, manifest_bytes: bytes) -> str:
    """Upload `bundle` with its manifest as `<tier>/<version>`; returns "published" or "unchanged"."""
    manifest = json.loads(manifest_bytes)
    prefix = release_prefix(bundle.tier, manifest["version"])
    existing = _existing_manifest(store, prefix)
    if existing is not None:
        if artifact_entries(existing) != artifact_entries(manifest):
            raise UserError(f"{store.uri}/{prefix}: this version is already published with different content; "
                            "releases are immutable: set a new publish.version")
        log.info("%s/%s: already published with identical content", store.uri, prefix)
        verify_release(store, prefix)
        _move_latest(store, bundle.tier, existing)
        return "unchanged"
    started = time.perf_counter()
    uploads = [(name, path) for name, path in bundle.files.items()] + list(bundle.generated.items())
    for name, source in tqdm(uploads, desc=f"upload {prefix}", unit="file"):
        key = f"{prefix}/{name}"
        if isinstance(source, bytes):
            store.put_bytes(key, source)
        else:
            store.put_file(key, source)
        if store.sha256(key) != manifest["files"][name]["sha256"]:
            raise RuntimeError(f"{store.uri}/{key}: read back with a different sha256; upload again")
    try:
        store.put_bytes(f"{prefix}/{MANIFEST}", manifest_bytes, only_if_absent=True)
    except AlreadyExists:
        raise UserError(f"{store.uri}/{prefix}: another publisher created this release meanwhile; "
                        "re-run to compare its content") from None
    verify_release(store, prefix)
    _move_latest(store, bundle.tier, manifest)
    log.info("published %s/%s: %d files in %.1fs", store.uri, prefix, len(uploads) + 1, time.perf_counter() - started)
    return "published"


def _move_latest(store: Store, tier: str, manifest: dict) -> None:
    pointer = {"version": manifest["version"], "manifest": f"{release_prefix(tier, manifest['version'])}/{MANIFEST}"}
    store.put_bytes(f"{tier}/{LATEST}", json.dumps(pointer, indent=2).encode() + b"\n")


def check_release(store: Store, prefix: str) -> list[str]:
    """Problems of the release at `prefix` (empty when every file matches its manifest entry)."""
    manifest = _existing_manifest(store, prefix)
    if manifest is None:
        return [f"{prefix}/{MANIFEST}: missing (no release here, or an unfinished upload)"]
    problems = []
    for name, entry in manifest["files"].items():
        actual = store.sha256(f"{prefix}/{name}")
        if actual is None:
            problems.append(f"{name}: missing")
        elif actual != entry["sha256"]:
            problems.append(f"{name}: sha256 {actual[:12]}… differs from the manifest's {entry['sha256'][:12]}…")
    listed = {f"{prefix}/{name}" for name in manifest["files"]} | {f"{prefix}/{MANIFEST}"}
    problems += [f"{key[len(prefix) + 1:]}: not in the manifest" for key in store.keys(prefix) if key not in listed]
    return problems


def verify_release(store: Store, prefix: str) -> None:
    problems = check_release(store, prefix)
    if problems:
        raise UserError(f"{store.uri}/{prefix}: release does not match its manifest: " + "; ".join(problems))
