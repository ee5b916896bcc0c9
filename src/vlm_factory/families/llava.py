"""The LLaVA family: a SigLIP or CLIP tower, a 2-layer MLP connector, a Llama or Qwen2 LLM.

Covers `LlavaForConditionalGeneration` checkpoints as transformers 5 writes them and as the hub
publishes them (llava-hf/llava-1.5-*, llava-interleave-qwen-*, the bundled tiny bases): tensors
under `language_model.model.*` / `model.language_model.*`, towers under `vision_tower.*` with or
without `vision_model.`, the connector under `multi_modal_projector.*`.

The connector reads one hidden state of the tower (`vision_feature_layer`, LLaVA-1.5 reads -2)
before any post-layernorm; with `vision_feature_select_strategy: default` the first (CLS) position
is dropped, with `full` every position is kept.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlm_factory.errors import UserError
from vlm_factory.hf_files import load_pretrained
from vlm_factory.io import read_json
from vlm_factory.families.base import CheckpointKey, DecoderParts, ModelFamily, PromptSpec, TextFacts, VisionFacts
from vlm_factory.families.param_counts import decoder_params, vision_tower_params

TOWERS = {"siglip_vision_model": "siglip", "clip_vision_model": "clip"}
LLMS = ("llama", "qwen2")
# clip.cpp runs GELU (tanh form) or, with use_gelu false, quick GELU.
GGUF_TOWER_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "quick_gelu")
# The CLS-ordering defect of the pinned llama.cpp (see eval/verdict notes and the README).
CLIP_GGUF_NOTE = ("llama.cpp (pinned) puts a CLIP tower's CLS token after the patches "
                  "(ggml-org/llama.cpp#25814, fix PR #25844): its mmproj fails the embedding gate")
PROMPT_QUESTION, PROMPT_ANSWER = "{question}", "{answer}"
RESAMPLE_NAMES = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _strip(key: str, prefixes: tuple[str, ...]) -> str | None:
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix):]
    return None


def _size_dict(size) -> dict | None:
    if size is None:
        return None
    items = size.items() if hasattr(size, "items") else vars(size).items()
    return {k: int(v) for k, v in items if v is not None}


def image_preprocessing(image_processor) -> dict:
    """A CLIP/SigLIP/LLaVA image processor's steps as plain data (runtime/preprocess.py implements it).

    The pad colour is what LlavaImageProcessor computes: int(mean * 255) per channel.
    """
    p = image_processor
    mean = [float(m) for m in p.image_mean]
    return {
        "convert_rgb": bool(getattr(p, "do_convert_rgb", True)),
        "pad_to_square": bool(getattr(p, "do_pad", False)),
        "pad_color": [int(m * 255) for m in mean],
        "resize": _size_dict(p.size) if p.do_resize else None,
        "resample": RESAMPLE_NAMES.get(int(p.resample), str(p.resample)),
        "center_crop": _size_dict(p.crop_size) if getattr(p, "do_center_crop", False) else None,
        "rescale_factor": float(p.rescale_factor) if p.do_rescale else 1.0,
        "mean": mean if p.do_normalize else [0.0, 0.0, 0.0],
        "std": [float(s) for s in p.image_std] if p.do_normalize else [1.0, 1.0, 1.0],
        "layout": "NCHW", "dtype": "float32",
    }


def chat_prompt(processor, image_tokens: int, source: str) -> PromptSpec:
    """The checkpoint's own chat template, rendered once with placeholders for question and answer."""
    tokenizer = processor.tokenizer
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    if not template:
        raise UserError(f"{source}: no chat template (chat_template.json, chat_template.jinja or "
                        "tokenizer_config.json); add the model's template to the checkpoint")
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT_QUESTION}]}
    assistant = {"role": "assistant", "content": [{"type": "text", "text": PROMPT_ANSWER}]}
    try:
        prompt = processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False,
                                               chat_template=template)
        full = processor.apply_chat_template([user, assistant], tokenize=False, chat_template=template)
    except Exception as exc:  # jinja2 errors carry no common base with transformers'
        raise UserError(f"{source}: the chat template cannot be rendered ({str(exc).splitlines()[0][:200]})") from None
    image_token = processor.image_token
    if prompt.count(PROMPT_QUESTION) != 1 or prompt.count(image_token) != 1:
        raise UserError(f"{source}: the chat template renders {prompt.count(image_token)} image token(s) "
                        f"{image_token!r} and {prompt.count(PROMPT_QUESTION)} question(s) for one of each")
    answer = full[len(prompt):] if full.startswith(prompt) else f" {PROMPT_ANSWER}"
    eos = tokenizer.eos_token or ""
    if eos and eos in answer:  # learn up to the end of the turn, not the separator after it
        answer = answer[:answer.index(eos) + len(eos)]
    elif eos:
        answer += eos
    bos = tokenizer.bos_token
    return PromptSpec(template=prompt, image_token=image_token, image_token_repeat=image_tokens, answer=answer,
                      add_special_tokens=not (bos and prompt.startswith(bos)))


