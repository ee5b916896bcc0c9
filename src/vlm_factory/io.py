"""Atomic outputs: everything is written to a temporary sibling and renamed into place.

A killed or failing stage therefore never leaves a half-written file or directory at its final path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temporary file path next to `final`; rename it over `final` only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.chmod(0o666 & ~_umask())  # mkstemp makes 0600 files; outputs should look like any other file
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(final: Path | str) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `final`; swap it in for `final` only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: Path | str, *, missing: str, fix: str, shown: Path | str | None = None) -> dict:
    """The JSON object in `path`, or a one-line UserError: `missing` is the whole message when the file is
    absent; `fix` says what to do when it is not a JSON object; `shown` is the name to print (default `path`)."""
    from vlm_factory.errors import UserError

    path = Path(path)
    shown = shown or path
    if not path.is_file():
        raise UserError(missing)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{shown}: not valid JSON ({str(exc).splitlines()[0][:120]}); {fix}") from None
    except RecursionError:  # nesting deeper than Python's parser recurses: no real file of ours is
        raise UserError(f"{shown}: JSON nested too deeply to be a real file; {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{shown}: not a JSON object; {fix}")
    return data


def write_json(data: object, path: Path | str) -> None:
    """Write pretty, key-sorted JSON atomically (metrics files are diffed in git)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_jsonl_rows(rows: Iterable[dict], path: Path | str) -> None:
    """One JSON object per line, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
