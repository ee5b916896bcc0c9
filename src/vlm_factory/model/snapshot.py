"""Bring a model snapshot into the pipeline: from the Hugging Face Hub or from a local directory.

Both routes end the same way: a directory of safetensors + configs with a SHA256SUMS file that
later stages (and releases) can verify. The bundled base is a local source whose SHA256SUMS was
written when it was made, so a corrupted or edited bundle is caught before anything trains on it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import shutil
import time
from pathlib import Path

from vlm_factory.config import ModelConfig
from vlm_factory.errors import UserError
from vlm_factory.io import atomic_dir
from vlm_factory.paths import contained

log = logging.getLogger(__name__)

CHECKSUM_FILE = "SHA256SUMS"
# Weights only as safetensors: pickled *.bin / *.pt files are never fetched, so never loaded.
MODEL_FILE_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.md"]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: Path) -> dict[str, str]:
    """Write SHA256SUMS (sha256sum format) for every file in `directory`, sorted by name."""
    sums = {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != CHECKSUM_FILE}
    (directory / CHECKSUM_FILE).write_text("".join(f"{h}  {n}\n" for n, h in sums.items()), encoding="utf-8")
    return sums


def read_checksums(directory: Path) -> dict[str, str]:
    """name -> sha256 from `directory`'s SHA256SUMS. Every name must be a plain file name inside the
    directory (no path, no link out of it); a missing or empty SHA256SUMS is an error, never 'nothing to check'."""
    path = directory / CHECKSUM_FILE
    real = contained(directory, CHECKSUM_FILE, what=directory, key=CHECKSUM_FILE, fix="restore the model directory")
    if not real.is_file():
        raise UserError(f"{path}: missing; a local model source must carry checksums (`sha256sum * > {CHECKSUM_FILE}`)")
    sums = {}
    for line_no, line in enumerate(real.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        digest, _, name = line.partition("  ")
        name = name.strip()
        if len(digest) != 64 or not name or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise UserError(f"{path}:{line_no}: not a 'sha256  filename' line")
        contained(directory, name, what=path, key=f"line {line_no}", plain=True, fix="restore the model directory")
        sums[name] = digest.lower()
    if not sums:
        raise UserError(f"{path}: empty; it must list every model file (`sha256sum * > {CHECKSUM_FILE}`)")
    return sums


def verify_checksums(directory: Path) -> dict[str, str]:
    """Check every file listed in SHA256SUMS; name the first one that is missing or differs.

    Only regular files inside `directory` are ever opened (read_checksums contains every name)."""
    sums = read_checksums(directory)
    for name, expected in sums.items():
        path = directory / name
        real = contained(directory, name, what=directory / CHECKSUM_FILE, key=name, plain=True,
                         fix="restore the model directory")
        if not real.is_file():
            raise UserError(f"{path}: listed in {CHECKSUM_FILE} but missing; restore the model directory")
        actual = sha256_file(real)
        if actual != expected:
            raise UserError(f"{path}: sha256 {actual[:12]}… does not match {CHECKSUM_FILE} ({expected[:12]}…); "
                            "the file is corrupt or was edited")
    return sums


def _model_files(directory: Path) -> list[str]:
    # A hub cache folder can hold more than allow_patterns fetched (pickles included): filter here.
    return sorted(p.name for p in directory.iterdir()
                  if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in MODEL_FILE_PATTERNS))


def materialise(snapshot: Path, out_dir: Path, source: str, root: Path | None = None) -> dict[str, str]:
    """The common end of every source: model files only (never pickles), copied atomically, checksummed.

    Every file must resolve inside `root` (default: the snapshot itself; a hub snapshot's links lead to
    its repository's blobs, so there it is the repository's cache folder)."""
    names = _model_files(snapshot)
    for name in names:
        contained(root or snapshot, str((snapshot / name).relative_to(root or snapshot)), what=source, key=name,
                  fix="remove the link or copy the file in")
    if not any(n.endswith(".safetensors") for n in names):
        raise UserError(f"{source}: no .safetensors weights; pickled weights are never loaded "
                        "(convert them to safetensors first)")
    with atomic_dir(out_dir) as tmp:
        for name in names:
            shutil.copy2(snapshot / name, tmp / name)  # follows the hub cache's symlinks to blobs
        return write_checksums(tmp)


def fetch_local(path: Path, out_dir: Path) -> dict[str, str]:
    """Verify a local model directory against its SHA256SUMS, then materialise it in `out_dir`."""
    if not path.is_dir():
        raise UserError(f"{path}: model directory not found (model.path); check the path or use model.source=hub")
    sums = verify_checksums(path)
    unlisted = [name for name in _model_files(path) if name not in sums]
    if unlisted:
        raise UserError(f"{path}: {', '.join(unlisted)} not listed in {CHECKSUM_FILE}; "
                        "add their sha256 or remove them")
    return materialise(path, out_dir, str(path))


def _download(repo_id: str, revision: str, kwargs: dict) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, **kwargs))
    except LocalEntryNotFoundError:
        raise UserError(f"{repo_id}@{revision}: not in the local Hugging Face cache and the hub cannot be reached "
                        "(no network or HF_HUB_OFFLINE=1); download it where there is network, "
                        "or use model.source=local") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{repo_id}@{revision}: cannot download from the hub ({reason[:200]}); "
                        "no network? use model.source=local") from None
    except Exception as exc:  # httpx transport errors do not share a base class with the above
        if type(exc).__module__.startswith(("httpx", "httpcore")):
            raise UserError(f"{repo_id}@{revision}: cannot reach the hub ({type(exc).__name__}); "
                            "no network? use model.source=local") from None
        raise


def fetch_hub(repo_id: str, revision: str, out_dir: Path, *, cache_dir: Path | None = None,
              endpoint: str | None = None, etag_timeout: float = 10.0) -> dict[str, str]:
    """`huggingface_hub.snapshot_download` at a pinned revision, then copy + checksum into `out_dir`.

    A pinned revision already in the cache is used without the network (HF_HUB_OFFLINE=1 forbids
    the network altogether). Network failures become one-line errors after huggingface_hub's
    bounded retries, never a hang.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    started = time.perf_counter()
    kwargs = dict(revision=revision, cache_dir=cache_dir, endpoint=endpoint, allow_patterns=MODEL_FILE_PATTERNS,
                  etag_timeout=etag_timeout)
    try:
        # A pinned commit in the cache can never change: use it without touching the network.
        snapshot = Path(snapshot_download(repo_id, local_files_only=True, **kwargs))
        log.info("%s@%s found in the local Hugging Face cache", repo_id, revision[:12])
    except LocalEntryNotFoundError:
        snapshot = _download(repo_id, revision, kwargs)
    # <cache>/models--org--name/snapshots/<rev>: links there point into <cache>/models--org--name/blobs.
    sums = materialise(snapshot, out_dir, f"{repo_id}@{revision}", root=snapshot.parent.parent)
    log.info("fetched %s@%s (%d files) in %.1fs", repo_id, revision[:12], len(sums), time.perf_counter() - started)
    return sums


def fetch_model(model: ModelConfig, out_dir: Path) -> dict[str, str]:
    """The `download` stage's model half: whichever source `model.source` names."""
    if model.source == "hub":
        return fetch_hub(model.repo_id, model.revision, out_dir)
    return fetch_local(Path(model.path), out_dir)
