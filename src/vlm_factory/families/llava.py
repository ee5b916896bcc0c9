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

import copy
import math
from pathlib import Path

import torch

from vlm_factory.errors import UserError, first_line
from vlm_factory.hf_files import load_pretrained
from vlm_factory.families.base import CheckpointKey, DecoderParts, ModelFamily, PromptSpec, TextFacts, VisionFacts
from vlm_factory.families.facts_bounds import (BOOL, FEATURE_LAYER, MAX_CHANNELS, MAX_IMAGE_SIZE,
                                               MAX_IMAGE_TOKENS, MAX_VOCAB, STRING, Rule, check_json_keys,
                                               check_text_facts, check_vision_facts, int_in, one_of,
                                               positive_int)
from vlm_factory.families.hf_config import (TEXT_FACT_KEYS, VISION_FACT_KEYS, nested_config_rules, stated_facts,
                                            text_facts)
from vlm_factory.families.param_counts import decoder_params, vision_tower_params
from vlm_factory.families.processor_files import chat_template_sources, check_processor_files

TOWERS = {"siglip_vision_model": "siglip", "clip_vision_model": "clip"}
LLMS = ("llama", "qwen2")
# clip.cpp runs GELU (tanh form) or, with use_gelu false, quick GELU.
GGUF_TOWER_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "quick_gelu")
# The CLS-ordering defect of the pinned llama.cpp (see eval/verdict notes and the README).
CLIP_GGUF_NOTE = ("llama.cpp (pinned) puts a CLIP tower's CLS token after the patches "
                  "(ggml-org/llama.cpp#25814, fix PR #25844): its mmproj fails the embedding gate")
PROMPT_QUESTION, PROMPT_ANSWER = "{question}", "{answer}"
RESAMPLE_NAMES = {0: "nearest", 2: "bilinear", 3: "bicubic"}

# The image token's id: transformers 5 writes `image_token_index`, some configs `image_token_id`.
IMAGE_TOKEN_KEYS = ("image_token_index", "image_token_id")


def _config_rules() -> dict[str, Rule]:
    """Every config.json key the LLaVA facts read, with its rule (facts_bounds.py holds the bounds)."""
    rules = nested_config_rules()
    rules.update({key: int_in(0, MAX_VOCAB - 1) for key in IMAGE_TOKEN_KEYS})
    rules.update({
        "vision_feature_layer": FEATURE_LAYER, "vision_feature_select_strategy": one_of("default", "full"),
        "image_seq_length": positive_int(MAX_IMAGE_TOKENS), "projector_hidden_act": STRING,
        "tie_word_embeddings": BOOL, "multimodal_projector_bias": BOOL, "text_config.attention_bias": BOOL,
        "text_config.mlp_bias": BOOL, "text_config.tie_word_embeddings": BOOL, "vision_config.hidden_act": STRING,
        "vision_config.vision_use_head": BOOL,
    })
    return rules


CONFIG_RULES = _config_rules()

_ABSENT = object()


def strip_prefix(key: str, prefixes: tuple[str, ...]) -> str | None:
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix):]
    return None


def _size_dict(size) -> dict | None:
    if size is None:
        return None
    items = size.items() if hasattr(size, "items") else vars(size).items()
    return {k: int(v) for k, v in items if v is not None}


def image_preprocessing(image_processor, source: str = "the image processor") -> dict:
    """A CLIP/SigLIP/LLaVA image processor's steps as plain data (runtime/preprocess.py implements it).

    The pad colour is what LlavaImageProcessor computes: int(mean * 255) per channel. A setting that
    cannot be read or makes no image (a zero std, a negative size) is refused naming `source` and the key.
    """
    p = image_processor

    def setting(key: str, read=lambda value: value, default=_ABSENT):
        try:
            value = getattr(p, key) if default is _ABSENT else getattr(p, key, default)
            return read(value)
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as exc:
            raise UserError(f"{source}: {key} is not usable ({first_line(exc)}); fix or re-download it") from None

    mean = setting("image_mean", _channel_numbers)
    normalize = setting("do_normalize", bool)
    return {
        "convert_rgb": setting("do_convert_rgb", bool, True),
        "pad_to_square": setting("do_pad", bool, False),
        "pad_color": [int(m * 255) for m in mean],
        "resize": setting("size", _sizes) if setting("do_resize", bool) else None,
        "resample": setting("resample", lambda r: RESAMPLE_NAMES.get(int(r), str(r))),
        "center_crop": setting("crop_size", _sizes) if setting("do_center_crop", bool, False) else None,
        "rescale_factor": setting("rescale_factor", _positive_number) if setting("do_rescale", bool) else 1.0,
        "mean": mean if normalize else [0.0, 0.0, 0.0],
        "std": setting("image_std", _divisors) if normalize else [1.0, 1.0, 1.0],
        "layout": "NCHW", "dtype": "float32",
    }


