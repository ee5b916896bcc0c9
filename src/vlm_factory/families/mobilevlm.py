"""The MobileVLM V2 family: a CLIP tower, the LDPv2 projector (MLP, 2x2 pooling, depthwise-conv residual),
MobileLLaMA (a plain Llama).

Covers mtgv/MobileVLM_V2-1.7B, -3B and -7B in their published tensor layout (model/mobilevlm.py holds
the model class transformers lacks): Llama keys at the top level of config.json, `mm_*` keys for the
vision side, tensors under `model.*` / `lm_head.*`, `model.vision_tower.vision_tower.vision_model.*`
and `model.mm_projector.*`. The hub repositories ship pickled weights (pytorch_model.bin) and no image
processor or chat template; a directory this family loads holds the same tensors as safetensors, plus:

- `vision_config` in config.json: the tower's CLIPVisionConfig (the original reads it from the hub by
  `mm_vision_tower`; offline it must be written down: openai/clip-vit-large-patch14-336's vision_config);
- `image_token_index` in config.json: the id of an `<image>` token in the tokenizer, below vocab_size
  (the original splices image features in at a -200 placeholder no embedding row holds);
- preprocessor_config.json: the tower's CLIPImageProcessor settings. Images are padded to a square
  with the mean colour first when config.json says `image_aspect_ratio: pad` (all V2 checkpoints), as
  MobileVLM's `process_images` does: the processor built here is a LLaVA one with `do_pad` from there.

Without a chat template the processor gets MobileVLM's own "v1" conversation (`V1_TEMPLATE`), the one
its inference script uses: "<system> USER: <image>\\n{question} ASSISTANT:".

One image is (grid / 2)^2 tokens (144 for the 24 x 24 grid of a 336 px / patch 14 tower): LDPv2 pools
2 x 2 patches, so the grid side must be even.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from vlm_factory.errors import UserError, first_line
from vlm_factory.families.base import CheckpointKey, DecoderParts, ModelFamily, PromptSpec, TextFacts, VisionFacts
from vlm_factory.families.facts_bounds import (BOOL, MAX_HIDDEN, MAX_LAYERS, MAX_VOCAB, OBJECT, STRING, TEXT_BOUNDS,
                                               VISION_BOUNDS, Rule, check_json_keys, check_text_facts,
                                               check_vision_facts, int_in, one_of, optional, positive_int)
from vlm_factory.families.hf_config import NULL_DERIVED, VISION_FACT_KEYS, stated_facts
from vlm_factory.families.llava import (CLIP_GGUF_NOTE, centre_crop_processor, chat_prompt, image_preprocessing,
                                        image_processor_file, strip_prefix)
from vlm_factory.families.param_counts import decoder_params, vision_tower_params
from vlm_factory.families.processor_files import chat_template_sources, check_processor_files
from vlm_factory.hf_files import load_pretrained

# MobileLLaMA's facts sit at the top level of config.json, as in a LlamaConfig.
TEXT_FACT_KEYS = {
    "hidden_size": "hidden_size", "intermediate_size": "intermediate_size", "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
    "vocab_size": "vocab_size", "max_positions": "max_position_embeddings",
    "rope_theta": "rope_parameters.rope_theta", "rms_norm_eps": "rms_norm_eps",
    "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id",
}
IMAGE_TOKEN_KEYS = ("image_token_index", "image_token_id")  # the second is an alias transformers maps
PROJECTOR = "ldpnetv2"
# What config.json must hold beyond the published keys, and what to write there.
REQUIRED_KEYS = {
    "vision_config": "MobileVLM names its tower (mm_vision_tower) but not its shape, which cannot be fetched "
                     "offline; add the tower's CLIP vision config as vision_config (for the published checkpoints "
                     "the vision_config of openai/clip-vit-large-patch14-336's config.json)",
    "image_token_index": "MobileVLM marks the image with id -200, which no tokenizer or embedding row holds; add "
                         "an <image> token to the tokenizer (and a row to the embeddings) and give its id here",
}
# MobileVLM's "v1" conversation (mobilevlm/conversation.py, conv_vicuna_v1) as a chat template, written here.
V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the user's questions.")
V1_TEMPLATE = (
    "{{ '" + V1_SYSTEM.replace("'", "\\'") + " ' }}"
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{{ ' ' }}{% else %}{{ 'ASSISTANT: ' }}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{{ '</s>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# llama.cpp's LDPv2 graph reshapes the patches to a fixed 24 x 24 grid (tools/mtmd/models/llava.cpp, n_patch = 24).
LLAMA_CPP_LDPV2_GRID = 24
# Tensors an older transformers saved as persistent buffers: recomputed, never read.
DERIVED_BUFFERS = re.compile(r".*\.(position_ids|rotary_emb\.inv_freq)$")


def _config_rules() -> dict[str, Rule]:
    """Every config.json key the MobileVLM facts read, with its rule (facts_bounds.py holds the bounds)."""
    rules: dict[str, Rule] = {"model_type": STRING, "rope_parameters": optional(OBJECT),
                              "rope_theta": TEXT_BOUNDS["rope_theta"],  # transformers 4 configs (the published)
                              "tie_word_embeddings": BOOL, "attention_bias": BOOL, "mlp_bias": BOOL}
    for fact, key in TEXT_FACT_KEYS.items():
        rules[key] = optional(TEXT_BOUNDS[fact]) if fact in NULL_DERIVED else TEXT_BOUNDS[fact]
    rules.update({"vision_config": OBJECT, "vision_config.model_type": one_of("clip_vision_model"),
                  "vision_config.hidden_act": STRING})
    rules.update({key: VISION_BOUNDS[fact] for fact, key in VISION_FACT_KEYS.items()})
    rules.update({key: int_in(0, MAX_VOCAB - 1) for key in IMAGE_TOKEN_KEYS})
    rules.update({
        "mm_projector_type": Rule(f"{PROJECTOR!r} (MobileVLM V2's LDPv2; V1's 'ldpnet' and LLaVA's MLP projectors "
                                  "are other models)", lambda v: v == PROJECTOR),
        "mm_vision_select_layer": int_in(-MAX_LAYERS - 1, MAX_LAYERS),
        "mm_vision_select_feature": Rule("'patch' (LDPv2 pools a square grid of patches; 'cls_patch' adds the CLS "
                                         "token to it)", lambda v: v == "patch"),
        "mm_hidden_size": positive_int(MAX_HIDDEN),
        "vision_tower_type": one_of("clip"),
        "mm_use_im_start_end": Rule("false (MobileVLM V2 has no image start/end tokens)", lambda v: v is False),
        # "pad": letterbox with the mean colour (MobileVLM's process_images); anything else: CLIP's own resize + crop
        "image_aspect_ratio": optional(one_of("pad", "square")),
    })
    return rules


CONFIG_RULES = _config_rules()


class MobileVLMFamily(ModelFamily):
    name = "mobilevlm"
    model_types = ("mobilevlm",)
    description = "MobileVLM V2: CLIP tower + LDPv2 projector (MLP, 2x2 pooling, conv residual) + MobileLLaMA"
    format_support = {
        "gguf": None, "onnx": None, "coreml": None, "tflite": None,
    }
    format_notes = {"gguf": "projector 'ldpv2', for the published towers' 24x24 patch grid only (llama.cpp's graph "
                            "is built for it); the pinned llama.cpp orders the CLIP tower's CLS token after the "
                            "patches (ggml-org/llama.cpp#25814): the embedding gate fails the export and says so. "
                            "llama.cpp resizes a non-square image and then pads it, MobileVLM pads and then "
                            "resizes: the parity's preprocessing gate fails it (cosine 0.97 tall / 0.98 wide "
                            "on the shrunk MobileVLM V2)"}
    variants_refused = ("projectors other than LDPv2 (mm_projector_type 'ldpnetv2')",
                        "towers other than CLIP, or whose patch grid has an odd side",
                        "checkpoints without vision_config and image_token_index in config.json")

    # -- identity -----------------------------------------------------------------------------------

    @property
    def variant(self) -> str:
        return "clip + ldpv2 + llama"

    def format_refusal(self, fmt: str) -> str | None:
        reason = super().format_refusal(fmt)
        # llama.cpp's ldpv2 graph is built for one grid only (the published 336 px / patch 14 towers).
        if reason is None and fmt == "gguf" and self._grid != LLAMA_CPP_LDPV2_GRID:
            return (f"llama.cpp's ldpv2 graph reshapes a {LLAMA_CPP_LDPV2_GRID}x{LLAMA_CPP_LDPV2_GRID} patch grid, "
                    f"this tower makes {self._grid}x{self._grid}")
        return reason

    def known_issue(self, fmt: str) -> str | None:
        """llama.cpp runs ldpv2 in its llava graph, CLS-ordering defect included."""
        return CLIP_GGUF_NOTE if fmt == "gguf" else None

    # -- facts ----------------------------------------------------------------------------------------

    @property
    def text(self) -> TextFacts:
        c = self.config
        heads = c.num_attention_heads
        rope = getattr(c, "rope_parameters", None) or {}
        return TextFacts(
            arch="llama", hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_layers=c.num_hidden_layers, num_heads=heads, num_kv_heads=c.num_key_value_heads or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads, vocab_size=c.vocab_size,
            max_positions=c.max_position_embeddings, rope_theta=float(rope.get("rope_theta", 10000.0)),
            rms_norm_eps=float(c.rms_norm_eps), qkv_bias=bool(getattr(c, "attention_bias", False)),
            tied_embeddings=bool(getattr(c, "tie_word_embeddings", False)), bos_token_id=c.bos_token_id,
            eos_token_id=c.eos_token_id, pad_token_id=getattr(c, "pad_token_id", None))

    @property
    def vision(self) -> VisionFacts:
        v = self.config.vision_config
        return VisionFacts(
            tower="clip", image_size=v.image_size, patch_size=v.patch_size, num_channels=getattr(v, "num_channels", 3),
            hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_layers=v.num_hidden_layers,
            num_heads=v.num_attention_heads, layer_norm_eps=float(v.layer_norm_eps), hidden_act=v.hidden_act,
            has_cls_token=True, feature_layer=self.config.mm_vision_select_layer % (v.num_hidden_layers + 1),
            drop_cls=True)

    @property
    def _grid(self) -> int:
        return self.config.vision_config.image_size // self.config.vision_config.patch_size

    @property
    def image_tokens(self) -> int:
        return (self._grid // 2) ** 2

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_index)

    @property
    def connector_type(self) -> str:
        return "ldpv2"

    def param_counts(self) -> dict[str, int]:
        d_in, d = self.config.vision_config.hidden_size, self.config.hidden_size
        text = self.text
        llm = decoder_params(text, o_bias=text.qkv_bias, mlp_bias=bool(getattr(self.config, "mlp_bias", False)))
        return {"vision_tower": vision_tower_params(self.vision),
                # mlp: two Linear with bias; peg: a depthwise 3x3 conv (one 3x3 kernel per channel) with bias
                "projector": d_in * d + d + d * d + d + 9 * d + d,
                "llm_embeddings": llm["embeddings"], "llm_lm_head": llm["lm_head"], "llm_rest": llm["rest"]}

    # -- bounds ---------------------------------------------------------------------------------------

    @classmethod
    def check_config_json(cls, raw: dict, where: str) -> None:
        for key, fix in REQUIRED_KEYS.items():  # first: null here is absence, not a value of the wrong type
            aliases = IMAGE_TOKEN_KEYS if key == "image_token_index" else (key,)
            if not any(raw.get(alias) is not None for alias in aliases):
                raise UserError(f"{where}: no {key}: {fix}")
        check_json_keys(raw, CONFIG_RULES, where)
        text = stated_facts(raw, TEXT_FACT_KEYS)
        vision = stated_facts(raw, VISION_FACT_KEYS)
        check_text_facts(text, TEXT_FACT_KEYS, where)
        check_vision_facts(vision, VISION_FACT_KEYS, where)
        if "image_size" in vision and "patch_size" in vision:
            _check_grid(vision["image_size"], vision["patch_size"], where)
        if raw.get("mm_hidden_size") is not None and "hidden_size" in vision \
                and raw["mm_hidden_size"] != vision["hidden_size"]:
            raise UserError(f"{where}: mm_hidden_size must equal vision_config.hidden_size, the width the projector "
                            f"reads (got {raw['mm_hidden_size']} and {vision['hidden_size']})")
        # The last step before transformers reads config.json (registry.family_of): it must know the model type.

    @classmethod
    def config_class(cls):
        from vlm_factory.model.mobilevlm import MobileVLMConfig  # late: it imports transformers' modelling code

        return MobileVLMConfig

    def validate(self) -> None:
        where = self.config_file
        # The same rules on the config transformers built (its defaults filled in; also for configs made in code).
        self.check_config_json(self.config.to_dict(), where)
        text, vision = self.text, self.vision
        check_text_facts(text.as_dict(), TEXT_FACT_KEYS, where)
        check_vision_facts(vision.as_dict(), VISION_FACT_KEYS, where)
        layers, layer = vision.num_layers, self.config.mm_vision_select_layer
        if not -layers - 1 <= layer <= layers:
            raise UserError(f"{where}: mm_vision_select_layer must index the tower's hidden states, "
                            f"{-layers - 1}..{layers} for vision_config.num_hidden_layers {layers} (got {layer})")
        if not self.image_token_id < text.vocab_size:
            raise UserError(f"{where}: image_token_index must be below vocab_size "
                            f"(got {self.image_token_id} with {text.vocab_size} tokens)")

    # -- torch ------------------------------------------------------------------------------------------

    def load(self, path: Path):
        from vlm_factory.model.mobilevlm import MobileVLMForCausalLM

        processor = self.load_processor(path)  # first: its files are small, the weights are not
        model, report = load_pretrained(MobileVLMForCausalLM, path, "the checkpoint", fix="re-download or re-save it",
                                        use_safetensors=True, dtype=torch.float32, output_loading_info=True)
        _check_load_report(report, path)
        model.eval()
        return model, processor

    def load_processor(self, path: Path):
        """The tokenizer, the tower's image processor with MobileVLM's pad-to-square (`image_aspect_ratio`)
        and the chat template (MobileVLM's v1 conversation when the directory has none), as a LlavaProcessor:
        what `prompt` and `preprocessing` read, and what save_pretrained writes back."""
        from transformers import AutoTokenizer, LlavaImageProcessorPil, LlavaProcessor

        path = Path(path)
        check_processor_files(path)  # a malformed file is named before transformers reads it
        fix = "re-download or re-save it"
        tokenizer = load_pretrained(AutoTokenizer, path, "the tokenizer files", fix=fix)
        image_processor = load_pretrained(LlavaImageProcessorPil, path,
                                          "the image processor (preprocessor_config.json: the tower's CLIP settings)",
                                          fix="copy in the vision tower's preprocessor_config.json",
                                          do_pad=self.config.image_aspect_ratio == "pad")
        image_token = getattr(tokenizer, "image_token", None) or "<image>"
        if tokenizer.convert_tokens_to_ids(image_token) != self.image_token_id:
            raise UserError(f"{path}: the tokenizer's {image_token!r} token is not id {self.image_token_id}, the "
                            f"image_token_index of {self.config_file}; add the token to the tokenizer or fix the id")
        sources = chat_template_sources(path)
        try:
            # patch_size: the pixels one visual token spans (2x2 patches), so the processor expands <image>
            # into the pooled token count.
            return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  patch_size=2 * self.vision.patch_size, vision_feature_select_strategy="full",
                                  chat_template=sources[0][1] if sources else V1_TEMPLATE, image_token=image_token,
                                  num_additional_image_tokens=0)
        except Exception as exc:  # tokenizers and jinja raise their own exception types
            raise UserError(f"{path}: the processor cannot be built ({first_line(exc)}); {fix}") from None

    def empty_model(self):
        from vlm_factory.model.mobilevlm import MobileVLMForCausalLM

        return MobileVLMForCausalLM(self.config)

    def tower_features(self, model, pixel_values):
        return model.model.vision_tower(pixel_values)

    def project(self, model, features):
        return model.model.mm_projector(features)

    def connector(self, model):
        return model.model.mm_projector

    def connector_output_layer(self, model):
        # The MLP's last Linear: the pooling after it averages and the PEG adds a residual, so its scale
        # carries through to the image embeddings (up to the PEG's bias).
        return model.model.mm_projector.mlp.mlp[2]

    def input_embeddings(self, model):
        return model.get_input_embeddings()

    def decoder_parts(self, model) -> DecoderParts:
        core = model.model  # a LlamaModel: its forward is the text decoder's alone
        return DecoderParts(core=core, embed_tokens=core.embed_tokens, layers=core.layers, norm=core.norm,
                            lm_head=model.lm_head, rotary=core.rotary_emb, facts=self.text)

    @property
    def llm_module_pattern(self) -> str:
        # Anchored: the CLIP tower's blocks have q/k/v projections too (model.vision_tower...encoder.layers.N).
        return r"model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"

    def alternative_preprocessing(self, image_processor):
        """CLIP's own short-side resize + centre crop instead of MobileVLM's pad to square."""
        return "centre_crop", "letterbox_gain_points", centre_crop_processor(image_processor)

    # -- files --------------------------------------------------------------------------------------------

    def checkpoint_key(self, key: str) -> CheckpointKey | None:
        if key.startswith(("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")):
            return CheckpointKey("llm", key)  # the LLM's names are already a *ForCausalLM's
        if (rest := strip_prefix(key, ("model.vision_tower.vision_tower.vision_model.",))) is not None:
            return CheckpointKey("vision", rest)
        if (rest := strip_prefix(key, ("model.mm_projector.",))) is not None:
            return CheckpointKey("connector", rest)
        return None

    def preprocessing(self, processor) -> dict:
        return image_preprocessing(processor.image_processor, image_processor_file(processor, self.source))

    def prompt(self, processor) -> PromptSpec:
        return chat_prompt(processor, self.image_tokens, self.source)


def _check_grid(image_size: int, patch_size: int, where: str) -> None:
    grid = image_size // patch_size
    if grid % 2:
        raise UserError(f"{where}: vision_config.image_size {image_size} / vision_config.patch_size {patch_size} "
                        f"gives a {grid}x{grid} patch grid; LDPv2 pools 2x2 patches and needs an even side "
                        "(MobileVLM V2's tower: 336 / 14 = 24)")


def _check_load_report(report: dict, path: Path) -> None:
    """Every tensor of the model came from the checkpoint and every tensor of the checkpoint was used."""
    missing = sorted(report.get("missing_keys") or [])
    unexpected = sorted(k for k in report.get("unexpected_keys") or [] if not DERIVED_BUFFERS.fullmatch(k))
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, which no part of the model reads"
        raise UserError(f"{path}: the checkpoint {what} ({len(missing)} missing, {len(unexpected)} unexpected "
                        "tensors); a MobileVLM V2 checkpoint has the published tensor names")
