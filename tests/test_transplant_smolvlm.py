"""Deriving the SmolVLM base from the bundled LLaVA: the connector's fitted start, the joint alignment, the
learning rate a one-layer connector gets after its rescale, and pretraining's dense labels over all views."""

from pathlib import Path

import pytest
import torch

from vlm_factory.data.synthetic import iter_split
from vlm_factory.families import family_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bundled():
    from vlm_factory.model.checkpoint import load_checkpoint

    return load_checkpoint(ROOT / "models" / "tiny-llava-siglip")


def _pixels(processor, split: str, n: int) -> torch.Tensor:
    images = [item.image for item in iter_split(0, split, n, 1, 32)]
    return processor.image_processor(images, return_tensors="pt").pixel_values


@pytest.mark.slow
def test_fitted_connector_stands_in_for_the_source_projector(bundled):
    """The least-squares start reproduces the source's image embeddings on images it was not fitted on.
    Measured R^2 0.987 (fit) and held-out cosine ~0.99; the bounds leave room for float differences only:
    a connector fitted to the wrong patch order or the wrong tower state falls far below both."""
    from vlm_factory.model.transplant import fit_connector, smolvlm_from_llava

    llava, processor = bundled
    smol, _ = smolvlm_from_llava(llava, processor, scale_factor=1, tiles_per_side=2)
    r2 = fit_connector(llava, smol, _pixels(processor, "pretrain", 96))
    assert 0.95 < r2 <= 1.0
    held_out = _pixels(processor, "calibration", 24)
    with torch.no_grad():
        want = family_for(llava.config).image_features(llava, held_out)
        got = family_for(smol.config).image_features(smol, held_out)
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert cosine.mean() > 0.97, cosine.mean()


@pytest.mark.slow
def test_fitted_connector_folds_the_patches_it_shuffles(bundled):
    """With pixel shuffle x2 each token stands for 4 patches: it is fitted to their mean embedding."""
    from vlm_factory.model.transplant import fit_connector, smolvlm_from_llava

    llava, processor = bundled
    smol, _ = smolvlm_from_llava(llava, processor, scale_factor=2, tiles_per_side=2)
    with pytest.raises(ValueError, match="probe more images"):  # 4 tokens an image, 1024 inputs
        fit_connector(llava, smol, _pixels(processor, "pretrain", 96))
    assert fit_connector(llava, smol, _pixels(processor, "pretrain", 512)) > 0.95
    held_out = _pixels(processor, "calibration", 8)
    with torch.no_grad():
        want = family_for(llava.config).image_features(llava, held_out)  # [8, 16, 256], patches row-major
        got = family_for(smol.config).image_features(smol, held_out)  # [8, 4, 256], 2x2 blocks row-major
    block = want.unflatten(1, (2, 2, 2, 2)).permute(0, 1, 3, 2, 4, 5).flatten(1, 2).flatten(2, 3).mean(2)
    cosine = torch.nn.functional.cosine_similarity(got, block, dim=-1)
    assert cosine.mean() > 0.95, cosine.mean()


def test_a_one_layer_connector_learns_at_its_rescaled_rate(bundled):
    """Adam steps each weight by ~lr: a connector that is one rescaled layer gets lr x the rescale, an MLP
    connector (whose hidden layer's steps the rescale amplifies already) keeps one group at lr."""
    from vlm_factory.model.transplant import smolvlm_from_llava
    from vlm_factory.train.projector import parameter_groups

    llava, processor = bundled
    mlp_params = list(family_for(llava.config).connector(llava).parameters())
    assert [g["lr"] for g in parameter_groups(llava, mlp_params, 1e-3, 40.0)] == [1e-3]
    smol, _ = smolvlm_from_llava(llava, processor, scale_factor=2, tiles_per_side=2)
    connector = list(family_for(smol.config).connector(smol).parameters())
    llm = list(smol.model.text_model.layers[0].parameters())
    groups = parameter_groups(smol, llm + connector, 1e-3, 40.0)
    assert [(len(g["params"]), g["lr"]) for g in groups] == [(len(llm), 1e-3), (len(connector), pytest.approx(0.04))]
    assert parameter_groups(smol, llm + connector, 1e-3, 1.0) == [{"params": llm + connector, "lr": 1e-3}]


@pytest.mark.slow
def test_derived_base_trains_every_weight_on_every_view(bundled, tmp_path):
    """The derive stage's training: the pretraining recipe over tiles + global view moves the tower, the
    connector and the LLM, and saves a base that loads as Idefics3 with its metrics."""
    import json

    from vlm_factory.config import PretrainConfig
    from vlm_factory.model.checkpoint import load_checkpoint
    from vlm_factory.model.transplant import smolvlm_from_llava
    from vlm_factory.train.base import train_and_save

    llava, processor = bundled
    smol, smol_processor = smolvlm_from_llava(llava, processor, scale_factor=2, tiles_per_side=2)
    before = {k: v.clone() for k, v in smol.state_dict().items()}
    recipe = PretrainConfig(n_images=12, steps=3, batch_images=4, warmup_steps=1, eval_images=6, eval_every=3)
    final = train_and_save(smol, smol_processor, recipe, tmp_path / "smol", "card", {"derived_from": "bundled"})
    after = smol.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    for part in ("model.connector.", "model.text_model.layers.", "model.vision_model.encoder."):
        assert any(k.startswith(part) for k in changed), part
    metrics = json.loads((tmp_path / "smol" / "pretrain_metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [3] and final["n_questions"] == 12
    assert all(0 < h["relevance_loss"] < 1e3 and 0 < h["lm_loss"] < 20 for h in metrics["history"])
    loaded, _ = load_checkpoint(tmp_path / "smol")
    assert type(loaded).__name__ == "Idefics3ForConditionalGeneration"


@pytest.mark.slow
def test_joint_alignment_trains_connector_and_llm_not_the_tower(bundled):
    from vlm_factory.model.transplant import smolvlm_from_llava
    from vlm_factory.train.align import AlignRecipe, align_connector_and_llm

    llava, processor = bundled
    smol, smol_processor = smolvlm_from_llava(llava, processor, scale_factor=2, tiles_per_side=2)
    before = {k: v.clone() for k, v in smol.state_dict().items()}
    aligned, losses = align_connector_and_llm(smol, smol_processor,
                                              AlignRecipe(steps=3, n_images=12, batch_size=8))
    after = aligned.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert len(losses) == 3 and all(0 < loss < 20 for loss in losses)
    assert any(k.startswith("model.connector.") for k in changed)
    assert any(k.startswith("model.text_model.layers.") for k in changed)
    assert not any(k.startswith("model.vision_model.") for k in changed)