class LlavaFamily(ModelFamily):
    name = "llava"
    model_types = ("llava",)
    description = "LLaVA: SigLIP or CLIP tower + MLP connector + Llama or Qwen2 LLM"
    format_support = {"gguf": None, "onnx": None, "coreml": None, "tflite": None}
    # What the matrix says beside "supported": variants a format exports but its runtime is known to get wrong.
    format_notes = {"gguf": "CLIP towers export, but the pinned llama.cpp orders their CLS token after the "
                            "patches (ggml-org/llama.cpp#25814): the embedding gate fails them and says so. "
                            "llama.cpp letterboxes non-square images for 'mlp' projectors; a checkpoint whose "
                            "processor stretches them instead (SiglipImageProcessor, as llava-interleave ships) "
                            "sees other pixels there: the parity's preprocessing check reports it (cosine "
                            "0.92 tall / 0.97 wide on the shrunk llava-interleave)"}
    variants_refused = ("towers other than SigLIP and CLIP", "LLMs other than Llama and Qwen2",
                        "several feature layers (a list in vision_feature_layer)",
                        "GGUF: a projector or tower activation llama.cpp does not run")

    # -- identity -----------------------------------------------------------------------------------

    @property
    def variant(self) -> str:
        tower = TOWERS.get(self.config.vision_config.model_type, self.config.vision_config.model_type)
        return f"{tower} + mlp + {self.config.text_config.model_type}"

    def format_refusal(self, fmt: str) -> str | None:
        reason = super().format_refusal(fmt)
        if reason is not None:
            return reason
        config = self.config
        if config.vision_config.model_type not in TOWERS:
            return f"vision tower {config.vision_config.model_type!r} (supported: {', '.join(TOWERS)})"
        if config.text_config.model_type not in LLMS:
            return f"LLM {config.text_config.model_type!r} (supported: {', '.join(LLMS)})"
        if not isinstance(config.vision_feature_layer, int):
            return f"vision_feature_layer {config.vision_feature_layer!r}: one layer index is supported, not a list"
        if fmt == "gguf":
            if config.projector_hidden_act != "gelu":
                return f"projector activation {config.projector_hidden_act!r} (llama.cpp's 'mlp' projector is GELU)"
            if config.vision_config.hidden_act not in GGUF_TOWER_ACTIVATIONS:
                return (f"vision activation {config.vision_config.hidden_act!r} "
                        f"(clip.cpp runs {', '.join(GGUF_TOWER_ACTIVATIONS)})")
        return None

    def known_issue(self, fmt: str) -> str | None:
        """A defect of a runtime this variant is known to hit (the gate still measures it)."""
        if fmt == "gguf" and self.vision.tower == "clip":
            return CLIP_GGUF_NOTE
        return None

    # -- facts ----------------------------------------------------------------------------------------

    @property
    def text(self) -> TextFacts:
        t = self.config.text_config
        heads = t.num_attention_heads
        rope = getattr(t, "rope_parameters", None) or {}
        tied = bool(getattr(t, "tie_word_embeddings", False) or getattr(self.config, "tie_word_embeddings", False))
        return TextFacts(
            arch=t.model_type, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_layers=t.num_hidden_layers, num_heads=heads, num_kv_heads=t.num_key_value_heads or heads,
            head_dim=getattr(t, "head_dim", None) or t.hidden_size // heads, vocab_size=t.vocab_size,
            max_positions=t.max_position_embeddings,
            rope_theta=float(rope.get("rope_theta", getattr(t, "rope_theta", 10000.0))),
            rms_norm_eps=float(t.rms_norm_eps),
            qkv_bias=True if t.model_type == "qwen2" else bool(getattr(t, "attention_bias", False)),
            tied_embeddings=tied, bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id,
            pad_token_id=getattr(t, "pad_token_id", None))

    @property
    def vision(self) -> VisionFacts:
        v = self.config.vision_config
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int) or not -v.num_hidden_layers - 1 <= layer <= v.num_hidden_layers:
            raise UserError(f"{self.source}: vision_feature_layer {layer!r} must be one layer index within "
                            f"the tower's {v.num_hidden_layers} layers")
        return VisionFacts(
            tower=TOWERS.get(v.model_type, v.model_type), image_size=v.image_size, patch_size=v.patch_size,
            num_channels=getattr(v, "num_channels", 3), hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size, num_layers=v.num_hidden_layers, num_heads=v.num_attention_heads,
            layer_norm_eps=float(v.layer_norm_eps), hidden_act=v.hidden_act,
            has_cls_token=v.model_type == "clip_vision_model", feature_layer=layer % (v.num_hidden_layers + 1),
            drop_cls=self.config.vision_feature_select_strategy == "default")

    @property
    def image_tokens(self) -> int:
        vision = self.vision
        tokens = vision.patches + int(vision.has_cls_token) - int(vision.drop_cls)
        declared = getattr(self.config, "image_seq_length", tokens)
        if declared != tokens:  # the processor expands the image token this many times
            raise UserError(f"{self.source}: image_seq_length is {declared} but the vision tower yields {tokens} "
                            "tokens per image; fix image_seq_length in config.json")
        return tokens

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def connector_type(self) -> str:
        return "mlp"

    def param_counts(self) -> dict[str, int]:
        d_in, d_out = self.config.vision_config.hidden_size, self.config.text_config.hidden_size
        bias = d_out if getattr(self.config, "multimodal_projector_bias", True) else 0
        text = self.config.text_config
        llama_bias = self.text.arch == "llama" and self.text.qkv_bias  # Llama's attention_bias covers o_proj too
        llm = decoder_params(self.text, o_bias=llama_bias, mlp_bias=bool(getattr(text, "mlp_bias", False)))
        return {"vision_tower": vision_tower_params(self.vision, bool(getattr(self.config.vision_config,
                                                                              "vision_use_head", False))),
                "projector": d_in * d_out + bias + d_out * d_out + bias,
                "llm_embeddings": llm["embeddings"], "llm_lm_head": llm["lm_head"], "llm_rest": llm["rest"]}

    # -- torch ------------------------------------------------------------------------------------------

    def load(self, path: Path):
        from transformers import LlavaForConditionalGeneration

        model = load_pretrained(LlavaForConditionalGeneration, path, "the checkpoint", fix="re-download or re-save it",
                                use_safetensors=True, dtype=torch.float32)
        model.eval()
        return model, self.load_processor(path)

    def load_processor(self, path: Path):
        from transformers import AutoProcessor

        return load_pretrained(AutoProcessor, path, "the processor (tokenizer + image processor files)",
                               fix="re-download or re-save it")

    def empty_model(self):
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration(self.config)

    def tower_features(self, model, pixel_values):
        out = model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        selected = out.hidden_states[self.config.vision_feature_layer]
        return selected[:, 1:] if self.config.vision_feature_select_strategy == "default" else selected

    def project(self, model, features):
        return model.model.multi_modal_projector(features)

    def connector(self, model):
        return model.model.multi_modal_projector

    def connector_output_layer(self, model):
        return model.model.multi_modal_projector.linear_2

    def input_embeddings(self, model):
        return model.get_input_embeddings()

    def decoder_parts(self, model) -> DecoderParts:
        core = model.model.language_model
        return DecoderParts(core=core, embed_tokens=core.embed_tokens, layers=core.layers, norm=core.norm,
                            lm_head=model.lm_head, rotary=core.rotary_emb, facts=self.text)

    @property
    def llm_module_pattern(self) -> str:
        return r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"

    # -- files --------------------------------------------------------------------------------------------

    def checkpoint_key(self, key: str) -> CheckpointKey | None:
        if (rest := _strip(key, ("language_model.model.", "model.language_model."))) is not None:
            return CheckpointKey("llm", "model." + rest)
        if (rest := _strip(key, ("language_model.lm_head.", "lm_head."))) is not None:
            return CheckpointKey("llm", "lm_head." + rest)
        if (rest := _strip(key, ("vision_tower.vision_model.", "model.vision_tower.vision_model.",
                                 "model.vision_tower.", "vision_tower."))) is not None:
            return CheckpointKey("vision", rest)
        if (rest := _strip(key, ("multi_modal_projector.", "model.multi_modal_projector."))) is not None:
            return CheckpointKey("connector", rest)
        return None

    def preprocessing(self, processor) -> dict:
        return image_preprocessing(processor.image_processor)

    def prompt(self, processor) -> PromptSpec:
        return chat_prompt(processor, self.image_tokens, self.source)


def read_config_json(path: Path) -> dict:
    """config.json of a model directory, or a one-line error naming it."""
    return read_json(Path(path) / "config.json", fix="the model directory is damaged; download it again",
                     missing=f"{path}: not a model directory (no config.json); run the stage that produces it")
