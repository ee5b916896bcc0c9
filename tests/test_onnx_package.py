"""An ONNX package stands on its own: its answer.py answers exactly as the project's OnnxRuntime adapter.

Each bundled tiny model (one per family that exports ONNX: LLaVA with a Llama and with a Qwen2 LLM,
SmolVLM with its image tiles, MobileVLM) is exported with the production fp32 exporter. The package's
answer.py then runs in a child interpreter in isolated mode (`-I`) from a copy of the package, with an
import hook that refuses vlm_factory, torch and transformers, so it proves it needs only onnxruntime,
numpy, tokenizers and Pillow; its printed answer must equal the adapter's on the same image file,
string for string. Both run the same graphs with the same greedy decoding: the first disagreement
would be a contract the example reads differently from the adapter (pixels, prompt, splice, cache).
onnxruntime's CPU kernels split work across threads by output rows, never along a reduction, so the
adapter's thread count (at most 4) and the example's default give bit-equal logits (measured: equal
answers on every input below).

The config names its format and schema version; both readers refuse a version they do not know with
one line naming the file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import BUNDLED_BASE
from vlm_factory.errors import UserError

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed")

MODELS = BUNDLED_BASE.parent
# One bundled tiny model per family (and LLM kind) that exports ONNX; each export takes ~12 s.
PACKAGES = [
    pytest.param(MODELS / "tiny-llava-siglip", id="llava-llama", marks=pytest.mark.family_format("llava", "onnx")),
    pytest.param(MODELS / "tiny-llava-qwen2", id="llava-qwen2",
                 marks=[pytest.mark.family_format("llava", "onnx"), pytest.mark.slow]),
    pytest.param(MODELS / "tiny-smolvlm", id="smolvlm",
                 marks=[pytest.mark.family_format("idefics3", "onnx"), pytest.mark.slow]),
    pytest.param(MODELS / "tiny-mobilevlm", id="mobilevlm",
                 marks=[pytest.mark.family_format("mobilevlm", "onnx"), pytest.mark.slow]),
]
# Runs answer.py (argv[1]) as __main__ with vlm_factory, torch and transformers unimportable.
WITHOUT_PROJECT = """
import runpy, sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("vlm_factory", "torch", "transformers"):
            raise ImportError(f"answer.py must not import {name}")

sys.meta_path.insert(0, Refuse())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
CHILD_TIMEOUT_S = 60  # imports and three sessions take ~0.5 s on the tiny models


@pytest.fixture(scope="module", params=PACKAGES)
def package(request, tmp_path_factory) -> Path:
    from vlm_factory.export.onnx_graphs import export_onnx_fp32

    out = tmp_path_factory.mktemp("onnx-package") / "onnx"
    export_onnx_fp32(request.param, out)
    return out


@pytest.fixture(scope="module")
def questions(synthetic_data, tmp_path_factory) -> list[tuple[Path, str]]:
    """(image file, question): one eval record per aspect, plus two files that exercise more of the
    preprocessing: an odd-sized wide image (resize, crop, several tiles) and an RGBA one whose alpha
    varies (composited onto white, not dropped)."""
    from vlm_factory.data.records import read_jsonl

    records = read_jsonl(synthetic_data / "eval.jsonl")
    picked = [next(r for r in records if r.aspect == aspect) for aspect in ("square", "tall", "wide")]
    picked.append(records[-1])
    inputs = [(synthetic_data / r.image, r.question) for r in picked]
    extra = tmp_path_factory.mktemp("images")
    source = Image.open(inputs[0][0]).convert("RGB")
    source.resize((150, 63), Image.Resampling.BILINEAR).save(extra / "odd.png")
    alpha = Image.fromarray(np.random.default_rng(0).integers(0, 256, source.size[::-1], dtype=np.uint8), "L")
    rgba = source.copy()
    rgba.putalpha(alpha)
    rgba.save(extra / "rgba.png")
    return inputs + [(extra / "odd.png", picked[2].question), (extra / "rgba.png", picked[0].question)]


