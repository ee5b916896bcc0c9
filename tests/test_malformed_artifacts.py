"""Generated malformed artifacts: every JSON file an export is read back from, and its native model files.

Each format is exported once per module from the bundled tiny base with its production exporter (ONNX
fp32, TFLite fp32, Core ML 4-bit per-tensor: the cheapest settings of each); every case copies that
directory (hard links: a mutated file is replaced, never written through the link) and changes one thing:

- every key of onnx_config.json / tflite_config.json / coreml_config.json, walking the JSON (sections
  and leaves, list items; a weight map's first entry stands for all of it), is deleted, set to null,
  a list, a string, -1, 0, 1e9 and (where numeric) NaN;
- each config and export_report.json as a whole: non-UTF-8 bytes, truncated JSON, a JSON list,
  nesting 100000 deep, an empty object;
- tokenizer.json / tokenizer_config.json: random bytes, non-UTF-8, deep nesting, an object of the wrong
  shape; the embedding tables (.npy): truncated, a header that lies, pickled objects;
- export_report.json: every key, of an ONNX export and of a GGUF pair;
- the .onnx / .tflite files (and Core ML package files) truncated and with bytes flipped, in a child
  process per case, so a crash in a native runtime fails that case instead of killing pytest.

Opening the runtime (and, when it opens, answering one question on one small image) must raise a
one-line UserError naming the file, and for key mutations the key, under a deadline that fails a hang.
A mutation the runtime cannot refuse must be on an explicit allow-list below, with the reason: HARMLESS
(it answers exactly as the unmutated export does) or IN_RANGE (a well-formed value the runtime cannot
tell from a real one: it must still answer, possibly differently).
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import BUNDLED_BASE, deadline
from vlm_factory.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE, QUESTION = (40, 30), "what colour is the square?"  # non-square: the letterbox runs too
DEADLINE_S = 30        # one case, in-process: opening + one answer take < 1 s on the tiny base
CHILD_TIMEOUT_S = 90   # one native case in a child: imports (torch, transformers) dominate, ~3-8 s
FIRST = "#0"           # in a key path: the first entry of a data mapping (a weight map) stands for all




# -- formats ---------------------------------------------------------------------------------------------

RUNTIMES = {"onnx": ("vlm_factory.runtime.onnx_runtime", "OnnxRuntime", "onnx_config.json"),
            "tflite": ("vlm_factory.runtime.tflite_runtime", "TFLiteRuntime", "tflite_config.json"),
            "coreml": ("vlm_factory.runtime.coreml_runtime", "CoreMLRuntime", "coreml_config.json")}
NEEDS = {"onnx": ("onnxruntime", "onnxscript"), "tflite": ("ai_edge_litert", "litert_torch"),
         "coreml": ("coremltools",), "gguf": ("llama_cpp",)}
CONTEXT = {"tflite": 4096, "coreml": 2048}  # the tiers' contexts; the bundled base's 256 positions bound both


def runtime_class(fmt: str):
    module, name, _ = RUNTIMES[fmt]
    return getattr(importlib.import_module(module), name)


def small_image() -> Image.Image:
    return Image.new("RGB", IMAGE_SIZE, (200, 30, 30))


def open_and_answer(fmt: str, directory: Path) -> str:
    with runtime_class(fmt)(directory) as runtime:
        return runtime.answer([small_image()], [QUESTION])[0]


def open_reported_and_answer(fmt: str, directory: Path) -> str:
    """Through open_runtime, which reads export_report.json first (what the parity stage calls)."""
    from vlm_factory.runtime.open import open_runtime

    with open_runtime(fmt, directory, context_tokens=256, kv_cache="f32", **in_process()) as runtime:
        return runtime.answer([small_image()], [QUESTION])[0]


@functools.cache
def in_process() -> dict:
    """open_runtime's argument to skip its child-process probe (runtime/isolated.py, tested on its own):
    here every case would pay a fresh interpreter, and the native-file cases below run in children anyway."""
    import inspect

    from vlm_factory.runtime.open import open_runtime

    return {"isolated": False} if "isolated" in inspect.signature(open_runtime).parameters else {}


def _export(fmt: str, out: Path) -> None:
    for module in NEEDS[fmt]:
        pytest.importorskip(module, reason=f"the {fmt} extra is not installed")
    if fmt == "onnx":
        from vlm_factory.export.onnx_graphs import export_onnx_fp32

        export_onnx_fp32(BUNDLED_BASE, out)
    elif fmt == "tflite":
        from vlm_factory.export.tflite_export import export_tflite

        export_tflite(BUNDLED_BASE, out, "android_flagship", {"precision": "fp32"}, context_tokens=CONTEXT[fmt])
    elif fmt == "coreml":
        from vlm_factory.export.coreml_export import export_coreml

        # 4 bits per tensor: 15 s instead of 70 s for 8 bits per grouped channel; the layout is the same.
        export_coreml(BUNDLED_BASE, out, "iphone15pro", {"nbits": 4, "granularity": "per_tensor"}, check_images=1,
                      context_tokens=CONTEXT[fmt])
    else:
        from vlm_factory.export.gguf_llm import write_llm_gguf
        from vlm_factory.export.gguf_mmproj import write_mmproj_gguf
        from vlm_factory.families import family_of

        # The report is the subject here: the pair unquantized (export_gguf would also run llama.cpp's
        # quantizer), the report with what export_gguf writes that code reads back.
        out.mkdir(parents=True)
        write_llm_gguf(BUNDLED_BASE, out / "llm.gguf", "F32")
        write_mmproj_gguf(BUNDLED_BASE, out / "mmproj.gguf")
        family = family_of(BUNDLED_BASE)
        prompt = family.prompt(family.load_processor(BUNDLED_BASE)).as_dict()
        report = {"format": "gguf", "tier": "test", "files": {"llm": {"file": "llm.gguf", "file_bytes": 1},
                                                              "mmproj": {"file": "mmproj.gguf", "file_bytes": 1}},
                  "prompt": prompt, "tools": {"gguf": "0", "llama_cpp_commit": None}}
        (out / "export_report.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """fmt -> its export directory, exported on first use (once per module)."""
    made: dict[str, Path] = {}

    def get(fmt: str) -> Path:
        if fmt not in made:
            out = tmp_path_factory.mktemp(f"export-{fmt}") / fmt
            _export(fmt, out)
            made[fmt] = out
        return made[fmt]

    return get


@pytest.fixture(scope="module")
def baselines(exports):
    """fmt -> the unmutated export's answer (what a HARMLESS mutation must still answer)."""
    answers: dict[str, str] = {}

    def get(fmt: str) -> str:
        if fmt not in answers:
            answers[fmt] = (open_reported_and_answer if fmt == "gguf" else open_and_answer)(fmt, exports(fmt))
        return answers[fmt]

    return get


