"""Publish a bundle as an immutable, verified release, and verify any release against its manifest.

Layout of a release in the store (`<upload>` is `upload-<UTC time>-<random hex>`):

    <tier>/<version>/manifest.json     the release itself: sha256 and size of every file, provenance,
                                       `"upload": "<upload>"`, the upload prefix that holds its files, and
                                       `"signature"` (method, public key fingerprint) when signed
    <tier>/<version>/<upload>/...      the files: gguf/..., onnx/..., parity/<format>.json, budget.json,
                                       README.md (the model card; its paths are relative to this folder),
                                       report.html (the parity report, self-contained)
    <tier>/<version>/<upload>/manifest.sig   the signature of manifest.json's exact bytes (signing.py)
    <tier>/latest.json                 {"version", "manifest", "files"}: moved only after verification

How a publish goes, and why it cannot corrupt a release however many publishers race:

1. If `<tier>/<version>/manifest.json` exists, the version is taken: the same artifacts make this
   publish a no-op ("unchanged"; verified, latest moved), different ones are refused.
2. Every file is uploaded below a fresh upload prefix of this attempt's own, each read back and
   hashed, then the manifest's signature next to them. No two publishers ever write the same key, so
   nothing one of them does (a loser of a race, a killed upload, a retry) can touch the bytes (or the
   signature) another one's manifest names.
3. The manifest is the one commit point: written once, conditionally (S3 If-None-Match, link(2) on
   a file store). If it exists already, it is read back: byte-identical to ours (it names our
   random upload prefix, so nobody else's can be) means our own write landed and only its reply
   was lost, the retry got 412: success. Anything else means another publisher won: identical
   artifacts make ours "unchanged", different ones are the one-line error "version X already
   published with different content"; either way our now unreferenced upload is deleted (best
   effort). A manifest that changed under us after our write succeeded (a store without atomic
   conditional writes) is treated the same way.
4. The release is re-verified from the store (its signature with the signing key's public half); only
   then does latest.json move.

A publish killed before step 3 leaves an upload prefix no manifest names and no release: `vlm-factory
gc` (gc.py) lists such orphans and deletes them. Releases made before upload prefixes existed (no
"upload" in the manifest) keep their files directly in `<tier>/<version>/`; verify reads both.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from datetime import datetime, timezone

from vlm_factory.errors import UserError
from vlm_factory.logs import progress_bar
from vlm_factory.publish.bundle import MANIFEST, Bundle, artifact_entries
from vlm_factory.publish.signing import (METHOD, SIGNATURE, SigningKey, public_key_sha256, sign_manifest,
                                        signature_problem)
from vlm_factory.publish.store import AlreadyExists, Store

log = logging.getLogger(__name__)

LATEST = "latest.json"
UPLOAD_PATTERN = re.compile(r"upload-\d{8}T\d{6}Z-[0-9a-f]{16}")


def release_prefix(tier: str, version: str) -> str:
    return f"{tier}/{version}"


def new_upload_id() -> str:
    """A name no other publish attempt picks: the time (for people reading a listing) and 64 random bits."""
    return f"upload-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(8)}"


def is_upload_id(name: str) -> bool:
    return UPLOAD_PATTERN.fullmatch(name) is not None


def manifest_bytes_of(manifest: dict) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"


class InvalidManifest(UserError):
    """A manifest.json that is there but cannot be read as one."""


def parse_manifest(data: bytes, where: str) -> dict:
    """The manifest's JSON, checked for what locating its files needs; InvalidManifest naming `where` if not."""
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidManifest(f"{where}: not a valid manifest ({error})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise InvalidManifest(f"{where}: not a valid manifest (no 'files' table)")
    upload = manifest.get("upload")
    if upload is not None and not (isinstance(upload, str) and is_upload_id(upload)):
        raise InvalidManifest(f"{where}: not a valid manifest ('upload' is {upload!r}, not an upload prefix)")
    return manifest


def files_root(prefix: str, manifest: dict) -> str:
    """Where the files of the release at `prefix` live: its upload prefix (or `prefix` itself for old releases)."""
    return f"{prefix}/{manifest['upload']}" if manifest.get("upload") else prefix


def read_manifest(store: Store, prefix: str) -> dict | None:
    """The manifest of the release at `prefix`; None when there is none."""
    data = store.get_bytes(f"{prefix}/{MANIFEST}")
    return parse_manifest(data, f"{store.uri}/{prefix}/{MANIFEST}") if data is not None else None


def publish_bundle(store: Store, bundle: Bundle, manifest: dict, signing_key: SigningKey | None = None) -> str:
    """Upload `bundle` as release `<tier>/<version>` described by `manifest` (everything but "upload" and
    "signature", which are added here), signed with `signing_key` when given; returns "published" or
    "unchanged". See the module docstring."""
    version = str(manifest["version"])
    if not version or "/" in version or version in (".", ".."):
        raise UserError(f"publish.version {version!r}: one path segment, e.g. 1.2.0")
    prefix = release_prefix(bundle.tier, version)
    manifest_key = f"{prefix}/{MANIFEST}"
    existing = read_manifest(store, prefix)
    if existing is not None:
        return _taken(store, bundle.tier, prefix, existing, manifest)
    started = time.perf_counter()
    upload = new_upload_id()
    manifest = {**manifest, "upload": upload}
    public_pem = signing_key.public_pem() if signing_key else None
    if public_pem:
        manifest["signature"] = {"file": SIGNATURE, "method": METHOD,
                                 "public_key_sha256": public_key_sha256(public_pem)}
    ours = manifest_bytes_of(manifest)
    root = files_root(prefix, manifest)
    uploads = list(bundle.files.items()) + list(bundle.generated.items())
    for name, source in progress_bar(uploads, desc=f"upload {prefix}", unit="file"):
        key = f"{root}/{name}"
        if isinstance(source, bytes):
            store.put_bytes(key, source)
        else:
            store.put_file(key, source)
        if store.sha256(key) != manifest["files"][name]["sha256"]:
            raise UserError(f"{store.uri}/{key}: read back with a different sha256 than the local file; "
                            "publish again")
    if signing_key:
        store.put_bytes(f"{root}/{SIGNATURE}", sign_manifest(ours, signing_key))
    try:
        store.put_bytes(manifest_key, ours, only_if_absent=True)
    except AlreadyExists:
        pass  # someone's manifest is there: ours (a retry whose first reply was lost) or a winner's
    stored = store.get_bytes(manifest_key)
    if stored is None:
        raise UserError(f"{store.uri}/{manifest_key}: gone right after it was written; is something deleting "
                        "releases? publish again")
    if stored != ours:
        _discard(store, root)
        return _taken(store, bundle.tier, prefix, parse_manifest(stored, f"{store.uri}/{manifest_key}"), manifest)
    verify_release(store, prefix, public_pem)
    _move_latest(store, bundle.tier, manifest)
    log.info("published %s/%s: %d files in %.1fs", store.uri, prefix, len(uploads) + 1, time.perf_counter() - started)
    return "published"


def _taken(store: Store, tier: str, prefix: str, existing: dict, manifest: dict) -> str:
    """The version exists already: a no-op for the same artifacts, refused for different ones."""
    if artifact_entries(existing) != artifact_entries(manifest):
        raise UserError(f"{store.uri}/{prefix}: version {manifest['version']} already published with different "
                        "content; releases are immutable: set a new publish.version")
    log.info("%s/%s: already published with identical content", store.uri, prefix)
    verify_release(store, prefix)
    _move_latest(store, tier, existing)
    return "unchanged"


def _discard(store: Store, root: str) -> None:
    """Delete an upload no manifest names (ours, after losing); what fails to go is left to `vlm-factory gc`."""
    try:
        store.delete([obj.key for obj in store.objects(root)])
    except UserError as error:
        log.warning("%s/%s: not referenced, left for `vlm-factory gc`: %s", store.uri, root, error)


def _move_latest(store: Store, tier: str, manifest: dict) -> None:
    prefix = release_prefix(tier, manifest["version"])
    pointer = {"version": manifest["version"], "manifest": f"{prefix}/{MANIFEST}",
               "files": files_root(prefix, manifest)}
    store.put_bytes(f"{tier}/{LATEST}", json.dumps(pointer, indent=2).encode() + b"\n")


def check_release(store: Store, prefix: str, public_key: bytes | None = None) -> list[str]:
    """Problems of the release at `prefix` (empty when every file matches its manifest entry and, given
    the publisher's `public_key` (PEM), the manifest's signature verifies with it).

    File names in problems are relative to the release's files (its upload prefix). Other upload
    prefixes next to it (a loser's or a killed publish's, no manifest names them) are not part of
    the release and not reported: `vlm-factory gc` removes them."""
    manifest_bytes = store.get_bytes(f"{prefix}/{MANIFEST}")
    if manifest_bytes is None:
        return [f"{prefix}/{MANIFEST}: missing (no release here, or an unfinished upload)"]
    try:
        manifest = parse_manifest(manifest_bytes, f"{store.uri}/{prefix}/{MANIFEST}")
    except InvalidManifest as error:
        return [str(error)]
    root = files_root(prefix, manifest)
    signature = store.get_bytes(f"{root}/{SIGNATURE}")
    problems = []
    if public_key is not None:
        problem = signature_problem(manifest_bytes, signature, public_key)
        if problem:
            problems.append(problem)
    elif signature is None and manifest.get("signature"):
        problems.append(f"{SIGNATURE}: missing (the manifest says the release is signed)")
    for name, entry in manifest["files"].items():
        actual = store.sha256(f"{root}/{name}")
        if actual is None:
            problems.append(f"{name}: missing")
        elif actual != entry["sha256"]:
            problems.append(f"{name}: sha256 {actual[:12]}… differs from the manifest's {entry['sha256'][:12]}…")
    listed = {f"{root}/{name}" for name in manifest["files"]} | {f"{prefix}/{MANIFEST}", f"{root}/{SIGNATURE}"}
    for key in store.keys(prefix):
        if key in listed:
            continue
        first = key[len(prefix) + 1:].split("/", 1)[0]
        if is_upload_id(first) and first != manifest.get("upload"):
            continue  # another upload's object, not this release's
        base = root if key.startswith(root + "/") else prefix
        problems.append(f"{key[len(base) + 1:]}: not in the manifest")
    return problems


def verify_release(store: Store, prefix: str, public_key: bytes | None = None) -> None:
    problems = check_release(store, prefix, public_key)
    if problems:
        raise UserError(f"{store.uri}/{prefix}: release does not match its manifest: " + "; ".join(problems))