def run_example(script: Path, image: Path, question: str, *extra: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-I", "-c", WITHOUT_PROJECT, str(script), str(image), question, *extra],
                          cwd=cwd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)


def adapter_answers(package: Path, inputs: list[tuple[Path, str]]) -> list[str]:
    from vlm_factory.runtime.onnx_runtime import OnnxRuntime

    with OnnxRuntime(package) as runtime:
        # The file as PIL opens it (an RGBA file stays RGBA), as answer.py reads it.
        return [runtime.answer([Image.open(image)], [question])[0] for image, question in inputs]


def test_example_answers_as_the_adapter(package, questions, tmp_path):
    from vlm_factory.export.onnx_graphs import EXAMPLE

    assert (package / "answer.py").read_bytes() == EXAMPLE.read_bytes()  # every package carries the example
    copy = shutil.copytree(package, tmp_path / "package")
    expected = adapter_answers(package, questions)
    actual = []
    for image, question in questions:
        done = run_example(Path("answer.py"), image, question, cwd=copy)
        assert done.returncode == 0, done.stderr[-2000:]
        actual.append(done.stdout.strip())
    print([(image.name, question, answer) for (image, question), answer in zip(questions, actual)])
    assert actual == expected
    assert sum(bool(answer) for answer in actual) > len(actual) // 2  # words, not empty strings


def load_example(path: Path):
    """answer.py imported in this process, to compare its steps with the adapter's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("onnx_package_answer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_steps_equal_the_adapters(package, questions):
    """Pixels, prompt ids, the decoder's logits (prefill and one cached step) and the answer's token ids, bit
    for bit: an answer string alone misses a wrong tile order or positions off by one (measured: the tiny
    models still answer the same words). The adapter runs one thread, the example onnxruntime's default."""
    from vlm_factory.runtime.onnx_runtime import OnnxRuntime

    example = load_example(package / "answer.py")
    ours = example.Package(package)
    with OnnxRuntime(package, intra_op_threads=1) as runtime:
        for path, question in questions:
            image = Image.open(path)
            pixels, rows, cols = example.image_views(image, ours.model["vision"]["preprocessing"])
            expected_pixels, *grid = runtime.views(image)
            assert [rows, cols] == grid and np.array_equal(pixels, expected_pixels), path.name
            assert np.array_equal(ours.prompt_ids(question, rows, cols), runtime._prompt_ids(question, rows, cols))
            logits, past = ours.decoder_step(ours.prompt_embeddings(image, question), ours.empty_cache(), 0)
            expected, expected_past, length = runtime._prefill(image, question)
            assert np.array_equal(logits, expected), path.name
            token = np.asarray([[int(np.argmax(logits))]])
            logits, _ = ours.decoder_step(ours.embed(token), past, length)
            assert np.array_equal(logits, runtime._decode(runtime._embed(token), expected_past, length)[0]), path.name
            assert ours.answer_tokens(image, question) == runtime.answer_tokens(image, question), path.name