def _channel_numbers(values) -> list[float]:
    numbers = [float(v) for v in values]
    if not 1 <= len(numbers) <= MAX_CHANNELS or not all(math.isfinite(n) for n in numbers):
        raise ValueError(f"must be 1..{MAX_CHANNELS} finite numbers, one per channel; got {numbers[:MAX_CHANNELS]}")
    return numbers


def _divisors(values) -> list[float]:
    numbers = _channel_numbers(values)
    if not all(n > 0 for n in numbers):
        raise ValueError(f"must be above 0, images are divided by it; got {numbers}")
    return numbers


def _positive_number(value) -> float:
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"must be a finite number above 0; got {number}")
    return number


def _sizes(size) -> dict | None:
    sizes = _size_dict(size)
    if sizes is not None and not (sizes and all(1 <= v <= MAX_IMAGE_SIZE for v in sizes.values())):
        raise ValueError(f"must be sizes in 1..{MAX_IMAGE_SIZE} px; got {sizes}")
    return sizes


def _processor_dir(processor) -> Path | None:
    """The directory a processor was loaded from (transformers records it on the tokenizer), if any."""
    name = getattr(getattr(processor, "tokenizer", None), "name_or_path", None)
    return Path(name) if isinstance(name, str) and name and Path(name).is_dir() else None


def _template_origin(processor, template: str, source: str) -> str:
    """The file `template` was read from (what an error about it names), else a description."""
    directory = _processor_dir(processor)
    if directory is not None:
        for path, text in chat_template_sources(directory):
            if text == template:
                return str(path)
    return f"{source}: the processor's chat template"


