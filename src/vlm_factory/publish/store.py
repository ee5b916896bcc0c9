"""Object storage for releases: a local directory (`file://`) or S3 (`s3://bucket/prefix`), one interface.

Keys are `/`-separated paths below the store's root. Writes are whole objects: a file store
writes to a temporary sibling and renames; S3 uploads through boto3's transfer manager (multipart
above a threshold) with a SHA-256 checksum S3 verifies on arrival, and retries with exponential
backoff (botocore's standard mode). `put` with `only_if_absent` is a conditional write (S3:
If-None-Match, a file store: link(2)), so two publishers cannot both create the same key; it raises
`AlreadyExists` for whoever comes second, and for a retry of a write whose reply was lost (the
caller tells the two apart by reading the key back). Credentials for S3 come only from the usual
AWS chain (environment, profile, instance role) and are never logged.

Failures a user can act on are one-line `UserError`s naming the object (`s3://bucket/key` or the
file): a transport error after botocore's retries, an S3 error reply (no such bucket, access
denied), no credentials, a full disk. Listing (`objects`, with each object's size and time) and
deleting (`delete`, and `pending_uploads` / `abort_upload` for multipart uploads a killed process
left open) are what `vlm-factory gc` needs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from stat import S_ISREG
from typing import Protocol, TypeVar
from urllib.parse import urlparse

from vlm_factory.errors import UserError
from vlm_factory.io import atomic_path

CHUNK = 1 << 20
T = TypeVar("T")

_PRECONDITION_CODES = ("PreconditionFailed", "ConditionalRequestConflict")
_MISSING_CODES = ("NoSuchKey", "404")


class AlreadyExists(Exception):
    """A conditional write found the key already there."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    modified: datetime  # timezone-aware (UTC): S3's LastModified, a file's mtime


@dataclass(frozen=True)
class PendingUpload:
    """A multipart upload that was started and neither completed nor aborted (S3 only)."""

    key: str
    upload_id: str
    initiated: datetime


class Store(Protocol):
    uri: str

    def put_file(self, key: str, path: Path, only_if_absent: bool = False) -> None: ...

    def put_bytes(self, key: str, data: bytes, only_if_absent: bool = False) -> None: ...

    def get_bytes(self, key: str) -> bytes | None: ...

    def get_file(self, key: str, path: Path) -> str | None: ...

    def sha256(self, key: str) -> str | None: ...

    def keys(self, prefix: str) -> list[str]: ...

    def objects(self, prefix: str) -> list[StoredObject]: ...

    def delete(self, keys: list[str]) -> None: ...

    def pending_uploads(self, prefix: str) -> list[PendingUpload]: ...

    def abort_upload(self, upload: PendingUpload) -> None: ...


