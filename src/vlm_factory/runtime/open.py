"""Open an exported artifact directory in its own runtime, by format."""

from __future__ import annotations

import logging
from pathlib import Path

from vlm_factory.artifacts import EXPORT_REPORT, read_export_report, report_file
from vlm_factory.errors import UserError

log = logging.getLogger(__name__)


def open_runtime(fmt: str, artifact_dir: Path, *, context_tokens: int, kv_cache: str, isolated: bool = True):
    """A runtime adapter (answer, image_embeddings, close) over the artifact in `artifact_dir`.

    isolated: first open it and answer one question in a child process (runtime/isolated.py), so a
    file that crashes or hangs the native runtime is a one-line error instead of killing this process.
    """
    artifact_dir = Path(artifact_dir)
    report = read_export_report(artifact_dir)
    if report.get("format") != fmt:
        raise UserError(f"{artifact_dir}: holds a {report.get('format')!r} export, not {fmt!r}")
    if isolated:
        from vlm_factory.runtime.isolated import check_in_child

        seconds = check_in_child(fmt, artifact_dir, context_tokens=context_tokens, kv_cache=kv_cache)
        log.info("%s loads and answers in its %s runtime in a child process (%.1f s)", artifact_dir, fmt, seconds)
    if fmt == "gguf":
        from vlm_factory.runtime.llama_cpp import LlamaCppRuntime
        from vlm_factory.runtime.prompting import prompt_from_config

        # Contained before llama.cpp opens anything: an absolute, `../` or outward-linked name is refused.
        llm, mmproj = report_file(artifact_dir, report, "llm"), report_file(artifact_dir, report, "mmproj")
        prompt = prompt_from_config(report.get("prompt"), artifact_dir / EXPORT_REPORT)
        return LlamaCppRuntime(llm, mmproj, n_ctx=context_tokens, kv_cache=kv_cache, prompt=prompt)
    if fmt == "onnx":
        from vlm_factory.runtime.onnx_runtime import OnnxRuntime

        return OnnxRuntime(artifact_dir)
    if fmt == "coreml":
        from vlm_factory.runtime.coreml_runtime import CoreMLRuntime

        return CoreMLRuntime(artifact_dir)
    if fmt == "tflite":
        from vlm_factory.runtime.tflite_runtime import TFLiteRuntime

        return TFLiteRuntime(artifact_dir)
    raise UserError(f"format {fmt!r} has no runtime adapter yet")
