"""Download a published release to a local folder, checked against its manifest (and signature) first.

`<store uri>/<tier>/<version>` (or `<tier>/latest`) becomes `<cache>/<tier>/<version>/`, holding the
release's files as they are in the store (gguf/..., onnx/..., budget.json, ...) plus manifest.json and
manifest.sig. With the publisher's public key the manifest's signature is checked before any file is
fetched; every file is hashed as it arrives and refused unless it matches its manifest entry. A folder
already complete from an earlier fetch of the same manifest is re-hashed instead of downloaded again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from vlm_factory.errors import UserError
from vlm_factory.logs import progress_bar
from vlm_factory.publish.bundle import MANIFEST
from vlm_factory.publish.release import LATEST, files_root, parse_manifest
from vlm_factory.publish.signing import SIGNATURE, signature_problem
from vlm_factory.publish.store import Store, file_chunks, sha256_of

log = logging.getLogger(__name__)

COMPLETE = ".complete"  # written last: the folder holds every file of the manifest next to it


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlm-factory" / "releases"


def resolve_version(store: Store, tier: str, version: str) -> str:
    """`latest` is what `<tier>/latest.json` points at; any other version is taken as given."""
    if version != "latest":
        return version
    pointer = store.get_bytes(f"{tier}/{LATEST}")
    if pointer is None:
        raise UserError(f"{store.uri}/{tier}/{LATEST}: missing; no release of tier {tier!r} was published there")
    try:
        return str(json.loads(pointer)["version"])
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{store.uri}/{tier}/{LATEST}: not a release pointer; name the version instead") from None


def fetch_release(store: Store, tier: str, version: str, cache: Path, public_key: bytes | None = None) -> Path:
    """The release's folder under `cache`, every file checked (see the module docstring)."""
    started = time.perf_counter()
    version = resolve_version(store, tier, version)
    prefix = f"{tier}/{version}"
    manifest_bytes = store.get_bytes(f"{prefix}/{MANIFEST}")
    if manifest_bytes is None:
        raise UserError(f"{store.uri}/{prefix}: no release there (no {MANIFEST})")
    manifest = parse_manifest(manifest_bytes, f"{store.uri}/{prefix}/{MANIFEST}")
    root = files_root(prefix, manifest)
    signature = store.get_bytes(f"{root}/{SIGNATURE}")
    if public_key is not None:
        problem = signature_problem(manifest_bytes, signature, public_key)
        if problem:
            raise UserError(f"{store.uri}/{prefix}: {problem}; not fetched")
    dest = cache / tier / version
    if (dest / COMPLETE).is_file() and (dest / MANIFEST).read_bytes() == manifest_bytes:
        _check_local(dest, manifest)
        log.info("%s/%s: already here (%s), every file re-hashed", store.uri, prefix, dest)
        return dest
    (dest / COMPLETE).unlink(missing_ok=True)
    for name, entry in progress_bar(sorted(manifest["files"].items()), desc=f"fetch {prefix}", unit="file"):
        target = _inside(dest, name)
        actual = store.get_file(f"{root}/{name}", target)
        if actual != entry["sha256"]:
            target.unlink(missing_ok=True)
            why = "missing" if actual is None else f"sha256 {actual[:12]}… differs from the manifest's"
            raise UserError(f"{store.uri}/{root}/{name}: {why}; the release is damaged (`vlm-factory verify` "
                            "lists every problem)")
    if signature is not None:
        (dest / SIGNATURE).write_bytes(signature)
    (dest / MANIFEST).write_bytes(manifest_bytes)
    (dest / COMPLETE).write_text(version + "\n")
    size = sum(entry["size"] for entry in manifest["files"].values())
    log.info("fetched %s/%s to %s: %d files, %.1f MiB in %.1f s", store.uri, prefix, dest, len(manifest["files"]),
             size / 2**20, time.perf_counter() - started)
    return dest


def _inside(dest: Path, name: str) -> Path:
    """`dest/name`, refusing a manifest entry that would land outside `dest` (an absolute or `../` name)."""
    target = (dest / name).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise UserError(f"{name!r}: a manifest entry outside the release; refusing to fetch it")
    return target


def _check_local(dest: Path, manifest: dict) -> None:
    for name, entry in manifest["files"].items():
        path = _inside(dest, name)
        if not path.is_file() or sha256_of(file_chunks(path)) != entry["sha256"]:
            raise UserError(f"{path}: changed since it was fetched; delete {dest} and ask again")
