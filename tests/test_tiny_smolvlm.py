"""The tiny SmolVLM / Idefics3 builder (model=tiny_smolvlm's frozen base): Idefics3's token layout in an
exactly sized vocabulary, a processor that agrees with the model, and the connector's learning rate."""

import pytest

from vlm_factory.families import family_for


@pytest.fixture(scope="module")
def tiny_smolvlm(small_arch):
    from dataclasses import replace

    from vlm_factory.model.tiny import build_model

    return build_model(replace(small_arch, family="idefics3"), seed=0)


def test_markers_are_single_tokens_of_an_exactly_sized_vocabulary(tiny_smolvlm):
    """libmtmd looks "\\n", "\\n\\n", <fake_token_around_image> and <global-img> up as single tokens (and aborts
    on a missing one); SmolLM2's BPE has them so. The vocabulary stays the configured size (K-quant rows)."""
    model, processor = tiny_smolvlm
    tokenizer = processor.tokenizer
    assert len(tokenizer) == model.config.text_config.vocab_size == 512
    for marker in ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<row_1_col_1>",
                   "<row_2_col_2>", "<image>", "\n", "\n\n"):
        assert len(tokenizer(marker, add_special_tokens=False).input_ids) == 1, repr(marker)
    assert "<row_3_col_1>" not in tokenizer.get_vocab()  # 2 x 2 tiles at most


def test_processor_and_model_agree_on_the_image_layout(tiny_smolvlm):
    """4x4 patches per 64-px tile, pixel shuffle x2: 4 tokens per tile, up to 2 x 2 tiles + the global view."""
    model, processor = tiny_smolvlm
    family = family_for(model.config)
    assert family.name == "idefics3" and family.image_tokens == processor.image_seq_len == 4
    assert family.max_views(processor) == 5 and family.visual_tokens(processor) == 20
    assert family.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")


def test_a_one_layer_connector_learns_at_its_rescaled_rate(tiny_smolvlm, random_llava):
    """Adam steps each weight by ~lr: a connector that is one rescaled layer gets lr x the rescale, an MLP
    connector (whose hidden layer's steps the rescale amplifies already) keeps one group at lr."""
    from vlm_factory.train.projector import parameter_groups

    llava, _ = random_llava
    mlp_params = list(family_for(llava.config).connector(llava).parameters())
    assert [g["lr"] for g in parameter_groups(llava, mlp_params, 1e-3, 40.0)] == [1e-3]
    smol, _ = tiny_smolvlm
    connector = list(family_for(smol.config).connector(smol).parameters())
    llm = list(smol.model.text_model.layers[0].parameters())
    groups = parameter_groups(smol, llm + connector, 1e-3, 40.0)
    assert [(len(g["params"]), g["lr"]) for g in groups] == [(len(llm), 1e-3), (len(connector), pytest.approx(0.04))]
    assert parameter_groups(smol, llm + connector, 1e-3, 1.0) == [{"params": llm + connector, "lr": 1e-3}]