def chat_prompt(processor, image_tokens: int, source: str) -> PromptSpec:
    """The checkpoint's own chat template, rendered once with placeholders for question and answer."""
    tokenizer = processor.tokenizer
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one is the chat template
        template = template.get("default")
    if not template or not isinstance(template, str):
        raise UserError(f"{source}: no chat template (chat_template.json, chat_template.jinja or "
                        "tokenizer_config.json); add the model's template to the checkpoint")
    origin = _template_origin(processor, template, source)
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT_QUESTION}]}
    assistant = {"role": "assistant", "content": [{"type": "text", "text": PROMPT_ANSWER}]}
    try:
        prompt = processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False,
                                               chat_template=template)
        full = processor.apply_chat_template([user, assistant], tokenize=False, chat_template=template)
    except RecursionError:
        raise UserError(f"{origin}: the chat template is nested too deeply to be a real one") from None
    except Exception as exc:  # jinja2 errors carry no common base with transformers'
        raise UserError(f"{origin}: the chat template cannot be rendered ({first_line(exc)})") from None
    if not isinstance(prompt, str) or not isinstance(full, str):
        raise UserError(f"{origin}: the chat template renders no text")
    image_token = processor.image_token
    if prompt.count(PROMPT_QUESTION) != 1 or prompt.count(image_token) != 1:
        raise UserError(f"{origin}: the chat template renders {prompt.count(image_token)} image token(s) "
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
                            "sees other pixels there: the parity's preprocessing gate fails it (cosine "
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
        return text_facts(self.config)

    @property
    def vision(self) -> VisionFacts:
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise UserError(f"{self.source}: vision_feature_layer {layer!r} must be one layer index within "
                            f"the tower's {self.config.vision_config.num_hidden_layers} layers")
        return self._vision_facts(layer)

    def _vision_facts(self, layer: int) -> VisionFacts:
        """The tower's facts with the connector reading hidden state `layer` (negative: from the end)."""
        v = self.config.vision_config
        if not -v.num_hidden_layers - 1 <= layer <= v.num_hidden_layers:
            raise UserError(f"{self.config_file}: vision_feature_layer must index the tower's hidden states, "
                            f"{-v.num_hidden_layers - 1}..{v.num_hidden_layers} for vision_config.num_hidden_layers "
                            f"{v.num_hidden_layers} (got {layer})")
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
            raise UserError(f"{self.config_file}: image_seq_length is {declared} but the vision tower yields {tokens} "
                            "tokens per image; fix image_seq_length in config.json")
        return tokens

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    # -- bounds ---------------------------------------------------------------------------------------

    @classmethod
    def check_config_json(cls, raw: dict, where: str) -> None:
        check_json_keys(raw, CONFIG_RULES, where)
        check_text_facts(stated_facts(raw, TEXT_FACT_KEYS), TEXT_FACT_KEYS, where)
        check_vision_facts(stated_facts(raw, VISION_FACT_KEYS), VISION_FACT_KEYS, where)

    def validate(self) -> None:
        where = self.config_file
        # The same rules on the config transformers built (defaults filled in; also for configs made in code).
        self.check_config_json(self.config.to_dict(), where)
        layers = self.config.vision_feature_layer
        try:
            text = self.text
            towers = [self._vision_facts(layer)  # a list is refused per format, later; each index must fit
                      for layer in (layers if isinstance(layers, list) else [layers])]
        except AttributeError as exc:  # a sub-config of another model type lacks a key the facts read
            raise UserError(f"{where}: no {exc.name or first_line(exc)} in text_config (model_type "
                            f"{self.config.text_config.model_type!r}) or vision_config (model_type "
                            f"{self.config.vision_config.model_type!r}), which the LLaVA family reads") from None
        check_text_facts(text.as_dict(), TEXT_FACT_KEYS, where)
        for vision in towers:
            check_vision_facts(vision.as_dict(), VISION_FACT_KEYS, where)
        if not self.image_token_id < text.vocab_size:
            raise UserError(f"{where}: {' / '.join(IMAGE_TOKEN_KEYS)} must be below text_config.vocab_size "
                            f"(got {self.image_token_id} with {text.vocab_size} tokens)")
        if isinstance(layers, int):
            self.image_tokens  # image_seq_length must be what the tower yields

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

        processor = self.load_processor(path)  # first: its files are small, the weights are not
        model = load_pretrained(LlavaForConditionalGeneration, path, "the checkpoint", fix="re-download or re-save it",
                                use_safetensors=True, dtype=torch.float32)
        model.eval()
        return model, processor

    def load_processor(self, path: Path):
        from transformers import AutoProcessor

        check_processor_files(path)  # a malformed file is named before transformers reads it
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
        if (rest := strip_prefix(key, ("language_model.model.", "model.language_model."))) is not None:
            return CheckpointKey("llm", "model." + rest)
        if (rest := strip_prefix(key, ("language_model.lm_head.", "lm_head."))) is not None:
            return CheckpointKey("llm", "lm_head." + rest)
        if (rest := strip_prefix(key, ("vision_tower.vision_model.", "model.vision_tower.vision_model.",
                                 "model.vision_tower.", "vision_tower."))) is not None:
            return CheckpointKey("vision", rest)
        if (rest := strip_prefix(key, ("multi_modal_projector.", "model.multi_modal_projector."))) is not None:
            return CheckpointKey("connector", rest)
        return None

    def alternative_preprocessing(self, image_processor):
        """The classic CLIP preprocessing (short side, centre crop) instead of letterbox."""
        return "centre_crop", "letterbox_gain_points", centre_crop_processor(image_processor)

    def preprocessing(self, processor) -> dict:
        return image_preprocessing(processor.image_processor, image_processor_file(processor, self.source))

    def prompt(self, processor) -> PromptSpec:
        return chat_prompt(processor, self.image_tokens, self.source)


def centre_crop_processor(image_processor):
    """The same image processor without pad-to-square: resize the short side, then centre crop."""
    variant = copy.deepcopy(image_processor)
    variant.do_pad = False
    return variant


def image_processor_file(processor, source: str) -> str:
    """The file the image processor's settings were read from: preprocessor_config.json (hub layout) or
    processor_config.json (transformers 5 nests them there)."""
    directory = _processor_dir(processor)
    if directory is not None:
        for name in ("preprocessor_config.json", "processor_config.json"):
            if (directory / name).is_file():
                return str(directory / name)
    return f"{source}: the image processor"
