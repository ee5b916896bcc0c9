"""An artifact is tried in a child process before this process loads it: a crash, hang or failure
there is a one-line error naming the artifact, and a good artifact opens as before."""

import json
import os
import stat
import sys

import pytest

from conftest import BUNDLED_BASE
from vlm_factory.errors import UserError
from vlm_factory.runtime.isolated import check_in_child


@pytest.fixture(scope="module")
def gguf_artifact(tmp_path_factory):
    from vlm_factory.export.gguf_export import export_gguf

    out = tmp_path_factory.mktemp("isolated") / "gguf"
    export_gguf(BUNDLED_BASE, out, "phone", {"llm": "Q8_0", "vision": "F16"})
    return out


def test_a_good_artifact_passes_the_child_check_and_opens(gguf_artifact):
    from vlm_factory.runtime.open import open_runtime

    from PIL import Image

    assert check_in_child("gguf", gguf_artifact, context_tokens=256, kv_cache="f16") > 0
    with open_runtime("gguf", gguf_artifact, context_tokens=256, kv_cache="f16") as runtime:  # child first, then here
        [answer] = runtime.answer([Image.new("RGB", (32, 32), (200, 30, 30))], ["What color is the shape?"])
    assert isinstance(answer, str) and answer


def test_the_childs_own_one_line_error_is_passed_on(gguf_artifact, tmp_path):
    import shutil

    broken = tmp_path / "gguf"
    shutil.copytree(gguf_artifact, broken)
    report = json.loads((broken / "export_report.json").read_text())
    (broken / report["files"]["mmproj"]["file"]).write_bytes(b"GGUF" + b"\0" * 12)  # truncated mmproj
    with pytest.raises(UserError) as info:
        check_in_child("gguf", broken, context_tokens=256, kv_cache="f16")
    message = str(info.value)
    assert "\n" not in message and report["files"]["mmproj"]["file"] in message, message


def test_a_hang_is_a_timeout_error(gguf_artifact):
    # Loading llama.cpp and answering takes seconds; 0.01 s stands for a runtime that never returns.
    with pytest.raises(UserError, match=r"did not load and answer within 0 s"):
        check_in_child("gguf", gguf_artifact, context_tokens=256, kv_cache="f16", timeout_s=0.01)


@pytest.mark.skipif(os.name != "posix", reason="signals are POSIX")
def test_a_crash_in_the_child_is_one_line_naming_the_artifact(gguf_artifact, tmp_path, monkeypatch):
    # No file of ours is known to crash the pinned runtimes any more (the pre-checks refuse them), so the
    # child here is an interpreter that dies of SIGSEGV on start: what a native crash looks like from outside.
    crashing = tmp_path / "python"
    crashing.write_text("#!/bin/sh\nkill -SEGV $$\n")
    crashing.chmod(crashing.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(sys, "executable", str(crashing))
    with pytest.raises(UserError) as info:
        check_in_child("gguf", gguf_artifact, context_tokens=256, kv_cache="f16")
    message = str(info.value)
    assert "\n" not in message and str(gguf_artifact) in message and "crashed (SIGSEGV)" in message, message
