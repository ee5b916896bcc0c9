"""Generated malformed inputs: images and GGUF files that once hung or crashed are one-line errors.

Images: non-regular files (FIFO, directory, device), empty, random, truncated or corrupt files,
valid files whose letterboxed square would be gigapixels, and odd-but-valid modes that must load.
GGUF: one-byte tensor renames, dropped tensors, changed tensor shapes and metadata, truncations of a
real export of the bundled base; each is refused by the pre-checks with a line naming the file and
the tensor (or loads, where the file is truly valid). The runtime runs in a subprocess, so a crash
in llama.cpp fails a test instead of killing pytest; everything runs under an alarm, so a hang does too.
"""

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import BUNDLED_BASE, deadline
from vlm_factory.data import images as images_module
from vlm_factory.data.images import decode_image, load_image
from vlm_factory.errors import UserError

ROOT = Path(__file__).resolve().parents[1]



def assert_one_line_user_error(call, name: str, *needles: str) -> str:
    with deadline(20), pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    assert name in message, message
    for needle in needles:
        assert needle in message, message
    return message


# -- images ----------------------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height (8-bit grey) with one tiny IDAT: written in bytes, not pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + _png_chunk(b"IEND", b""))


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def _noise(size=(48, 40), mode="RGB", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def _noise_png() -> bytes:
    return _encoded(_noise(), "PNG")


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


# name -> bytes of a file that is no readable image
BAD_IMAGE_BYTES = {
    "empty.png": lambda: b"",
    "one-byte.png": lambda: b"\x89",
    "text.png": lambda: b"not a png",
    "png-signature-only.png": lambda: _noise_png()[:8],
    "png-cut-in-ihdr.png": lambda: _noise_png()[:20],
    **{f"png-cut-at-{pct}pct.png": (lambda pct=pct: (lambda d: d[: len(d) * pct // 100])(_noise_png()))
       for pct in (33, 50, 80, 95)},
    "png-bad-ihdr-crc.png": lambda: _flip(_noise_png(), 20),
    "png-zero-width.png": lambda: _png_header_only(0, 10),
    "png-zero-height.png": lambda: _png_header_only(10, 0),
    **{f"random-{seed}.bin": (lambda seed=seed: np.random.default_rng(seed).bytes(1000 + seed)) for seed in range(6)},
    "random-after-png-signature.png": lambda: b"\x89PNG\r\n\x1a\n" + np.random.default_rng(9).bytes(500),
    "jpeg-cut-in-half.jpg": lambda: (lambda d: d[: len(d) // 2])(_encoded(_noise(), "JPEG")),
    "jpeg-header-only.jpg": lambda: _encoded(_noise(), "JPEG")[:200],
    "gif-cut.gif": lambda: (lambda d: d[: len(d) // 2])(_encoded(_noise(mode="P"), "GIF")),
    "bmp-cut.bmp": lambda: (lambda d: d[: len(d) // 2])(_encoded(_noise(), "BMP")),
}

# name -> bytes of a valid image too large once letterboxed (or by PIL's bomb check)
HUGE_IMAGE_BYTES = {
    "wide-65535x1.png": lambda: _encoded(Image.new("L", (65535, 1)), "PNG"),
    "tall-1x40000.png": lambda: _encoded(Image.new("L", (1, 40000)), "PNG"),
    "strip-9000x2.png": lambda: _encoded(Image.new("RGB", (9000, 2)), "PNG"),
    "declared-8001x8001.png": lambda: _png_header_only(8001, 8001),
    "declared-100000x100000.png": lambda: _png_header_only(100000, 100000),
    "declared-2147483647x1.png": lambda: _png_header_only(2**31 - 1, 1),
}

# name -> bytes of an unusual but valid image that must load (as RGB, its own size)
GOOD_IMAGE_BYTES = {
    "palette.png": lambda: _encoded(_noise(mode="P"), "PNG"),
    "palette-transparent.png": lambda: _encoded(_noise(mode="P"), "PNG", transparency=0),
    "la.png": lambda: _encoded(_noise(mode="LA"), "PNG"),
    "grey.png": lambda: _encoded(_noise(mode="L"), "PNG"),
    "rgba.png": lambda: _encoded(_noise(mode="RGBA"), "PNG"),
    "one-bit.png": lambda: _encoded(_noise(mode="1"), "PNG"),
    "sixteen-bit.png": lambda: _encoded(Image.fromarray(np.arange(48 * 40, dtype=np.uint16).reshape(40, 48) * 30),
                                        "PNG"),
    "int32.tiff": lambda: _encoded(_noise(mode="I"), "TIFF"),
    "float.tiff": lambda: _encoded(_noise(mode="F"), "TIFF"),
    "cmyk.jpg": lambda: _encoded(_noise(mode="CMYK"), "JPEG"),
    "grey.jpg": lambda: _encoded(_noise(mode="L"), "JPEG"),
    "image.gif": lambda: _encoded(_noise(mode="P"), "GIF"),
    "image.bmp": lambda: _encoded(_noise(), "BMP"),
    "image.webp": lambda: _encoded(_noise(), "WEBP"),
    "pixel-1x1.png": lambda: _encoded(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"),
    "wide-but-fine-2000x10.png": lambda: _encoded(Image.new("RGB", (2000, 10)), "PNG"),
    "png-named-jpg.jpg": lambda: _noise_png(),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGE_BYTES))
def test_unreadable_image_is_a_one_line_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(BAD_IMAGE_BYTES[name]())
    assert_one_line_user_error(lambda: load_image(path), str(path))
    assert_one_line_user_error(lambda: decode_image(path.read_bytes(), f"hub:{name}"), f"hub:{name}")


@pytest.mark.parametrize("name", sorted(HUGE_IMAGE_BYTES))
def test_image_too_large_once_letterboxed_is_refused_before_decoding(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(HUGE_IMAGE_BYTES[name]())
    for call, label in ((lambda: load_image(path), str(path)),
                        (lambda: decode_image(path.read_bytes(), f"hub:{name}"), f"hub:{name}")):
        message = assert_one_line_user_error(call, label)
        assert "MAX_LETTERBOX_PIXELS" in message or "exceeds limit" in message, message  # ours or PIL's bomb check
    if "x40000" in name or "65535" in name:
        message = assert_one_line_user_error(lambda: load_image(path), str(path), "megapixels")
        assert ("65535x1" in message or "1x40000" in message) and "limit of 64" in message


@pytest.mark.parametrize("name", sorted(GOOD_IMAGE_BYTES))
def test_unusual_but_valid_image_loads(tmp_path, name):
    path = tmp_path / name
    data = GOOD_IMAGE_BYTES[name]()
    path.write_bytes(data)
    with deadline(20):
        image = load_image(path)
        decoded = decode_image(data, name)
    assert image.mode == decoded.mode == "RGB"
    assert image.size == decoded.size == Image.open(io.BytesIO(data)).size


def test_fifo_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "image.png"
    os.mkfifo(fifo)
    assert_one_line_user_error(lambda: load_image(fifo), str(fifo), "FIFO")
    link = tmp_path / "link.png"
    link.symlink_to(fifo)
    assert_one_line_user_error(lambda: load_image(link), str(link), "FIFO")


def test_directory_device_and_missing_file_are_refused(tmp_path):
    folder = tmp_path / "folder.png"
    folder.mkdir()
    assert_one_line_user_error(lambda: load_image(folder), str(folder), "directory")
    assert_one_line_user_error(lambda: load_image(Path("/dev/null")), "/dev/null", "device")
    assert_one_line_user_error(lambda: load_image(tmp_path / "gone.png"), "gone.png", "not found")
    dangling = tmp_path / "dangling.png"
    dangling.symlink_to(tmp_path / "nowhere.png")
    assert_one_line_user_error(lambda: load_image(dangling), "dangling.png", "not found")


def test_symlink_to_a_valid_image_loads(tmp_path):
    target = tmp_path / "target.png"
    target.write_bytes(_noise_png())
    link = tmp_path / "link.png"
    link.symlink_to(target)
    assert load_image(link).size == (48, 40)


def test_letterbox_limit_is_a_module_setting(tmp_path, monkeypatch):
    square, wide = tmp_path / "square.png", tmp_path / "wide.png"
    Image.new("RGB", (10, 10)).save(square)
    Image.new("RGB", (11, 2)).save(wide)
    monkeypatch.setattr(images_module, "MAX_LETTERBOX_PIXELS", 100)
    assert load_image(square).size == (10, 10)
    assert_one_line_user_error(lambda: load_image(wide), str(wide), "11x2", "MAX_LETTERBOX_PIXELS")
    # The default admits a 12 MP 4:3 photo (16 MP letterboxed), judged from the header alone.
    monkeypatch.undo()
    photo = tmp_path / "photo.png"
    photo.write_bytes(_png_header_only(4000, 3000))
    assert_one_line_user_error(lambda: load_image(photo), str(photo), "not a readable image")  # data, not size
    assert Image.MAX_IMAGE_PIXELS is not None  # PIL's decompression-bomb check stays on


# -- GGUF ------------------------------------------------------------------------------------------

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed")


def _rename_one_byte(reader, tensor_name):
    """Change one byte of a tensor's name in the file (to an upper-case letter, never in a real name)."""
    part = next(t for t in reader.tensors if t.name == tensor_name).field.parts[1]
    at = len(part) - 2  # the last-but-one character: "weight" -> "weigXt", "bias" -> "biXs"
    part[at] = ord("X")


def _set_dim(reader, tensor_name, axis, value):
    next(t for t in reader.tensors if t.name == tensor_name).field.parts[3][axis] = value


def _set_meta(reader, key, value):
    field = reader.fields[key]
    field.parts[field.data[0]][0] = value


def _flip_string(reader, key):
    field = reader.fields[key]
    part = field.parts[field.data[0]]
    part[-1] = part[-1] + 1


# (case id, which file, mutation, expected: None = loads; else substrings of the error line)
LLM_CASES = [
    *[(f"llm-rename-{t}", "llm", ("rename", t), [t[:-2]]) for t in (
        "token_embd.weight", "output_norm.weight", "output.weight", "blk.0.attn_norm.weight", "blk.0.attn_q.weight",
        "blk.1.attn_k.weight", "blk.0.attn_v.weight", "blk.1.attn_output.weight", "blk.0.ffn_norm.weight",
        "blk.0.ffn_gate.weight", "blk.1.ffn_up.weight", "blk.1.ffn_down.weight")],
    *[(f"llm-drop-{t}", "llm", ("drop", t), [t, "missing"]) for t in (
        "token_embd.weight", "output_norm.weight", "blk.1.attn_q.weight", "blk.0.ffn_down.weight",
        "blk.1.attn_norm.weight")],
    ("llm-drop-output.weight", "llm", ("drop", "output.weight"), None),  # tied to token_embd: valid
    ("llm-shape-attn_q", "llm", ("dim", "blk.0.attn_q.weight", 1, 128), ["blk.0.attn_q.weight", "shape [256, 128]"]),
    ("llm-shape-token_embd", "llm", ("dim", "token_embd.weight", 1, 500), ["token_embd.weight", "vocabulary 512"]),
    ("llm-shape-ffn_norm", "llm", ("dim", "blk.1.ffn_norm.weight", 0, 128), ["blk.1.ffn_norm.weight", "shape"]),
    ("llm-meta-block_count-up", "llm", ("meta", "llama.block_count", 3), ["blk.2.", "missing"]),
    ("llm-meta-block_count-down", "llm", ("meta", "llama.block_count", 1), ["blk.1.", "past the block count"]),
    ("llm-meta-block_count-zero", "llm", ("meta", "llama.block_count", 0), ["llama.block_count"]),
    ("llm-meta-embedding_length", "llm", ("meta", "llama.embedding_length", 128), ["token_embd.weight", "shape"]),
    ("llm-meta-head_count_kv", "llm", ("meta", "llama.attention.head_count_kv", 2), ["attn_k.weight", "kv heads"]),
    ("llm-meta-head_count-odd", "llm", ("meta", "llama.attention.head_count", 3), ["head_count"]),
    ("llm-meta-feed_forward_length", "llm", ("meta", "llama.feed_forward_length", 512), ["ffn_", "768"]),
    ("llm-meta-vocab_size", "llm", ("meta", "llama.vocab_size", 500), ["vocab_size is 500"]),
    ("llm-meta-arch", "llm", ("flip", "general.architecture"), ["general.architecture"]),
    ("llm-truncated-half", "llm", ("truncate", 0.5), ["not a readable GGUF"]),
    ("llm-truncated-header", "llm", ("truncate", 100), ["not a readable GGUF"]),
    ("llm-truncated-last-byte", "llm", ("truncate", -1), ["not a readable GGUF"]),
]
MMPROJ_CASES = [
    *[(f"mmproj-rename-{t}", "mmproj", ("rename", t), [t[:-2]]) for t in (
        "v.patch_embd.weight", "v.patch_embd.bias", "v.position_embd.weight", "v.blk.0.attn_q.weight",
        "v.blk.0.attn_k.bias", "v.blk.1.attn_out.bias", "v.blk.0.ln1.weight", "v.blk.1.ln2.bias",
        "v.blk.1.ffn_up.weight", "v.blk.0.ffn_down.bias", "mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias")],
    *[(f"mmproj-drop-{t}", "mmproj", ("drop", t), [t if "blk" not in t else t.replace(".0.", ".1."), "missing"])
      for t in ("v.patch_embd.weight", "v.position_embd.weight", "mm.0.weight", "mm.2.weight",
                "v.blk.1.ln2.weight", "v.blk.1.attn_v.weight")],
    *[(f"mmproj-drop-{t}", "mmproj", ("drop", t), [t, "missing", "present in"])
      for t in ("v.blk.1.attn_k.bias", "v.blk.0.ffn_up.bias")],  # a bias kept in one block only
    ("mmproj-shape-mm.0", "mmproj", ("dim", "mm.0.weight", 1, 128), ["mm.", "shape"]),
    ("mmproj-shape-mm.2", "mmproj", ("dim", "mm.2.weight", 1, 128), ["mm.2.weight", "projection_dim 256"]),
    ("mmproj-shape-position", "mmproj", ("dim", "v.position_embd.weight", 1, 15), ["v.position_embd.weight", "patches"]),
    ("mmproj-shape-patch", "mmproj", ("dim", "v.patch_embd.weight", 0, 8), ["v.patch_embd.weight", "patch_size 16"]),
    ("mmproj-meta-block_count-up", "mmproj", ("meta", "clip.vision.block_count", 3), ["v.blk.2.", "missing"]),
    ("mmproj-meta-block_count-down", "mmproj", ("meta", "clip.vision.block_count", 1), ["clip.vision.block_count"]),
    ("mmproj-meta-embedding_length", "mmproj", ("meta", "clip.vision.embedding_length", 128), ["shape"]),
    ("mmproj-meta-feed_forward_length", "mmproj", ("meta", "clip.vision.feed_forward_length", 256), ["ffn_"]),
    ("mmproj-meta-patch_size", "mmproj", ("meta", "clip.vision.patch_size", 8), ["v.patch_embd.weight", "shape"]),
    ("mmproj-meta-patch_size-uneven", "mmproj", ("meta", "clip.vision.patch_size", 15), ["patch_size"]),
    ("mmproj-meta-image_size", "mmproj", ("meta", "clip.vision.image_size", 48), ["v.position_embd.weight"]),
    ("mmproj-meta-projection_dim", "mmproj", ("meta", "clip.vision.projection_dim", 128), ["mm.2.weight"]),
    ("mmproj-meta-head_count", "mmproj", ("meta", "clip.vision.attention.head_count", 3), ["head_count"]),
    ("mmproj-meta-feature_layer", "mmproj", ("meta", "clip.vision.feature_layer", 7), ["feature_layer"]),
    ("mmproj-meta-projector_type", "mmproj", ("flip", "clip.projector_type"), ["clip.projector_type"]),
    ("mmproj-meta-general.type", "mmproj", ("flip", "general.type"), ["general.type"]),
    ("mmproj-truncated-half", "mmproj", ("truncate", 0.5), ["not a readable GGUF"]),
    ("mmproj-truncated-header", "mmproj", ("truncate", 64), ["not a readable GGUF"]),
    ("mmproj-truncated-last-byte", "mmproj", ("truncate", -1), ["not a readable GGUF"]),
]
CASES = {case[0]: case for case in [("valid-pair", "llm", None, None), *LLM_CASES, *MMPROJ_CASES]}


def _rewrite_without(source: Path, target: Path, drop: str) -> None:
    """Copy a GGUF file leaving out one tensor (the metadata and other tensors as they were)."""
    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(target), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub)
    for tensor in reader.tensors:
        if tensor.name != drop:
            writer.add_tensor(tensor.name, np.array(tensor.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _mutate(source: Path, target: Path, mutation) -> None:
    kind, *args = mutation
    if kind == "drop":
        _rewrite_without(source, target, args[0])
        return
    data = source.read_bytes()
    if kind == "truncate":
        cut = args[0]
        target.write_bytes(data[: int(len(data) * cut)] if isinstance(cut, float) else data[:cut])
        return
    target.write_bytes(data)
    reader = gguf.GGUFReader(str(target), "r+")
    {"rename": _rename_one_byte, "dim": _set_dim, "meta": _set_meta, "flip": _flip_string}[kind](reader, *args)
    reader.data.flush()
    del reader


@pytest.fixture(scope="module")
def gguf_pair(tmp_path_factory):
    from vlm_factory.export.gguf_llm import write_llm_gguf
    from vlm_factory.export.gguf_mmproj import write_mmproj_gguf

    folder = tmp_path_factory.mktemp("malformed-gguf")
    llm, mmproj = folder / "llm.gguf", folder / "mmproj.gguf"
    write_llm_gguf(BUNDLED_BASE, llm, "F32")
    write_mmproj_gguf(BUNDLED_BASE, mmproj)
    return llm, mmproj


@pytest.fixture(scope="module")
def gguf_cases(gguf_pair, tmp_path_factory):
    """case id -> (llm path, mmproj path): each case mutates one of the pair."""
    llm, mmproj = gguf_pair
    folder = tmp_path_factory.mktemp("mutations")
    files = {}
    for case_id, which, mutation, _ in CASES.values():
        if mutation is None:
            files[case_id] = (llm, mmproj)
            continue
        target = folder / f"{case_id}.gguf"
        _mutate(llm if which == "llm" else mmproj, target, mutation)
        files[case_id] = (target, mmproj) if which == "llm" else (llm, target)
    return files


@pytest.mark.parametrize("case_id", list(CASES))
def test_gguf_mutation_is_caught_by_the_pre_checks(gguf_cases, case_id):
    from vlm_factory.runtime.gguf_check import check_llamacpp_pair

    _, which, _, needles = CASES[case_id]
    llm, mmproj = gguf_cases[case_id]
    if needles is None:
        with deadline(20):
            check_llamacpp_pair(llm, mmproj)
        return
    mutated = llm if which == "llm" else mmproj
    assert_one_line_user_error(lambda: check_llamacpp_pair(llm, mmproj), str(mutated), *needles)


def test_mismatched_pair_and_non_regular_gguf_are_refused(gguf_pair, tmp_path):
    from vlm_factory.runtime.gguf_check import check_llamacpp_pair

    llm, mmproj = gguf_pair
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    assert_one_line_user_error(lambda: check_llamacpp_pair(llm, fifo), str(fifo), "not a regular file")
    folder = tmp_path / "folder.gguf"
    folder.mkdir()
    assert_one_line_user_error(lambda: check_llamacpp_pair(folder, mmproj), str(folder), "not a regular file")
    assert_one_line_user_error(lambda: check_llamacpp_pair(mmproj, llm), str(mmproj), "swapped")


RUNTIME_SCRIPT = r"""
import json, sys
import numpy as np
from PIL import Image
from vlm_factory.errors import UserError
from vlm_factory.runtime.llama_cpp import LlamaCppRuntime

for line in sys.stdin:
    case_id, llm, mmproj = json.loads(line)
    print(json.dumps({"case": case_id, "started": True}), flush=True)
    try:
        with LlamaCppRuntime(llm, mmproj, n_threads=1) as runtime:
            embeddings = runtime.image_embeddings(Image.new("RGB", (50, 30), (200, 30, 30)))
            logits = runtime._step(runtime.text_token_ids("a", add_special=True)[0])
        result = {"ok": bool(np.isfinite(embeddings).all() and np.isfinite(logits).all())}
    except UserError as error:
        result = {"error": str(error)}
    print(json.dumps({"case": case_id, **result}), flush=True)
"""


def test_runtime_refuses_every_mutation_without_crashing(gguf_cases):
    """LlamaCppRuntime over every case, in a subprocess: a crash (segfault) or hang fails this test."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the gguf extra) is not installed")
    lines = "".join(json.dumps([case_id, str(llm), str(mmproj)]) + "\n" for case_id, (llm, mmproj) in gguf_cases.items())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", RUNTIME_SCRIPT], input=lines, capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    last = records[-1]["case"] if records else None
    assert proc.returncode == 0, f"runtime subprocess died (status {proc.returncode}) on case {last}: " \
                                 f"{proc.stderr[-2000:]}"
    results = {r["case"]: r for r in records if "started" not in r}
    assert set(results) == set(gguf_cases)
    for case_id, result in results.items():
        _, which, _, needles = CASES[case_id]
        if needles is None:
            assert result.get("ok"), (case_id, result)
            continue
        assert "error" in result, (case_id, result)
        message = result["error"]
        mutated = gguf_cases[case_id][0 if which == "llm" else 1]
        assert "\n" not in message and str(mutated) in message, (case_id, message)
        assert all(needle in message for needle in needles), (case_id, message)


@pytest.mark.parametrize("runtime, name", [("onnx_runtime.OnnxRuntime", "onnx_config.json"),
                                           ("tflite_runtime.TFLiteRuntime", "tflite_config.json"),
                                           ("coreml_runtime.CoreMLRuntime", "coreml_config.json")])
@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00", b"[1, 2]"], ids=["syntax", "not-utf8", "list"])
def test_runtime_config_that_is_not_a_json_object_is_one_line(tmp_path, runtime, name, content):
    import importlib

    from vlm_factory.errors import UserError

    module, cls = runtime.split(".")
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError) as info:
        getattr(importlib.import_module(f"vlm_factory.runtime.{module}"), cls)(tmp_path)
    message = str(info.value)
    assert "\n" not in message and name in message and "re-run its export" in message
