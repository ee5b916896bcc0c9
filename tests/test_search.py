"""The per-tier precision search (eval/search.py): candidates, order, stopping rule, Pareto front, overrides,
picture; real GGUF exports of the bundled tiny base run in llama.cpp."""

import json

import pytest
from parity_inputs import bundled_reference

from vlm_factory.eval.gates import GateThresholds
from vlm_factory.eval.search import candidates, overrides, pareto_front, plot_points, render_picture, search

# Every accuracy and agreement check at its open end: the budget alone decides (a deterministic verdict).
OPEN = GateThresholds(max_drop=100.0, max_aspect_drop=100.0, max_flip_rate=1.0, min_answer_agreement=0.0,
                      min_first_token_agreement=0.0, max_first_token_kl=1e6, min_embedding_cosine=0.0,
                      min_aspect_embedding_cosine=0.0, min_preprocessing_cosine=0.0, min_informative_margin=10.0)
GRID = {"llm": ["Q8_0", "Q4_K_M"], "vision": ["F16"], "projector": ["F16"]}


def test_candidates_are_every_combination_the_format_accepts():
    valid, refused = candidates("gguf", "t", {"llm": "Q4_K_M"}, {"llm": ["Q2_K", "Q8_0"], "vision": ["Q4_K", "F16"],
                                                                 "projector": ["F16"]})
    assert [c["precisions"]["llm"] + "/" + c["precisions"]["vision"] for c in valid] == \
        ["Q2_K/Q4_K", "Q8_0/Q4_K", "Q2_K/F16", "Q8_0/F16"]  # components in pipeline order: vision varies slowest
    assert refused == []
    # Core ML refuses a 5-bit palette: the candidate is listed as refused with the settings check's reason.
    valid, refused = candidates("coreml", "t", {"nbits": 6}, {"vision": [5, 8], "projector": [8], "llm": [8]})
    assert len(valid) == 1 and valid[0]["precisions"] == {"vision": "8", "projector": "8", "llm": "8"}
    assert len(refused) == 1 and "targets.coreml.t.vision" in refused[0]["reason"]


def test_a_grid_without_a_component_is_a_one_line_error():
    from vlm_factory.errors import UserError

    with pytest.raises(UserError, match=r"search\.grid\.gguf.*missing: projector"):
        candidates("gguf", "t", {"llm": "Q4_K_M"}, {"llm": ["Q8_0"], "vision": ["F16"]})


def test_pareto_front_keeps_what_nothing_beats_on_both_size_and_accuracy():
    rows = [{"candidate": "a", "artifact_bytes": 10, "vqa_accuracy": 80.0},
            {"candidate": "b", "artifact_bytes": 20, "vqa_accuracy": 85.0},
            {"candidate": "c", "artifact_bytes": 30, "vqa_accuracy": 84.0},   # bigger and worse than b
            {"candidate": "d", "artifact_bytes": 10, "vqa_accuracy": 79.0}]   # as big as a, worse
    assert pareto_front(rows) == ["a", "b"]
    assert overrides("gguf", "iphone15pro", {"vision": "Q8_0", "projector": "F16", "llm": "Q3_K_M"}) == [
        "targets.gguf.iphone15pro.vision=Q8_0", "targets.gguf.iphone15pro.projector=F16",
        "targets.gguf.iphone15pro.llm=Q3_K_M"]


@pytest.fixture(scope="module")
def bench(root, synthetic_data, tmp_path_factory):
    """A bench over the bundled tiny base and the synthetic eval split, on the android_budget tier."""
    from vlm_factory.config import load_params
    from vlm_factory.eval.bench import Bench

    ref = bundled_reference(root, synthetic_data, tmp_path_factory.mktemp("reference"))
    params = load_params(root / "params.yaml")
    params.eval.embedding_images = 6
    return Bench(params, "android_budget", model_dir=ref["model_dir"], data_dir=synthetic_data,
                 reference_predictions=ref["predictions"], reference_metrics=ref["metrics"])


def test_search_tries_the_smallest_first_and_stops_at_the_first_that_passes(bench, tmp_path):
    result = search(bench, "gguf", {"llm": "Q8_0"}, GRID, OPEN, "until_pass")
    result["reference_accuracy"] = bench.reference.accuracy  # what search.run adds for the picture
    names = [r["candidate"] for r in result["evaluated"]]
    print(json.dumps(result["evaluated"], indent=1))
    assert names == ["vision F16, projector F16, llm Q4_K_M"]  # smaller than Q8_0, and it passes
    assert result["not_evaluated"] == ["vision F16, projector F16, llm Q8_0"]
    assert result["winner"]["candidate"] == names[0] and result["winner"]["fits"]
    assert result["override"] == ["targets.gguf.android_budget.vision=F16",
                                  "targets.gguf.android_budget.projector=F16", "targets.gguf.android_budget.llm=Q4_K_M"]
    assert result["current_target"] == {"vision": "F16", "projector": "F16", "llm": "Q8_0"}
    picture = tmp_path / "search.png"
    render_picture(result, picture)
    from PIL import Image

    with Image.open(picture) as png:
        assert png.format == "PNG" and png.size == (770, 462)  # 7 x 4.2 inches at 110 dpi
        colours = {rgb for _, rgb in png.convert("RGB").getcolors(1 << 20)}
    # The passing candidate's point is drawn green (matplotlib's tab:green, anti-aliased): the only green pixels.
    assert any(g > r + 60 and g > b + 60 for r, g, b in colours)
    assert plot_points(result) == [{"candidate": names[0], "artifact_mib": result["winner"]["artifact_mib"],
                                    "vqa_accuracy": result["winner"]["vqa_accuracy"], "verdict": "pass"}]


def test_search_over_a_tier_too_small_for_any_candidate_evaluates_all_and_names_the_budget(bench):
    before, bench.tier.memory_budget_mb = bench.tier.memory_budget_mb, 1  # below any weights + KV + activations
    try:
        result = search(bench, "gguf", {"llm": "Q8_0"}, GRID, OPEN, "until_pass")
    finally:
        bench.tier.memory_budget_mb = before
    sizes = [r["artifact_bytes"] for r in result["evaluated"]]
    assert len(sizes) == 2 and sizes == sorted(sizes)  # smallest first, the estimate's order held
    assert result["winner"] is None and result["override"] is None and result["not_evaluated"] == []
    for row in result["evaluated"]:
        assert not row["passed"] and not row["fits"] and row["failure_reason"].startswith("memory_mib")
    assert set(result["pareto_front"]) <= {r["candidate"] for r in result["evaluated"]}
