"""Shrunk copies of real LLaVA-family checkpoints, random weights, written the way the hub publishes them.

Each builder keeps what makes the real model hard for an exporter (tower kind, feature layer, CLS
handling, GQA, QKV bias, tied embeddings, widths K-quants cannot block, an embedding table with more
rows than the tokenizer has tokens, the model's own chat template and tokenizer kind) and shrinks
the rest. `layout="hub"` writes what the hub holds for checkpoints saved before transformers 5:
`preprocessor_config.json` + `chat_template.json` beside the tokenizer files, fp16 weights;
`layout="transformers5"` is what `save_pretrained` writes today.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlm_factory.families.mobilevlm import V1_TEMPLATE

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Chat templates in the shape of the originals (written here, not copied): LLaVA-1.5 and ChatML.
LLAVA15_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endif %}"
    "{% endfor %}{% if message['role'] == 'assistant' %}{{ '</s>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# SmolVLM-256M/500M-Instruct's template as it renders: "<|im_start|>User:<image>question<end_of_utterance>\n
# Assistant:" (no space after the colon when the turn opens with an image; written here, not copied).
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
CORPUS = ["What color is the circle? red", "How many shapes are there? three", "Is there a square? yes",
          "Which digit is shown? seven", "Where is the triangle? left", "What shape is blue? star"] * 20


def _llama_tokenizer(tokens: int):
    """A Llama-2 style tokenizer: SentencePiece-normalised BPE with byte fallback, BOS added."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=tokens - 2, special_tokens=specials,
                                                         show_progress=False))
    tok.add_special_tokens(["<image>", "<pad>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                   padding_side="left")


def _qwen2_tokenizer(tokens: int):
    """A Qwen2 style tokenizer: byte-level BPE behind Qwen2's split regex, no BOS, ChatML specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=tokens - len(specials),
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                         show_progress=False))
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens={"image_token": "<image>"}, padding_side="left")


def _smollm2_tokenizer(tokens: int, grid: int = 6):
    """A SmolLM2 style tokenizer: byte-level BPE with single digits, no BOS added, the ChatML specials
    first, then SmolVLM's image tokens: `<fake_token_around_image>`, `<image>`, `<end_of_utterance>`,
    `<global-img>` and one `<row_r_col_c>` per tile of a `grid` x `grid` split (the real one has 6x6)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    image_specials = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
        f"<row_{r}_col_{c}>" for r in range(1, grid + 1) for c in range(1, grid + 1)]
    # Paragraph breaks, so that "\n\n" is one token as in SmolLM2 (the processor puts it before the global
    # view; llama.cpp's idefics3 layout looks that token up and would feed token -1 without it).
    tok.train_from_iterator(CORPUS + ["Describe the image.\n\n"] * 20, trainers.BpeTrainer(vocab_size=tokens - len(image_specials),
                                                         special_tokens=specials,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                         show_progress=False))
    tok.add_special_tokens(image_specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>",
                                   extra_special_tokens={"image_token": "<image>"}, padding_side="left")


def _save(model, processor, out: Path, layout: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    if layout == "hub":
        model = model.to(torch.float16)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    if layout == "hub":  # the pre-transformers-5 layout of hub snapshots
        config = json.loads((out / "processor_config.json").read_text())
        (out / "preprocessor_config.json").write_text(json.dumps(config.pop("image_processor"), indent=2))
        (out / "processor_config.json").write_text(json.dumps(config, indent=2))
        template = out / "chat_template.jinja"
        (out / "chat_template.json").write_text(json.dumps({"chat_template": template.read_text()}))
        template.unlink()
    elif layout != "transformers5":
        raise ValueError(layout)
    return out


def llava15_clip_llama(out: Path, layout: str = "hub", seed: int = 0, text_hidden: int = 256,
                       text_intermediate: int = 512) -> Path:
    """llava-hf/llava-1.5-7b-hf shrunk: CLIP ViT-L/14-336 (CLS, quick GELU, feature layer -2,
    `default` strategy), LLaMA-2 (SentencePiece-style BPE, BOS), 64 embedding rows past the tokenizer.
    `text_hidden` (a multiple of 8: 4 heads of even size) / `text_intermediate` shrink the LLM further."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tokenizer = _llama_tokenizer(320)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                              image_size=56, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                              projection_dim=64)
    text = LlamaConfig(hidden_size=text_hidden, intermediate_size=text_intermediate, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=len(tokenizer) + 64,
                       max_position_embeddings=512,
                       rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-2,
                         image_seq_length=16, tie_word_embeddings=False)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                         do_center_crop=True, resample=3,
                                         image_mean=[0.48145466, 0.4578275, 0.40821073],
                                         image_std=[0.26862954, 0.26130258, 0.27577711])
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", chat_template=LLAVA15_TEMPLATE,
                               image_token="<image>", num_additional_image_tokens=1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    return _save(model, processor, out, layout)


def llava_interleave_qwen2(out: Path, layout: str = "hub", seed: int = 0, text_hidden: int = 896,
                           text_intermediate: int = 1152) -> Path:
    """llava-hf/llava-interleave-qwen-0.5b-hf shrunk: SigLIP (no CLS, `full`, last layer), Qwen2 with
    GQA (14 query / 2 KV heads), QKV bias, tied embeddings, width 896 (no K-quant blocks), ChatML,
    embedding rows past the tokenizer. `text_hidden` (a multiple of 28: 14 heads of even size) /
    `text_intermediate` shrink the LLM further (the default width is the real model's)."""
    from transformers import (LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, Qwen2Config,
                              SiglipImageProcessor, SiglipVisionConfig)

    tokenizer = _qwen2_tokenizer(400)
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2,
                                image_size=56, patch_size=14, vision_use_head=False)
    text = Qwen2Config(hidden_size=text_hidden, intermediate_size=text_intermediate, num_hidden_layers=2,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=len(tokenizer) + 48,
                       max_position_embeddings=1024,
                       rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                       tie_word_embeddings=True, bos_token_id=None,
                       eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         projector_hidden_act="gelu", vision_feature_select_strategy="full", vision_feature_layer=-1,
                         image_seq_length=16, tie_word_embeddings=True)
    image_processor = SiglipImageProcessor(size={"height": 56, "width": 56}, resample=3,
                                           image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="full", chat_template=CHATML_TEMPLATE,
                               image_token="<image>", num_additional_image_tokens=0)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # Qwen2's QKV biases start at zero; make them matter
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                param.normal_(0.0, 0.5)
    return _save(model, processor, out, layout)


def smolvlm_256m(out: Path, layout: str = "hub", seed: int = 0, text_hidden: int = 576,
                 text_intermediate: int = 1536) -> Path:
    """HuggingFaceTB/SmolVLM-256M-Instruct shrunk: Idefics3 (SigLIP-style tower, patch 16, pixel shuffle
    with scale factor 4 into a linear connector), SmolLM2 Llama (9 query / 3 KV heads, head_dim 64,
    tied embeddings, width 576: not a multiple of 256, so no K-quant blocks), SmolVLM's chat template,
    image splitting with LANCZOS. The tile is 128 px (real: 512) so a tile is 8x8 patches (real: 32x32)
    and scale factor 4 leaves 2x2 = 4 tokens per tile (real: 64); the longest edge is 4 tiles (512 px,
    real: 2048), so images split into at most 4x4 tiles + the global view. `text_hidden` (a multiple of
    18: 9 heads of even size) / `text_intermediate` shrink the LLM further (the default is the real width)."""
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil,
                              Idefics3Processor, Idefics3VisionConfig, LlamaConfig)

    tile, patch, scale = 128, 16, 4
    tokens_per_tile = (tile // patch // scale) ** 2
    tokenizer = _smollm2_tokenizer(400)
    ids = tokenizer.convert_tokens_to_ids
    vision = Idefics3VisionConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=tile, patch_size=patch, hidden_act="gelu_pytorch_tanh",
                                  layer_norm_eps=1e-6)
    text = LlamaConfig(hidden_size=text_hidden, intermediate_size=text_intermediate, num_hidden_layers=2,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=text_hidden // 9,
                       vocab_size=-(-len(tokenizer) // 64) * 64,  # padded to 64 rows, past the tokenizer
                       max_position_embeddings=2048, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                       tie_word_embeddings=True, bos_token_id=ids("<|im_start|>"),
                       eos_token_id=ids("<end_of_utterance>"), pad_token_id=ids("<|im_end|>"))
    config = Idefics3Config(vision_config=vision, text_config=text, image_token_id=ids("<image>"),
                            scale_factor=scale, tie_word_embeddings=True, pad_token_id=ids("<|im_end|>"))
    # The PIL backend explicitly: it is what AutoProcessor picks without torchvision >= 0.27 (LANCZOS);
    # both save as "Idefics3ImageProcessor", as the hub has it.
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 4 * tile}, max_image_size={"longest_edge": tile},
                                                resample=1, do_image_splitting=True, image_mean=[0.5, 0.5, 0.5],
                                                image_std=[0.5, 0.5, 0.5])
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=tokens_per_tile,
                                  chat_template=SMOLVLM_TEMPLATE)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids("<end_of_utterance>")
    model.generation_config.pad_token_id = ids("<|im_end|>")
    return _save(model, processor, out, layout)


