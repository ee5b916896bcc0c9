"""Answer a question about an image with an exported artifact in its own runtime (`vlm-factory ask --artifact`).

The artifact may be
- an export directory (`artifacts/export/<tier>/<format>`: its export_report.json names the format),
- a release folder (a fetched or copied release: one `<format>/` directory per format, budget.json), or
- a release URI, `<store uri>/<tier>/<version>` or `<store uri>/<tier>/latest` (file:// or s3://),
  fetched and checked against its manifest (and, given the publisher's key, its signature) first.

The runtime applies the packaged preprocessing and prompt (the export report's), as the parity gate does.
Core ML programs run only on macOS (coremltools' predict); elsewhere the answer is a one-line refusal.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vlm_factory.artifacts import EXPORT_REPORT, read_export_report
from vlm_factory.errors import UserError

log = logging.getLogger(__name__)

RELEASE_SCHEMES = ("file://", "s3://")
DEFAULT_CONTEXT_TOKENS = 2048  # at most, without a tier: enough for a tiled image and an answer
DEFAULT_KV_CACHE = "f16"


@dataclass(frozen=True)
class Located:
    fmt: str
    directory: Path
    context_tokens: int
    kv_cache: str
    verified: bool  # checked against a release manifest (and so gated by parity when it was published)


def locate(artifact: str, fmt: str | None, *, public_key: bytes | None = None, cache: Path | None = None,
           endpoint_url: str | None = None, region: str | None = None) -> Located:
    """Where the `fmt` artifact of `artifact` (directory, release folder or release URI) is, and how to run it."""
    verified = False
    if artifact.startswith(RELEASE_SCHEMES):
        from vlm_factory.publish.fetch import default_cache, fetch_release
        from vlm_factory.publish.run import split_release_uri
        from vlm_factory.publish.store import open_store

        store_uri, prefix = split_release_uri(artifact)
        tier, version = prefix.split("/")
        store = open_store(store_uri, endpoint_url, region)
        folder = fetch_release(store, tier, version, cache or default_cache(), public_key)
        verified = True
    else:
        folder = Path(artifact)
        if not folder.is_dir():
            raise UserError(f"{folder}: no such directory; pass an export directory, a release folder or a "
                            "release URI (file://... or s3://.../<tier>/<version>)")
    if (folder / EXPORT_REPORT).is_file():  # an export directory
        found = read_export_report(folder).get("format")
        if fmt and fmt != found:
            raise UserError(f"{folder}: holds a {found!r} export, not {fmt!r}")
        return Located(found, folder, _untiered_context(found, folder), DEFAULT_KV_CACHE, verified)
    formats = sorted(p.parent.name for p in folder.glob(f"*/{EXPORT_REPORT}"))
    if not formats:
        raise UserError(f"{folder}: neither an export directory nor a release (no {EXPORT_REPORT} in it or its "
                        "subdirectories)")
    if fmt is None:
        if len(formats) > 1:
            raise UserError(f"{folder}: a release of {', '.join(formats)}; choose one with --format")
        fmt = formats[0]
    if fmt not in formats:
        raise UserError(f"{folder}: no {fmt} artifact in this release (it has {', '.join(formats)})")
    context, kv_cache = _tier_context(folder / "budget.json")
    return Located(fmt, folder / fmt, context, kv_cache, verified)


def _untiered_context(fmt: str, folder: Path) -> int:
    """An export directory alone names no tier: llama.cpp gets the LLM's trained context (capped), as more
    than that only warns and wastes memory; the other runtimes' graphs carry their own cache size."""
    if fmt != "gguf":
        return DEFAULT_CONTEXT_TOKENS
    from vlm_factory.artifacts import report_file
    from vlm_factory.runtime.gguf_check import trained_context

    llm = report_file(folder, read_export_report(folder), "llm")
    return min(trained_context(llm), DEFAULT_CONTEXT_TOKENS)


def _tier_context(budget_path: Path) -> tuple[int, str]:
    """The context and KV-cache type the release's tier runs with (its budget.json), else the defaults."""
    if not budget_path.is_file():
        return DEFAULT_CONTEXT_TOKENS, DEFAULT_KV_CACHE
    try:
        budget = json.loads(budget_path.read_text(encoding="utf-8"))
        return int(budget["effective_context_tokens"]), str(budget.get("kv_cache_dtype", DEFAULT_KV_CACHE))
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{budget_path}: not a tier budget (no effective_context_tokens); re-publish the release") \
            from None


def ask(located: Located, image_path: Path, question: str) -> str:
    """The artifact's greedy answer to `question` about the image at `image_path`."""
    from vlm_factory.data.images import load_image
    from vlm_factory.runtime.open import open_runtime

    if located.fmt == "coreml" and sys.platform != "darwin":
        raise UserError(f"{located.directory}: Core ML programs run only on macOS (coremltools' predict); ask a "
                        "gguf, onnx or tflite artifact here")
    image = load_image(image_path)
    started = time.perf_counter()
    # A release checked against its manifest was gated when it was published: open it directly. Any other
    # directory is first tried in a child process, so a file that crashes the native runtime is an error.
    runtime = open_runtime(located.fmt, located.directory, context_tokens=located.context_tokens,
                           kv_cache=located.kv_cache, isolated=not located.verified)
    try:
        answer = runtime.answer([image], [question])[0]
    finally:
        runtime.close()
    log.info("%s answered in %.1f s (%s runtime)", located.directory, time.perf_counter() - started, located.fmt)
    return answer
