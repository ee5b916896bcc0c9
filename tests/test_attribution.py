"""Attribution of a target's drift to its components (eval/attribution.py) and the per-component settings it
builds on (export/components.py): real exports of the bundled tiny base, run in llama.cpp."""

import pytest
from parity_inputs import bundled_reference

from vlm_factory.export.components import FULL_PRECISION, component_precisions, full_precision, only


def test_every_format_names_a_precision_per_component_and_a_full_one():
    """A variant keeps one component at the target's precision and puts the others at the format's full one."""
    gguf = {"llm": "Q4_K_M", "vision": "Q8_0"}
    assert component_precisions("gguf", gguf, "t") == {"vision": "Q8_0", "projector": "F16", "llm": "Q4_K_M"}
    assert only("gguf", gguf, "t", "vision") == {"llm": "F16", "vision": "Q8_0", "projector": "F16"}
    assert full_precision("gguf", gguf, "t") == {"llm": "F16", "vision": "F16", "projector": "F16"}
    coreml = {"nbits": 6, "granularity": "per_grouped_channel", "group_size": 16}
    assert component_precisions("coreml", coreml, "t") == {"vision": "6", "projector": "6", "llm": "6"}
    llm_only = only("coreml", coreml, "t", "llm")
    assert (llm_only["vision"], llm_only["projector"], llm_only["llm"]) == ("fp16", "fp16", 6)
    assert llm_only["nbits"] == 6 and llm_only["group_size"] == 16  # the rest of the target is kept
    for fmt, target in (("onnx", {"precision": "int8", "ort_format": True}), ("tflite", {"precision": "fp16"})):
        full = component_precisions(fmt, full_precision(fmt, target, "t"), "t")
        assert full == dict.fromkeys(("vision", "projector", "llm"), FULL_PRECISION[fmt])
        alone = component_precisions(fmt, only(fmt, target, "t", "projector"), "t")
        assert alone == {"vision": FULL_PRECISION[fmt], "projector": target["precision"], "llm": FULL_PRECISION[fmt]}


def test_a_bad_component_precision_names_its_key():
    from vlm_factory.errors import UserError

    with pytest.raises(UserError, match=r"targets\.coreml\.t\.vision' must be one of 4, 6, 8, fp16; got 5"):
        component_precisions("coreml", {"nbits": 6, "vision": 5}, "t")


@pytest.fixture(scope="module")
def reference(root, synthetic_data, tmp_path_factory):
    """The bundled tiny base as the reference, with its own answers to the synthetic eval split."""
    from vlm_factory.eval.artifact_parity import ReferenceSide

    ref = bundled_reference(root, synthetic_data, tmp_path_factory.mktemp("reference"))
    return ref["model_dir"], ReferenceSide.load(ref["records"], synthetic_data, ref["predictions"], ref["model"],
                                                ref["processor"], embedding_images=6)


def test_attribution_runs_one_variant_per_reduced_component_in_llama_cpp(reference):
    """GGUF with a Q4_K tower and a Q4_K_M LLM: a floor, a vision-only and an LLM-only variant, each exported
    and answered by llama.cpp. The LLM-only variant carries the floor's mmproj, so its image embeddings are the
    floor's to the last digit; the vision-only one's are not; each reduction shrinks the files."""
    from vlm_factory.eval.attribution import attribute
    from vlm_factory.export.gguf_export import export_gguf
    from vlm_factory.runtime.open import open_runtime

    model_dir, ref = reference
    target = {"llm": "Q4_K_M", "vision": "Q4_K", "projector": "F16"}
    table = attribute(
        "gguf", "t", target, ref, export=lambda settings, out: export_gguf(model_dir, out, "t", settings),
        open_runtime=lambda artifact: open_runtime("gguf", artifact, context_tokens=256, kv_cache="f16",
                                                   isolated=False),
        max_new_tokens=8, vqa_metric="official")
    rows = table["rows"]
    print(table["summary"], {name: (r["drift"], r["embedding_cosine"], r["artifact_bytes"]) for name, r in rows.items()})
    assert table["reduced"] == ["vision", "llm"] and table["at_full_precision"] == ["projector"]
    assert set(rows) == {"floor", "vision", "llm"}
    assert rows["floor"]["precisions"] == {"vision": "F16", "projector": "F16", "llm": "F16"}
    assert rows["vision"]["precisions"] == {"vision": "Q4_K", "projector": "F16", "llm": "F16"}
    assert rows["llm"]["precisions"] == {"vision": "F16", "projector": "F16", "llm": "Q4_K_M"}
    assert rows["llm"]["embedding_cosine"] == rows["floor"]["embedding_cosine"]
    assert rows["vision"]["embedding_cosine"] != rows["floor"]["embedding_cosine"]
    assert rows["vision"]["artifact_bytes"] < rows["floor"]["artifact_bytes"]
    assert rows["llm"]["artifact_bytes"] < rows["floor"]["artifact_bytes"]
    assert table["summary"] == (f"vision {rows['vision']['drift']:+.2f}, llm {rows['llm']['drift']:+.2f} "
                                f"(floor {rows['floor']['drift']:+.2f})")
    for row in rows.values():  # 72 questions: a drift is a multiple of 1/72 of the score range
        assert -100.0 <= row["drift"] <= 100.0 and 0.0 <= row["answer_agreement"] <= 1.0