def mobilevlm_v2_1_7b(out: Path, layout: str = "hub", seed: int = 0, text_hidden: int = 128,
                      text_intermediate: int = 256, image_size: int = 112) -> Path:
    """mtgv/MobileVLM_V2-1.7B shrunk, in its published layout: config.json with the published keys (Llama keys
    at the top level, `mm_*`, architectures MobileLlamaForCausalLM) plus the two this project requires
    (`vision_config`, `image_token_index`), fp16 safetensors under the published names (`model.layers.*`,
    `model.vision_tower.vision_tower.vision_model.*`, `model.mm_projector.{mlp.mlp,peg.peg}.*`), a Llama-2
    style tokenizer with an `<image>` token, the tower's CLIPImageProcessor as preprocessor_config.json and
    MobileVLM's v1 conversation as chat_template.json (the hub repository has pickled weights and neither).

    CLIP with CLS, quick GELU, feature layer -2, patch 14; `image_size` 112 px makes an 8x8 patch grid that
    LDPv2 pools to 4x4 = 16 image tokens, so the 3x3 PEG has interior positions, not only zero-padded borders
    (real: 336 px, 24x24 -> 144; llama.cpp's ldpv2 graph runs only 24x24, i.e. image_size 336). The projector
    is re-drawn at unit gain: at transformers' init (std 0.02, zero biases) its output is nearly the same for
    every image (features of two images differ by 8 % instead of 70 %)."""
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessorPil

    from vlm_factory.model.mobilevlm import MobileVLMConfig, MobileVLMForCausalLM

    if layout != "hub":
        raise ValueError(f"{layout}: MobileVLM checkpoints exist in the hub layout only")
    tokenizer = _llama_tokenizer(320)
    vision = {"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3,
              "num_attention_heads": 2, "image_size": image_size, "patch_size": 14, "hidden_act": "quick_gelu",
              "layer_norm_eps": 1e-5, "projection_dim": 64}
    config = {  # the published keys, in the published order, shrunk
        "_name_or_path": "mtgv/MobileVLM_V2-1.7B", "architectures": ["MobileLlamaForCausalLM"], "bos_token_id": 1,
        "eos_token_id": 2, "freeze_mm_mlp_adapter": False, "hidden_act": "silu", "hidden_size": text_hidden,
        "image_aspect_ratio": "pad", "image_grid_pinpoints": None, "initializer_range": 0.02,
        "intermediate_size": text_intermediate, "max_position_embeddings": 2048, "max_sequence_length": 2048,
        "mm_hidden_size": vision["hidden_size"], "mm_projector_lr": None, "mm_projector_type": "ldpnetv2",
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2, "mm_vision_tower": "openai/clip-vit-large-patch14-336", "model_type": "mobilevlm",
        "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 4, "pad_token_id": 0,
        "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.33.1",
        "tune_mm_mlp_adapter": False, "use_cache": True, "use_mm_proj": True, "vision_tower_type": "clip",
        "vocab_size": len(tokenizer),
        # this project's additions
        "vision_config": vision, "image_token_index": tokenizer.convert_tokens_to_ids("<image>"),
    }
    torch.manual_seed(seed)
    model = MobileVLMForCausalLM(MobileVLMConfig(**config)).eval()
    projector = model.model.mm_projector
    with torch.no_grad():
        for linear in (projector.mlp.mlp[0], projector.mlp.mlp[2]):
            linear.weight.normal_(0.0, linear.in_features ** -0.5)
        projector.peg.peg[0].weight.normal_(0.0, 0.5)
        projector.peg.peg[0].bias.normal_(0.0, 0.1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))
    save_file({k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                          do_center_crop=True, resample=3, image_mean=[0.48145466, 0.4578275, 0.40821073],
                          image_std=[0.26862954, 0.26130258, 0.27577711]).save_pretrained(out)
    # The template the family gives a checkpoint without one (tests assert its prompt literally), written in as
    # a hub conversion would.
    (out / "chat_template.json").write_text(json.dumps({"chat_template": V1_TEMPLATE}))
    return out


VARIANTS = {"llava15_clip_llama": llava15_clip_llama, "llava_interleave_qwen2": llava_interleave_qwen2}


# Square, tall (1:2.5) and wide (2.4:1) test images: letterbox, centre crop and plain resize differ on them.
IMAGE_SIZES = {"square": (90, 90), "tall": (40, 100), "wide": (150, 63)}


def gradient_image(width: int, height: int, seed: int):
    """Smooth gradients plus noise: resampling differences show up, unlike on flat colour."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([255 * x / width, 255 * y / height, 127 + 127 * np.sin((x + y) / 7.0)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8))


@torch.no_grad()
def cls_last_graph(family, tower, pixels: torch.Tensor) -> torch.Tensor:
    """A CLIP tower + connector as the pinned llama.cpp's llava graph runs it, in torch: the CLS token
    appended after the patches, position embeddings added in that order, hidden state `feature_layer`,
    the first row dropped (ggml-org/llama.cpp#25814), then the family's connector. [images, tokens, text]."""
    embeddings = tower.embeddings
    patches = embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)
    cls = embeddings.class_embedding.expand(len(pixels), 1, -1)
    hidden = tower.pre_layrnorm(torch.cat([patches, cls], dim=1) + embeddings.position_embedding.weight[None])
    for layer in tower.encoder.layers[:family.vision.feature_layer]:
        hidden = layer(hidden, None)
    return hidden[:, 1:]
