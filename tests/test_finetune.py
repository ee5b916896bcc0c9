"""Projector fine-tuning: the recipe freezes what it says, trains what it says, and learns."""

import pytest
import torch

from vlm_factory.config import TrainConfig
from vlm_factory.data.records import read_jsonl
from vlm_factory.model.checkpoint import load_checkpoint
from vlm_factory.train.projector import finetune_projector, reinitialise_projector

from conftest import BUNDLED_BASE


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_bundled_base_projector_stage_loss_falls_and_only_the_projector_moves(synthetic_data):
    model, processor = load_checkpoint(BUNDLED_BASE)
    tower, llm = _snapshot(model.model.vision_tower), _snapshot(model.model.language_model)
    records = read_jsonl(synthetic_data / "train.jsonl")
    cfg = TrainConfig(steps=30, batch_size=32, lr=3e-3, warmup_steps=5, log_every=5)
    logged = []
    trained, losses = finetune_projector(model, processor, records, synthetic_data, cfg,
                                         log_metric=lambda step, loss: logged.append((step, loss)))
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert [s for s, _ in logged] == [5, 10, 15, 20, 25, 30]
    for name, value in _snapshot(trained.model.vision_tower).items():
        assert torch.equal(value, tower[name]), name
    for name, value in _snapshot(trained.model.language_model).items():
        assert torch.equal(value, llm[name]), name


def test_reinitialised_projector_is_new_and_deterministic(random_llava):
    model, _ = random_llava
    before = _snapshot(model.model.multi_modal_projector)
    reinitialise_projector(model, seed=5)
    once = _snapshot(model.model.multi_modal_projector)
    reinitialise_projector(model, seed=5)
    again = _snapshot(model.model.multi_modal_projector)
    assert all(torch.equal(once[k], again[k]) for k in once)
    assert not torch.equal(once["linear_1.weight"], before["linear_1.weight"])


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_llm_modes_train_the_llm_and_return_a_plain_llava(mode, small_arch, synthetic_data):
    from transformers import LlavaForConditionalGeneration

    from vlm_factory.model.tiny import build_model

    model, processor = build_model(small_arch, seed=1)
    llm = _snapshot(model.model.language_model)
    records = read_jsonl(synthetic_data / "train.jsonl")
    cfg = TrainConfig(llm=mode, steps=4, batch_size=16, lr=1e-2, warmup_steps=1, log_every=2)
    trained, losses = finetune_projector(model, processor, records, synthetic_data, cfg)
    assert type(trained) is LlavaForConditionalGeneration  # LoRA merged away, saveable as plain HF
    changed = [k for k, v in _snapshot(trained.model.language_model).items() if not torch.equal(v, llm[k])]
    assert changed
    if mode == "lora":
        assert all(any(p in k for p in ("q_proj", "k_proj", "v_proj", "o_proj")) for k in changed), changed
    assert all(torch.isfinite(torch.tensor(losses)))


def test_projector_continue_starts_from_the_checkpoints_own(small_arch, synthetic_data, monkeypatch):
    """train.projector=continue fine-tunes the trained connector: it is never re-initialised, and it moves."""
    from vlm_factory.model.tiny import build_model
    from vlm_factory.train import projector as recipe

    model, processor = build_model(small_arch, seed=2)
    before = _snapshot(model.model.multi_modal_projector)
    monkeypatch.setattr(recipe, "reinitialise_projector", lambda *a, **k: pytest.fail("re-initialised"))
    cfg = TrainConfig(projector="continue", steps=3, batch_size=16, lr=1e-3, warmup_steps=1, log_every=1)
    trained, losses = finetune_projector(model, processor, read_jsonl(synthetic_data / "train.jsonl"),
                                         synthetic_data, cfg)
    assert len(losses) == 3
    after = _snapshot(trained.model.multi_modal_projector)
    assert not torch.equal(after["linear_2.weight"], before["linear_2.weight"])


def test_projector_frozen_trains_nothing(random_llava, synthetic_data):
    model, processor = random_llava
    before = _snapshot(model)
    trained, losses = finetune_projector(model, processor, read_jsonl(synthetic_data / "train.jsonl"),
                                         synthetic_data, TrainConfig(projector="frozen"))
    assert losses == [] and all(torch.equal(v, before[k]) for k, v in _snapshot(trained).items())


def test_finetune_aligns_a_qwen2_llava(synthetic_data):
    """The same recipe on the Qwen2 base: the family supplies the prompt, connector and LLM."""
    model, processor = load_checkpoint(BUNDLED_BASE.parent / "tiny-llava-qwen2")
    cfg = TrainConfig(steps=20, batch_size=32, lr=3e-3, warmup_steps=5, log_every=5)
    _, losses = finetune_projector(model, processor, read_jsonl(synthetic_data / "train.jsonl"), synthetic_data, cfg)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
