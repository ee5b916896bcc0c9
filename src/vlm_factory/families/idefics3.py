"""The Idefics3 family (SmolVLM, nanoVLM, Granite-Docling): a SigLIP-style tower, pixel shuffle into one
linear layer, a Llama LLM; images cut into tiles plus a global view.

Covers `Idefics3ForConditionalGeneration` checkpoints (HuggingFaceTB/SmolVLM-256M/500M/2.2B-Instruct):
tensors under `model.vision_model.*`, `model.connector.modality_projection.proj.*`,
`model.text_model.*` and `lm_head.*` (absent when tied, as SmolLM2 is).

What differs from LLaVA, and where each part answers it:
- the tower reads every tile at `vision_config.image_size` and its last hidden state goes through the
  post-layernorm (no feature layer, no CLS);
- the connector folds `scale_factor` x `scale_factor` neighbouring patches into one token
  (pixel shuffle) and projects it with one bias-free Linear: a tile gives
  (image_size / patch / scale_factor)^2 tokens (`image_tokens`);
- one image is `rows x cols` tiles + the global view (`image_views`, runtime/tiling.py for devices),
  and the prompt's `<image>` becomes one marked block per view (`PromptSpec.image_layout`).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from vlm_factory.errors import UserError, first_line
from vlm_factory.families.base import CheckpointKey, DecoderParts, ImageViews, ModelFamily, PromptSpec, TextFacts, VisionFacts
from vlm_factory.families.facts_bounds import (BOOL, MAX_VOCAB, STRING, Rule, check_json_keys, check_text_facts,
                                               check_vision_facts, int_in, positive_int)
from vlm_factory.families.hf_config import (TEXT_FACT_KEYS, VISION_FACT_KEYS, nested_config_rules, stated_facts,
                                            text_facts)
from vlm_factory.families.llava import chat_prompt, image_processor_file, strip_prefix
from vlm_factory.families.param_counts import decoder_params, vision_tower_params
from vlm_factory.families.processor_files import check_processor_files
from vlm_factory.hf_files import load_pretrained

LLMS = ("llama",)
MAX_SCALE_FACTOR = 64  # real checkpoints use 2..4


def _config_rules() -> dict[str, Rule]:
    rules = nested_config_rules()
    rules.update({"image_token_id": int_in(0, MAX_VOCAB - 1), "scale_factor": positive_int(MAX_SCALE_FACTOR),
                  "tie_word_embeddings": BOOL, "text_config.tie_word_embeddings": BOOL,
                  "text_config.attention_bias": BOOL, "text_config.mlp_bias": BOOL,
                  "vision_config.hidden_act": STRING})
    return rules


CONFIG_RULES = _config_rules()


def tile_position_ids(side: int) -> torch.Tensor:
    """[side * side] int64: the position ids transformers' Idefics3VisionEmbeddings gives the patches of a whole
    tile of `side` x `side` patches (an all-ones patch mask), by its own float32 arithmetic. Not always
    0..N-1: its bucketing repeats a row or column for some sizes (19, 25, 29, 31, ... patches per side)."""
    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    step = 1.0 / torch.tensor([side])  # an int64 count, as the mask's sum is
    coords = torch.clamp(torch.arange(side, dtype=torch.float32)[None, :] * step[:, None], max=(1.0 - 1e-6))
    buckets = torch.bucketize(coords, boundaries, right=True)[0]
    return (buckets[:, None] * side + buckets[None, :]).reshape(-1)


class Idefics3Family(ModelFamily):
    name = "idefics3"
    model_types = ("idefics3",)
    description = "SmolVLM / Idefics3: SigLIP-style tower on tiles + global view, pixel shuffle + linear, Llama LLM"
    format_support = {"gguf": None, "onnx": None, "coreml": None, "tflite": None}
    format_notes = {"gguf": "llama.cpp cuts the image into tiles itself (projector 'idefics3'); the parity's "
                            "preprocessing check compares its embeddings of the raw image with those of the "
                            "processor's own tiles"}
    variants_refused = ("LLMs other than Llama (SmolLM2)",)

    # -- identity -----------------------------------------------------------------------------------

    @property
    def variant(self) -> str:
        return f"siglip + pixel shuffle x{self.config.scale_factor} + {self.config.text_config.model_type}"

    def format_refusal(self, fmt: str) -> str | None:
        reason = super().format_refusal(fmt)
        if reason is not None:
            return reason
        if self.config.text_config.model_type not in LLMS:
            return f"LLM {self.config.text_config.model_type!r} (supported: {', '.join(LLMS)})"
        if fmt == "gguf" and self.scale_factor < 2:
            # clip.cpp's build_patch_merge_permute: GGML_ASSERT(scale_factor > 1), which aborts the process
            return f"llama.cpp's idefics3 graph needs a pixel shuffle scale_factor above 1 (this model: {self.scale_factor})"
        return None

    # -- facts ----------------------------------------------------------------------------------------

    @property
    def text(self) -> TextFacts:
        return text_facts(self.config)

    @property
    def vision(self) -> VisionFacts:
        v = self.config.vision_config
        return VisionFacts(
            tower="siglip", image_size=v.image_size, patch_size=v.patch_size, num_channels=getattr(v, "num_channels", 3),
            hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_layers=v.num_hidden_layers,
            num_heads=v.num_attention_heads, layer_norm_eps=float(v.layer_norm_eps), hidden_act=v.hidden_act,
            has_cls_token=False, feature_layer=v.num_hidden_layers, drop_cls=False)

    @property
    def scale_factor(self) -> int:
        return int(self.config.scale_factor)

    @property
    def image_tokens(self) -> int:
        side = self.vision.image_size // self.vision.patch_size
        return (side // self.scale_factor) ** 2

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    def largest_grid(self, processor=None) -> tuple[int, int]:
        """The tiles of a square image at the processor's longest edge, the most any image makes."""
        if processor is None:
            raise ValueError("the Idefics3 family needs the processor to count tiles")
        from vlm_factory.runtime.tiling import tiling_spec

        spec = tiling_spec(processor.image_processor)
        if not spec["split"] or not spec["resize_longest_edge"]:
            return 0, 0
        per_side = -(-min(spec["resize_longest_edge"], spec["max_resolution"]) // spec["tile_size"])
        return (per_side, per_side) if per_side > 1 else (0, 0)

    @property
    def connector_type(self) -> str:
        return "idefics3"

    def param_counts(self) -> dict[str, int]:
        vision, text = self.vision, self.config.text_config
        llm = decoder_params(self.text, o_bias=self.text.qkv_bias, mlp_bias=bool(getattr(text, "mlp_bias", False)))
        return {"vision_tower": vision_tower_params(vision),
                "projector": vision.hidden_size * self.scale_factor ** 2 * self.text.hidden_size,
                "llm_embeddings": llm["embeddings"], "llm_lm_head": llm["lm_head"], "llm_rest": llm["rest"]}

    # -- bounds ---------------------------------------------------------------------------------------

    @classmethod
    def check_config_json(cls, raw: dict, where: str) -> None:
        check_json_keys(raw, CONFIG_RULES, where)
        check_text_facts(stated_facts(raw, TEXT_FACT_KEYS), TEXT_FACT_KEYS, where)
        check_vision_facts(stated_facts(raw, VISION_FACT_KEYS), VISION_FACT_KEYS, where)

    def validate(self) -> None:
        where = self.config_file
        self.check_config_json(self.config.to_dict(), where)
        try:
            text, vision = self.text, self.vision
        except AttributeError as exc:
            raise UserError(f"{where}: no {exc.name or first_line(exc)} in text_config (model_type "
                            f"{self.config.text_config.model_type!r}) or vision_config, which the Idefics3 family "
                            "reads") from None
        check_text_facts(text.as_dict(), TEXT_FACT_KEYS, where)
        check_vision_facts(vision.as_dict(), VISION_FACT_KEYS, where)
        side = vision.image_size // vision.patch_size
        if side % self.scale_factor:
            raise UserError(f"{where}: scale_factor {self.scale_factor} must divide the tile's "
                            f"{side} patches per side (vision_config.image_size {vision.image_size} / patch_size "
                            f"{vision.patch_size}); fix scale_factor or the tower's sizes")
        if not self.image_token_id < text.vocab_size:
            raise UserError(f"{where}: image_token_id must be below text_config.vocab_size "
                            f"(got {self.image_token_id} with {text.vocab_size} tokens)")
        # Now, eagerly: tower_features runs inside graph tracers, which would record (or fake) this.
        self._tile_positions = tile_position_ids(side)

    # -- torch ------------------------------------------------------------------------------------------

    def load(self, path: Path):
        from transformers import Idefics3ForConditionalGeneration

        processor = self.load_processor(path)
        model = load_pretrained(Idefics3ForConditionalGeneration, path, "the checkpoint",
                                fix="re-download or re-save it", use_safetensors=True, dtype=torch.float32)
        model.eval()
        return model, processor

    def load_processor(self, path: Path):
        from transformers import AutoProcessor

        check_processor_files(path)
        # The PIL image processor on purpose: it is the one every installation has (the torchvision one
        # needs torchvision >= 0.27) and the one runtime/tiling.py reproduces bit for bit.
        return load_pretrained(AutoProcessor, path, "the processor (tokenizer + image processor files)",
                               fix="re-download or re-save it", backend="pil")

    def empty_model(self):
        from transformers import Idefics3ForConditionalGeneration

        return Idefics3ForConditionalGeneration(self.config)

    def tower_features(self, model, pixel_values):
        # Whole tiles only (image_views never pads), so every patch is real: transformers' forward with its
        # default all-ones mask, spelled out so that it traces to a static graph. Its embeddings place the
        # patches with bucketize and float arithmetic on that mask, which LiteRT and Core ML cannot lower;
        # for a whole tile they depend on its size alone, so they are computed once (`tile_position_ids`).
        vision = model.model.vision_model
        embeddings = vision.embeddings
        hidden = embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        hidden = hidden + embeddings.position_embedding(self._tile_positions.to(hidden.device))
        return vision.post_layernorm(vision.encoder(inputs_embeds=hidden).last_hidden_state)

    def project(self, model, features):
        return model.model.connector(features)

    def connector(self, model):
        return model.model.connector

    def connector_output_layer(self, model):
        return model.model.connector.modality_projection.proj

    def input_embeddings(self, model):
        return model.get_input_embeddings()

    def decoder_parts(self, model) -> DecoderParts:
        core = model.model.text_model
        return DecoderParts(core=core, embed_tokens=core.embed_tokens, layers=core.layers, norm=core.norm,
                            lm_head=model.lm_head, rotary=core.rotary_emb, facts=self.text)

    @property
    def llm_module_pattern(self) -> str:
        return r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj)"

    def image_views(self, image_processor, images) -> list[ImageViews]:
        views = []
        for image in images:  # one call per image: a batch would pad every image to the most tiles
            out = image_processor([[image]], return_tensors="pt", return_row_col_info=True)
            views.append(ImageViews(out.pixel_values[0], int(out["rows"][0][0]), int(out["cols"][0][0])))
        return views

    def view_rectangles(self, image_processor, width: int, height: int, rows: int = 0, cols: int = 0):
        # The processor resizes the image to whole tiles (stretching it a little), cuts rows x cols tiles
        # row-major, then appends the whole image squashed to one tile: every view lies inside the image.
        tiles = [(c / cols, r / rows, (c + 1) / cols, (r + 1) / rows) for r in range(rows) for c in range(cols)]
        return [*tiles, (0.0, 0.0, 1.0, 1.0)]

    def generation_pixels(self, views: list[ImageViews]) -> dict:
        return {"pixel_values": torch.stack([v.pixel_values for v in views])}

    def alternative_preprocessing(self, image_processor):
        """No splitting: the global view alone, what a runtime that skips tiling would feed the model."""
        variant = copy.deepcopy(image_processor)
        variant.do_image_splitting = False
        return "no_image_splitting", "splitting_gain_points", variant

    # -- files --------------------------------------------------------------------------------------------

    def checkpoint_key(self, key: str) -> CheckpointKey | None:
        if (rest := strip_prefix(key, ("model.text_model.",))) is not None:
            return CheckpointKey("llm", "model." + rest)
        if (rest := strip_prefix(key, ("lm_head.",))) is not None:
            return CheckpointKey("llm", "lm_head." + rest)
        if (rest := strip_prefix(key, ("model.vision_model.",))) is not None:
            return CheckpointKey("vision", rest)
        if (rest := strip_prefix(key, ("model.connector.",))) is not None:
            return CheckpointKey("connector", rest)
        return None

    def preprocessing(self, processor) -> dict:
        from vlm_factory.runtime.tiling import tiling_spec

        try:
            return tiling_spec(processor.image_processor)
        except (AttributeError, TypeError, ValueError) as exc:
            raise UserError(f"{image_processor_file(processor, self.source)}: the Idefics3 image processor "
                            f"settings are not usable ({first_line(exc)}); fix or re-download it") from None

    def prompt(self, processor) -> PromptSpec:
        from vlm_factory.runtime.tiling import prompt_layout

        layout = prompt_layout(processor)
        if layout["tokens_per_tile"] != self.image_tokens:
            raise UserError(f"{self.source}: the processor's image_seq_len is {layout['tokens_per_tile']} but a tile "
                            f"makes {self.image_tokens} tokens; fix image_seq_len in processor_config.json")
        return dataclasses.replace(chat_prompt(processor, self.image_tokens, self.source), image_layout=layout)
