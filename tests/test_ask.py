"""`vlm-factory ask --artifact`: where the artifact is and which runtime answers (the answers themselves are
checked end to end on real releases in test_pipeline_smoke.py)."""

import subprocess
import sys

import pytest

from vlm_factory.ask import Located, ask, locate
from vlm_factory.errors import UserError


@pytest.fixture
def release_folder(tmp_path):
    """A release's layout: one directory per format holding its export report, and the tier's budget."""
    for fmt in ("gguf", "onnx"):
        (tmp_path / fmt).mkdir()
        (tmp_path / fmt / "export_report.json").write_text(f'{{"format": "{fmt}"}}')
    (tmp_path / "budget.json").write_text('{"effective_context_tokens": 384, "kv_cache_dtype": "q8_0"}')
    return tmp_path


def test_a_release_folder_needs_a_format_when_it_has_several(release_folder):
    with pytest.raises(UserError, match="a release of gguf, onnx; choose one with --format"):
        locate(str(release_folder), None)
    with pytest.raises(UserError, match=r"no tflite artifact in this release \(it has gguf, onnx\)"):
        locate(str(release_folder), "tflite")
    located = locate(str(release_folder), "onnx")
    # The tier's own context and KV-cache type come from the release's budget.
    assert located == Located("onnx", release_folder / "onnx", 384, "q8_0", verified=False)


def test_what_is_not_an_artifact_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="no such directory; pass an export directory, a release folder"):
        locate(str(tmp_path / "missing"), None)
    with pytest.raises(UserError, match="neither an export directory nor a release"):
        locate(str(tmp_path), None)
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "export_report.json").write_text('{"format": "gguf"}')
    (tmp_path / "budget.json").write_text('{"context": 1}')
    with pytest.raises(UserError, match="budget.json: not a tier budget"):
        locate(str(tmp_path), None)


def test_core_ml_is_refused_off_macos(tmp_path):
    if sys.platform == "darwin":
        pytest.skip("on macOS Core ML programs run: the refusal is for every other platform")
    with pytest.raises(UserError, match="Core ML programs run only on macOS"):
        ask(Located("coreml", tmp_path, 256, "f16", verified=True), tmp_path / "image.png", "what?")


def test_the_cli_refuses_a_format_without_an_artifact(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vlm_factory.cli", "ask", "image.png", "what?", "--format", "onnx"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "--format chooses among an artifact's formats" in result.stderr
    assert "Traceback" not in result.stderr
