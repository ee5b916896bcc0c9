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
