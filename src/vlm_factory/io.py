"""Atomic outputs: everything is written to a temporary sibling and renamed into place.

A killed or failing stage therefore never leaves a half-written file or directory at its final path.
Staging and scratch siblings are hidden (`.<name>.<kind>-<pid>-<random>.tmp`), removed on every exit
path Python sees, and - since `kill -9` leaves them behind - swept by the next writer of the same
output once the process that made them is gone. They sit next to the output (so the final rename is
atomic on one filesystem) but never inside it: a stage that reads `<dir>/<name>` never sees them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

# `.{name}.{kind}-{pid}-{random}.tmp`: the pid says whether the writer is still alive.
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?:staging|scratch|old)-(?P<pid>\d+)-[^/]*\.tmp")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _prefix(final: Path, kind: str) -> str:
    return f".{final.name}.{kind}-{os.getpid()}-"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sweep_leftovers(final: Path | str) -> list[Path]:
    """Remove the staging/scratch siblings of `final` that a killed writer (a dead pid) left; return them.

    A reused pid only makes the sweep skip a leftover until a later run; a live writer's files are never
    touched."""
    final = Path(final)
    swept = []
    if not final.parent.is_dir():
        return swept
    for entry in final.parent.iterdir():
        match = _LEFTOVER.fullmatch(entry.name)
        if match and match["name"] == final.name and not _alive(int(match["pid"])):
            _remove(entry)
            swept.append(entry)
    if swept:
        log.info("removed %d leftover(s) of a killed writer of %s: %s", len(swept), final,
                 ", ".join(p.name for p in swept))
    return swept


@contextmanager
def scratch_dir(near: Path | str) -> Iterator[Path]:
    """A temporary directory next to `near` (same filesystem, for big intermediates), removed on exit
    and swept like staging when a kill skips that."""
    near = Path(near)
    near.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(near)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(near, "scratch"), suffix=".tmp", dir=near.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temporary file path next to `final`; rename it over `final` only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(final)
    fd, tmp_name = tempfile.mkstemp(prefix=_prefix(final, "staging"), suffix=".tmp", dir=final.parent)
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
    sweep_leftovers(final)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(final, "staging"), suffix=".tmp", dir=final.parent))
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
        if final.exists():
            # Directories cannot be renamed over each other: move the old one aside (a name the sweep
            # knows), swap, then delete it. A kill in between leaves `final` absent, never half-written.
            old = Path(tempfile.mkdtemp(prefix=_prefix(final, "old"), suffix=".tmp", dir=final.parent))
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
