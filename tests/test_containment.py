"""Every path an artifact or model directory names stays inside it (src/vlm_factory/paths.py).

For each loader: an absolute name, a `../` name, a symlink out of the directory, and a FIFO or directory
where a file is expected are each refused with a one-line UserError naming the file and key, before any
runtime opens anything; an audit hook proves that no file outside the directory was opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from vlm_factory.errors import UserError

_OPENED: list[str] | None = None


def _audit(event, args):
    if _OPENED is not None and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)

ATTACKS = ["absolute", "dotdot", "symlink", "fifo", "directory"]
EXPECTED = {"absolute": "an absolute path", "dotdot": "resolves outside", "symlink": "resolves outside",
            "fifo": "not a regular file", "directory": "not a regular file"}
SECRET = b"outside secret bytes\n"


@pytest.fixture
def dirs(tmp_path):
    """(artifact dir, outside dir holding secret.bin); the outside file must never be opened."""
    art, outside = tmp_path / "artifact", tmp_path / "outside"
    art.mkdir()
    outside.mkdir()
    (outside / "secret.bin").write_bytes(SECRET)
    return art, outside


def attack_name(kind: str, art: Path, outside: Path) -> str:
    if kind == "absolute":
        return str(outside / "secret.bin")
    if kind == "dotdot":
        return "../outside/secret.bin"
    if kind == "symlink":
        (art / "link.bin").symlink_to(outside / "secret.bin")
        return "link.bin"
    if kind == "fifo":
        os.mkfifo(art / "fifo.bin")
        return "fifo.bin"
    (art / "dir.bin").mkdir()
    return "dir.bin"


def refused(call, outside: Path, *needles: str) -> str:
    """Run `call`, expect a one-line UserError containing every needle; assert nothing under `outside` was opened."""
    global _OPENED
    _OPENED = []
    try:
        with pytest.raises(UserError) as caught:
            call()
    finally:
        opened, _OPENED = _OPENED, None
    message = str(caught.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    real_outside = os.path.realpath(outside)
    leaked = [p for p in opened if os.path.realpath(p).startswith(real_outside)]
    assert not leaked, f"opened outside the directory: {leaked}"
    return message


# -- the one function ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ATTACKS)
def test_contained_refuses(dirs, kind):
    from vlm_factory.paths import contained

    art, outside = dirs
    name = attack_name(kind, art, outside)
    refused(lambda: contained(art, name, what="cfg.json", key="model.file"), outside,
            "cfg.json: model.file", EXPECTED[kind])


def test_contained_accepts_inside_names(dirs):
    from vlm_factory.paths import contained

    art, _ = dirs
    (art / "sub").mkdir()
    (art / "sub" / "a.bin").write_bytes(b"x")
    (art / "alias.bin").symlink_to("sub/a.bin")  # a link that stays inside is fine
    assert contained(art, "sub/../sub/a.bin", what="cfg", key="k") == (art / "sub" / "a.bin").resolve()
    assert contained(art, "alias.bin", what="cfg", key="k") == (art / "sub" / "a.bin").resolve()
    assert contained(art, "sub", what="cfg", key="k", kind="dir") == (art / "sub").resolve()
    assert contained(art, "not-there.bin", what="cfg", key="k") == art.resolve() / "not-there.bin"
    for bad in ["C:\\x.bin", "\\\\host\\share", "", "a\x00b"]:
        with pytest.raises(UserError, match="refusing to load this model"):
            contained(art, bad, what="cfg", key="k")
    with pytest.raises(UserError, match="not a plain file name"):
        contained(art, "sub/a.bin", what="cfg", key="k", plain=True)


# -- GGUF: files.*.file of export_report.json -------------------------------------------------------------


@pytest.mark.parametrize("role", ["llm", "mmproj"])
@pytest.mark.parametrize("kind", ATTACKS)
def test_gguf_report_files_are_contained(dirs, kind, role):
    from vlm_factory.runtime.open import open_runtime

    art, outside = dirs
    files = {"llm": {"file": "llm.gguf"}, "mmproj": {"file": "mmproj.gguf"}}
    files[role]["file"] = attack_name(kind, art, outside)
    (art / "export_report.json").write_text(json.dumps({"format": "gguf", "files": files}))
    refused(lambda: open_runtime("gguf", art, context_tokens=64, kv_cache="f32"), outside,
            "export_report.json", f"files.{role}.file", EXPECTED[kind])


def test_export_report_linked_outside_is_refused(dirs):
    from vlm_factory.artifacts import artifact_bytes, read_export_report

    art, outside = dirs
    (art / "export_report.json").symlink_to(outside / "secret.bin")
    refused(lambda: read_export_report(art), outside, "export_report.json", "resolves outside")
    (art / "export_report.json").unlink()
    (art / "weights.bin").symlink_to(outside / "secret.bin")
    refused(lambda: artifact_bytes(art), outside, "weights.bin", "resolves outside")


# -- ONNX: onnx_config.json filenames and external data ------------------------------------------------------


@pytest.mark.parametrize("kind", ATTACKS)
def test_onnx_config_filenames_are_contained(dirs, kind):
    from vlm_factory.runtime.onnx_runtime import OnnxRuntime

    art, outside = dirs
    model = {role: {"filename": f"{role}.onnx"} for role in ("vision", "embedding", "decoder")}
    model["embedding"]["filename"] = attack_name(kind, art, outside)
    (art / "onnx_config.json").write_text(json.dumps({"model": model}))
    refused(lambda: OnnxRuntime(art), outside, "onnx_config.json", "model.embedding.filename", EXPECTED[kind])


def _onnx_with_external_data(path: Path, location: str) -> Path:
    import onnx
    from onnx import TensorProto, helper

    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], initializer=[weight])
    onnx.save_model(helper.make_model(graph), str(path))
    return path


@pytest.mark.parametrize("kind", ATTACKS)
def test_onnx_external_data_is_contained(dirs, kind):
    from vlm_factory.runtime.onnx_check import check_external_data

    art, outside = dirs
    path = _onnx_with_external_data(art / "vision.onnx", attack_name(kind, art, outside))
    refused(lambda: check_external_data(path), outside, "vision.onnx", "tensor 'w'", EXPECTED[kind])


# -- TFLite: tflite_config.json filenames (graphs and embedding.npy) ---------------------------------------------


@pytest.mark.parametrize("role", ["vision", "decoder", "embedding"])
@pytest.mark.parametrize("kind", ATTACKS)
def test_tflite_config_filenames_are_contained(dirs, kind, role):
    from vlm_factory.runtime.tflite_runtime import TFLiteRuntime

    art, outside = dirs
    model = {"vision": {"filename": "vision.tflite", "signature": "vision"},
             "decoder": {"filename": "decoder.tflite"}, "embedding": {"filename": "embedding.npy"}}
    model[role]["filename"] = attack_name(kind, art, outside)
    (art / "tflite_config.json").write_text(json.dumps({"model": model}))
    refused(lambda: TFLiteRuntime(art), outside, "tflite_config.json", f"model.{role}.filename", EXPECTED[kind])


# -- Core ML: package directories and the embedding .npy ---------------------------------------------------------


def _coreml_config(art: Path, package: str = "vision.mlpackage", embedding: str = "embed_tokens.npy") -> None:
    config = {"vision": {}, "prompt": {}, "packages": {"vision": {"file": package, "weights": {}}},
              "embedding": {"file": embedding, "parameter": "embed"}}
    (art / "coreml_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("kind", ATTACKS)
def test_coreml_embedding_file_is_contained(dirs, kind):
    from vlm_factory.runtime.coreml_runtime import CoreMLRuntime

    art, outside = dirs
    (art / "vision.mlpackage").mkdir()
    _coreml_config(art, embedding=attack_name(kind, art, outside))
    refused(lambda: CoreMLRuntime(art), outside, "coreml_config.json", "embedding.file", EXPECTED[kind])


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "fifo", "file", "link_inside_package"])
def test_coreml_packages_are_contained(dirs, kind):
    from vlm_factory.runtime.coreml_runtime import CoreMLRuntime

    art, outside = dirs
    expected = {"absolute": "an absolute path", "fifo": "not a directory", "file": "not a directory"}
    if kind == "absolute":
        name = str(outside)
    elif kind == "dotdot":
        name = "../outside"
    elif kind == "symlink":
        (art / "vision.mlpackage").symlink_to(outside, target_is_directory=True)
        name = "vision.mlpackage"
    elif kind == "fifo":
        os.mkfifo(art / "vision.mlpackage")
        name = "vision.mlpackage"
    elif kind == "file":
        (art / "vision.mlpackage").write_bytes(b"")
        name = "vision.mlpackage"
    else:  # a real package directory whose weight file links out of the artifact
        (art / "vision.mlpackage" / "Data").mkdir(parents=True)
        (art / "vision.mlpackage" / "Data" / "weight.bin").symlink_to(outside / "secret.bin")
        name = "vision.mlpackage"
    _coreml_config(art, package=name)
    refused(lambda: CoreMLRuntime(art), outside, "coreml_config.json", "packages.vision.file",
            expected.get(kind, "resolves outside"))


# -- model sources: SHA256SUMS entries, empty/missing SHA256SUMS, linked safetensors -----------------------------------


def _source(art: Path, lines: list[str]) -> None:
    (art / "model.safetensors").write_bytes(b"weights")
    (art / "SHA256SUMS").write_text("".join(f"{line}\n" for line in lines))


@pytest.mark.parametrize("kind", ATTACKS)
def test_checksum_entries_are_plain_names_inside(dirs, tmp_path, kind):
    from vlm_factory.model.snapshot import fetch_local

    art, outside = dirs
    name = attack_name(kind, art, outside)
    wrong = "0" * 64
    _source(art, [f"{hashlib.sha256(b'weights').hexdigest()}  model.safetensors", f"{wrong}  {name}"])
    message = refused(lambda: fetch_local(art, tmp_path / "out"), outside, "SHA256SUMS", "line 2")
    assert hashlib.sha256(SECRET).hexdigest()[:12] not in message  # never a hash of an outside file
    assert not (tmp_path / "out").exists()


def test_empty_or_missing_checksums_are_errors(dirs, tmp_path):
    from vlm_factory.model.snapshot import fetch_local, verify_checksums

    art, outside = dirs
    _source(art, [])
    refused(lambda: fetch_local(art, tmp_path / "out"), outside, "SHA256SUMS: empty")
    (art / "SHA256SUMS").write_text("\n  \n")
    refused(lambda: verify_checksums(art), outside, "SHA256SUMS: empty")
    (art / "SHA256SUMS").unlink()
    refused(lambda: fetch_local(art, tmp_path / "out"), outside, "SHA256SUMS: missing")
    (art / "SHA256SUMS").symlink_to(outside / "secret.bin")
    refused(lambda: verify_checksums(art), outside, "SHA256SUMS", "resolves outside")


@pytest.mark.parametrize("kind", ["symlink_weights", "symlink_config", "directory_weights", "fifo_weights"])
def test_checkpoint_files_are_contained(dirs, kind):
    from vlm_factory.model.checkpoint import load_model

    art, outside = dirs
    if kind == "symlink_weights":
        (art / "model.safetensors").symlink_to(outside / "secret.bin")
        needles = ("model.safetensors", "resolves outside")
    elif kind == "symlink_config":
        (art / "config.json").symlink_to(outside / "secret.bin")
        needles = ("config.json", "resolves outside")
    elif kind == "directory_weights":
        (art / "model.safetensors").mkdir()
        needles = ("model.safetensors", "not a regular file")
    else:
        os.mkfifo(art / "model.safetensors")
        needles = ("model.safetensors", "not a regular file")
    if kind != "symlink_config":
        (art / "config.json").write_text(json.dumps({"model_type": "llava"}))

    def call():
        try:
            load_model(art)
        except UserError:
            raise
        except Exception as exc:  # the family check may differ; only a UserError is acceptable
            raise AssertionError(f"not a UserError: {exc!r}") from None

    refused(call, outside, str(art), *needles)


def test_numpy_never_loads_outside_arrays(dirs):
    """The inside case still works: contained names load (guards against over-refusal)."""
    from vlm_factory.paths import contained

    art, _ = dirs
    np.save(art / "embed.npy", np.arange(3, dtype=np.float32))
    assert np.load(contained(art, "embed.npy", what="cfg", key="embedding.file")).tolist() == [0.0, 1.0, 2.0]
