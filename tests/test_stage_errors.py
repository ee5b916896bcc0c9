"""Stage scripts on bad input: one line on stderr naming the thing, exit status 2, nothing half-written."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from vlm_factory.config import compose_to_yaml


def _stage(root, script, *args, cwd=None):
    return subprocess.run([sys.executable, str(root / "stages" / script), *args], capture_output=True, text=True,
                          cwd=cwd or root, timeout=300)


def _assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in last, last


def test_missing_checkpoint(root, tmp_path):
    result = _stage(root, "finetune.py", "--base", str(tmp_path / "nowhere"), "--data", str(tmp_path),
                    "--out", str(tmp_path / "out"), "--metrics-dir", str(tmp_path / "m"))
    _assert_one_line_error(result, "nowhere", "not a model directory")


def test_unknown_config_key(root, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(compose_to_yaml(config_dir=root / "conf").replace("\ntrain:\n", "\ntrain:\n  epochs: 3\n", 1))
    result = _stage(root, "finetune.py", "--params", str(params), "--base", "x", "--data", "x", "--out", "x",
                    "--metrics-dir", "x")
    _assert_one_line_error(result, "train.epochs")


def test_corrupt_image_in_eval_data(root, tmp_path, random_checkpoint, synthetic_data):
    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    first = next((data / "images" / "eval").iterdir())
    first.write_bytes(b"not a png")
    result = _stage(root, "reference_eval.py", "--model", str(random_checkpoint), "--data", str(data),
                    "--predictions", str(tmp_path / "p.jsonl"), "--metrics", str(tmp_path / "m.json"))
    _assert_one_line_error(result, first.name, "not a readable image")
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "p.jsonl").exists()


def test_unknown_tier(root, tmp_path, random_checkpoint):
    result = _stage(root, "budget.py", "--tier", "toaster", "--model", str(random_checkpoint),
                    "--out", str(tmp_path / "b.json"))
    _assert_one_line_error(result, "toaster", "iphone15pro")


def test_broken_yaml(root, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train: {lr: [\n")
    result = _stage(root, "finetune.py", "--params", str(params), "--base", "x", "--data", "x", "--out", "x",
                    "--metrics-dir", "x")
    _assert_one_line_error(result, "params.yaml", "not valid YAML")


def test_killed_stage_leaves_no_output_at_its_final_path(root, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(compose_to_yaml(["data.train_images=30000"], config_dir=root / "conf"))
    out = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, str(root / "stages" / "download.py"), "--params", str(params),
                             "--model-out", str(tmp_path / "base"), "--data-out", str(out)],
                            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".data.") for p in tmp_path.iterdir()):
        time.sleep(0.2)
    time.sleep(1.0)  # well inside rendering 30000 images
    assert proc.poll() is None, proc.stderr.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert any(p.name.startswith(".data.") for p in tmp_path.iterdir())  # the partial work stayed aside