def test_example_reads_a_package_it_is_pointed_at(package, questions, tmp_path):
    """answer.py outside the package, run from elsewhere, with --package."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = shutil.copy2(package / "answer.py", elsewhere / "answer.py")
    image, question = questions[1]
    done = run_example(script, image, question, "--package", str(package), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == adapter_answers(package, [(image, question)])[0]


def test_config_names_its_format_and_schema_version(package):
    from vlm_factory.runtime.artifact_schema import ONNX_CONFIG, ONNX_FORMAT, ONNX_SCHEMA_VERSION

    config = json.loads((package / ONNX_CONFIG).read_text())
    assert (config["format"], config["schema_version"]) == (ONNX_FORMAT, ONNX_SCHEMA_VERSION) == \
        ("vlm-factory-onnx", 1)
    assert not (package / "genai_config.json").exists()
    decoder = config["model"]["decoder"]
    assert decoder["inputs"]["past_key"] == {"name": "past_key_values.%d.key", "dtype": "float32",
                                             "shape": ["batch", decoder["num_key_value_heads"], "past_sequence",
                                                       decoder["head_size"]]}
    assert decoder["outputs"]["present_value"]["shape"][2] == "total_sequence"
    assert config["generation"] == {"do_sample": False, "num_beams": 1, "max_new_tokens": 8}


def _with_config(package: Path, target: Path, **changes) -> Path:
    copy = shutil.copytree(package, target)
    config = json.loads((copy / "onnx_config.json").read_text())
    (copy / "onnx_config.json").write_text(json.dumps({**config, **changes}))
    return copy


@pytest.mark.parametrize("changes, says", [
    ({"schema_version": 2}, "schema_version: 2 is not a schema version this runtime reads (it reads 1 only)"),
    ({"format": "onnxruntime-genai"}, "format: 'onnxruntime-genai' is not 'vlm-factory-onnx'"),
], ids=["schema-version-2", "other-format"])
def test_readers_refuse_an_unknown_version(package, questions, tmp_path, changes, says):
    """The adapter and answer.py both refuse, in one line naming the file, before reading any other key
    (a version-2 layout would otherwise fail on whichever key moved first)."""
    from vlm_factory.runtime.onnx_runtime import OnnxRuntime

    # The other keys as a different version might lay them out: the version must be refused first.
    copy = _with_config(package, tmp_path / "package", generation=None, **changes)
    with pytest.raises(UserError) as info:
        OnnxRuntime(copy)
    message = str(info.value)
    assert "\n" not in message and f"{copy / 'onnx_config.json'}: {says}" in message, message

    done = run_example(copy / "answer.py", *questions[0], cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and not done.stdout and len(lines) == 1, done.stderr
    assert str(copy / "onnx_config.json") in lines[0], lines[0]
    assert "but this answer.py reads 'vlm-factory-onnx' version 1 only" in lines[0], lines[0]


def _vision_graph(path: Path, dtype: int, shape: list, features: list) -> None:
    """A stand-in vision graph: `pixel_values` of `dtype` and `shape` (unused), constant `image_features`."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0])),
             helper.make_node("Constant", [], ["size"], value=helper.make_tensor("s", TensorProto.INT64, [3],
                                                                                  [1, *features[1:]])),
             helper.make_node("Expand", ["zero", "size"], ["image_features"])]
    graph = helper.make_graph(nodes, "vision", [helper.make_tensor_value_info("pixel_values", dtype, shape)],
                              [helper.make_tensor_value_info("image_features", TensorProto.FLOAT, features)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10  # the exported graphs' (this onnx writes a newer one than onnxruntime reads)
    onnx.save(model, str(path))


@pytest.mark.parametrize("wrong, says", [
    ("dtype", "model.vision.inputs.pixel_values.dtype: float32, but 'pixel_values' is tensor(float16) (vision.onnx)"),
    ("size", "model.vision.image_size: {height}, but 'pixel_values' has {wrong} on axis 2 (vision.onnx)"),
], ids=["dtype", "size"])
def test_adapter_checks_the_contract_against_the_graphs(package, tmp_path, wrong, says):
    """The config's dtypes and sizes are checked against the graphs, not only written: a vision graph taking
    float16 pixels, or pixels of another size, is refused in one line naming the key and the file."""
    from onnx import TensorProto

    from vlm_factory.runtime.onnx_runtime import OnnxRuntime

    copy = shutil.copytree(package, tmp_path / "package")
    vision = json.loads((copy / "onnx_config.json").read_text())["model"]["vision"]
    shape, features = vision["inputs"]["pixel_values"]["shape"], vision["outputs"]["image_features"]["shape"]
    height = shape[2]
    if wrong == "size":
        shape = [*shape[:2], height // 2, shape[3]]
    _vision_graph(copy / "vision.onnx", TensorProto.FLOAT16 if wrong == "dtype" else TensorProto.FLOAT, shape,
                  features)
    with pytest.raises(UserError) as info:
        OnnxRuntime(copy)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{copy / 'onnx_config.json'}: "), message
    assert says.format(height=height, wrong=height // 2) in message, message