def copy_export(source: Path, target: Path) -> Path:
    """A per-case copy: hard links, so that it costs nothing; mutations replace files (see `replace`)."""
    shutil.copytree(source, target, copy_function=os.link)
    return target


def replace(path: Path, data: bytes) -> None:
    """New contents for `path` without touching the shared, hard-linked original."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)


# -- key paths ---------------------------------------------------------------------------------------------

def walk(node, path: tuple = ()):
    """Every key path below `node`, sections before their keys; list items by index; a weight map
    (a mapping of data, not of fields) by its first entry only."""
    if isinstance(node, dict):
        items = list(node.items())
        data_map = bool(path) and path[-1] == "weights"
        for key, value in items[:1] if data_map else items:
            child = path + (FIRST if data_map else key,)
            yield child
            yield from walk(value, child)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield path + (index,)
            yield from walk(value, path + (index,))


def resolve(data, path: tuple) -> tuple:
    """`path` with FIRST replaced by the real first key."""
    real, node = [], data
    for part in path:
        part = next(iter(node)) if part == FIRST else part
        real.append(part)
        node = node[part]
    return tuple(real)


def dotted(path: tuple) -> str:
    return ".".join(str(part) for part in path)


@functools.cache
def written_configs() -> dict[str, dict]:
    """The runtime configs as the exporters write them for the bundled base, built at collection time
    from the exporters' own builders (Core ML builds its config inline: its layout is spelled out, and
    `test_generated_keys_are_every_key_of_the_export` checks all three against real exports)."""
    from vlm_factory.export.onnx_graphs import onnx_config
    from vlm_factory.export.tflite_export import tflite_config, tflite_settings
    from vlm_factory.families import family_of

    family = family_of(BUNDLED_BASE)
    processor = family.load_processor(BUNDLED_BASE)
    text, vision = family.text, family.vision
    context = min(CONTEXT["tflite"], text.max_positions)
    spec, prompt = family.preprocessing(processor), family.prompt(processor).as_dict()
    coreml = {
        "format": "coreml", "family": family.name, "variant": family.variant, "max_context": context,
        "image_size": vision.image_size, "image_tokens": family.image_tokens, "image_token_id": family.image_token_id,
        "eos_token_id": processor.tokenizer.eos_token_id,
        "vision": {"package": "vision.mlpackage", "image_size": [vision.image_size] * 2,
                   "num_channels": vision.num_channels, "preprocessing": spec},
        "preprocessing_text": "", "prompt": prompt,
        "packages": {role: {"file": f"{role}.mlpackage", "weights": {FIRST: ""}} for role in ("vision", "text")},
        "output_projection": None, "constant_parameters": {}, "unused_parameters": ["", ""],
        "embedding": {"file": "embed_tokens.npy", "parameter": "", "dtype": "float32", "palettized": False},
    }
    return {"onnx": onnx_config(None, processor, family),
            "tflite": tflite_config(family, processor, tflite_settings({"precision": "fp32"}, "t"), context,
                                    (text.vocab_size, text.hidden_size)),
            "coreml": coreml}


@functools.cache
def written_report() -> dict:
    """The GGUF report `_export` writes (its keys: what code reads back from a GGUF report)."""
    return {"format": "gguf", "tier": "", "files": {"llm": {"file": "", "file_bytes": 1},
                                                   "mmproj": {"file": "", "file_bytes": 1}},
            "prompt": {key: "" for key in ("template", "image_token", "image_token_repeat", "answer",
                                           "add_special_tokens")},
            "tools": {"gguf": "", "llama_cpp_commit": None}}


# -- mutations ---------------------------------------------------------------------------------------------

DELETE = object()
MUTATIONS = {"delete": DELETE, "null": None, "list": [], "string": "mutated", "minus_one": -1, "zero": 0,
             "huge": 1e9, "nan": math.nan}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def applies(original, mutation: str) -> bool:
    """Skipped: NaN where the value is not a number (a type change the other mutations already make),
    and any mutation that writes the value already there (null on null, 0 on 0, [] on [], ...)."""
    if mutation == "nan":
        return _is_number(original)
    new = MUTATIONS[mutation]
    return new is DELETE or json.dumps(new) != json.dumps(original)


def mutated(data: dict, path: tuple, mutation: str) -> dict:
    data = json.loads(json.dumps(data))  # a deep copy (NaN survives: json writes and reads it)
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    if MUTATIONS[mutation] is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = MUTATIONS[mutation]
    return data


def key_cases(tree: dict, prefix: str) -> list:
    """pytest params (prefix, key path, mutation) for every key of `tree` and every mutation that applies."""
    cases = []
    for path in walk(tree):
        original = tree
        for part in path:
            original = original[next(iter(original))] if part == FIRST else original[part]
        for mutation in MUTATIONS:
            if applies(original, mutation):
                cases.append(pytest.param(prefix, path, mutation, id=f"{prefix}:{dotted(path)}:{mutation}"))
    return cases


CONFIG_CASES = [case for fmt in RUNTIMES for case in key_cases(written_configs()[fmt], fmt)]
REPORT_CASES = key_cases(written_report(), "gguf")

# -- what the runtime cannot refuse, and why (fnmatch patterns over "format:key:mutation") --------------------

HARMLESS = {
    # Labels and notes for people: the runtime reads none of them, any string is one.
    "onnx:model.family:string", "tflite:model.type:string", "tflite:model.variant:string",
    "onnx:prompt.note:delete", "onnx:prompt.note:null", "onnx:prompt.note:string",
    "tflite:model.decoder.note:string", "coreml:preprocessing_text:string",
    # Token ids apps may use for BOS and padding; batch-1 greedy decoding from the exported prompt uses
    # neither (the tokenizer adds BOS itself), and any id below the vocabulary, or null, is well-formed.
    "onnx:model.bos_token_id:null", "onnx:model.bos_token_id:zero", "onnx:model.pad_token_id:null",
    "tflite:model.bos_token_id:null", "tflite:model.bos_token_id:zero", "tflite:model.pad_token_id:null",
    # With pad_to_square and a shortest-edge resize to the model's size, a centre crop to that size
    # crops nothing: the spec without it preprocesses the same pixels.
    "*:*vision.preprocessing.center_crop:null",
    # The GGUF report's tool versions are a record for the release manifest, any string or null is one.
    "gguf:tools.gguf:string", "gguf:tools.gguf:null", "gguf:tools.llama_cpp_commit:string",
    # Unread by every runtime: the tier label and file sizes are for the committed summary only.
    "gguf:tier:*", "gguf:files.*.file_bytes:*",
    # Tool versions are optional (publish/bundle.py reads them with a default): reports of exporters that
    # recorded none are valid.
    "gguf:tools:delete", "gguf:tools.*:delete",
}
IN_RANGE = {
    # Padding colour and normalisation mean: 0 is a legitimate value (black padding, no centring), the
    # runtime cannot know the model was trained otherwise. It must still answer.
    "*:*vision.preprocessing.pad_color.[012]:zero", "*:*vision.preprocessing.mean.[012]:zero",
}


def allowance(case_id: str) -> str | None:
    if any(fnmatch.fnmatchcase(case_id, pattern) for pattern in HARMLESS):
        return "harmless"
    if any(fnmatch.fnmatchcase(case_id, pattern) for pattern in IN_RANGE):
        return "in range"
    return None


# Where the one-line error names another key than the one mutated, and why (patterns as above).
BLAMED = {
    # A resize without its size: the section is what is incomplete (the message says which keys it needs).
    "*:*preprocessing.resize.shortest_edge:delete": "preprocessing.resize: must hold shortest_edge",
    "*:*preprocessing.resize.shortest_edge:null": "preprocessing.resize: must hold shortest_edge",
    # A parameter nothing names any more: the config is incomplete rather than one key wrong; the line
    # names where a source belongs (a package's weight map, or the unused list).
    "coreml:packages.*.weights.#0:delete": "packages / unused_parameters",
    "coreml:unused_parameters:list": "packages / unused_parameters",
    "coreml:unused_parameters.*:delete": "packages / unused_parameters",
    # Another id below the vocabulary is well-formed; the list is what lacks the tokenizer's EOS.
    "onnx:model.eos_token_ids.0:zero": "model.eos_token_ids: [0] lacks the tokenizer's EOS id",
}


def expected_key(case_id: str, real_path: tuple, mutation: str) -> str:
    for pattern, key in BLAMED.items():
        if fnmatch.fnmatchcase(case_id, pattern):
            return key
    if mutation == "delete" and isinstance(real_path[-1], int):
        return dotted(real_path[:-1])  # the list lost an item: its length is what is wrong
    return dotted(real_path)


def check_case(case_id: str, call, file_name: str, key: str | None, baseline) -> None:
    """The case's outcome: an allowed answer, or a one-line UserError naming the file (and key)."""
    kind = allowance(case_id)
    if kind is not None:
        with deadline(DEADLINE_S):
            answer = call()
        assert isinstance(answer, str), (case_id, answer)
        if kind == "harmless":
            assert answer == baseline(), f"{case_id}: allowed as harmless, but answers {answer!r}"
        return
    with deadline(DEADLINE_S), pytest.raises(UserError) as info:
        answer = call()
        pytest.fail(f"{case_id}: not refused, answers {answer!r}")
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    assert file_name in message, message
    if key is not None:
        assert key in message, f"{case_id}: the error does not name {key!r}: {message}"


