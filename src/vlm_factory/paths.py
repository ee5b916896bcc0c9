"""Keep every path an artifact or model directory names inside that directory.

Export reports, runtime configs (onnx_config.json, tflite_config.json, coreml_config.json), ONNX
external-data references and SHA256SUMS entries all name files by a string someone else wrote. A
crafted or corrupted directory could name `/etc/passwd`, `../../secrets.bin`, or a symlink that
points out of it, and the runtime that opens the name would then read (and, for checksums, hash and
partly print) a file the pipeline never made. `contained` is the one check every loader applies
before any runtime opens such a name: absolute paths, `..` that leaves, and names whose target,
symlinks resolved, lies outside the resolved directory are refused with a one-line UserError naming
the file and key that named them; so is anything but a regular file (a FIFO, a device, a directory)
where a file is expected. Nothing outside the directory is opened or stat'ed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath

from vlm_factory.errors import UserError


def is_absolute(name: str) -> bool:
    """Absolute in either convention: a Windows drive or UNC path is as foreign on Linux as /etc is on Windows."""
    return (PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute()
            or bool(PureWindowsPath(name).drive) or name.startswith(("/", "\\")))


def _inside(target: str, root: str) -> bool:
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


def contained(root: Path | str, name, *, what: Path | str, key: str | None = None, kind: str = "file",
              plain: bool = False, fix: str = "re-export it") -> Path:
    """`root / name` resolved (symlinks followed), refused unless it stays inside the resolved `root`.

    what: the file that names the path (for the message); key: where in it (a JSON key, a line).
    kind: "file" (a regular file when it exists), "dir" (a directory when it exists) or "any".
    plain: the name must be a bare file name (no directory part at all), as SHA256SUMS entries are.
    A name that does not exist is returned (resolved) for the caller's own "missing" message.
    """
    where = f"{what}: {key}" if key else f"{what}"

    def refuse(reason: str) -> UserError:
        return UserError(f"{where} names {name!r}, {reason}; refusing to load this model ({fix})")

    if not isinstance(name, str) or not name or "\x00" in name or "\n" in name or "\r" in name:
        raise refuse("not a file name")
    if is_absolute(name):
        raise refuse(f"an absolute path (files must be named relative to {Path(root)})")
    if plain and (name in (".", "..") or "/" in name or "\\" in name):
        raise refuse("not a plain file name")
    base = os.path.realpath(root)
    target = os.path.realpath(os.path.join(base, name))
    if not _inside(target, base):
        raise refuse(f"which resolves outside {Path(root)}")
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return Path(target)
    except OSError as exc:
        raise refuse(f"which cannot be read ({exc.strerror})") from None
    if kind == "file" and not stat.S_ISREG(mode):
        raise refuse("not a regular file")
    if kind == "dir" and not stat.S_ISDIR(mode):
        raise refuse("not a directory")
    return Path(target)


def contained_tree(root: Path | str, directory: Path | str, *, what: Path | str, key: str | None = None,
                   fix: str = "re-export it") -> None:
    """Refuse any entry below `directory` (itself inside `root`) that resolves outside `root` or is not a
    regular file or directory (a package's files are read by libraries that follow links)."""
    base = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(directory):
        for entry in dirnames + filenames:
            rel = os.path.relpath(os.path.join(dirpath, entry), base)
            target = contained(base, rel, what=what, key=key, kind="any", fix=fix)
            try:
                mode = os.stat(target).st_mode
            except OSError:
                mode = 0
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise UserError(f"{what}: {key or 'entry'} holds {rel!r}, not a readable regular file; "
                                f"refusing to load this model ({fix})")
