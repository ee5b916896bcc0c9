"""Derive a bundled base of another LLM family from the trained one, without pretraining again.

A Llama decoder is a Qwen2 decoder whose q/k/v projections have zero bias: same RMS norms, rotary
embedding, gated SiLU MLP and attention. Moving the trained tower, projector and LLM weights of the
bundled Llama LLaVA into `Qwen2` classes gives a Qwen2 LLaVA that computes the same function (a test
checks the logits), so the pipeline's Qwen2 paths are gated on a model that truly answers; the
fine-tune stage then aligns a new projector as for the default (the LLaVA recipe).
"""

from __future__ import annotations

import logging

import torch

from vlm_factory.errors import UserError

log = logging.getLogger(__name__)
QKV_BIASES = ("q_proj.bias", "k_proj.bias", "v_proj.bias")


def qwen2_text_config(llama):
    """The Qwen2 config computing what `llama` (a LlamaConfig without attention or MLP bias) computes."""
    from transformers import Qwen2Config

    if getattr(llama, "attention_bias", False) or getattr(llama, "mlp_bias", False):
        raise UserError("the source LLM has attention or MLP biases; only bias-free Llama decoders map onto Qwen2")
    return Qwen2Config(
        hidden_size=llama.hidden_size, intermediate_size=llama.intermediate_size,
        num_hidden_layers=llama.num_hidden_layers, num_attention_heads=llama.num_attention_heads,
        num_key_value_heads=llama.num_key_value_heads, vocab_size=llama.vocab_size,
        max_position_embeddings=llama.max_position_embeddings, rms_norm_eps=llama.rms_norm_eps,
        rope_parameters=dict(llama.rope_parameters), hidden_act=llama.hidden_act, use_sliding_window=False,
        tie_word_embeddings=bool(llama.tie_word_embeddings), bos_token_id=llama.bos_token_id,
        eos_token_id=llama.eos_token_id, pad_token_id=llama.pad_token_id)


