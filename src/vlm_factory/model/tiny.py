"""Builders for the tiny bases (LLaVA, MobileVLM V2, SmolVLM / Idefics3): config, tokenizer and
processor, all in HF format.

The dimensions are chosen for the exporters downstream: LLM rows are multiples of 256 (K-quants),
vision rows multiples of 32 (Q8_0), the vision MLP is wider than its hidden size (clip.cpp swaps
fc1/fc2 when they are equal), and the tower is SigLIP (no CLS token, which llama.cpp orders
differently from transformers).
"""

from __future__ import annotations

import numpy as np

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from vlm_factory.config import ArchitectureConfig
from vlm_factory.data.questions import NUMBER_WORDS, QUESTION_TYPES, ask
from vlm_factory.data.scenes import ASPECTS, sample_scene
from vlm_factory.model.prompt import (
    BOS_TOKEN,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    IMAGE_TOKEN,
    PAD_TOKEN,
    answer_text,
    user_prompt,
)

# OpenAI CLIP statistics: LlavaImageProcessor pads with round-down(mean * 255) = (122, 116, 104),
# the same letterbox colour llama.cpp uses for "mlp" projectors.
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN]
# The tokens an Idefics3 processor writes around each view's image tokens (runtime/tiling.py), and the
# paragraph break before the global view: SmolLM2's BPE has it as one token, and libmtmd looks it up as one.
SMOLVLM_MARKERS = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>")
PARAGRAPH = "\n\n"


def smolvlm_grid_tokens(tiles_per_side: int) -> list[str]:
    """The `<row_r_col_c>` token of every tile position."""
    return [f"<row_{r}_col_{c}>" for r in range(1, tiles_per_side + 1) for c in range(1, tiles_per_side + 1)]


def tokenizer_corpus(n_scenes: int = 3000) -> list[str]:
    """Prompts and answers drawn from the synthetic generator itself, plus a little plain English."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n_scenes):
        scene = sample_scene(rng, ASPECTS[i % len(ASPECTS)], with_digit=True)
        for question_type in QUESTION_TYPES:
            qa = ask(scene, question_type, rng)
            if qa is not None:
                lines.append(user_prompt(qa.question) + answer_text(qa.answer) + EOS_TOKEN)
    lines += [answer_text(word) for word in NUMBER_WORDS]
    # Questions outside the templates should still tokenize into sensible pieces.
    lines += ["What is in the picture? Which object is larger? Describe the image in one word."]
    return lines


def build_tokenizer(vocab_size: int, extra_special: tuple[str, ...] = (),
                    extra_plain: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A byte-level BPE (llama.cpp: tokenizer.ggml.model=gpt2), exactly `vocab_size` tokens long.

    `extra_special`: a family's own special tokens (Idefics3's markers); `extra_plain`: strings that must be
    single, non-special tokens (Idefics3's paragraph break)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(extra_plain), special_tokens=SPECIAL_TOKENS + list(extra_special), min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    tok.add_tokens([AddedToken(text, normalized=False, special=False) for text in extra_plain])
    # The corpus is small: pad the vocabulary with unused reserved tokens so its length is exact.
    missing = vocab_size - tok.get_vocab_size()
    if missing < 0:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the byte alphabet plus special tokens")
    tok.add_tokens([f"<reserved_{i}>" for i in range(missing)])
    bos_id, eos_id = tok.token_to_id(BOS_TOKEN), tok.token_to_id(EOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id), (EOS_TOKEN, eos_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN}, padding_side="left", model_max_length=256,
    )
    if extra_special:
        fast.add_special_tokens({"additional_special_tokens": list(extra_special)})
    assert len(fast) == vocab_size, (len(fast), vocab_size)
    return fast


def build_image_processor(image_size: int, letterbox: bool = True) -> LlavaImageProcessorPil:
    """Pad to square with the mean colour, then resize: the letterbox llama.cpp applies.

    With letterbox=False it is the classic CLIP preprocessing (short side resize + centre crop),
    kept only to measure what that mistake costs on tall and wide images.
    """
    return LlavaImageProcessorPil(
        do_pad=letterbox, size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=IMAGE_MEAN, image_std=IMAGE_STD, do_center_crop=True, do_convert_rgb=True,
    )


def build_processor(arch: ArchitectureConfig) -> LlavaProcessor:
    # patch_size: the pixels one image token spans, so <image> expands to the token count (LDPv2 pools 2x2).
    token_pixels = arch.patch_size * (2 if arch.family == "mobilevlm" else 1)
    return LlavaProcessor(
        image_processor=build_image_processor(arch.image_size), tokenizer=build_tokenizer(arch.vocab_size),
        patch_size=token_pixels, vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN, num_additional_image_tokens=0,
    )


def build_smolvlm_image_processor(tile: int, tiles_per_side: int, image_mean=IMAGE_MEAN, image_std=IMAGE_STD,
                                  resample: int = 1) -> Idefics3ImageProcessorPil:
    """Idefics3's splitting: the longest edge resized to `tiles_per_side` tiles, cut into `tile`-px tiles,
    plus the whole image as one tile (the PIL processor, which runtime/tiling.py reproduces bit for bit)."""
    return Idefics3ImageProcessorPil(
        do_resize=True, size={"longest_edge": tile * tiles_per_side}, max_image_size={"longest_edge": tile},
        resample=resample, do_image_splitting=True, image_mean=list(image_mean), image_std=list(image_std))


def build_smolvlm_processor(arch: ArchitectureConfig) -> Idefics3Processor:
    tokenizer = build_tokenizer(arch.vocab_size, extra_special=(*SMOLVLM_MARKERS, *smolvlm_grid_tokens(arch.tiles_per_side)),
                                extra_plain=(PARAGRAPH,))
    side = arch.image_size // arch.patch_size // arch.scale_factor
    return Idefics3Processor(image_processor=build_smolvlm_image_processor(arch.image_size, arch.tiles_per_side),
                             tokenizer=tokenizer, image_seq_len=side * side, chat_template=CHAT_TEMPLATE)


def llama_fields(arch: ArchitectureConfig, tokenizer) -> dict:
    """The Llama LLM's config keys (a LlamaConfig's, or a MobileVLM config's top level)."""
    return dict(
        hidden_size=arch.text_hidden, intermediate_size=arch.text_intermediate,
        num_hidden_layers=arch.text_layers, num_attention_heads=arch.text_heads,
        num_key_value_heads=arch.text_kv_heads, vocab_size=arch.vocab_size,
        max_position_embeddings=arch.max_positions, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def build_smolvlm_config(arch: ArchitectureConfig, processor: Idefics3Processor) -> Idefics3Config:
    """SmolVLM's layout: a SigLIP-style tower on one tile, pixel shuffle, a linear connector, a Llama."""
    tok = processor.tokenizer
    vision = Idefics3VisionConfig(
        hidden_size=arch.vision_hidden, intermediate_size=arch.vision_intermediate,
        num_hidden_layers=arch.vision_layers, num_attention_heads=arch.vision_heads,
        image_size=arch.image_size, patch_size=arch.patch_size,
    )
    return Idefics3Config(vision_config=vision, text_config=LlamaConfig(**llama_fields(arch, tok)),
                          scale_factor=arch.scale_factor, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                          tie_word_embeddings=False, pad_token_id=tok.pad_token_id)


def build_config(arch: ArchitectureConfig, processor: LlavaProcessor) -> LlavaConfig:
    tok = processor.tokenizer
    vision = SiglipVisionConfig(
        hidden_size=arch.vision_hidden, intermediate_size=arch.vision_intermediate,
        num_hidden_layers=arch.vision_layers, num_attention_heads=arch.vision_heads,
        image_size=arch.image_size, patch_size=arch.patch_size, vision_use_head=False,
    )
    text = LlamaConfig(**llama_fields(arch, tok))
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu", vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_seq_length=(arch.image_size // arch.patch_size) ** 2, tie_word_embeddings=False,
    )


