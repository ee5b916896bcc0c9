"""kill -9 during a real export: the next run of the stage sweeps what it left, and nothing the next
stage (parity, publish) reads ever holds a staging or scratch directory."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import BUNDLED_BASE

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")

EXPORT = """
import sys
from pathlib import Path
from vlm_factory.export.gguf_export import export_gguf
export_gguf(Path(sys.argv[1]), Path(sys.argv[2]), "phone", {"llm": "Q8_0", "vision": "F16"})
"""


def _hidden(tier_dir):
    return sorted(p.name for p in tier_dir.iterdir() if p.name.startswith("."))


def _kill_when_scratch_holds_data(child, tier_dir, timeout_s=120):
    """SIGKILL the exporter once its staging dir exists and its scratch holds an intermediate file."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert child.poll() is None, f"the export ended before it could be killed: {child.stderr.read()}"
        names = _hidden(tier_dir) if tier_dir.is_dir() else []
        scratch = [tier_dir / n for n in names if ".scratch-" in n]
        if any(".staging-" in n for n in names) and any(any(s.iterdir()) for s in scratch if s.is_dir()):
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
            return
        time.sleep(0.02)
    child.kill()
    pytest.fail("no staging + scratch directory appeared")


def test_kill_9_during_export_leaves_nothing_for_the_next_stage(tmp_path):
    from vlm_factory.export.gguf_export import export_gguf
    from vlm_factory.publish.bundle import collect

    tier_dir = tmp_path / "export" / "phone"
    out = tier_dir / "gguf"
    child = subprocess.Popen([sys.executable, "-c", EXPORT, str(BUNDLED_BASE), str(out)],
                             stderr=subprocess.PIPE, text=True)
    _kill_when_scratch_holds_data(child, tier_dir)
    assert child.returncode == -signal.SIGKILL
    leftovers = _hidden(tier_dir)
    assert any(".staging-" in n for n in leftovers) and any(".scratch-" in n for n in leftovers), leftovers
    assert not out.exists(), "a killed export must not leave a half-written output"
    # The next run of the stage sweeps the dead writer's directories, then writes the output atomically.
    export_gguf(BUNDLED_BASE, out, "phone", {"llm": "Q8_0", "vision": "F16"})
    assert sorted(p.name for p in tier_dir.iterdir()) == ["gguf"]
    # What the publish stage reads of this tier: the export directory's own files, none hidden.
    bundle = collect("phone", ["gguf"], tmp_path / "export", tmp_path / "parity", tmp_path / "budget.json")
    gguf_files = [name for name in bundle.files if name.startswith("gguf/")]
    assert gguf_files and not [n for n in gguf_files if "/." in n or ".tmp" in n]