def llava_with_qwen2(model):
    """The same LLaVA with its Llama LLM as a Qwen2 LLM (zero QKV biases); weights copied, not shared."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = model.config
    if config.text_config.model_type != "llama":
        raise UserError(f"the source LLM is {config.text_config.model_type!r}; the transplant starts from llama")
    fields = config.to_dict()
    fields.pop("text_config"), fields.pop("vision_config")
    new_config = LlavaConfig(**{**fields, "text_config": qwen2_text_config(config.text_config),
                                "vision_config": config.vision_config})
    qwen = LlavaForConditionalGeneration(new_config).eval()
    missing, unexpected = qwen.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not name.endswith(QKV_BIASES) for name in missing):
        raise RuntimeError(f"weights do not map onto Qwen2: missing {missing[:3]}, unexpected {unexpected[:3]}")
    added = set(missing)  # the LLM's new biases only: the vision tower has q/k/v biases of its own
    with torch.no_grad():
        for name, param in qwen.named_parameters():
            if name in added:
                param.zero_()
    qwen.generation_config = model.generation_config
    log.info("transplanted %d tensors into the Qwen2 LLaVA; %d zero QKV biases added",
             len(model.state_dict()), len(missing))
    return qwen


# The tokens an Idefics3 processor writes around each view's image tokens (runtime/tiling.py).
SMOLVLM_MARKERS = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>")
PARAGRAPH = "\n\n"


@torch.no_grad()
def fit_connector(source, target, pixel_values: torch.Tensor) -> float:
    """Start `target`'s new Idefics3 connector as the least-squares linear stand-in for `source`'s projector.

    On the images `pixel_values` (source-sized) each connector token should give the mean of the source's
    embeddings of the patches it folds (pixel shuffle), so the LLM reads a whole image, as the global view
    shows it, about as it read the source's image tokens. Why not a random start: the LLM was trained on
    image embeddings of norm ~417 (its token embeddings: 0.39) with a large shared offset, which a random
    linear connector reaches only slowly (measured with pixel shuffle x2: joint alignment then finetune end
    near loss 0.5, 48 % VQA, where the source's loss is 0.07). The source projector (GELU MLP) is nearly
    linear in the tower's post-layernormed features: R^2 0.98 on held-out synthetic images. Returns the
    fit's R^2 on `pixel_values`.
    """
    from vlm_factory.families import family_for

    connector = target.model.connector
    scale = connector.scale_factor
    wanted = family_for(source.config).image_features(source, pixel_values)
    inputs = connector.pixel_shuffle(family_for(target.config).tower_features(target, pixel_values), scale)
    targets = connector.pixel_shuffle(wanted, scale).unflatten(-1, (scale * scale, -1)).mean(-2)
    x, y = inputs.flatten(0, 1).double(), targets.flatten(0, 1).double()
    if len(x) < 2 * x.shape[1]:  # fewer equations than that would fit the probe, not the projector
        raise ValueError(f"{len(x)} image tokens cannot fit a {x.shape[1]}-input connector: probe more images")
    weight = torch.linalg.lstsq(x, y).solution
    connector.modality_projection.proj.weight.copy_(weight.T.to(connector.modality_projection.proj.weight.dtype))
    residual = (y - x @ weight).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    return float(1 - residual)


def smolvlm_from_llava(model, processor, *, scale_factor: int, tiles_per_side: int, resample: int = 1,
                       probe_images=None):
    """The bundled LLaVA as an Idefics3 / SmolVLM model: its trained tower reads each tile, its trained
    LLM reads the tiles' tokens, and a new pixel-shuffle connector (to be aligned by `finetune`) sits
    between them. Returns (model, processor).

    The tower's tile is its own input size, the longest edge `tiles_per_side` tiles; mean, std and the
    chat template stay the source's (what the tower and LLM were trained with). The processor's marker
    tokens (`<fake_token_around_image>`, `<global-img>`, `<row_r_col_c>`) are new to the LLM: their
    embedding rows start as copies of the newline's, a separator it knows from its image prompts. With
    `probe_images` (PIL images like the training data), the connector starts from `fit_connector`.
    """
    from tokenizers import AddedToken
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil,
                              Idefics3Processor, Idefics3VisionConfig)

    if model.config.vision_config.model_type != "siglip_vision_model" or model.config.text_config.model_type != "llama":
        raise UserError("the SmolVLM transplant starts from a SigLIP + Llama LLaVA")
    source_vision, source_image = model.config.vision_config, processor.image_processor
    tile = source_vision.image_size
    tokenizer = processor.tokenizer
    grid = [f"<row_{r}_col_{c}>" for r in range(1, tiles_per_side + 1) for c in range(1, tiles_per_side + 1)]
    tokenizer.add_special_tokens({"additional_special_tokens": [*SMOLVLM_MARKERS, *grid]})
    # SmolLM2's BPE has "\n\n" (before the global view) as one token, and libmtmd looks it up as one.
    tokenizer.add_tokens([AddedToken(PARAGRAPH, normalized=False, special=False)])
    vision = Idefics3VisionConfig(
        hidden_size=source_vision.hidden_size, intermediate_size=source_vision.intermediate_size,
        num_hidden_layers=source_vision.num_hidden_layers, num_attention_heads=source_vision.num_attention_heads,
        image_size=tile, patch_size=source_vision.patch_size, hidden_act=source_vision.hidden_act,
        layer_norm_eps=source_vision.layer_norm_eps)
    text = model.config.text_config
    text.vocab_size = max(text.vocab_size, len(tokenizer))
    config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=scale_factor,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                            tie_word_embeddings=False, pad_token_id=text.pad_token_id)
    smol = Idefics3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        tower = model.model.vision_tower
        smol.model.vision_model.load_state_dict(getattr(tower, "vision_model", tower).state_dict())
        llm = model.model.language_model.state_dict()
        embed, head = llm.pop("embed_tokens.weight"), model.lm_head.weight
        smol.model.text_model.load_state_dict({**llm, "embed_tokens.weight": smol.model.text_model.embed_tokens.weight},
                                              strict=True)
        rows = embed.shape[0]
        smol.model.text_model.embed_tokens.weight[:rows] = embed
        smol.lm_head.weight[:rows] = head
        newline = tokenizer("\n", add_special_tokens=False).input_ids[-1]
        for token in (*SMOLVLM_MARKERS, *grid, PARAGRAPH):
            smol.model.text_model.embed_tokens.weight[tokenizer.convert_tokens_to_ids(token)] = embed[newline]
        # Output rows of the new tokens: the padding token's, which the LLM learnt never to predict.
        smol.lm_head.weight[rows:] = head[tokenizer.pad_token_id]
        if probe_images is not None:
            probe = source_image(list(probe_images), return_tensors="pt").pixel_values
            log.info("connector fitted to the source projector: R^2 %.3f", fit_connector(model, smol, probe))
    smol.generation_config = model.generation_config
    image_processor = Idefics3ImageProcessorPil(
        do_resize=True, size={"longest_edge": tile * tiles_per_side}, max_image_size={"longest_edge": tile},
        resample=resample, do_image_splitting=True, image_mean=list(source_image.image_mean),
        image_std=list(source_image.image_std))
    side = tile // source_vision.patch_size
    smol_processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                       image_seq_len=(side // scale_factor) ** 2,
                                       chat_template=processor.chat_template)
    log.info("transplanted the tower and LLM into an Idefics3 model: %d-px tiles, up to %dx%d + global, "
             "%d tokens per tile", tile, tiles_per_side, tiles_per_side, (side // scale_factor) ** 2)
    return smol, smol_processor
