"""Atomic outputs: a failure inside the block leaves nothing at the final path."""

import pytest

from vlm_factory.io import atomic_dir, atomic_path, write_json


def test_failed_directory_write_leaves_no_partial_output(tmp_path):
    final = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "weights.safetensors").write_bytes(b"half")
            raise RuntimeError("killed")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_previous_version(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "a.txt").write_text("v2")
            raise RuntimeError("killed")
    assert (final / "a.txt").read_text() == "v1"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("v3")
    assert (final / "a.txt").read_text() == "v3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_atomic_file_write(tmp_path):
    target = tmp_path / "m.json"
    write_json({"b": 1, "a": 2}, target)
    assert target.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # readable like any other output
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise ValueError
    assert target.read_text().startswith("{")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped): what a kill -9'd writer leaves behind."""
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def test_leftovers_of_dead_writers_are_swept_and_live_ones_kept(tmp_path):
    import os

    from vlm_factory.io import sweep_leftovers

    dead, alive = _dead_pid(), os.getpid()
    stale = [tmp_path / f".model.staging-{dead}-x1.tmp", tmp_path / f".model.scratch-{dead}-x2.tmp",
             tmp_path / f".model.old-{dead}-x3.tmp"]
    for path in stale:
        path.mkdir()
        (path / "big.bin").write_bytes(b"0" * 64)
    live = tmp_path / f".model.staging-{alive}-y.tmp"
    other_output = tmp_path / f".model2.staging-{dead}-z.tmp"
    live.mkdir()
    other_output.mkdir()
    assert sorted(sweep_leftovers(tmp_path / "model")) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other_output.name])
    # and the next writer of that output sweeps before it stages
    with atomic_dir(tmp_path / "model2") as tmp:
        (tmp / "a.txt").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "model2"])


def test_scratch_is_next_to_the_output_and_gone_after(tmp_path):
    from vlm_factory.io import scratch_dir

    with scratch_dir(tmp_path / "gguf") as scratch:
        assert scratch.parent == tmp_path and scratch.name.startswith(".gguf.scratch-")
        (scratch / "llm-F16.gguf").write_bytes(b"x")
    assert list(tmp_path.iterdir()) == []
