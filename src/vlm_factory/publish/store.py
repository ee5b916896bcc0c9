"""Object storage for releases: a local directory (`file://`) or S3 (`s3://bucket/prefix`), one interface.

Keys are `/`-separated paths below the store's root. Writes are whole objects: a file store
writes to a temporary sibling and renames; S3 uploads through boto3's transfer manager (multipart
above a threshold) with a SHA-256 checksum S3 verifies on arrival, and retries with exponential
backoff (botocore's standard mode). `put` with `only_if_absent` is a conditional write (S3:
If-None-Match), so two publishers cannot both create the same release. Credentials for S3 come
only from the usual AWS chain (environment, profile, instance role) and are never logged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from vlm_factory.errors import UserError
from vlm_factory.io import atomic_path

CHUNK = 1 << 20


class AlreadyExists(Exception):
    """A conditional write found the key already there."""


class Store(Protocol):
    uri: str

    def put_file(self, key: str, path: Path, only_if_absent: bool = False) -> None: ...

    def put_bytes(self, key: str, data: bytes, only_if_absent: bool = False) -> None: ...

    def get_bytes(self, key: str) -> bytes | None: ...

    def sha256(self, key: str) -> str | None: ...

    def keys(self, prefix: str) -> list[str]: ...


def sha256_of(chunks: Iterator[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


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

    def _write(self, key: str, write, only_if_absent: bool) -> None:
        final = self._path(key)
        with atomic_path(final) as tmp:
            write(tmp)
            if only_if_absent:
                # link(2) refuses an existing name: the file system's own conditional write. The
                # rename that follows is then a no-op (both names are the same file).
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    raise AlreadyExists(key) from None

    def put_file(self, key: str, path: Path, only_if_absent: bool = False) -> None:
        self._write(key, lambda tmp: shutil.copyfile(path, tmp), only_if_absent)

    def put_bytes(self, key: str, data: bytes, only_if_absent: bool = False) -> None:
        self._write(key, lambda tmp: tmp.write_bytes(data), only_if_absent)

    def get_bytes(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.is_file() else None

    def sha256(self, key: str) -> str | None:
        path = self._path(key)
        return sha256_of(file_chunks(path)) if path.is_file() else None

    def keys(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(str(p.relative_to(self.root.resolve())) for p in base.rglob("*")
                      if p.is_file() and not p.name.startswith("."))


@dataclass
class S3Store:
    bucket: str
    prefix: str
    endpoint_url: str | None = None
    region: str | None = None
    multipart_threshold_mb: int = 64
    max_attempts: int = 8

    def __post_init__(self) -> None:
        import boto3
        from botocore.config import Config

        config = Config(retries={"max_attempts": self.max_attempts, "mode": "standard"},
                        region_name=self.region)
        self._client = boto3.client("s3", endpoint_url=self.endpoint_url, config=config)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _conditional(self, call, key: str):
        from botocore.exceptions import ClientError

        try:
            return call()
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise AlreadyExists(key) from None
            raise

    def put_file(self, key: str, path: Path, only_if_absent: bool = False) -> None:
        from boto3.s3.transfer import TransferConfig

        if only_if_absent:  # conditional writes are single requests; release files are small enough here
            self.put_bytes(key, path.read_bytes(), only_if_absent=True)
            return
        threshold = self.multipart_threshold_mb * 2**20
        transfer = TransferConfig(multipart_threshold=threshold, multipart_chunksize=threshold)
        self._client.upload_file(str(path), self.bucket, self._key(key), Config=transfer,
                                 ExtraArgs={"ChecksumAlgorithm": "SHA256"})

    def put_bytes(self, key: str, data: bytes, only_if_absent: bool = False) -> None:
        extra = {"IfNoneMatch": "*"} if only_if_absent else {}
        self._conditional(lambda: self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                                          ChecksumAlgorithm="SHA256", **extra), key)

    def get_bytes(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    def sha256(self, key: str) -> str | None:
        """Hash of the object as stored, read back in full (not the checksum S3 reports about itself)."""
        from botocore.exceptions import ClientError

        try:
            body = self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return sha256_of(iter(lambda: body.read(CHUNK), b""))

    def keys(self, prefix: str) -> list[str]:
        full = self._key(prefix).rstrip("/") + "/"
        skip = len(self.prefix) + 1 if self.prefix else 0
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
        return sorted(obj["Key"][skip:] for page in pages for obj in page.get("Contents", []))


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