def build_mobilevlm_config(arch: ArchitectureConfig, processor: LlavaProcessor):
    """A MobileVLM V2 config in the published layout (Llama keys at the top level, `mm_*` keys), with the two
    keys this project requires (`vision_config`, `image_token_index`; see families/mobilevlm.py)."""
    from vlm_factory.model.mobilevlm import MobileVLMConfig

    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=arch.vision_hidden, intermediate_size=arch.vision_intermediate,
        num_hidden_layers=arch.vision_layers, num_attention_heads=arch.vision_heads,
        image_size=arch.image_size, patch_size=arch.patch_size, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )
    return MobileVLMConfig(
        **llama_fields(arch, tok), vision_config=vision.to_dict(), image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        mm_hidden_size=arch.vision_hidden, mm_projector_type="ldpnetv2", mm_vision_select_layer=-2,
        mm_vision_select_feature="patch", mm_vision_tower="tiny-clip", image_aspect_ratio="pad",
        mm_use_im_start_end=False, vision_tower_type="clip", architectures=["MobileLlamaForCausalLM"],
    )


def build_model(arch: ArchitectureConfig, seed: int):
    """A randomly initialised tiny base of `arch.family` and its processor (deterministic for a seed)."""
    import torch

    processor = build_smolvlm_processor(arch) if arch.family == "idefics3" else build_processor(arch)
    torch.manual_seed(seed)
    if arch.family == "idefics3":
        model = Idefics3ForConditionalGeneration(build_smolvlm_config(arch, processor))
    elif arch.family == "mobilevlm":
        from vlm_factory.model.mobilevlm import MobileVLMForCausalLM

        model = MobileVLMForCausalLM(build_mobilevlm_config(arch, processor))
    else:
        model = LlavaForConditionalGeneration(build_config(arch, processor))
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    return model, processor