def sha256_of(chunks: Iterator[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def save_chunks(chunks: Iterator[bytes], path: Path) -> str:
    """Write `chunks` to `path` (a temporary sibling renamed on success); the sha256 of what was written."""
    digest = hashlib.sha256()
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        for chunk in chunks:
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@dataclass
class FileStore:
    root: Path

    @property
    def uri(self) -> str:
        return f"file://{self.root}"

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise UserError(f"{self.uri}: key {key!r} leaves the store")
        return path

    @contextmanager
    def _io(self, op: str, key: str) -> Iterator[None]:
        try:
            yield
        except OSError as error:
            raise UserError(f"{self.uri}/{key}: {op} failed: {_one_line(error)}") from error

    def _write(self, key: str, write, only_if_absent: bool, attempts: int = 3) -> None:
        final = self._path(key)
        for attempt in range(1, attempts + 1):
            try:
                with self._io("write", key), atomic_path(final) as tmp:
                    write(tmp)
                    if only_if_absent:
                        # link(2) refuses an existing name: the file system's own conditional write. The
                        # rename that follows is then a no-op (both names are the same file).
                        try:
                            os.link(tmp, final)
                        except FileExistsError:
                            raise AlreadyExists(key) from None
                return
            except UserError as error:
                # `delete` (gc, a loser cleaning up) may remove a directory that had just been emptied
                # between our mkdir and our write: write again.
                if not isinstance(error.__cause__, FileNotFoundError) or attempt == attempts:
                    raise

    def put_file(self, key: str, path: Path, only_if_absent: bool = False) -> None:
        self._write(key, lambda tmp: shutil.copyfile(path, tmp), only_if_absent)

    def put_bytes(self, key: str, data: bytes, only_if_absent: bool = False) -> None:
        self._write(key, lambda tmp: tmp.write_bytes(data), only_if_absent)

    def get_bytes(self, key: str) -> bytes | None:
        path = self._path(key)
        with self._io("read", key):
            try:
                return path.read_bytes()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return None

    def get_file(self, key: str, path: Path) -> str | None:
        """Copy the object to `path`; its sha256, or None when there is no such key."""
        source = self._path(key)
        with self._io("read", key):
            try:
                return save_chunks(file_chunks(source), path)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return None

    def sha256(self, key: str) -> str | None:
        path = self._path(key)
        with self._io("read", key):
            try:
                return sha256_of(file_chunks(path))
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return None

    def keys(self, prefix: str) -> list[str]:
        """Every file below `prefix` but the temporary ones of writes under way."""
        return [obj.key for obj in self.objects(prefix) if not Path(obj.key).name.startswith(".")]

    def objects(self, prefix: str) -> list[StoredObject]:
        """Every file below `prefix`, temporary ones (`.name.*.tmp`, a write under way or killed) included."""
        base = self._path(prefix)
        root = self.root.resolve()
        found = []
        def vanished_or_raise(error: OSError) -> None:
            if not isinstance(error, (FileNotFoundError, NotADirectoryError)):  # gone meanwhile: skipped
                raise error

        with self._io("list", prefix):
            for directory, _, names in os.walk(base, onerror=vanished_or_raise):
                for name in names:
                    path = Path(directory) / name
                    try:
                        stat = path.lstat()
                    except FileNotFoundError:  # removed while we listed
                        continue
                    if S_ISREG(stat.st_mode):
                        found.append(StoredObject(str(path.relative_to(root)), stat.st_size,
                                                  datetime.fromtimestamp(stat.st_mtime, timezone.utc)))
        return sorted(found, key=lambda obj: obj.key)

    def delete(self, keys: list[str]) -> None:
        """Remove the files, then every directory this left empty (never the store's root)."""
        root = self.root.resolve()
        parents = set()
        for key in keys:
            path = self._path(key)
            with self._io("delete", key):
                path.unlink(missing_ok=True)
            parents.add(path.parent)
        for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            while parent != root and parent.is_relative_to(root):
                try:
                    parent.rmdir()
                except OSError:  # not empty (or already gone): stop climbing
                    break
                parent = parent.parent

    def pending_uploads(self, prefix: str) -> list[PendingUpload]:
        return []  # a file store has no multipart uploads; a killed write leaves a `.tmp` file `objects` lists

    def abort_upload(self, upload: PendingUpload) -> None:
        raise NotImplementedError("a file store has no multipart uploads")


@dataclass
class S3Store:
    bucket: str
    prefix: str
    endpoint_url: str | None = None
    region: str | None = None
    multipart_threshold_mb: int = 64
    max_attempts: int = 8  # requests in all, the first included (botocore retries transient failures)
    read_attempts: int = 3  # re-reads of a body whose stream broke (botocore retries requests, not streams)

    def __post_init__(self) -> None:
        import boto3
        from botocore.config import Config

        config = Config(retries={"total_max_attempts": self.max_attempts, "mode": "standard"},
                        region_name=self.region)
        self._client = boto3.client("s3", endpoint_url=self.endpoint_url, config=config)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}".rstrip("/")

    def _call(self, op: str, key: str, call: Callable[[], T], *, missing_ok: bool = False,
              conditional: bool = False) -> T | None:
        """Run one S3 request (botocore retries it); map what is left of a failure to a one-line error."""
        import urllib3.exceptions
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return call()
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code")
            if conditional and code in _PRECONDITION_CODES:
                raise AlreadyExists(key) from None
            if missing_ok and code in _MISSING_CODES:
                return None
            raise UserError(f"{self._where(key)}: {op} failed: {_one_line(error)}") from error
        except NoCredentialsError as error:
            raise UserError(f"{self._where(key)}: {op} failed: no AWS credentials (set them in the environment, "
                            "a profile or an instance role)") from error
        except (BotoCoreError, Boto3Error, urllib3.exceptions.HTTPError) as error:
            if isinstance(error.__cause__ or error.__context__, ClientError):  # boto3's wrapping of an S3 reply
                raise UserError(f"{self._where(key)}: {op} failed: {_one_line(error)}") from error
            raise UserError(f"{self._where(key)}: {op} failed after {self.max_attempts} attempts: "
                            f"{_one_line(error)}") from error

    def put_file(self, key: str, path: Path, only_if_absent: bool = False) -> None:
        from boto3.s3.transfer import TransferConfig

        if only_if_absent:  # conditional writes are single requests; release files are small enough here
            self.put_bytes(key, path.read_bytes(), only_if_absent=True)
            return
        threshold = self.multipart_threshold_mb * 2**20
        transfer = TransferConfig(multipart_threshold=threshold, multipart_chunksize=threshold)
        self._call("upload", key, lambda: self._client.upload_file(
            str(path), self.bucket, self._key(key), Config=transfer, ExtraArgs={"ChecksumAlgorithm": "SHA256"}))

    def put_bytes(self, key: str, data: bytes, only_if_absent: bool = False) -> None:
        extra = {"IfNoneMatch": "*"} if only_if_absent else {}
        self._call("write", key, lambda: self._client.put_object(
            Bucket=self.bucket, Key=self._key(key), Body=data, ChecksumAlgorithm="SHA256", **extra),
            conditional=only_if_absent)

    def _read(self, key: str, consume: Callable[[object], T]) -> T | None:
        """GET `key` and hand its body to `consume`; None when there is no such key. A stream that
        breaks halfway is read again from the start (`read_attempts` times)."""
        for attempt in range(1, self.read_attempts + 1):
            response = self._call("read", key, lambda: self._client.get_object(Bucket=self.bucket,
                                                                               Key=self._key(key)),
                                  missing_ok=True)
            if response is None:
                return None
            try:
                return self._call("read", key, lambda: consume(response["Body"]))
            except UserError:
                if attempt == self.read_attempts:
                    raise
        raise AssertionError("unreachable")

    def get_bytes(self, key: str) -> bytes | None:
        return self._read(key, lambda body: body.read())

    def get_file(self, key: str, path: Path) -> str | None:
        """Stream the object to `path`; its sha256, or None when there is no such key."""
        return self._read(key, lambda body: save_chunks(iter(lambda: body.read(CHUNK), b""), path))

    def sha256(self, key: str) -> str | None:
        """Hash of the object as stored, read back in full (not the checksum S3 reports about itself)."""
        return self._read(key, lambda body: sha256_of(iter(lambda: body.read(CHUNK), b"")))

    def _full_prefix(self, prefix: str) -> str:
        full = self._key(prefix.strip("/")).rstrip("/")
        return full + "/" if full else ""

    def _relative(self, key: str) -> str:
        return key[len(self.prefix) + 1:] if self.prefix else key

    def keys(self, prefix: str) -> list[str]:
        return [obj.key for obj in self.objects(prefix)]

    def objects(self, prefix: str) -> list[StoredObject]:
        def listing():
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                           Prefix=self._full_prefix(prefix))
            return [StoredObject(self._relative(obj["Key"]), obj["Size"], obj["LastModified"])
                    for page in pages for obj in page.get("Contents", [])]

        return sorted(self._call("list", prefix, listing), key=lambda obj: obj.key)

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = keys[start:start + 1000]
            reply = self._call("delete", batch[0], lambda: self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": self._key(k)} for k in batch], "Quiet": True}))
            if reply.get("Errors"):
                error = reply["Errors"][0]
                raise UserError(f"s3://{self.bucket}/{error.get('Key')}: delete failed: {error.get('Code')}: "
                                f"{error.get('Message')} ({len(reply['Errors'])} of {len(batch)} keys failed)")

    def pending_uploads(self, prefix: str) -> list[PendingUpload]:
        full = self._full_prefix(prefix)

        def listing():
            pages = self._client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=full)
            return [PendingUpload(self._relative(up["Key"]), up["UploadId"], up["Initiated"])
                    for page in pages for up in page.get("Uploads", []) if up["Key"].startswith(full)]

        return sorted(self._call("list uploads", prefix, listing), key=lambda up: (up.key, up.upload_id))

    def abort_upload(self, upload: PendingUpload) -> None:
        self._call("abort upload", upload.key, lambda: self._client.abort_multipart_upload(
            Bucket=self.bucket, Key=self._key(upload.key), UploadId=upload.upload_id), missing_ok=True)


def open_store(uri: str, endpoint_url: str | None = None, region: str | None = None,
               multipart_threshold_mb: int = 64) -> Store:
    """A store for `file://path` (relative paths from the working directory) or `s3://bucket/prefix`."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return FileStore(Path(parsed.netloc + parsed.path))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise UserError(f"publish.uri {uri!r}: name a bucket, s3://bucket/prefix")
        return S3Store(parsed.netloc, parsed.path.strip("/"), endpoint_url, region, multipart_threshold_mb)
    raise UserError(f"publish.uri {uri!r}: use file://<dir> or s3://<bucket>/<prefix>")