# -- runtime configs: every key --------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, path, mutation", CONFIG_CASES)
def test_config_key_mutation(exports, baselines, tmp_path, fmt, path, mutation):
    source = exports(fmt)
    config_name = RUNTIMES[fmt][2]
    data = json.loads((source / config_name).read_text())
    real = resolve(data, path)
    case_id = f"{fmt}:{dotted(path)}:{mutation}"
    directory = copy_export(source, tmp_path / fmt)
    replace(directory / config_name, json.dumps(mutated(data, real, mutation)).encode())
    check_case(case_id, lambda: open_and_answer(fmt, directory), config_name,
               expected_key(case_id, real, mutation), lambda: baselines(fmt))


@pytest.mark.parametrize("fmt", list(RUNTIMES) + ["gguf"])
def test_generated_keys_are_every_key_of_the_export(exports, fmt):
    """The collection-time key lists (from the exporters' builders) are exactly the real export's keys."""
    if fmt == "gguf":
        written, real = written_report(), json.loads((exports(fmt) / "export_report.json").read_text())
    else:
        written, real = written_configs()[fmt], json.loads((exports(fmt) / RUNTIMES[fmt][2]).read_text())
    assert sorted(map(dotted, walk(real))) == sorted(map(dotted, walk(written)))


def test_every_allowance_is_a_generated_case():
    """No allow-list entry is dead: each pattern matches a case that exists (a stale one would hide nothing,
    but would claim a mutation is harmless that nobody checks)."""
    ids = [case.id for case in CONFIG_CASES + REPORT_CASES]
    for pattern in (*HARMLESS, *IN_RANGE, *BLAMED):
        assert any(fnmatch.fnmatchcase(case_id, pattern) for case_id in ids), pattern


