"""`vlm-factory gc`: find (and with `delete`, remove) upload prefixes no release manifest references.

A publish stages its files below `<tier>/<version>/<upload>/` and commits by writing
`<tier>/<version>/manifest.json`, which names that upload (release.py). An upload no manifest
names is an orphan: a publish that was killed, failed halfway, or lost a race and could not clean
up after itself. Nothing reads orphans; they only cost storage.

What gc never touches:

- an upload a manifest names, and anything that is not below an upload prefix (manifests,
  `latest.json`, releases from before upload prefixes, foreign keys);
- an upload with an object, or an unfinished multipart upload, younger than the grace period
  (default 1 hour): its publish may still be under way. The grace must be longer than a publish
  takes between writing its last object and its manifest (reading that object back once), and
  than any clock skew between this machine and the store;
- every upload of a version whose manifest cannot be read (reported, left alone).

Right before an orphan is deleted its version's manifest is read again, so a commit that lands
while gc runs is seen. Multipart uploads a killed process left open below an orphan (S3 keeps and
bills their parts, invisible to listings) are aborted with it; so are ones below a referenced
upload once older than the grace period (the release is complete, they cannot belong to it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from vlm_factory.errors import UserError
from vlm_factory.publish.bundle import MANIFEST
from vlm_factory.publish.release import InvalidManifest, is_upload_id, read_manifest
from vlm_factory.publish.store import PendingUpload, Store, StoredObject

log = logging.getLogger(__name__)

DEFAULT_GRACE = timedelta(hours=1)


@dataclass
class Upload:
    """One upload prefix, `<tier>/<version>/<upload>`, and what is stored below it."""

    prefix: str
    objects: list[StoredObject] = field(default_factory=list)
    pending: list[PendingUpload] = field(default_factory=list)

    @property
    def version_prefix(self) -> str:
        return self.prefix.rsplit("/", 1)[0]

    @property
    def upload_id(self) -> str:
        return self.prefix.rsplit("/", 1)[1]

    @property
    def size(self) -> int:
        return sum(obj.size for obj in self.objects)

    @property
    def last_activity(self) -> datetime | None:
        times = [obj.modified for obj in self.objects] + [up.initiated for up in self.pending]
        return max(times) if times else None


@dataclass
class GcReport:
    grace: timedelta
    orphans: list[Upload] = field(default_factory=list)       # deleted when `deleted`
    in_flight: list[Upload] = field(default_factory=list)     # unreferenced but younger than the grace period
    referenced: list[Upload] = field(default_factory=list)    # a manifest names them: releases
    stale_pending: list[PendingUpload] = field(default_factory=list)  # open multipart uploads below referenced ones
    unreadable: list[str] = field(default_factory=list)       # versions whose manifest could not be read
    deleted: bool = False

    @property
    def orphan_objects(self) -> int:
        return sum(len(up.objects) for up in self.orphans)

    @property
    def orphan_bytes(self) -> int:
        return sum(up.size for up in self.orphans)


def _upload_prefix(key: str) -> str | None:
    """`<tier>/<version>/<upload>` when `key` lies below an upload prefix, else None."""
    parts = key.split("/")
    if len(parts) >= 4 and is_upload_id(parts[2]):
        return "/".join(parts[:3])
    return None


def _referenced_upload(store: Store, version_prefix: str) -> tuple[bool, str | None]:
    """(manifest readable, the upload it names). A missing manifest is readable and names none."""
    try:
        manifest = read_manifest(store, version_prefix)
    except InvalidManifest:
        return False, None
    return True, (manifest or {}).get("upload")


def collect_garbage(store: Store, *, grace: timedelta = DEFAULT_GRACE, delete: bool = False,
                    now: datetime | None = None) -> GcReport:
    """Classify every upload prefix in `store`; with `delete`, remove the orphans. Returns what was found."""
    if grace < timedelta(0):
        raise UserError(f"gc grace period {grace}: must not be negative")
    now = now or datetime.now(timezone.utc)
    report = GcReport(grace=grace)
    uploads: dict[str, Upload] = {}
    for obj in store.objects(""):
        prefix = _upload_prefix(obj.key)
        if prefix is not None:
            uploads.setdefault(prefix, Upload(prefix)).objects.append(obj)
    for pending in store.pending_uploads(""):
        prefix = _upload_prefix(pending.key)
        if prefix is not None:
            uploads.setdefault(prefix, Upload(prefix)).pending.append(pending)

    manifests: dict[str, tuple[bool, str | None]] = {}
    for prefix in sorted(uploads):
        upload = uploads[prefix]
        version = upload.version_prefix
        if version not in manifests:
            manifests[version] = _referenced_upload(store, version)
            if not manifests[version][0]:
                report.unreadable.append(version)
        readable, referenced = manifests[version]
        if not readable:
            continue
        if referenced == upload.upload_id:
            report.referenced.append(upload)
            report.stale_pending += [up for up in upload.pending if now - up.initiated > grace]
        elif upload.last_activity is not None and now - upload.last_activity <= grace:
            report.in_flight.append(upload)
        else:
            report.orphans.append(upload)

    if delete:
        kept = []
        for upload in report.orphans:
            readable, referenced = _referenced_upload(store, upload.version_prefix)  # a commit meanwhile?
            if not readable or referenced == upload.upload_id:
                log.warning("%s/%s: referenced (or unreadable) by now, kept", store.uri, upload.prefix)
                continue
            for pending in upload.pending:
                store.abort_upload(pending)
            store.delete([obj.key for obj in upload.objects])
            kept.append(upload)
        for pending in report.stale_pending:
            store.abort_upload(pending)
        report.orphans = kept
        report.deleted = True
    return report


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _when(moment: datetime | None) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if moment else "-"


def format_report(report: GcReport, store_uri: str) -> str:
    lines = []
    verb = "deleted" if report.deleted else "orphan"
    for upload in report.orphans:
        pending = f", {len(upload.pending)} unfinished multipart" if upload.pending else ""
        lines.append(f"{verb:8} {upload.prefix}/  {len(upload.objects)} objects, {_mib(upload.size)}{pending}, "
                     f"last written {_when(upload.last_activity)}")
    for upload in report.in_flight:
        lines.append(f"{'kept':8} {upload.prefix}/  written {_when(upload.last_activity)}, within the "
                     f"{report.grace.total_seconds() / 3600:g} h grace period: may still be uploading")
    for pending in report.stale_pending:
        lines.append(f"{'aborted' if report.deleted else 'stale':8} {pending.key}  unfinished multipart upload "
                     f"started {_when(pending.initiated)}")
    for version in report.unreadable:
        lines.append(f"{'kept':8} {version}/  its {MANIFEST} is not readable: every upload of it left alone")
    count = (f"{len(report.orphans)} orphan uploads, {report.orphan_objects} objects, {_mib(report.orphan_bytes)}"
             f" ({len(report.referenced)} referenced by releases, {len(report.in_flight)} in flight)")
    if report.deleted:
        lines.append(f"{store_uri}: deleted {count}")
    elif report.orphans or report.stale_pending:
        lines.append(f"{store_uri}: {count}; dry run, nothing deleted: pass --delete to remove them")
    else:
        lines.append(f"{store_uri}: {count}; nothing to delete")
    return "\n".join(lines)