# -- whole files: configs, reports, tokenizer files ------------------------------------------------------------

def _deep(depth: int = 100_000) -> bytes:
    return b"[" * depth + b"]" * depth


WHOLE_FILE = {
    "non-utf8": lambda text: b"\xff\xfe\x00\x80" + text[:50],
    "truncated": lambda text: text[: len(text) // 2],
    "json-list": lambda text: b"[1, 2, 3]",
    "deep-nesting": lambda text: _deep(),
    "deep-object": lambda text: b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "empty-object": lambda text: b"{}",
    "empty-file": lambda text: b"",
    "random-bytes": lambda text: np.random.default_rng(0).bytes(300),
}
# An empty tokenizer_config.json is a valid file: transformers builds the tokenizer from tokenizer.json
# alone (no EOS/BOS names); the ONNX and TFLite configs carry their own EOS ids and the prompt its
# special tokens, so the answer must not change. (Core ML's config must agree with the tokenizer's EOS:
# refused there.)
WHOLE_FILE_HARMLESS = {"onnx:tokenizer_config.json:empty-object", "tflite:tokenizer_config.json:empty-object"}
WHOLE_FILE_CASES = [pytest.param(fmt, name, how, id=f"{fmt}:{name}:{how}")
                    for fmt in RUNTIMES
                    for name in (RUNTIMES[fmt][2], "export_report.json", "tokenizer.json", "tokenizer_config.json")
                    for how in WHOLE_FILE]


@pytest.mark.parametrize("fmt, name, how", WHOLE_FILE_CASES)
def test_whole_file_mutation(exports, baselines, tmp_path, fmt, name, how):
    source = exports(fmt)
    directory = copy_export(source, tmp_path / fmt)
    replace(directory / name, WHOLE_FILE[how]((source / name).read_bytes()))
    case_id = f"{fmt}:{name}:{how}"
    if any(fnmatch.fnmatchcase(case_id, pattern) for pattern in WHOLE_FILE_HARMLESS):
        with deadline(DEADLINE_S):
            assert open_reported_and_answer(fmt, directory) == baselines(fmt), case_id
        return
    check_case(case_id, lambda: open_reported_and_answer(fmt, directory), name, None, lambda: baselines(fmt))


# -- export_report.json: every key (GGUF, whose report the runtime reads most of; ONNX for the common keys) ----

@pytest.mark.parametrize("prefix, path, mutation", REPORT_CASES)
def test_gguf_report_key_mutation(exports, baselines, tmp_path, prefix, path, mutation):
    source = exports("gguf")
    data = json.loads((source / "export_report.json").read_text())
    case_id = f"gguf:{dotted(path)}:{mutation}"
    directory = copy_export(source, tmp_path / "gguf")
    replace(directory / "export_report.json", json.dumps(mutated(data, path, mutation)).encode())
    check_case(case_id, lambda: open_reported_and_answer("gguf", directory), "export_report.json",
               expected_key(case_id, path, mutation), lambda: baselines("gguf"))


ONNX_REPORT_KEYS = [("format",), ("files",), ("files", "text"), ("files", "text", "file"),
                    ("files", "vision", "file"), ("tools",), ("tools", "onnxruntime")]
# Keys the ONNX report holds that no code reads back (the runtime reads onnx_config.json): any value.
ONNX_REPORT_UNREAD = [("precision",), ("opset",), ("exporter",), ("files", "text", "file_bytes")]
ONNX_REPORT_HARMLESS = {
    # A tool version is a string or null (package_versions writes null for a missing package); the
    # versions are optional altogether (publish/bundle.py reads them with a default).
    (("tools", "onnxruntime"), "null"), (("tools", "onnxruntime"), "string"), (("tools", "onnxruntime"), "delete"),
    (("tools",), "delete"),
    # The ONNX runtime takes its graphs' names from onnx_config.json; the report's file list feeds the
    # committed summary. A report listing fewer files is not one the runtime can tell from a real one.
    (("files", "text"), "delete"),
}
ONNX_REPORT_CASES = [pytest.param(path, mutation, id=f"onnx-report:{dotted(path)}:{mutation}")
                     for path in ONNX_REPORT_KEYS + ONNX_REPORT_UNREAD for mutation in MUTATIONS
                     if mutation != "nan"]


@pytest.mark.parametrize("path, mutation", ONNX_REPORT_CASES)
def test_onnx_report_key_mutation(exports, baselines, tmp_path, path, mutation):
    source = exports("onnx")
    data = json.loads((source / "export_report.json").read_text())
    directory = copy_export(source, tmp_path / "onnx")
    replace(directory / "export_report.json", json.dumps(mutated(data, path, mutation)).encode())
    case_id = f"onnx-report:{dotted(path)}:{mutation}"
    call = functools.partial(open_reported_and_answer, "onnx", directory)
    if path in ONNX_REPORT_UNREAD or (path, mutation) in ONNX_REPORT_HARMLESS:
        with deadline(DEADLINE_S):
            assert call() == baselines("onnx"), case_id
        return
    check_case(case_id, call, "export_report.json", expected_key(case_id, path, mutation), lambda: baselines("onnx"))


# -- embedding tables (.npy): numpy reads them in-process --------------------------------------------------------

def _npy_with_header(original: bytes, header_shape: str) -> bytes:
    """The same data under a header that claims another shape (padded to the original header's length)."""
    start = original.index(b"{")
    end = original.index(b"\n", start)
    header = original[start:end].decode("latin1")
    shape_at = header.index("'shape':")
    claimed = header[:shape_at] + f"'shape': {header_shape}, }}"
    return original[:start] + claimed.ljust(end - start).encode("latin1") + original[end:]


NPY_MUTATIONS = {
    "truncated": lambda data: data[: len(data) // 2],
    "header-only": lambda data: data[:128],
    "one-byte-short": lambda data: data[:-1],
    "one-byte-long": lambda data: data + b"\0",
    "magic-flipped": lambda data: bytes([data[0] ^ 0xFF]) + data[1:],
    "huge-shape": lambda data: _npy_with_header(data, "(1000000000000, 256)"),
    "wrong-shape": lambda data: _npy_with_header(data, "(256, 512)"),
    "pickled": lambda data: _pickled(),
    "empty": lambda data: b"",
}


def _pickled() -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buffer.getvalue()


NPY_FILES = {"tflite": "embedding.npy", "coreml": "embed_tokens.npy"}
NPY_CASES = [pytest.param(fmt, how, id=f"{fmt}:{NPY_FILES[fmt]}:{how}") for fmt in NPY_FILES for how in NPY_MUTATIONS]


@pytest.mark.parametrize("fmt, how", NPY_CASES)
def test_embedding_table_mutation(exports, baselines, tmp_path, fmt, how):
    source = exports(fmt)
    name = NPY_FILES[fmt]
    directory = copy_export(source, tmp_path / fmt)
    replace(directory / name, NPY_MUTATIONS[how]((source / name).read_bytes()))
    check_case(f"{fmt}:{name}:{how}", lambda: open_and_answer(fmt, directory), name, None, lambda: baselines(fmt))


# -- native model files, in a child process per case --------------------------------------------------------------

CHILD = r"""
import sys
from PIL import Image
from vlm_factory.errors import exits_cleanly

@exits_cleanly
def main(module, name, directory):
    import importlib
    runtime = getattr(importlib.import_module(module), name)(directory)
    with runtime:
        print(runtime.answer([Image.new("RGB", (40, 30), (200, 30, 30))], ["what colour is the square?"])[0])

main(*sys.argv[1:])
"""


def _truncate(fraction: float | int):
    return lambda data: data[:fraction] if isinstance(fraction, int) else data[: int(len(data) * fraction)]


def _flip_at(offset: int):
    return lambda data: data[:offset % len(data)] + bytes([data[offset % len(data)] ^ 0xFF]) + data[offset % len(data) + 1:]


def _flip_in(needle: bytes):
    """Flip the case of the first letter of the first occurrence of `needle` (a name or op type)."""
    def flip(data: bytes) -> bytes:
        at = data.index(needle)
        return data[:at] + bytes([data[at] ^ 0x20]) + data[at + 1:]
    return flip


def _flip_in_weights(data: bytes) -> bytes:
    """One byte in the middle of the file: weight data of the tiny base's graphs (a different number)."""
    return _flip_at(len(data) // 2)(data)


NATIVE = {
    ("onnx", "text.onnx", "truncated-half"): _truncate(0.5),
    ("onnx", "text.onnx", "truncated-8-bytes"): _truncate(8),
    ("onnx", "vision.onnx", "truncated-90pct"): _truncate(0.9),
    ("onnx", "embedding.onnx", "one-byte-short"): _truncate(-1),
    ("onnx", "text.onnx", "first-byte-flipped"): _flip_at(0),
    ("onnx", "vision.onnx", "last-byte-flipped"): _flip_at(-1),
    ("onnx", "text.onnx", "op-type-flipped"): _flip_in(b"MatMul"),
    ("onnx", "text.onnx", "input-name-flipped"): _flip_in(b"past_key_values.1.key"),
    ("onnx", "embedding.onnx", "op-type-flipped"): _flip_in(b"Gather"),
    ("onnx", "vision.onnx", "input-name-flipped"): _flip_in(b"pixel_values"),
    ("onnx", "text.onnx", "weight-byte-flipped"): _flip_in_weights,
    ("tflite", "decoder.tflite", "truncated-half"): _truncate(0.5),
    ("tflite", "vision.tflite", "truncated-100-bytes"): _truncate(100),
    ("tflite", "decoder.tflite", "one-byte-short"): _truncate(-1),
    ("tflite", "decoder.tflite", "identifier-flipped"): _flip_at(4),
    ("tflite", "vision.tflite", "first-byte-flipped"): _flip_at(0),
    ("tflite", "vision.tflite", "signature-name-flipped"): _flip_in(b"serving_default"),
    ("tflite", "decoder.tflite", "signature-name-flipped"): _flip_in(b"prefill"),
    ("tflite", "decoder.tflite", "cache-name-flipped"): _flip_in(b"k_cache"),
    ("tflite", "decoder.tflite", "position-name-flipped"): _flip_in(b"input_pos"),
    ("tflite", "vision.tflite", "input-name-flipped"): _flip_in(b"pixel_values"),
    ("tflite", "decoder.tflite", "output-name-flipped"): _flip_in(b"logits"),
    ("tflite", "decoder.tflite", "weight-byte-flipped"): _flip_in_weights,
    ("coreml", "vision.mlpackage/Data/com.apple.CoreML/weights/weight.bin", "truncated-half"): _truncate(0.5),
    ("coreml", "text.mlpackage/Data/com.apple.CoreML/model.mlmodel", "truncated-half"): _truncate(0.5),
    ("coreml", "vision.mlpackage/Manifest.json", "random-bytes"): lambda data: np.random.default_rng(1).bytes(200),
}
# A flipped weight byte is another valid model: nothing short of a checksum (SHA256SUMS is checked where
# a release is downloaded, not by the runtime) can tell. It may load and answer, or be refused; never crash.
MAY_ANSWER = {("onnx", "text.onnx", "weight-byte-flipped"), ("tflite", "decoder.tflite", "weight-byte-flipped")}
# What the libraries print on stderr while they import and load, whatever happens (not error reports):
# glog/absl lines (TensorFlow, torch), LiteRT's delegate note, optional extensions coremltools and torchao
# cannot load on Linux, and version notices.
NATIVE_NOISE = re.compile(r"[IWE]\d{4} \d\d:\d\d:\d\d|INFO: Created TensorFlow Lite XNNPACK delegate|"
                          r"WARNING: All log messages before absl|Failed to load |scikit-learn version |"
                          r"TensorFlow version |Torch version ")


def _run_child(fmt: str, directory: Path) -> subprocess.CompletedProcess:
    module, name, _ = RUNTIMES[fmt]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "3", "TRANSFORMERS_VERBOSITY": "error"}
    try:
        return subprocess.run([sys.executable, "-c", CHILD, module, name, str(directory)], capture_output=True,
                              text=True, timeout=CHILD_TIMEOUT_S, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess([], returncode=None, stdout="", stderr="timed out: a hang")


@pytest.fixture(scope="module")
def native_results(exports, tmp_path_factory):
    """(fmt, file, mutation) -> the child's CompletedProcess; a format's cases run together, two at a time
    (the children spend most of their time importing, which runs in parallel)."""
    results: dict[tuple, subprocess.CompletedProcess] = {}

    def get(case: tuple) -> subprocess.CompletedProcess:
        fmt = case[0]
        if case not in results:
            jobs = {}
            for other, mutate in NATIVE.items():
                if other[0] != fmt:
                    continue
                directory = copy_export(exports(fmt), tmp_path_factory.mktemp("native") / fmt)
                target = directory / other[1]
                replace(target, mutate(target.read_bytes()))
                jobs[other] = directory
            with ThreadPoolExecutor(max_workers=2) as pool:
                for other, done in zip(jobs, pool.map(lambda d: _run_child(fmt, d), jobs.values())):
                    results[other] = done
        return results[case]

    return get


@pytest.mark.parametrize("case", list(NATIVE), ids=["/".join(case) for case in NATIVE])
def test_native_file_mutation_in_a_child(native_results, case):
    fmt, name, _ = case
    done = native_results(case)
    assert done.returncode is not None, f"{case}: the child hung"
    if done.returncode < 0:
        pytest.fail(f"{case}: the child was killed by {signal.Signals(-done.returncode).name} (a native crash): "
                    f"{done.stderr[-1500:]}")
    if case in MAY_ANSWER and done.returncode == 0:
        assert done.stdout.strip(), case
        return
    errors = [line for line in done.stderr.splitlines() if line.strip() and not NATIVE_NOISE.match(line)]
    assert done.returncode == 2, f"{case}: exit status {done.returncode}: {done.stderr[-1500:]}"
    assert len(errors) == 1 and errors[0].startswith("error: "), f"{case}: stderr is not one error line: {errors}"
    assert Path(name).name in errors[0] or Path(name).parts[0] in errors[0], errors[0]


# -- the parity stage's command line ---------------------------------------------------------------------------

def _with(raw: bytes, path: tuple, value) -> bytes:
    """The JSON document `raw` with the key at `path` set to `value`."""
    data = json.loads(raw)
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    parent[path[-1]] = value
    return json.dumps(data).encode()


# (format, file, how to change it, what the one error line says). The first one hung the adapter before
# the schema (it built two billion input names); the last is a native file, refused by onnx.load's parser.
CLI_CASES = {
    "onnx-layers-1e9": ("onnx", "onnx_config.json",
                        lambda raw: _with(raw, ("model", "decoder", "num_hidden_layers"), 1e9),
                        "onnx_config.json: model.decoder.num_hidden_layers"),
    "tflite-negative-prefill": ("tflite", "tflite_config.json",
                                lambda raw: _with(raw, ("model", "decoder", "prefill_length"), -1),
                                "tflite_config.json: model.decoder.prefill_length"),
    "onnx-graph-first-byte": ("onnx", "text.onnx", _flip_at(0), "text.onnx: not a readable ONNX file"),
}
# The stage loads the reference model before the artifact: these lines are its libraries' logging (our
# log format, glog/absl, a progress bar), not error reports.
CLI_NOISE = re.compile(NATIVE_NOISE.pattern + r"|\d\d:\d\d:\d\d WARNING |Loading weights")


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_parity_stage_exits_2_with_one_error_line(exports, tmp_path, case):
    """The real entry point (stages/parity.py) on a malformed export: exit status 2, and besides library
    logging exactly one line on stderr, `error: ...` naming the file and key; no traceback."""
    fmt, name, change, needle = CLI_CASES[case]
    source = exports(fmt)
    directory = copy_export(source, tmp_path / fmt)
    replace(directory / name, change((source / name).read_bytes()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "TF_CPP_MIN_LOG_LEVEL": "3"}
    tier = "iphone15pro" if fmt == "coreml" else "android_flagship"
    done = subprocess.run([sys.executable, "stages/parity.py", "--params", "params.yaml", "--format", fmt,
                           "--tier", tier, "--artifact", str(directory), "--model", str(BUNDLED_BASE),
                           "--data", str(tmp_path), "--reference", str(tmp_path / "ref.jsonl"),
                           "--reference-metrics", str(tmp_path / "reference.json"), "--out", str(tmp_path / "out.json")],
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, cwd=ROOT, env=env)
    lines = [line for line in done.stderr.splitlines() if line.strip() and not CLI_NOISE.match(line)]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
